"""Options that several commands take, declared once so their flags, defaults and help stay the same."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated

import typer

from ..settings import STAGES

TASK_HELP = "task name: a GLUE task, a built-in task (`osrm-lora data list`), or your own with --files"
GLUE_HELP = "local GLUE folder (default: $OSRM_LORA_GLUE_DIR, else the hub)"
FILES_HELP = "your own data: split=path (CSV/TSV/JSONL), e.g. --files train=train.csv --files dev=dev.csv"
OPTION_HELP = "file-task option key=value (text_column, text_pair_column, label_column, label_names, ...)"
FORCE_HELP = f"redo this stage even if cached (repeatable): {', '.join(STAGES)}"

# `train` takes these two as optional (it also lists the inits), hence the bare options.
MODEL = typer.Option("--model", "-m", help="base model: hub id, local folder or builtin:minilm")
TASK = typer.Option("--task", "-t", help=TASK_HELP)
ModelOpt = Annotated[str, MODEL]
TaskOpt = Annotated[str, TASK]
GlueDirOpt = Annotated[Path | None, typer.Option("--glue-dir", help=GLUE_HELP)]
FilesOpt = Annotated[list[str] | None, typer.Option("--files", help=FILES_HELP)]
TaskOptionOpt = Annotated[list[str] | None, typer.Option("--task-option", help=OPTION_HELP)]
TrustRemoteCodeOpt = Annotated[bool, typer.Option("--trust-remote-code")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="no progress bars or messages")]
JsonOpt = Annotated[bool, typer.Option("--json", help="print machine-readable JSON instead of tables")]
AllowMismatchOpt = Annotated[
    bool,
    typer.Option("--allow-model-mismatch", help="for experts: inputs recorded on different base models (by "
                 "content digest) are used together with a warning instead of refused"),
]
OverwriteOpt = Annotated[
    bool,
    typer.Option("--overwrite", help="let --out replace (or write into) an existing path that is not this command's "
                 "own kind of output; never an input of the command, a read-only path, or a file by a folder"),
]
PushOpt = Annotated[
    str | None,
    typer.Option("--push-to-hub", metavar="REPO", help="then upload the output folder with a model card (its "
                 "README.md) to this Hugging Face Hub repository, user/repo (created if missing)"),
]


def _stages(values: list[str] | None) -> list[str] | None:
    """--force takes stage names only: a typo is a usage error, not a run that redoes nothing."""
    unknown = [v for v in values or [] if v not in STAGES]
    if unknown:
        raise typer.BadParameter(f"unknown stage(s) {', '.join(unknown)}; stages: {', '.join(STAGES)}")
    return values


ForceOpt = Annotated[list[str] | None, typer.Option("--force", callback=_stages, help=FORCE_HELP)]
MaxLengthOpt = Annotated[int, typer.Option("--max-length", min=1, help="tokens per example (longer ones are cut)")]


def _finite(value: float | None) -> float | None:
    """A float option's callback: NaN and ±inf are usage errors (a NaN λ would write a NaN adapter)."""
    if value is not None and not math.isfinite(value):
        raise typer.BadParameter(f"{value} is not a finite number")
    return value


def float_option(*names: str, **kwargs):
    """`typer.Option` for a float: finite values only (`_finite`)."""
    return typer.Option(*names, callback=_finite, **kwargs)
