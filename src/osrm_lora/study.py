"""An experiment's comparisons made sound: λ chosen on held-out rows, and seeds as paired replicates.

From the flat score records of results.json (see `pipeline.results`):

- `select_lambdas`: for each (init, method, seed), λ by the average over tasks on the `select` rows and the
  `report` scores at that λ, with the oracle (best λ on `report`) and the whole curve beside it
  (`selection.choose_lambda`);
- `paired_differences`: each init against the reference init, per method and for the individual
  (unmerged) adapters, over the seeds both have: mean and s.d. of the per-seed difference of the selected
  report average, its t-interval and the bootstrap over seeds then examples (`paired`), in words too.

The bootstrap needs each task's score split per example (`scores.example_values`); `examples` loads them for
one (init, method, seed, λ). Numpy and scipy only: the report is rebuilt without torch.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from .paired import paired_difference, verdict_text
from .scores import average, decode_labels, example_values
from .selection import choose_lambda

INDIVIDUAL = "individual"  # the method name of the unmerged adapters' rows and comparisons
# (init, method, seed, λ) -> {task: per-example values of the report rows}; method INDIVIDUAL: the adapters.
ExampleLoader = Callable[[str, str, int, float | None], Mapping[str, np.ndarray]]


def record_values(record: Mapping[str, Any]) -> np.ndarray:
    """The per-example values of an eval JSON's task record (its report rows' predictions and labels)."""
    examples = record["examples"]
    return example_values(record["primary_metric"], decode_labels(examples["predictions"]),
                          decode_labels(examples["labels"]), examples["num_labels"])


def select_lambdas(merged: Sequence[Mapping[str, Any]], tasks: Sequence[str]) -> list[dict]:
    """One λ choice per (init, method, seed) from its λ values that score every task on both parts."""
    grouped: dict[tuple, dict[float | None, dict[str, Mapping]]] = {}
    for r in merged:
        grouped.setdefault((r["init"], r["method"], r["seed"]), {}).setdefault(r["lambda"], {})[r["task"]] = r
    out = []
    for (init, method, seed), by_lam in grouped.items():
        complete = {lam: rows for lam, rows in by_lam.items() if set(tasks) <= set(rows)}
        if not complete:
            continue
        choice = choose_lambda(
            {lam: {t: rows[t]["select_score"] for t in tasks} for lam, rows in complete.items()},
            {lam: {t: rows[t]["score"] for t in tasks} for lam, rows in complete.items()},
        )
        out.append({"init": init, "method": method, "seed": seed, **choice.to_dict()})
    return out


def per_seed_scores(
    selection: Sequence[Mapping[str, Any]], individual: Sequence[Mapping[str, Any]], tasks: Sequence[str]
) -> dict[tuple[str, str], dict[int, tuple[float, float | None]]]:
    """(init, method) -> seed -> (score averaged over tasks, λ it was taken at); INDIVIDUAL for the adapters."""
    out: dict[tuple[str, str], dict[int, tuple[float, float | None]]] = {}
    for entry in selection:
        chosen = entry["selected"]
        out.setdefault((entry["init"], entry["method"]), {})[entry["seed"]] = (chosen["average"], chosen["lambda"])
    scores: dict[tuple[str, int], dict[str, float]] = {}
    for r in individual:
        scores.setdefault((r["init"], r["seed"]), {})[r["task"]] = r["score"]
    for (init, seed), by_task in scores.items():
        if set(tasks) <= set(by_task):
            out.setdefault((init, INDIVIDUAL), {})[seed] = (average({t: by_task[t] for t in tasks}), None)
    return out


def paired_differences(
    results: Mapping[str, Any],
    reference: str,
    examples: ExampleLoader | None,
    *,
    level: float = 0.95,
    resamples: int = 2000,
    threshold: float = 0.0,
) -> list[dict]:
    """Every init but `reference` against it, per method (at each seed's selected λ) and for the adapters,
    over the seeds both have; each entry is `PairedDifference.to_dict()` plus its `verdict` in words.

    Without `examples` there is no bootstrap interval."""
    tasks = list(results["tasks"])
    per_seed = per_seed_scores(results["selection"], results["individual"], tasks)
    out = []
    for method in [*results["methods"], INDIVIDUAL]:
        ref = per_seed.get((reference, method), {})
        for init in results["inits"]:
            mine = per_seed.get((init, method), {})
            seeds = sorted(set(mine) & set(ref))
            if init == reference or not seeds:
                continue
            boot = {}
            if examples is not None:
                boot = {
                    "examples": {s: examples(init, method, s, mine[s][1]) for s in seeds},
                    "reference_examples": {s: examples(reference, method, s, ref[s][1]) for s in seeds},
                }
            result = paired_difference(
                init, reference, method, {s: mine[s][0] for s in seeds}, {s: ref[s][0] for s in seeds},
                **boot, level=level, resamples=resamples,
            )
            out.append({**result.to_dict(), "seeds": seeds, "verdict": verdict_text(result, threshold)})
    return out
