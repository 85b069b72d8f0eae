"""results.json: every finished score of an experiment, flat, plus the study's comparisons, as `report` reads it.

Only finished units count (their names per stage, from the cache's lookup), so a study run in chunks is
reported from whatever is done, and a unit not yet run is left out rather than invented.
"""

from __future__ import annotations

import json
from collections.abc import Collection, Mapping
from typing import Any

import numpy as np

from ..settings import ExperimentConfig
from .keys import AdapterKey, MergeKey, RunKey
from .layout import Layout

Finished = Mapping[str, Collection[str]]  # stage -> names of its finished units


def _read(path) -> dict:
    return json.loads(path.read_text())


def _score_row(record: Mapping[str, Any]) -> dict:
    """An eval JSON's task record without its per-example predictions (kept in the eval files)."""
    row = {k: record[k] for k in ("task", "metrics", "primary_metric", "score")}
    row["examples"] = record["examples"]["n"]
    if "select" in record:
        row.update(select_score=record["select"]["score"], select_metrics=record["select"]["metrics"])
    return row


def _merge_keys(config: ExperimentConfig):
    for merge in config.merge:
        for seed in config.seeds:
            for init in config.init_labels:
                for lam in merge.grid:
                    yield MergeKey(merge.label, init, seed, lam)


def _runs(config: ExperimentConfig):
    for seed in config.seeds:
        for init in config.init_labels:
            yield RunKey(init, seed)


def _samples(config: ExperimentConfig, init: str) -> dict[str, int]:
    """The `samples` field of a statistics-based init's records: the sample size its subspaces came from."""
    n = config.init_run(init).samples
    return {} if n is None else {"samples": n}


def _scores(config: ExperimentConfig, layout: Layout, finished: Finished) -> dict[str, list]:
    """The individual and merged score rows, interference matrices and diagnostics of the finished units."""
    individual = [
        {"init": run.init, "seed": run.seed, **_samples(config, run.init),
         **_score_row(_read(layout.individual(run.adapter(t))))}
        for run in _runs(config)
        for t in config.task_names
        if run.adapter(t).name in finished.get("eval", ())
    ]
    merged = []
    for key in _merge_keys(config):
        if key.name in finished.get("merge", ()):
            row = {"init": key.init, "seed": key.seed, **_samples(config, key.init), "method": key.label,
                   "lambda": key.lam}
            merged += [{**row, **_score_row(record)} for record in _read(layout.merged(key))["tasks"]]
    done = [run for run in _runs(config) if run.name in finished.get("interference", ())]
    interference = [
        {k: data[k] for k in ("init", "seed", "tasks", "matrix")}
        for data in (_read(layout.interference(run)) for run in done)
    ]
    diagnostics = [
        _read(layout.diagnostics(run)) for run in _runs(config) if run.name in finished.get("diagnostics", ())
    ]
    return {"individual": individual, "merged": merged, "interference": interference, "diagnostics": diagnostics}


def _forecasts(config: ExperimentConfig, layout: Layout) -> dict[str, dict[str, dict]]:
    """Per init that starts from a subspace and per merged task, the forecast its subspace file records
    (`forecast.summarise`), read from the file's header without loading tensors; absent files are skipped."""
    from safetensors import safe_open

    from ..forecast import summarise
    from ..inits import get_init

    forecasts: dict[str, dict[str, dict]] = {}
    for run in config.init_runs:
        variant = get_init(run.name).subspace_variant(config.subspace.variant)
        for task in config.task_names if variant else ():
            tag = None if run.samples == config.statistics.reference else run.samples
            path = layout.subspace(variant, task, tag)
            if not path.is_file():
                continue
            with safe_open(str(path), framework="numpy") as f:
                diagnostics = json.loads((f.metadata() or {}).get("diagnostics", "{}"))
            summary = summarise({m: d.get("spectrum", {}) for m, d in diagnostics.items()})
            if summary is not None:
                forecasts.setdefault(run.label, {})[task] = summary
    return forecasts


def _modes(config: ExperimentConfig, layout: Layout, finished: Finished) -> list[dict[str, Any]]:
    """Per evaluated adapter of a training mode with a hook (osrm-reg, osrm-project), its last logged task loss
    and mode values and its metadata's final record, from the adapter's osrm_lora.json."""
    from ..adapters import METADATA_NAME

    rows = []
    for run in _runs(config):
        for task in config.task_names:
            key = run.adapter(task)
            path = layout.adapter(key) / METADATA_NAME
            if key.name not in finished.get("eval", ()) or not path.is_file():
                continue
            mode = _read(path).get("mode") or {}
            if mode.get("log"):
                final = {k: v for k, v in mode.items() if k != "log" and not isinstance(v, dict)}
                rows.append({"init": run.init, "seed": run.seed, "task": task, **final, "last_log": mode["log"][-1]})
    return rows


def _example_loader(config: ExperimentConfig, layout: Layout):
    """(init, method, seed, λ) -> {task: per-example values of the report rows}, read from the eval files."""
    from ..study import INDIVIDUAL, record_values

    def load(init: str, method: str, seed: int, lam: float | None) -> dict[str, np.ndarray]:
        if method == INDIVIDUAL:
            records = [_read(layout.individual(AdapterKey(init, seed, t))) for t in config.task_names]
        else:
            records = _read(layout.merged(MergeKey(method, init, seed, lam)))["tasks"]
        return {r["task"]: record_values(r) for r in records}

    return load


def collect_results(config: ExperimentConfig, layout: Layout, finished: Finished) -> dict[str, Any]:
    """The finished units' scores of `config`, read from `layout`, with the λ selection per (init, method,
    seed) and each init's paired differences from the reference init."""
    from ..report import RESULTS_FORMAT
    from ..study import paired_differences, select_lambdas

    c = config
    results = {
        "format": RESULTS_FORMAT,
        "experiment": c.name,
        "model": c.model.name,
        "tasks": c.task_names,
        "inits": c.init_labels,
        "init_runs": {r.label: {"entry": r.entry, "init": r.name, "options": r.options, "samples": r.samples}
                      for r in c.init_runs},
        "methods": [m.label for m in c.merge],
        "seeds": c.seeds,
        "reference_init": c.reference_init,
        "evaluation": c.evaluation.model_dump(),
        "fixed_lambda": {m.label: m.fixed_lambda for m in c.merge},
        **_scores(c, layout, finished),
    }
    results["primary_metrics"] = {r["task"]: r["primary_metric"] for r in results["individual"] + results["merged"]}
    results["forecast"] = _forecasts(c, layout)
    results["modes"] = _modes(c, layout, finished)
    results["selection"] = select_lambdas(results["merged"], c.task_names)
    settings = c.report
    results["paired"] = paired_differences(
        results, c.reference_init, _example_loader(c, layout),
        level=settings.level, resamples=settings.resamples, threshold=settings.threshold,
    )
    return results
