"""The paper's score aggregates over tasks: the average, and the normalised score of a merged model.

Merged models are compared to the individually fine-tuned adapters through the *normalised* score (merged /
individual, per task), which removes the differences in task difficulty before averaging (as in the OSRM and
TIES papers). Each task's score is also split into per-example values, for bootstraps over examples. Numpy and
scipy only, so reports are rebuilt without torch.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping

import numpy as np

from .errors import EvaluationError


def average(scores: Mapping[str, float]) -> float:
    """Unweighted mean over tasks."""
    if not scores:
        raise EvaluationError("cannot average an empty set of task scores")
    return statistics.fmean(float(v) for v in scores.values())


def normalised_scores(merged: Mapping[str, float], individual: Mapping[str, float]) -> dict[str, float]:
    """merged[t] / individual[t] per task; NaN where the individual score is <= 0 (an MCC or a correlation at
    or below chance gives a ratio with no meaning)."""
    missing = sorted(set(merged) - set(individual))
    if missing:
        raise EvaluationError(f"no individual fine-tuned score for tasks {missing} to normalise by")
    return {
        t: (float(s) / float(individual[t]) if individual[t] > 0 else math.nan) for t, s in merged.items()
    }


def normalised_average(normalised: Mapping[str, float]) -> float:
    """Mean of the defined (non-NaN) normalised scores; NaN when none is defined."""
    defined = [float(v) for v in normalised.values() if not math.isnan(v)]
    return statistics.fmean(defined) if defined else math.nan


# ------------------------------------------------------------------------------------- per-example values
#
# Seeds as paired replicates resample evaluation examples (`paired._bootstrap_interval`), which needs each
# task's score split into one value per example. For accuracy that is the correctness. For F1, MCC and
# correlations, which are not means, it is the jackknife's split: v_i = M + (n − 1)(mean_j M₋ⱼ − M₋ᵢ), with
# M₋ᵢ the score without example i. The values average to M exactly and their spread is the jackknife's
# (first-order right for any smooth score); for accuracy they are the correctness itself.

_DIGITS = "0123456789abcdefghijklmnopqrstuvwxyz"


def encode_labels(values, regression: bool) -> str | list[float]:
    """Compact JSON for per-example class ids (one base-36 character each) or regression values (8 digits)."""
    if regression:
        return [float(f"{float(v):.8g}") for v in values]
    ids = [int(v) for v in values]
    if ids and (min(ids) < 0 or max(ids) >= len(_DIGITS)):
        raise EvaluationError(f"class ids must lie in 0..{len(_DIGITS) - 1} to encode, got {min(ids)}..{max(ids)}")
    return "".join(_DIGITS[i] for i in ids)


def decode_labels(encoded: str | list) -> np.ndarray:
    """The inverse of `encode_labels`: int64 class ids from a string, float64 values from a list."""
    if isinstance(encoded, str):
        return np.array([_DIGITS.index(c) for c in encoded], dtype=np.int64)
    return np.asarray(encoded, dtype=np.float64)


def _confusion_scores(C: np.ndarray, metric: str) -> np.ndarray:
    """`metric` of a stack of K×K confusion matrices (…, gold, predicted), with scikit-learn's conventions
    (zero_division=0; an undefined MCC is 0)."""
    C = C.astype(np.float64)
    n = C.sum((-2, -1))
    diag = np.diagonal(C, axis1=-2, axis2=-1)
    gold, pred = C.sum(-1), C.sum(-2)
    with np.errstate(divide="ignore", invalid="ignore"):
        if metric == "accuracy":
            return diag.sum(-1) / n
        if metric == "f1":
            tp, fp, fn = C[..., 1, 1], C[..., 0, 1], C[..., 1, 0]
            return np.where(2 * tp + fp + fn > 0, 2 * tp / (2 * tp + fp + fn), 0.0)
        if metric == "macro_f1":
            return np.where(gold + pred > 0, 2 * diag / (gold + pred), 0.0).mean(-1)
        if metric == "matthews":
            cov = diag.sum(-1) * n - (gold * pred).sum(-1)
            var = (n ** 2 - (pred * pred).sum(-1)) * (n ** 2 - (gold * gold).sum(-1))
            return np.where(var > 0, cov / np.sqrt(var), 0.0)
        if metric == "mean_f1_accuracy":
            return (_confusion_scores(C, "f1") + _confusion_scores(C, "accuracy")) / 2
    raise EvaluationError(f"no per-example values for classification metric {metric!r}")


def _classification_values(metric: str, pred: np.ndarray, gold: np.ndarray, num_labels: int) -> np.ndarray:
    """Only K² confusion matrices differ between the leave-one-out scores: one per (gold, predicted) cell."""
    C = np.zeros((num_labels, num_labels))
    np.add.at(C, (gold, pred), 1)
    cells = np.eye(num_labels * num_labels).reshape(num_labels, num_labels, num_labels, num_labels)
    without = _confusion_scores(C[None, None] - cells, metric)[gold, pred]  # M₋ᵢ per example
    return _jackknife(float(_confusion_scores(C, metric)), without)


def _jackknife(full: float, without: np.ndarray) -> np.ndarray:
    """vᵢ = M + (n − 1)(mean_j M₋ⱼ − M₋ᵢ): mean M, the jackknife's spread."""
    return full + (without.size - 1) * (without.mean() - without)


def _pearson_without(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Pearson's r of (x, y) without each example in turn, from running sums (0 where a side is constant)."""
    x, y = x - x.mean(), y - y.mean()
    m = x.size - 1
    sx, sy = x.sum() - x, y.sum() - y
    sxx, syy, sxy = (x * x).sum() - x * x, (y * y).sum() - y * y, (x * y).sum() - x * y
    vx, vy = sxx - sx * sx / m, syy - sy * sy / m
    with np.errstate(divide="ignore", invalid="ignore"):
        r = (sxy - sx * sy / m) / np.sqrt(vx * vy)
    scale = max(float((x * x).sum() * (y * y).sum()), np.finfo(float).tiny)
    return np.where(vx * vy > 1e-24 * scale, r, 0.0)


def _spearman_without(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Spearman's ρ without each example: removing xᵢ lowers the (average) rank of each larger value by 1
    and of each tie by ½; the ranks' Pearson r is then taken over the other n − 1 (in blocks of rows)."""
    from scipy.stats import rankdata

    rx, ry = rankdata(x), rankdata(y)
    n = x.size
    out = np.empty(n)
    rows = max(1, (1 << 22) // n)
    for start in range(0, n, rows):
        i = np.arange(start, min(n, start + rows))
        keep = np.ones((i.size, n))
        keep[np.arange(i.size), i] = 0.0
        a = (rx - (x > x[i, None]) - 0.5 * (x == x[i, None])) * keep
        b = (ry - (y > y[i, None]) - 0.5 * (y == y[i, None])) * keep
        m = n - 1
        ma, mb = a.sum(1, keepdims=True) / m, b.sum(1, keepdims=True) / m
        da, db = (a - ma) * keep, (b - mb) * keep
        va, vb = (da * da).sum(1), (db * db).sum(1)
        with np.errstate(divide="ignore", invalid="ignore"):
            out[i] = np.where(va * vb > 0, (da * db).sum(1) / np.sqrt(va * vb), 0.0)
    return out


def _regression_values(metric: str, pred: np.ndarray, gold: np.ndarray) -> np.ndarray:
    from scipy.stats import pearsonr, spearmanr

    def full(fn) -> float:
        return 0.0 if np.ptp(pred) == 0 or np.ptp(gold) == 0 else float(fn(pred, gold)[0])

    parts = {
        "pearson": lambda: _jackknife(full(pearsonr), _pearson_without(pred, gold)),
        "spearman": lambda: _jackknife(full(spearmanr), _spearman_without(pred, gold)),
    }
    if metric == "mean_pearson_spearman":
        return (parts["pearson"]() + parts["spearman"]()) / 2
    if metric not in parts:
        raise EvaluationError(f"no per-example values for regression metric {metric!r}")
    return parts[metric]()


def example_values(metric: str, predictions, labels, num_labels: int | None) -> np.ndarray:
    """One value per example that averages to the task's `metric` (see above); `num_labels` None: regression.

    Predictions and labels are class ids or regression values (as `decode_labels` gives them)."""
    pred, gold = np.asarray(predictions), np.asarray(labels)
    if pred.shape != gold.shape or pred.ndim != 1 or pred.size < 2:
        raise EvaluationError(f"per-example values need ≥ 2 paired predictions and labels, got {pred.shape}, "
                              f"{gold.shape}")
    if num_labels is None:
        return _regression_values(metric, pred.astype(np.float64), gold.astype(np.float64))
    if metric == "accuracy":  # the jackknife's values exactly, without rounding: few distinct values
        return (pred.astype(np.int64) == gold.astype(np.int64)).astype(np.float64)
    return _classification_values(metric, pred.astype(np.int64), gold.astype(np.int64), num_labels)
