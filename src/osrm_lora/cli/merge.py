"""`merge`: combine adapters with a registered method into a PEFT adapter or, shard by shard, a full model."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from .common import fail, key_values, out, print_json, print_listing
from .options import JsonOpt

app = typer.Typer()


def _methods_table(methods: list[dict]) -> Table:
    table = Table("method", "hyper-parameters (type = default)", "summary", show_lines=True)
    for m in methods:
        params = "\n".join(f"{p['name']}: {p['type']} = {p['default']!r}" for p in m["parameters"]) or "-"
        needs = f" [dim](needs {', '.join(m['requires'])})[/dim]" if m["requires"] else ""
        table.add_row(m["name"], params, m["summary"] + needs)
    return table


@app.command(
    epilog="Examples:\n\n"
    "  osrm-lora merge --list\n\n"
    "  osrm-lora merge adapters/a adapters/b --method ties --param density=0.2 --lambda 1.0 --out merged "
    "--rank 16\n\n"
    "  osrm-lora merge adapters/a adapters/b --method ties --param density=0.2 --full-model Llama-2-7b-hf/ "
    "--heads-from a --out merged-model --max-shard-size 2GB",
)
def merge(
    adapters: Annotated[
        list[Path] | None, typer.Argument(help="PEFT adapter folders to merge (names = tasks)")
    ] = None,
    method: Annotated[str | None, typer.Option("--method", help="merge method (see --list)")] = None,
    param: Annotated[
        list[str] | None, typer.Option("--param", "-p", help="hyper-parameter key=value (repeatable)")
    ] = None,
    lam: Annotated[float | None, typer.Option("--lambda", help="global λ (the method's `scaling`)")] = None,
    out_dir: Annotated[
        Path | None,
        typer.Option(
            "--out", "-o", help="write the merge as a PEFT adapter here (a full model with --full-model)"
        ),
    ] = None,
    rank: Annotated[
        int | None, typer.Option("--rank", help="truncate dense merges to this rank (SVD)")
    ] = None,
    task: Annotated[
        str | None, typer.Option("--task", help="per-task merges (EMR): the task to export")
    ] = None,
    heads_from: Annotated[
        str | None, typer.Option("--heads-from", help="copy this adapter's task head")
    ] = None,
    stats_files: Annotated[
        list[Path] | None, typer.Option("--stats", help="statistics per adapter, in order (RegMean)")
    ] = None,
    fisher_files: Annotated[
        list[Path] | None, typer.Option("--fisher", help="Fisher diagonals per adapter (Fisher merging)")
    ] = None,
    full_model: Annotated[
        Path | None,
        typer.Option(
            "--full-model",
            help="base checkpoint folder (safetensors): write base + merged update as a full model to --out, "
            "shard by shard without loading the model",
        ),
    ] = None,
    max_shard_size: Annotated[
        str, typer.Option("--max-shard-size", help="largest weight file of a --full-model output")
    ] = "2GB",
    list_: Annotated[
        bool, typer.Option("--list", help="list the methods and their typed hyper-parameters")
    ] = False,
    as_json: JsonOpt = False,
) -> None:
    """Merge LoRA adapters with a registered method and save the result as a PEFT adapter.

    With --full-model, write the merged full model instead (`from_pretrained`-ready safetensors shards),
    reading the base checkpoint one tensor at a time, so models larger than memory can be merged.
    """
    from ..merge import list_methods

    if list_:
        print_listing(list_methods(), as_json, _methods_table)
        return
    if not adapters or method is None or out_dir is None:
        fail("give adapter folders, --method and --out (or --list to see the methods)")
    if full_model is not None and rank is not None:
        fail("--rank truncates an adapter export; a --full-model merge is written exactly, without it")
    hyper = key_values(param or [], "--param")
    if lam is not None:
        hyper["scaling"] = lam
    from ..merge import merge_adapters
    from ..runtime.fisher import load_fisher
    from ..stats import TaskStats

    inputs: dict[str, Any] = {}
    if stats_files:
        inputs["stats"] = [TaskStats.load(p) for p in stats_files]
    if fisher_files:
        inputs["fisher"] = [load_fisher(p) for p in fisher_files]
    merged = merge_adapters([str(a) for a in adapters], method, **inputs, **hyper)
    if full_model is not None:
        _write_full_model(merged, full_model, out_dir, max_shard_size, task, heads_from, as_json)
    else:
        _write_adapter(merged, out_dir, rank, task, heads_from, as_json)


def _write_full_model(merged, full_model: Path, out_dir: Path, max_shard_size: str, task, heads_from, as_json):
    from ..merge import merge_checkpoint_sharded

    written = merge_checkpoint_sharded(
        full_model, merged, None, out_dir, max_shard_size=max_shard_size, task=task, heads_from=heads_from
    )
    if as_json:
        print_json({"path": str(out_dir), **merged.describe(), "files": written.files, "bytes": written.total_size})
        return
    out.print(
        f"{out_dir}: full model, {full_model} + {merged.method} of {', '.join(merged.tasks)} "
        f"({len(written.files)} weight files)"
    )


def _write_adapter(merged, out_dir: Path, rank: int | None, task, heads_from, as_json: bool) -> None:
    from ..merge import save_adapter

    export = save_adapter(merged, out_dir, rank, task=task, heads_from=heads_from)
    if as_json:
        print_json({"path": str(out_dir), **merged.describe(), **export.report()})
        return
    exactness = (
        "exact" if export.exact else f"truncated, {100 * export.discarded_fraction:.2f}% energy discarded"
    )
    out.print(f"{out_dir}: {merged.method} of {', '.join(merged.tasks)} ({exactness})")
