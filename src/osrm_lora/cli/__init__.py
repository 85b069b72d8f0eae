"""The `osrm-lora` command line: whole experiments (`run`, `demo`) and every step on its own.

The step commands work on plain files (statistics, subspaces, PEFT adapter folders), so they compose with
adapters trained elsewhere: collect statistics, compute OSRM subspaces, train, merge, evaluate, measure
interference, and rebuild a report. Results go to stdout (a table, or JSON with --json); progress and
messages go to stderr. One module per command group; `common.ReportErrors` turns every user error into
one `error: …` line and exit code 2. Commands import torch only when they run, so `--help` stays light.
A command's function is as long as its list of options (typer declares each as a parameter); the bodies
stay short.
"""

from __future__ import annotations

import typer

from . import data, evaluate, experiments, merge, steps
from .common import ReportErrors

app = typer.Typer(
    name="osrm-lora",
    cls=ReportErrors,
    help=(
        "LoRA adapters that merge well (OSRM, ACL 2025): statistics, orthogonal-subspace init, training, "
        "merging, evaluation and reports.\n\n"
        "Start with [bold]osrm-lora demo[/bold] (offline, CPU, 6-9 min on 2 cores), then write your own experiment "
        "YAML (see examples/) and run it with [bold]osrm-lora run experiment.yaml[/bold]."
    ),
    no_args_is_help=True,
    rich_markup_mode="rich",
    add_completion=False,
    pretty_exceptions_enable=False,
)
for group in (experiments, steps, merge, evaluate):
    app.add_typer(group.app)
app.add_typer(data.app, name="data")

__all__ = ["app"]
