"""results.json: every score of an experiment, flat, as `report` reads it."""

from __future__ import annotations

import json
from typing import Any

from ..settings import ExperimentConfig
from .keys import AdapterKey, MergeKey, RunKey
from .layout import Layout


def _read(path) -> dict:
    return json.loads(path.read_text())


def collect_results(config: ExperimentConfig, layout: Layout) -> dict[str, Any]:
    """Every individual and merged score and interference matrix of `config`, read from `layout`."""
    from ..report import RESULTS_FORMAT

    c = config
    individual = [
        _read(layout.individual(AdapterKey(init, seed, t)))
        for seed in c.seeds
        for init in c.inits
        for t in c.task_names
    ]
    merged = []
    for merge in c.merge:
        for seed in c.seeds:
            for init in c.inits:
                for lam in merge.grid:
                    data = _read(layout.merged(MergeKey(merge.label, init, seed, lam)))
                    row = {"init": init, "seed": seed, "method": merge.label, "lambda": lam}
                    merged += [{**row, **record} for record in data["tasks"]]
    interference = []
    if c.interference:
        for seed in c.seeds:
            for init in c.inits:
                data = _read(layout.interference(RunKey(init, seed)))
                interference.append({k: data[k] for k in ("init", "seed", "tasks", "matrix")})
    return {
        "format": RESULTS_FORMAT,
        "experiment": c.name,
        "model": c.model.name,
        "tasks": c.task_names,
        "inits": c.inits,
        "methods": [m.label for m in c.merge],
        "seeds": c.seeds,
        "primary_metrics": {r["task"]: r["primary_metric"] for r in individual},
        "evaluation": c.evaluation.model_dump(),
        "fixed_lambda": {m.label: m.fixed_lambda for m in c.merge},
        "individual": individual,
        "merged": merged,
        "interference": interference,
    }
