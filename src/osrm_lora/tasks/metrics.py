"""Task metrics with GLUE's conventions, computed by scikit-learn and scipy.

Classification predictions may be class ids or logits (argmax is taken); regression predictions are one
number per example. A correlation of a constant vector is undefined; it is reported as 0.0 (no measurable
relationship) so that untrained or collapsed models still produce a comparable, finite score.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
from scipy.stats import pearsonr, spearmanr
from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

from .spec import TaskError, TaskSpec


def _correlation(fn: Callable, x: np.ndarray, y: np.ndarray) -> float:
    if len(x) < 2 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return 0.0
    return float(fn(x, y)[0])


def _classification_scores(pred: np.ndarray, gold: np.ndarray, n_labels: int) -> dict[str, Callable[[], float]]:
    labels = list(range(n_labels))
    return {
        "accuracy": lambda: float(accuracy_score(gold, pred)),
        "f1": lambda: float(f1_score(gold, pred, pos_label=1, average="binary", zero_division=0)),
        "macro_f1": lambda: float(f1_score(gold, pred, labels=labels, average="macro", zero_division=0)),
        "matthews": lambda: float(matthews_corrcoef(gold, pred)),
    }


def _as_class_ids(predictions: Any, spec: TaskSpec) -> np.ndarray:
    pred = np.asarray(predictions)
    if pred.ndim == 2:
        if pred.shape[1] != spec.num_labels:
            raise TaskError(
                f"task {spec.name!r}: logits have {pred.shape[1]} columns, the task has {spec.num_labels} labels"
            )
        return pred.argmax(axis=1)
    if pred.ndim != 1:
        raise TaskError(f"task {spec.name!r}: predictions must be class ids (N) or logits (N×C), got {pred.shape}")
    if pred.size and not np.all(np.equal(np.mod(pred, 1), 0)):
        raise TaskError(f"task {spec.name!r}: class-id predictions must be integers")
    ids = pred.astype(np.int64)
    if ids.size and (ids.min() < 0 or ids.max() >= spec.num_labels):
        raise TaskError(f"task {spec.name!r}: predicted class ids outside 0..{spec.num_labels - 1}")
    return ids


def _as_scores(values: Any, spec: TaskSpec, what: str) -> np.ndarray:
    arr = np.asarray(values, dtype=np.float64)
    if arr.ndim == 2 and arr.shape[1] == 1:
        arr = arr[:, 0]
    if arr.ndim != 1:
        raise TaskError(f"task {spec.name!r}: regression {what} must be one number per example, got {arr.shape}")
    return arr


def compute_metrics(spec: TaskSpec, predictions: Any, labels: Any) -> dict[str, float]:
    """Every metric of `spec.metrics` (the primary one included) for these predictions against gold labels."""
    gold_raw = np.asarray(labels)
    if len(np.atleast_1d(predictions)) != len(np.atleast_1d(gold_raw)):
        raise TaskError(
            f"task {spec.name!r}: {len(np.atleast_1d(predictions))} predictions for {len(gold_raw)} labels"
        )
    if gold_raw.size == 0:
        raise TaskError(f"task {spec.name!r}: no examples to score")
    if spec.is_regression:
        pred, gold = _as_scores(predictions, spec, "predictions"), _as_scores(labels, spec, "labels")
        pearson = _correlation(pearsonr, pred, gold)
        spearman = _correlation(spearmanr, pred, gold)
        scores = {"pearson": pearson, "spearman": spearman, "mean_pearson_spearman": (pearson + spearman) / 2}
        return {m: scores[m] for m in spec.metrics}
    pred, gold = _as_class_ids(predictions, spec), _as_class_ids(gold_raw, spec)
    lazy = _classification_scores(pred, gold, spec.num_labels)
    out: dict[str, float] = {}
    for m in spec.metrics:
        if m == "mean_f1_accuracy":
            out[m] = (lazy["f1"]() + lazy["accuracy"]()) / 2
        else:
            out[m] = lazy[m]()
    return out
