"""λ chosen on held-out examples, so the reported score is not also the score λ was tuned on.

Each task's evaluation rows are split into a `select` part and a disjoint `report` part
(`tasks.sampling.select_report_indices`). λ is the one with the best average over tasks on `select`; the
report gives the `report` scores at that λ. The oracle (best λ on `report` itself, an optimistic upper
bound) and the whole curve are kept beside it, each labelled as what it is. Pure Python: no torch.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping
from dataclasses import dataclass

Curve = Mapping[float | None, Mapping[str, float]]  # λ -> task -> score (None: a method without λ)


def _averages(curve: Curve, part: str) -> dict[float | None, float]:
    """Mean over tasks per λ; every λ must score the same tasks, all finite."""
    if not curve:
        raise ValueError(f"the {part} curve has no λ")
    tasks = sorted(next(iter(curve.values())))
    out = {}
    for lam, scores in curve.items():
        if sorted(scores) != tasks or not tasks:
            raise ValueError(f"{part} curve, λ={lam}: tasks {sorted(scores)} differ from {tasks}")
        bad = [t for t, v in scores.items() if not math.isfinite(v)]
        if bad:
            raise ValueError(f"{part} curve, λ={lam}: non-finite scores for tasks {bad}")
        out[lam] = statistics.fmean(float(v) for v in scores.values())
    return out


def _best_lambda(curve: Curve, part: str = "select") -> float | None:
    """The λ with the highest average score; ties go to the smaller λ (as the best-λ table does)."""
    averages = _averages(curve, part)
    return max(averages, key=lambda lam: (averages[lam], -(lam or 0.0)))


@dataclass(frozen=True)
class LambdaChoice:
    """λ picked on `select` with its `report` scores, the oracle, and the curve on both parts."""

    lam: float | None
    report: dict[str, float]  # report scores at the selected λ: the number to publish
    report_average: float
    oracle_lam: float | None  # best λ on report itself: optimistic, not a result
    oracle_average: float
    curve: list[dict]  # one entry per λ (ascending): select and report scores and averages

    def to_dict(self) -> dict:
        return {
            "selected": {"lambda": self.lam, "chosen_on": "select", "reported_on": "report",
                         "scores": self.report, "average": self.report_average},
            "oracle": {"lambda": self.oracle_lam, "chosen_on": "report", "reported_on": "report",
                       "average": self.oracle_average, "note": "λ tuned on the reported examples (optimistic)"},
            "curve": self.curve,
        }


def choose_lambda(select_curve: Curve, report_curve: Curve) -> LambdaChoice:
    """λ by the `select` average (which alone decides it), with the report scores, oracle and curve."""
    if set(select_curve) != set(report_curve):
        raise ValueError(f"select and report curves cover different λ: {sorted(select_curve, key=_order)} vs "
                         f"{sorted(report_curve, key=_order)}")
    lam = _best_lambda(select_curve, "select")
    select_avg, report_avg = _averages(select_curve, "select"), _averages(report_curve, "report")
    oracle = _best_lambda(report_curve, "report")
    curve = [{"lambda": x, "select": dict(select_curve[x]), "select_average": select_avg[x],
              "report": dict(report_curve[x]), "report_average": report_avg[x]}
             for x in sorted(select_curve, key=_order)]
    return LambdaChoice(lam=lam, report=dict(report_curve[lam]), report_average=report_avg[lam],
                        oracle_lam=oracle, oracle_average=report_avg[oracle], curve=curve)


def _order(lam: float | None) -> float:
    return -math.inf if lam is None else lam
