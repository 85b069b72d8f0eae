"""`merge`: combine adapters with a registered method into a PEFT adapter or, shard by shard, a full model.

The merge is given by options (ADAPTERS, --method, --param, --lambda) or by a mergekit-style file
(--config, `settings._parse_merge_file`); either way it becomes one `settings.MergeRecipe`.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from .. import identity
from .common import err, fail, input_paths, key_values, out, print_json, print_listing
from .options import AllowMismatchOpt, JsonOpt, OverwriteOpt, PushOpt, QuietOpt, float_option

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
    "  osrm-lora merge adapters/a adapters/b --method ties --param density=0.2 --lambda 1.0 --out merged\n\n"
    "  osrm-lora merge --config merge.yaml --out merged --push-to-hub me/merged-lora\n\n"
    "  osrm-lora merge adapters/a adapters/b --method ties --param density=0.2 --full-model Llama-2-7b-hf/ "
    "--heads-from a --out merged-model --max-shard-size 2GB",
)
def merge(
    adapters: Annotated[
        list[Path] | None,
        typer.Argument(help="PEFT adapter folders or Hub ids user/repo[@revision] to merge (names = tasks)"),
    ] = None,
    method: Annotated[str | None, typer.Option("--method", help="merge method (see --list)")] = None,
    param: Annotated[
        list[str] | None, typer.Option("--param", "-p", help="hyper-parameter key=value (repeatable)")
    ] = None,
    lam: Annotated[float | None, float_option("--lambda", help="global λ (the method's `scaling`)")] = None,
    config: Annotated[
        Path | None,
        typer.Option("--config", help="a mergekit-style merge file (models:, merge_method:, base_model:, "
                     "parameters:; see docs/merge_file.md) instead of ADAPTERS, --method, --param, --lambda"),
    ] = None,
    out_dir: Annotated[
        Path | None,
        typer.Option(
            "--out", "-o", help="write the merge as a PEFT adapter here (a full model with --full-model)"
        ),
    ] = None,
    rank: Annotated[
        int | None,
        typer.Option("--rank", min=1, help="rank of the exported adapter: low-rank merges are exact without it; "
                     "dense ones (ties, dare, fisher, emr) are truncated by SVD, by default to the sum of the "
                     "adapters' ranks"),
    ] = None,
    task: Annotated[
        str | None, typer.Option("--task", help="per-task merges (EMR): the task to export")
    ] = None,
    heads_from: Annotated[
        str | None, typer.Option("--heads-from", help="copy this adapter's task head")
    ] = None,
    stats_files: Annotated[
        list[Path] | None,
        typer.Option("--stats", help="statistics of the adapters' tasks (RegMean), matched to the adapters by "
                     "the task each records, in any order: files or Hub files user/repo/path[@revision]"),
    ] = None,
    fisher_files: Annotated[
        list[Path] | None,
        typer.Option("--fisher", help="Fisher diagonals of the adapters' tasks (Fisher merging), matched by task"),
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
    push_to_hub: PushOpt = None,
    overwrite: OverwriteOpt = False,
    list_: Annotated[
        bool, typer.Option("--list", help="list the methods and their typed hyper-parameters")
    ] = False,
    quiet: QuietOpt = False,
    allow_model_mismatch: AllowMismatchOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Merge LoRA adapters with a registered method and save the result as a PEFT adapter.

    With --full-model, write the merged full model instead (`from_pretrained`-ready safetensors shards),
    reading the base checkpoint one tensor at a time, so models larger than memory can be merged.
    \f
    Long because typer declares each of its 19 options and arguments as a parameter; the body is 30 lines.
    """
    from ..merge import list_methods

    if list_:
        print_listing(list_methods(), as_json, _methods_table)
        return
    if out_dir is None or (config is None and (not adapters or method is None)):
        fail("give adapter folders, --method and --out, or --config FILE and --out (or --list to see the methods)")
    if full_model is not None and rank is not None:
        fail("--rank truncates an adapter export; a --full-model merge is written exactly, without it")
    if push_to_hub is not None:
        from ..hub import check_repo_id

        check_repo_id(push_to_hub)
    recipe = _recipe(config, adapters, method, param, lam, stats_files, fisher_files)
    rules = {"overwrite": overwrite, "inputs": input_paths(recipe.adapters, *recipe.inputs.values(), config)}
    _check_out(out_dir, full_model, rules)
    with identity.allow_model_mismatch(allow_model_mismatch):
        merged = _merged(recipe, str(config) if config else "options")
    with _progress(merged, quiet, "full model" if full_model is not None else "merge"):
        if full_model is not None:
            result = _write_full_model(merged, full_model, out_dir, max_shard_size, task, heads_from, rules)
        else:
            result = _write_adapter(merged, out_dir, rank, task, heads_from, rules)
    summary = result.pop("summary")
    if push_to_hub is not None:
        result["url"] = _push(recipe, merged, result, push_to_hub)
    if as_json:
        print_json(result)
    else:
        out.print(summary)


def _recipe(config: Path | None, adapters, method, param, lam, stats_files, fisher_files):
    """The merge as a `MergeRecipe`, from the merge file or from the options (never both)."""
    from ..settings import MergeRecipe, load_merge_file

    if config is not None:
        given = [flag for flag, value in (("ADAPTERS", adapters), ("--method", method), ("--param", param),
                 ("--lambda", lam), ("--stats", stats_files), ("--fisher", fisher_files)) if value]
        if given:
            fail(f"--config gives the whole merge; drop {', '.join(given)} (or drop --config)")
        return load_merge_file(config)
    hyper = key_values(param or [], "--param")
    if lam is not None:
        hyper["scaling"] = lam
    inputs = {kind: [str(p) for p in files] for kind, files in (("stats", stats_files), ("fisher", fisher_files))
              if files}
    return MergeRecipe(method=method, params=hyper, adapters=[str(a) for a in adapters], inputs=inputs,
                       base_model=None, written_method=method)


def _merged(recipe, source: str):
    """The lazy merge of the recipe (every input loaded and checked), its base model checked against the file."""
    from ..hub import hub_file
    from ..merge import merge_adapters
    from ..runtime.fisher import load_fisher
    from ..settings import check_base_model
    from ..stats import TaskStats

    readers = {"stats": TaskStats.load, "fisher": load_fisher}
    inputs: dict[str, Any] = {kind: [readers[kind](hub_file(f)) for f in files] for kind, files in recipe.inputs.items()}
    merged = merge_adapters(recipe.adapters, recipe.method, **inputs, **recipe.params)
    if recipe.base_model is not None:
        recorded = {
            task: [n for n in (adapter.base_model, adapter.record.get("base_model")) if n]
            for task, adapter in merged.adapters.items()
        }
        check_base_model(recipe, recorded, source)
    return merged


@contextlib.contextmanager
def _progress(merged, quiet: bool, what: str):
    """A bar on stderr advancing as each module's merged update is ready (none with --quiet)."""
    if quiet:
        yield
        return
    from rich.progress import Progress

    with Progress(console=err, transient=True) as bar:
        job = bar.add_task(f"{what}: {merged.method} of {len(merged.tasks)} adapters", total=len(merged.modules))
        merged.on_module = lambda _name: bar.advance(job)
        try:
            yield
        finally:
            merged.on_module = None


def _check_out(out_dir: Path, full_model: Path | None, rules: dict) -> None:
    """--out is refused before any input is loaded or merged (`io.check_output`): another kind of folder needs
    --overwrite; an input (an adapter, a statistics, Fisher or merge file, the base checkpoint) never."""
    from ..io import check_output
    from ..merge.apply import MERGED_MODEL
    from ..merge.export import MERGED_ADAPTER

    inputs = [*rules["inputs"], *([full_model] if full_model is not None else [])]
    check_output(out_dir, MERGED_ADAPTER if full_model is None else MERGED_MODEL, folder=True,
                 overwrite=rules["overwrite"], inputs=inputs)


def _write_full_model(merged, full_model: Path, out_dir: Path, max_shard_size: str, task, heads_from,
                      rules: dict) -> dict:
    """The merged full model; `rules` holds --overwrite and the inputs (`_check_out`)."""
    from ..merge import merge_checkpoint_sharded

    written = merge_checkpoint_sharded(
        full_model, merged, None, out_dir, max_shard_size=max_shard_size, task=task, heads_from=heads_from,
        **rules,
    )
    summary = (f"{out_dir}: full model, {full_model} + {merged.method} of {', '.join(merged.tasks)} "
               f"({len(written.files)} weight files)")
    return {"path": str(out_dir), **merged.describe(), "files": written.files, "bytes": written.total_size,
            "base_checkpoint": str(full_model), "heads_from": heads_from, "task": task, "summary": summary}


def _write_adapter(merged, out_dir: Path, rank: int | None, task, heads_from, rules: dict) -> dict:
    """The PEFT adapter; a dense merge without --rank is truncated to the adapters' ranks summed. `rules`
    holds --overwrite and the inputs (`_check_out`)."""
    from ..merge import save_adapter

    default_rank = rank is None and not merged.spec.exact_low_rank
    if default_rank:
        rank = sum(max(f.rank for f in a.modules.values()) for a in merged.adapters.values())
    export = save_adapter(merged, out_dir, rank, task=task, heads_from=heads_from, **rules)
    summary = f"{out_dir}: {merged.method} of {', '.join(merged.tasks)} ({_exactness(export, rank, default_rank)})"
    return {"path": str(out_dir), **merged.describe(), **export.report(), "rank": rank, "default_rank": default_rank,
            "heads_from": heads_from, "task": task, "summary": summary}


def _exactness(export, rank: int | None, default_rank: bool) -> str:
    """Exact, exact at full rank (an SVD that kept every singular value), or the energy the truncation cut."""
    if export.exact:
        return "exact"
    chosen = f"rank {rank}" + (", the adapters' ranks summed (the default)" if default_rank else "")
    if export.discarded_fraction == 0.0:
        return f"exact: the SVD at {chosen} keeps every singular value"
    return f"truncated to {chosen}; {100 * export.discarded_fraction:.3g}% of the energy discarded"


def _push(recipe, merged, result: dict, repo_id: str) -> str:
    """Upload the output folder with its model card; returns the repository URL."""
    from ..hub import merge_card, push_folder

    records = {task: adapter.record for task, adapter in merged.adapters.items()}
    card = merge_card(result, records, recipe.written_method)
    url = push_folder(result["path"], repo_id, card, f"osrm-lora merge: {merged.method} of {', '.join(merged.tasks)}")
    err.print(f"pushed {result['path']} to {url}")
    return url
