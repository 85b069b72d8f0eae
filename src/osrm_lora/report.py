"""Tables and plots of an experiment's `results.json`, in the paper's layout.

Everything here is a pure function of the results dict (see `osrm_lora.pipeline` for how it is produced), so a
report can be rebuilt at any time with `osrm-lora report OUTPUT_DIR` without touching a model.

Rows are ``init × merge method`` (plus the individually fine-tuned adapters as reference rows), columns are
the tasks' primary scores on the `report` rows, their average and the normalised average (merged score / the
same init's individual score, averaged over the tasks whose individual score is positive). Three views: λ
selected per seed on the held-out `select` rows (the result), the oracle λ tuned on the `report` rows
themselves (optimistic: what a grid search on the reported data gives) and a fixed λ (the method's default).
Beside them: each init's paired differences from the reference init over seeds, with intervals and verdicts
in words, and the per-adapter diagnostics.
"""

from __future__ import annotations

import csv
import io
import math
import statistics
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import OsrmLoraError
from .io import atomic_path, write_json, write_text
from .scores import average, normalised_average, normalised_scores
from .study import INDIVIDUAL

RESULTS_FORMAT = "osrm-lora/results/1"


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
    seed_lambdas: list[float | None] | None = None  # λ of each seed where it was selected per seed


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


def _lambda_curves(results: Mapping[str, Any]) -> dict[tuple[str, str], list[Row]]:
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


def _individual_rows(results: Mapping[str, Any]) -> list[Row]:
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
    """Rows grouped by method (config order), kaiming/OSRM next to each other as in the paper."""
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


def selected_lambda_table(results: Mapping[str, Any]) -> Table:
    """Each (init, method) at the λ each seed selected on its `select` rows, scored on `report`
    (`results["selection"]`); seeds without every individual score are left out."""
    tasks = list(results["tasks"])
    individual = _individual_scores(results)
    grouped: dict[tuple[str, str], dict[int, dict]] = {}
    for entry in results.get("selection") or []:
        if _complete(individual.get((entry["init"], entry["seed"]), {}), tasks):
            grouped.setdefault((entry["init"], entry["method"]), {})[entry["seed"]] = entry["selected"]
    title = "Best λ on held-out examples (chosen per seed on the select rows, scored on the report rows)"
    table = Table("selected_lambda", title, tasks)
    table.rows = _individual_rows(results)
    for init, method in _order(results, grouped):
        chosen = grouped[(init, method)]
        seeds = sorted(chosen)
        row = _row(init, method, None, {s: chosen[s]["scores"] for s in seeds}, individual, tasks)
        row.seed_lambdas = [_lambda(chosen[s]["lambda"]) for s in seeds]
        if len(set(row.seed_lambdas)) == 1:
            row.lam = row.seed_lambdas[0]
        table.rows.append(row)
    return table


def best_lambda_table(results: Mapping[str, Any]) -> Table:
    """Each (init, method) at the λ with the highest average score on the report rows: the oracle."""
    curves = _lambda_curves(results)
    title = "Oracle λ per row (tuned on the report rows themselves: optimistic, not a result)"
    table = Table("best_lambda", title, list(results["tasks"]))
    table.rows = _individual_rows(results)
    for key in _order(results, curves):
        table.rows.append(max(curves[key], key=lambda row: (row.average, -(row.lam or 0.0))))
    return table


def fixed_lambda_table(results: Mapping[str, Any]) -> Table:
    """Each (init, method) at its fixed λ (`results["fixed_lambda"][method]`; None for methods without λ)."""
    curves = _lambda_curves(results)
    fixed = results.get("fixed_lambda") or {}
    table = Table("fixed_lambda", "Fixed λ per method (report rows)", list(results["tasks"]))
    table.rows = _individual_rows(results)
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


def lambda_cell(row: Row) -> str:
    """A row's λ: one value, or each seed's (``0.5/1``) where the seeds selected different ones."""
    if row.seed_lambdas and len(set(row.seed_lambdas)) > 1:
        return "/".join(_fmt_lambda(lam) for lam in row.seed_lambdas)
    return _fmt_lambda(row.lam)


def _table_csv(table: Table) -> str:
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
                lambda_cell(row),
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
            lambda_cell(row),
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


def _select_curves(results: Mapping[str, Any]) -> dict[tuple[str, str], tuple[list[float], list[float]]]:
    """(init, method) -> (λ, select average over tasks and seeds) from the per-seed λ choices."""
    by_lam: dict[tuple[str, str], dict[float, list[float]]] = {}
    for entry in results.get("selection") or []:
        for point in entry["curve"]:
            if point["lambda"] is not None:
                key = (entry["init"], entry["method"])
                by_lam.setdefault(key, {}).setdefault(point["lambda"], []).append(point["select_average"])
    return {k: (sorted(v), [statistics.fmean(v[lam]) for lam in sorted(v)]) for k, v in by_lam.items()}


def _plot_lambda_curves(results: Mapping[str, Any], path: Path) -> None:
    """Average score vs λ, one panel per method, one line per init on the report rows (dotted: on the select
    rows, where λ is chosen); dashed: the individual adapters."""
    curves = {k: rows for k, rows in _lambda_curves(results).items() if rows[0].lam is not None}
    select = _select_curves(results)
    methods = [m for m in (results.get("methods") or []) if any(k[1] == m for k in curves)]
    methods += sorted({k[1] for k in curves} - set(methods))
    fig = _new_figure(4.2 * max(len(methods), 1), 3.4)
    individual = {row.init: row.average for row in _individual_rows(results)}
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
            if (init, method) in select:
                lams, averages = select[(init, method)]
                ax.plot(lams, [100 * a for a in averages], linestyle=":", color=color, label=f"{init} (select)")
            if init in individual:
                ax.axhline(100 * individual[init], color=color, linestyle="--", linewidth=0.8)
        _label_axes(ax, method, "λ", "average score (%)")
    _save_figure(fig, path)


def _label_axes(ax, title: str, xlabel: str, ylabel: str) -> None:
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)


def _plot_samples(results: Mapping[str, Any], table: Table, path: Path) -> bool:
    """Merged average score at the selected λ vs the statistics sample size, one panel per method and one line
    per statistics-based init entry (`results["init_runs"]`); dashed: the inits without statistics. False when
    no entry was run at two sample sizes."""
    runs = results.get("init_runs") or {}
    points: dict[tuple[str, str], dict[int, float]] = {}
    flat: dict[tuple[str, str], float] = {}
    for row in table.rows:
        if row.method == INDIVIDUAL or row.init not in runs:
            continue
        run = runs[row.init]
        if run["samples"] is None:
            flat[(row.init, row.method)] = row.average
        else:
            points.setdefault((run["entry"], row.method), {})[run["samples"]] = row.average
    if not any(len(p) > 1 for p in points.values()):
        return False
    methods = list(dict.fromkeys(method for _, method in points))
    colors = {name: f"C{i}" for i, name in enumerate(dict.fromkeys([e for e, _ in points] + [i for i, _ in flat]))}
    fig = _new_figure(4.2 * len(methods), 3.4)
    for i, method in enumerate(methods):
        ax = fig.add_subplot(1, len(methods), i + 1)
        for (entry, m), by_size in points.items():
            if m == method:
                sizes = sorted(by_size)
                ax.plot(sizes, [100 * by_size[n] for n in sizes], marker="o", color=colors[entry], label=entry)
        for (init, m), value in flat.items():
            if m == method:
                ax.axhline(100 * value, color=colors[init], linestyle="--", linewidth=0.8, label=init)
        ax.set_xscale("log")
        _label_axes(ax, method, "statistics examples per task", "merged average score (%)")
    _save_figure(fig, path)
    return True


def _plot_interference(results: Mapping[str, Any], path: Path) -> bool:
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


def _plot_task_bars(table: Table, path: Path) -> None:
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


def _interval(low: float | None, high: float | None) -> str:
    return "n/a" if low is None or high is None else f"[{100 * low:+.2f}, {100 * high:+.2f}]"


def _yes_no(value: bool | None) -> str:
    return "n/a" if value is None else ("yes" if value else "no")


def paired_markdown(results: Mapping[str, Any]) -> str:
    """The paired differences from the reference init: a table (points) and each verdict in words."""
    entries = results.get("paired") or []
    if not entries:
        return ""
    level = f"{100 * entries[0]['level']:g} %"
    head = (f"| init − {results.get('reference_init', entries[0]['reference'])} | method | n | mean | s.d. | "
            f"{level} t-interval | excludes 0 | {level} bootstrap | excludes 0 |")
    lines = [head, "|---|---|---:|---:|---:|---:|---|---:|---|"]
    for e in entries:
        sd = "n/a" if e["sd"] is None else f"{100 * e['sd']:.2f}"
        lines.append(f"| {e['init']} | {e['method']} | {e['n']} | {100 * e['mean']:+.2f} | {sd} | "
                     f"{_interval(e['t_low'], e['t_high'])} | {_yes_no(e['excludes_zero'] if e['n'] > 1 else None)} | "
                     f"{_interval(e['bootstrap_low'], e['bootstrap_high'])} | "
                     f"{_yes_no(e['bootstrap_excludes_zero'])} |")
    lines.append("")
    lines += [f"- {e['verdict']}" for e in entries]
    return "\n".join(lines) + "\n"


DIAGNOSTICS = (  # (column, key of an adapter's diagnostics), averaged over tasks and seeds
    ("‖ΔW‖_F", "delta_norm"),
    ("A retention", "retention"),
    ("others' energy at init", "captured_init"),
    ("others' energy after", "captured_trained"),
    ("coordinate mass", "coordinate_mass"),
)


DIAGNOSTICS_NOTE = (
    "Means over adapters and seeds, exact from the statistics: ‖ΔW‖_F over all modules; how much of the trained "
    "A stays in its initial row space; the other tasks' input energy A's row space captures at init and after "
    "training; the share of ‖A‖² on its r largest input coordinates; cross-task interference on task i's "
    "inputs relative to the base output, beside its ratio to task i's own update; the mean overlap "
    "‖A_i A_jᵀ‖²/(‖A_i‖²‖A_j‖²).\n"
)


def _off_diagonal_mean(matrix: list[list[float | None]]) -> float:
    values = [v for i, row in enumerate(matrix) for j, v in enumerate(row) if i != j and v is not None]
    return statistics.fmean(values) if values else math.nan


def _diagnostics_rows(results: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Per init: each diagnostic's mean over its adapters and seeds (None where undefined), the mean
    off-diagonal absolute interference and ratio, and the mean overlap of the tasks' A's."""
    grouped: dict[str, list[dict]] = {}
    for record in results.get("diagnostics") or []:
        grouped.setdefault(record["init"], []).append(record)
    rows = []
    for init in [i for i in results["inits"] if i in grouped]:
        records = grouped[init]
        row: dict[str, Any] = {"init": init, "seeds": len(records)}
        for _, key in DIAGNOSTICS:
            values = [a[key] for r in records for a in r["adapters"].values() if a[key] is not None]
            row[key] = statistics.fmean(values) if values else None
        row["absolute_interference"] = statistics.fmean(_off_diagonal_mean(r["absolute_interference"]) for r in records)
        row["interference_ratio"] = statistics.fmean(_off_diagonal_mean(r["interference_ratio"]) for r in records)
        overlaps = [r["mean_overlap"] for r in records if r["mean_overlap"] is not None]
        row["mean_overlap"] = statistics.fmean(overlaps) if overlaps else None
        rows.append(row)
    return rows


def diagnostics_markdown(results: Mapping[str, Any]) -> str:
    rows = _diagnostics_rows(results)
    if not rows:
        return ""
    columns = [*DIAGNOSTICS, ("interference E‖ΔW_j x_i‖²/E‖W₀x_i‖²", "absolute_interference"),
               ("ratio to own ΔW_i", "interference_ratio"), ("mean A overlap", "mean_overlap")]
    lines = ["| init | " + " | ".join(c for c, _ in columns) + " |", "|---|" + "---:|" * len(columns)]
    for row in rows:
        cells = ["n/a" if row[k] is None or math.isnan(row[k]) else f"{row[k]:.4g}" for _, k in columns]
        lines.append(f"| {row['init']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


FORECAST_NOTE = (
    "Before training, from the statistics alone: the task's own and the other tasks' input energy its OSRM "
    "rows capture, and those of the osrm-contrast rows, each × the share r/d of a random subspace (mean over "
    "modules; docs/modes.md). *starves*: the OSRM rows give the task no clearly larger share than the others "
    "(they starve it as much as they protect the others). Beside it what was measured: the init's individual "
    "score against the reference init's on the same seeds, and the interference its adapter causes on the "
    "other tasks (mean of its column of the interference matrix).\n"
)


def forecast_markdown(results: Mapping[str, Any]) -> str:
    """The forecast of each init's subspace per task beside the measured outcome (`FORECAST_NOTE`)."""
    forecasts = results.get("forecast") or {}
    if not forecasts:
        return ""
    individual = _individual_scores(results)
    reference = results.get("reference_init")
    interference = _interference_by_init(results)

    def score(init: str, task: str, seeds: set[int] | None = None) -> str:
        values = [v[task] for (i, s), v in individual.items()
                  if i == init and task in v and (seeds is None or s in seeds)]
        return f"{100 * statistics.fmean(values):.2f}" if values else "–"

    def seeds_of(init: str) -> set[int]:
        return {s for (i, s) in individual if i == init}

    def caused(init: str, task: str) -> str:
        tasks, m = interference.get(init, ([], []))
        if task not in tasks or len(tasks) < 2:
            return "–"
        j = tasks.index(task)
        return f"{statistics.fmean(m[i][j] for i in range(len(tasks)) if i != j):.4g}"

    header = ("| init | task | OSRM: own | OSRM: others | contrast: own | contrast: others | null dim of Σ₋ᵢ | "
              f"starves | individual | {reference} individual | interference caused |")
    lines = [header, "|---|---|---:|---:|---:|---:|---:|---|---:|---:|---:|"]
    for init, tasks in forecasts.items():
        for task, f in tasks.items():
            shares = " | ".join(f"{f[mode][who]:.3g}" for mode in ("osrm", "contrast") for who in ("own", "others"))
            lines.append(f"| {init} | {task} | {shares} | {f['others_null_dim']} | {_yes_no(f['starves'])} | "
                         f"{score(init, task)} | {score(reference, task, seeds_of(init))} | {caused(init, task)} |")
    return "\n".join(lines) + "\n"


def modes_markdown(results: Mapping[str, Any]) -> str:
    """The training modes' last logged task loss and penalty (osrm-reg) per adapter (docs/modes.md)."""
    rows = results.get("modes") or []
    if not rows:
        return ""
    def cell(value: float | None) -> str:
        return "–" if value is None else f"{value:.4g}"

    lines = ["| init | seed | task | μ | task loss | penalty P | P at the start |", "|---|---:|---|---:|---:|---:|---:|"]
    for r in rows:
        log = r["last_log"]
        lines.append(f"| {r['init']} | {r['seed']} | {r['task']} | {r.get('mu', '–')} | {cell(log['task_loss'])} | "
                     f"{cell(log.get('penalty'))} | {cell(r.get('penalty_initial'))} |")
    return "\n".join(lines) + "\n"


def _write_tables_and_plots(results: Mapping[str, Any], output_dir: Path, tables: Sequence[Table]) -> dict[str, Path]:
    """The CSV tables and the PNG plots of the report; returns what was written."""
    selected, best, fixed = tables
    written: dict[str, Path] = {}
    for table in (selected, best, fixed):
        written[f"{table.name}.csv"] = output_dir / f"table_{table.name}.csv"
        write_text(written[f"{table.name}.csv"], _table_csv(table))
    plots = output_dir / "plots"
    written["lambda_plot"] = plots / "score_vs_lambda.png"
    _plot_lambda_curves(results, written["lambda_plot"])
    if _plot_interference(results, plots / "interference.png"):
        written["interference_plot"] = plots / "interference.png"
    written["bars_plot"] = plots / "task_scores_best_lambda.png"
    _plot_task_bars(selected, written["bars_plot"])
    if _plot_samples(results, selected, plots / "score_vs_samples.png"):
        written["samples_plot"] = plots / "score_vs_samples.png"
    return written


def write_report(results: Mapping[str, Any], output_dir: str | Path) -> dict[str, Path]:
    """Write report.md, the CSV tables and the PNG plots into `output_dir`; returns what was written."""
    check_results(results)
    output_dir = Path(output_dir)
    selected, best, fixed = selected_lambda_table(results), best_lambda_table(results), fixed_lambda_table(results)
    written = _write_tables_and_plots(results, output_dir, (selected, best, fixed))
    fixed_note = ", ".join(
        f"{m}: λ={lam:g}" for m, lam in (results.get("fixed_lambda") or {}).items() if lam is not None
    )
    metrics = ", ".join(f"{t}: {m}" for t, m in (results.get("primary_metrics") or {}).items())
    evaluation = results.get("evaluation") or {}
    parts = [
        f"# {results.get('experiment', 'experiment')}: merging LoRA adapters\n",
        f"Model `{results.get('model', '?')}`; seeds {results['seeds']}; primary metrics: {metrics}.\n",
        (
            "Scores in percent on each task's *report* rows; *norm. avg* is the mean over tasks of merged score / "
            "the same init's individual score. λ is chosen on disjoint held-out *select* rows "
            f"({evaluation.get('select_examples', '?')} per task), per seed (λ per seed where they differ); "
            "the oracle view tunes λ on the report rows themselves and is an optimistic bound, not a result; "
            "the fixed-λ view needs no tuning.\n"
        ),
        f"## {selected.title}\n",
        table_markdown(selected),
    ]
    paired = paired_markdown(results)
    if paired:
        parts += [f"## Paired differences from {results.get('reference_init')} over seeds\n",
                  ("Per seed, the difference of the average score (merged: at each init's selected λ; "
                   "individual: the unmerged adapters); points.\n"), paired]
    parts += [f"## {best.title}\n", table_markdown(best), f"## {fixed.title} ({fixed_note})\n", table_markdown(fixed)]
    diagnostics = diagnostics_markdown(results)
    if diagnostics:
        parts += ["## Adapter diagnostics\n", DIAGNOSTICS_NOTE, diagnostics]
    modes = modes_markdown(results)
    if modes:
        parts += ["## Training modes: the task loss and the penalty, as last logged\n", modes]
    forecast = forecast_markdown(results)
    if forecast:
        parts += ["## Forecast from the statistics, and the outcome\n", FORECAST_NOTE, forecast]
    interference = _interference_markdown(results)
    if interference:
        parts += ["## Interference\n", interference, "![interference](plots/interference.png)\n"]
    parts += [
        "## Plots\n",
        "![score vs λ](plots/score_vs_lambda.png)\n",
        "![per-task scores](plots/task_scores_best_lambda.png)\n",
    ]
    if "samples_plot" in written:
        parts.append("![score vs statistics sample size](plots/score_vs_samples.png)\n")
    written["report"] = output_dir / "report.md"
    write_text(written["report"], "\n".join(parts))
    return written


def write_results(results: Mapping[str, Any], path: str | Path) -> None:
    check_results(results)
    write_json(path, dict(results))
