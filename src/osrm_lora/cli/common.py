"""What every command shares: the two consoles, the error report, JSON and table printing, option parsing.

Results go to `out` (stdout: a table, or JSON with --json); progress and messages go to `err` (stderr).
Nothing here imports torch: `--help` and `run --validate-only` stay light.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from typer._click.exceptions import NoArgsIsHelpError, UsageError  # typer ≥ 0.29 vendors click: its errors
from typer.core import TyperGroup

from ..errors import OsrmLoraError

out = Console(soft_wrap=True)
err = Console(stderr=True)


def fail(message: str) -> NoReturn:
    """Print `error: message` on stderr and exit with code 2 (a usage or input error); a long line is left
    to the terminal to wrap, so that it stays one line in logs and pipes."""
    err.print(f"[bold red]error:[/bold red] {escape(message)}", highlight=False, soft_wrap=True)
    raise typer.Exit(2)


def interrupted(how_to_resume: str) -> NoReturn:
    """After Ctrl-C: say what is kept and how to go on, then exit with code 130 (as a shell does)."""
    err.print(f"[yellow]interrupted[/yellow]: {escape(how_to_resume)}", highlight=False, soft_wrap=True)
    raise typer.Exit(130)


class ReportErrors(TyperGroup):
    """The one place that turns a user's mistake into `error: …` and exit code 2, for every command.

    Catches `OsrmLoraError` (every domain error), pydantic's `ValidationError` (an option model validated
    directly), `OSError` (a file or model that cannot be read or written) and click's usage errors (a bad
    option value, an unknown option: one line too, not click's boxed panel). Anything else is a bug and
    keeps its traceback.
    """

    def make_context(self, info_name: str | None, args: list[str], parent: Any = None, **extra: Any) -> Any:
        try:
            return super().make_context(info_name, args, parent, **extra)
        except NoArgsIsHelpError:
            raise
        except UsageError as exc:  # an option of `osrm-lora` itself
            _usage_error(exc, info_name or "osrm-lora")

    def invoke(self, ctx: Any) -> Any:
        formatted, warnings.formatwarning = warnings.formatwarning, _one_line_warning
        try:
            return super().invoke(ctx)
        except NoArgsIsHelpError:
            raise  # a command given no arguments shows its help, as before
        except UsageError as exc:
            _usage_error(exc, ctx.command_path)
        except (OsrmLoraError, OSError) as exc:
            fail(str(exc))
        except Exception as exc:
            from pydantic import ValidationError

            if not isinstance(exc, ValidationError):
                raise
            from ..settings import format_validation_error

            fail(format_validation_error(exc, exc.title))
        finally:
            warnings.formatwarning = formatted


def _usage_error(exc: UsageError, command_path: str) -> NoReturn:
    path = exc.ctx.command_path if exc.ctx is not None else command_path
    fail(f"{path}: {exc.format_message()} (see '{path} --help')")


def _one_line_warning(message, category, filename, lineno, line=None) -> str:
    """A warning as one `warning: …` line, like errors, not Python's two lines with the source. Only the format
    changes, so whatever records warnings (pytest.warns, logging.captureWarnings) still sees them."""
    return f"warning: {message}\n"


def quiet_libraries() -> None:
    """Silence the libraries' chatter (weight-loading reports and bars, deprecation notices) in our output."""
    import datasets
    import transformers

    warnings.filterwarnings("ignore", category=FutureWarning, module="transformers")
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    datasets.disable_progress_bars()


def to_stderr():
    """Libraries print logs to stdout (Trainer's loss lines); keep stdout for our results (tables, --json)."""
    return contextlib.redirect_stdout(sys.stderr)


def print_json(obj: Any) -> None:
    out.print_json(json.dumps(obj, default=str, allow_nan=True))


def print_listing(entries: list[dict], as_json: bool, table: Callable[[list[dict]], Table]) -> None:
    """A registry's listing (`merge --list`, `train --list-inits`): its entries as JSON, or as a table."""
    if as_json:
        print_json(entries)
    else:
        out.print(table(entries))


def print_tables(tables: list[Table]) -> None:
    """Tables at the terminal's width, or unclipped when stdout is a file or a pipe."""
    if not out.is_terminal:
        out.width = max(out.width, 200)
    for table in tables:
        out.print(table)


def key_values(items: list[str], what: str) -> dict[str, Any]:
    """`key=value` options; values are parsed as YAML scalars/lists (`0.2` -> float, `[1,2]` -> list), and
    a NaN or infinite number (`.nan`, `[1, .inf]`) is refused."""
    import yaml

    parsed = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            fail(f"{what} {item!r} must look like key=value")
        loaded = yaml.safe_load(value)
        if any(isinstance(v, float) and not math.isfinite(v) for v in (loaded if isinstance(loaded, list) else [loaded])):
            fail(f"{what} {item!r}: not a finite number")
        parsed[key.strip()] = loaded
    return parsed


def input_paths(*given: Any, files: list[str] | None = None) -> list[str]:
    """The local paths among `given` (paths, strings, lists of them, None: a model folder but not a Hub id)
    and the --files values: what the command reads, so what its output may never replace (`io.check_output`)."""
    flat: list[Any] = [v for g in given for v in (g if isinstance(g, (list, tuple)) else [g]) if v is not None]
    flat += key_values(files or [], "--files").values()
    return [str(p) for p in flat if os.path.exists(str(p))]


def load_task(name: str, glue_dir: Path | None, files: list[str] | None, options: list[str] | None):
    """The task of the shared --task/--glue-dir/--files/--task-option options."""
    from ..tasks import get_task

    kwargs: dict[str, Any] = key_values(options or [], "--task-option")
    if glue_dir is not None:
        kwargs["glue_dir"] = glue_dir
    if files:
        split_files = key_values(files, "--files")
        kwargs["files"] = {split: str(path) for split, path in split_files.items()}
    return get_task(name, **kwargs)
