"""Tables and plots of an experiment's `results.json`, in the paper's layout.

Everything here is a pure function of the results dict (see `osrm_lora.pipeline` for how it is produced), so a
report can be rebuilt at any time with `osrm-lora report OUTPUT_DIR` without touching a model.

Rows are ``init × merge method`` (plus the individually fine-tuned adapters as reference rows), columns are
the tasks' primary scores, their average and the normalised average (merged score / the same init's individual
score, averaged over the tasks whose individual score is positive). Two views: the best λ of each row (chosen on
the evaluation split, as an upper bound, the way the paper's grid search does) and a fixed λ (the method's
documented default).
"""

from __future__ import annotations

import csv
import io
import math
import statistics
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import OsrmLoraError
from .io import atomic_path, write_json, write_text
from .scores import average, normalised_average, normalised_scores

RESULTS_FORMAT = "osrm-lora/results/1"
INDIVIDUAL = "individual"


class ResultsError(OsrmLoraError):
    """A results dict or file that the report cannot use; the message says which field is wrong."""


@dataclass
class Row:
    """One table row: scores per task (seed means), their average and the normalised average."""

    init: str
    method: str
    lam: float | None
    scores: dict[str, float]
    average: float
    normalised: dict[str, float]
    normalised_average: float
    average_std: float = 0.0
    seeds: int = 1


@dataclass
class Table:
    name: str
    title: str
    tasks: list[str]
    rows: list[Row] = field(default_factory=list)


def check_results(results: Mapping[str, Any]) -> None:
    """Refuse a results dict of another format or with missing fields."""
    if results.get("format") != RESULTS_FORMAT:
        raise ResultsError(f"results: format {results.get('format')!r} is not {RESULTS_FORMAT!r}")
    for key in ("tasks", "inits", "seeds", "individual", "merged"):
        if key not in results:
            raise ResultsError(f"results: field {key!r} is missing")
    tasks = set(results["tasks"])
    for kind in ("individual", "merged"):
        for i, record in enumerate(results[kind]):
            if record.get("task") not in tasks:
                raise ResultsError(
                    f"results: {kind}[{i}].task {record.get('task')!r} is not one of {sorted(tasks)}"
                )


def _individual_scores(results: Mapping[str, Any]) -> dict[tuple[str, int], dict[str, float]]:
    """(init, seed) -> {task: primary score} of the individually fine-tuned adapters."""
    out: dict[tuple[str, int], dict[str, float]] = {}
    for r in results["individual"]:
        out.setdefault((r["init"], r["seed"]), {})[r["task"]] = float(r["score"])
    return out


def _lambda(value: Any) -> float | None:
    """λ of a record; None for methods without a global λ (EMR)."""
    return None if value is None else float(value)


def _merged_scores(results: Mapping[str, Any]) -> dict[tuple[str, str, float | None, int], dict[str, float]]:
    """(init, method, λ, seed) -> {task: primary score} of the merged models."""
    out: dict[tuple[str, str, float | None, int], dict[str, float]] = {}
    for r in results["merged"]:
        out.setdefault((r["init"], r["method"], _lambda(r["lambda"]), r["seed"]), {})[r["task"]] = float(
            r["score"]
        )
    return out


def _row(
    init: str,
    method: str,
    lam: float | None,
    per_seed: Mapping[int, Mapping[str, float]],
    individual: Mapping[tuple[str, int], Mapping[str, float]],
    tasks: list[str],
) -> Row:
    """Average a row over seeds; normalisation uses each seed's own individual scores."""
    seeds = sorted(per_seed)
    scores = {t: statistics.fmean(per_seed[s][t] for s in seeds) for t in tasks}
    norm_per_seed = {s: normalised_scores(per_seed[s], individual[(init, s)]) for s in seeds}
    normalised = {t: statistics.fmean(norm_per_seed[s][t] for s in seeds) for t in tasks}
    averages = [average(per_seed[s]) for s in seeds]
    return Row(
        init=init,
        method=method,
        lam=lam,
        scores=scores,
        average=statistics.fmean(averages),
        normalised=normalised,
        normalised_average=statistics.fmean(normalised_average(norm_per_seed[s]) for s in seeds),
        average_std=statistics.stdev(averages) if len(averages) > 1 else 0.0,
        seeds=len(seeds),
    )


def _complete(scores: Mapping[str, float], tasks: Iterable[str]) -> bool:
    return all(t in scores for t in tasks)


def lambda_curves(results: Mapping[str, Any]) -> dict[tuple[str, str], list[Row]]:
    """(init, method) -> one row per λ (ascending; a single λ=None row for methods without λ), each averaged
    over the seeds that have every task."""
    tasks = list(results["tasks"])
    individual = _individual_scores(results)
    merged = _merged_scores(results)
    grouped: dict[tuple[str, str], dict[float | None, dict[int, dict[str, float]]]] = {}
    for (init, method, lam, seed), scores in merged.items():
        if _complete(scores, tasks) and _complete(individual.get((init, seed), {}), tasks):
            grouped.setdefault((init, method), {}).setdefault(lam, {})[seed] = scores
    return {
        key: [
            _row(key[0], key[1], lam, by_lam[lam], individual, tasks)
            for lam in sorted(by_lam, key=lambda v: -1.0 if v is None else v)
        ]
        for key, by_lam in grouped.items()
    }


def individual_rows(results: Mapping[str, Any]) -> list[Row]:
    """The individually fine-tuned adapters, one row per init (normalised average is 1 by definition)."""
    tasks = list(results["tasks"])
    individual = _individual_scores(results)
    rows = []
    for init in results["inits"]:
        per_seed = {s: sc for (i, s), sc in individual.items() if i == init and _complete(sc, tasks)}
        if per_seed:
            rows.append(_row(init, INDIVIDUAL, None, per_seed, individual, tasks))
    return rows


def _order(results: Mapping[str, Any], keys: Iterable[tuple[str, str]]) -> list[tuple[str, str]]:
    """Rows grouped by method (config order), gaussian/OSRM next to each other as in the paper."""
    methods = list(results.get("methods") or [])
    inits = list(results["inits"])
    return sorted(
        keys,
        key=lambda k: (
            methods.index(k[1]) if k[1] in methods else len(methods),
            k[1],
            inits.index(k[0]) if k[0] in inits else len(inits),
        ),
    )


def best_lambda_table(results: Mapping[str, Any]) -> Table:
    """Each (init, method) at the λ with the highest average score."""
    curves = lambda_curves(results)
    table = Table("best_lambda", "Best λ per row (selected on the evaluation split)", list(results["tasks"]))
    table.rows = individual_rows(results)
    for key in _order(results, curves):
        table.rows.append(max(curves[key], key=lambda row: (row.average, -(row.lam or 0.0))))
    return table


def fixed_lambda_table(results: Mapping[str, Any]) -> Table:
    """Each (init, method) at its fixed λ (`results["fixed_lambda"][method]`; None for methods without λ)."""
    curves = lambda_curves(results)
    fixed = results.get("fixed_lambda") or {}
    table = Table("fixed_lambda", "Fixed λ per method", list(results["tasks"]))
    table.rows = individual_rows(results)
    for key in _order(results, curves):
        lam = _lambda(fixed.get(key[1]))
        match = [
            row
            for row in curves[key]
            if row.lam == lam or (row.lam is not None and lam is not None and abs(row.lam - lam) < 1e-9)
        ]
        if match:
            table.rows.append(match[0])
    return table


def _fmt_lambda(lam: float | None) -> str:
    return "" if lam is None else f"{lam:g}"


def table_csv(table: Table) -> str:
    """The table as CSV with raw scores (0..1) so it round-trips with `results.json`."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(
        ["init", "method", "lambda", *table.tasks, "average", "normalised_average", "average_std", "seeds"]
    )
    for row in table.rows:
        writer.writerow(
            [
                row.init,
                row.method,
                _fmt_lambda(row.lam),
                *(f"{row.scores[t]:.6f}" for t in table.tasks),
                f"{row.average:.6f}",
                f"{row.normalised_average:.6f}",
                f"{row.average_std:.6f}",
                row.seeds,
            ]
        )
    return buf.getvalue()


def table_markdown(table: Table) -> str:
    """The table in Markdown, scores in percent as in the paper."""
    head = ["init", "method", "λ", *table.tasks, "avg", "norm. avg"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] * 3 + ["---:"] * (len(head) - 3)) + "|"]
    for row in table.rows:
        avg = f"{100 * row.average:.2f}" + (f" ± {100 * row.average_std:.2f}" if row.seeds > 1 else "")
        cells = [
            row.init,
            row.method,
            _fmt_lambda(row.lam),
            *(f"{100 * row.scores[t]:.2f}" for t in table.tasks),
            avg,
            f"{100 * row.normalised_average:.2f}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    undefined = sorted({t for row in table.rows for t, v in row.normalised.items() if math.isnan(v)})
    if undefined:
        lines.append(f"\nnorm. avg leaves out {', '.join(undefined)}: individual score ≤ 0, nothing to normalise by.")
    return "\n".join(lines) + "\n"


def _interference_by_init(results: Mapping[str, Any]) -> dict[str, tuple[list[str], list[list[float]]]]:
    """init -> (tasks, matrix averaged over seeds)."""
    grouped: dict[str, list[dict]] = {}
    for r in results.get("interference") or []:
        grouped.setdefault(r["init"], []).append(r)
    out = {}
    for init, records in grouped.items():
        tasks = records[0]["tasks"]
        n = len(records)
        matrix = [
            [sum(rec["matrix"][i][j] for rec in records) / n for j in range(len(tasks))]
            for i in range(len(tasks))
        ]
        out[init] = (tasks, matrix)
    return out


def _save_figure(fig, path: Path) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight")


def _new_figure(width: float, height: float):
    """A figure on the Agg canvas without touching pyplot's global backend."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height))
    FigureCanvasAgg(fig)
    return fig


def plot_lambda_curves(results: Mapping[str, Any], path: Path) -> None:
    """Average score vs λ, one panel per method, one line per init; dashed: the individual adapters."""
    curves = {k: rows for k, rows in lambda_curves(results).items() if rows[0].lam is not None}
    methods = [m for m in (results.get("methods") or []) if any(k[1] == m for k in curves)]
    methods += sorted({k[1] for k in curves} - set(methods))
    fig = _new_figure(4.2 * max(len(methods), 1), 3.4)
    individual = {row.init: row.average for row in individual_rows(results)}
    for i, method in enumerate(methods):
        ax = fig.add_subplot(1, len(methods), i + 1)
        for j, init in enumerate(results["inits"]):
            rows = curves.get((init, method))
            if not rows:
                continue
            color = f"C{j}"
            ax.plot(
                [r.lam for r in rows], [100 * r.average for r in rows], marker="o", color=color, label=init
            )
            if init in individual:
                ax.axhline(100 * individual[init], color=color, linestyle="--", linewidth=0.8)
        ax.set_title(method)
        ax.set_xlabel("λ")
        ax.set_ylabel("average score (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    _save_figure(fig, path)


def plot_interference(results: Mapping[str, Any], path: Path) -> bool:
    """Interference heatmaps of the inits side by side on one colour scale; False when there are none."""
    by_init = _interference_by_init(results)
    if not by_init:
        return False
    inits = [i for i in results["inits"] if i in by_init]
    values = [v for _, m in by_init.values() for row in m for v in row]
    vmin, vmax = min(0.0, min(values)), max(values) or 1.0
    fig = _new_figure(4.2 * len(inits) + 1.0, 3.8)
    image = None
    for k, init in enumerate(inits):
        tasks, matrix = by_init[init]
        ax = fig.add_subplot(1, len(inits), k + 1)
        image = ax.imshow(matrix, cmap="viridis", vmin=vmin, vmax=vmax)
        ax.set_xticks(range(len(tasks)), tasks, rotation=45, ha="right", fontsize=8)
        ax.set_yticks(range(len(tasks)), tasks if k == 0 else [], fontsize=8)
        if len(tasks) <= 10:
            for i, row in enumerate(matrix):
                for j, v in enumerate(row):
                    ax.text(
                        j,
                        i,
                        f"{v:.2g}",
                        ha="center",
                        va="center",
                        fontsize=7,
                        color="white" if v < (vmin + vmax) / 2 else "black",
                    )
        ax.set_title(f"{init} init")
        ax.set_xlabel("adapter j")
        if k == 0:
            ax.set_ylabel("task i (data)")
    fig.colorbar(image, ax=fig.axes, shrink=0.8, label="interference")
    _save_figure(fig, path)
    return True


def plot_task_bars(table: Table, path: Path) -> None:
    """Per-task scores of every row of a table, grouped by task."""
    labels = [f"{r.init} / {r.method}" for r in table.rows]
    groups = [*table.tasks, "average"]
    fig = _new_figure(max(6.0, 0.2 * len(groups) * max(len(labels), 1) + 3), 4.0)
    ax = fig.add_subplot(1, 1, 1)
    width = 0.8 / max(len(labels), 1)
    for k, row in enumerate(table.rows):
        values = [100 * row.scores[t] for t in table.tasks] + [100 * row.average]
        ax.bar(
            [g + (k - (len(labels) - 1) / 2) * width for g in range(len(groups))],
            values,
            width=width,
            label=labels[k],
            color=f"C{k % 10}",
        )
    ax.set_xticks(range(len(groups)), groups, rotation=30, ha="right")
    ax.set_ylabel("score (%)")
    ax.set_title(table.title)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    _save_figure(fig, path)


def _interference_markdown(results: Mapping[str, Any]) -> str:
    """Mean off-diagonal interference per init: the number the heatmaps summarise."""
    by_init = _interference_by_init(results)
    if not by_init:
        return ""
    lines = ["| init | mean off-diagonal interference |", "|---|---:|"]
    for init in results["inits"]:
        if init not in by_init:
            continue
        tasks, m = by_init[init]
        off = [m[i][j] for i in range(len(tasks)) for j in range(len(tasks)) if i != j]
        lines.append(f"| {init} | {statistics.fmean(off) if off else 0.0:.4g} |")
    return "\n".join(lines) + "\n"


def write_report(results: Mapping[str, Any], output_dir: str | Path) -> dict[str, Path]:
    """Write report.md, the CSV tables and the PNG plots into `output_dir`; returns what was written."""
    check_results(results)
    output_dir = Path(output_dir)
    best, fixed = best_lambda_table(results), fixed_lambda_table(results)
    written: dict[str, Path] = {}
    for table in (best, fixed):
        written[f"{table.name}.csv"] = output_dir / f"table_{table.name}.csv"
        write_text(written[f"{table.name}.csv"], table_csv(table))
    plots = output_dir / "plots"
    written["lambda_plot"] = plots / "score_vs_lambda.png"
    plot_lambda_curves(results, written["lambda_plot"])
    if plot_interference(results, plots / "interference.png"):
        written["interference_plot"] = plots / "interference.png"
    written["bars_plot"] = plots / "task_scores_best_lambda.png"
    plot_task_bars(best, written["bars_plot"])

    fixed_note = ", ".join(
        f"{m}: λ={lam:g}" for m, lam in (results.get("fixed_lambda") or {}).items() if lam is not None
    )
    metrics = ", ".join(f"{t}: {m}" for t, m in (results.get("primary_metrics") or {}).items())
    parts = [
        f"# {results.get('experiment', 'experiment')}: merging LoRA adapters\n",
        f"Model `{results.get('model', '?')}`; seeds {results['seeds']}; primary metrics: {metrics}.\n",
        (
            "Scores in percent; *norm. avg* is the mean over tasks of merged score / the same init's "
            "individual score. The best-λ view picks each row's λ on the evaluation split itself (an upper "
            "bound, like a grid search on validation data); the fixed-λ view needs no tuning.\n"
        ),
        f"## {best.title}\n",
        table_markdown(best),
        f"## {fixed.title} ({fixed_note})\n",
        table_markdown(fixed),
    ]
    interference = _interference_markdown(results)
    if interference:
        parts += ["## Interference\n", interference, "![interference](plots/interference.png)\n"]
    parts += [
        "## Plots\n",
        "![score vs λ](plots/score_vs_lambda.png)\n",
        "![per-task scores](plots/task_scores_best_lambda.png)\n",
    ]
    written["report"] = output_dir / "report.md"
    write_text(written["report"], "\n".join(parts))
    return written


def write_results(results: Mapping[str, Any], path: str | Path) -> None:
    check_results(results)
    write_json(path, dict(results))
