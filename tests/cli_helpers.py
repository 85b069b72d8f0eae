"""Shared helpers of the command-line tests: `osrm-lora` invoked in-process, refusals, the tiny file task."""

from __future__ import annotations

import re
from pathlib import Path

from typer.testing import CliRunner

from osrm_lora.cli import app

runner = CliRunner()
ANSI = re.compile(r"\x1b\[[0-9;]*m")


def invoke(*args):
    """Run the CLI; `result.plain` is its output without colours, on one line (rich wraps long messages)."""
    result = runner.invoke(app, [str(a) for a in args], env={"COLUMNS": "200", "NO_COLOR": "1", "TERM": "dumb"})
    result.plain = " ".join(ANSI.sub("", result.output).split())
    return result


def refused(*args) -> str:
    """The output of a command refused as a user error: exit code 2, no traceback."""
    result = invoke(*args)
    assert result.exit_code == 2, result.output
    assert isinstance(result.exception, SystemExit), result.exception
    return result.plain


def topic_args(data: Path) -> list:
    """--task options of the `topic` file task that `pipeline_helpers.write_tasks(data)` writes."""
    return ["--task", "topic", "--files", f"train={data / 'topic_train.jsonl'}", "--task-option",
            "text_column=sentence", "--quiet"]


def tiny_world(root: Path) -> Path:
    """`root` with the tiny model (root/model) and the synthetic tasks' files (root/data)."""
    from pipeline_helpers import write_tasks, write_tiny_model

    write_tiny_model(root / "model")
    write_tasks(root / "data")
    return root
