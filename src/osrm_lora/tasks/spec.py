"""What a task is: its text fields, its labels (or regression) and how it is scored.

A `TaskSpec` is pure description, independent of where the data comes from, so adapters, statistics and
reports can name a task and score predictions without loading any data.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import asdict, dataclass
from typing import Any

from ..errors import OsrmLoraError

# Metric names a spec may list; `metrics.py` computes each of them.
CLASSIFICATION_METRICS = ("accuracy", "f1", "macro_f1", "matthews", "mean_f1_accuracy")
REGRESSION_METRICS = ("pearson", "spearman", "mean_pearson_spearman")


class TaskError(OsrmLoraError):
    """A task that cannot be built or used: unknown name, bad options, labels that do not fit."""


class UnknownTaskError(TaskError):
    """A task name that no source knows; the message lists the closest known names."""


@dataclass(frozen=True)
class TaskSpec:
    """A task's description: `label_names` is None for a regression task (one real-valued output)."""

    name: str
    text_fields: tuple[str, ...]
    label_names: tuple[str, ...] | None
    metrics: tuple[str, ...]
    primary_metric: str
    source: str = ""
    licence: str = ""
    description: str = ""

    def __post_init__(self) -> None:
        object.__setattr__(self, "text_fields", tuple(self.text_fields))
        object.__setattr__(self, "metrics", tuple(self.metrics))
        if self.label_names is not None:
            object.__setattr__(self, "label_names", tuple(str(n) for n in self.label_names))
        where = f"task {self.name!r}"
        if not self.name:
            raise TaskError("a task needs a non-empty name")
        if len(self.text_fields) not in (1, 2):
            raise TaskError(f"{where}: text_fields must name one field or a pair, got {self.text_fields}")
        if self.label_names is not None:
            if len(self.label_names) < 2:
                raise TaskError(f"{where}: a classification task needs at least 2 labels, got {self.label_names}")
            if len(set(self.label_names)) != len(self.label_names):
                raise TaskError(f"{where}: duplicate label names {self.label_names}")
        allowed = REGRESSION_METRICS if self.is_regression else CLASSIFICATION_METRICS
        unknown = [m for m in self.metrics if m not in allowed]
        if unknown or not self.metrics:
            kind = "regression" if self.is_regression else "classification"
            raise TaskError(f"{where}: metrics {unknown or '[]'} are not {kind} metrics (choose from {allowed})")
        if self.label_names is not None and len(self.label_names) != 2:
            binary_only = [m for m in self.metrics if m in ("f1", "mean_f1_accuracy")]
            if binary_only:
                raise TaskError(f"{where}: {binary_only} need 2 labels (use macro_f1 for {len(self.label_names)})")
        if self.primary_metric not in self.metrics:
            raise TaskError(f"{where}: primary metric {self.primary_metric!r} is not among {self.metrics}")

    @property
    def is_regression(self) -> bool:
        return self.label_names is None

    @property
    def is_pair(self) -> bool:
        return len(self.text_fields) == 2

    @property
    def num_labels(self) -> int:
        """Size of the model's output layer: 1 for regression."""
        return 1 if self.label_names is None else len(self.label_names)

    def label_value(self, raw: Any) -> int | float:
        """A raw label (class name, class id, or number for regression) as the stored value; ValueError if not."""
        if self.label_names is None:
            value = float(raw)
            if not math.isfinite(value):
                raise TaskError(f"regression label {raw!r} is not a finite number")
            return value
        if isinstance(raw, numbers.Number) and not isinstance(raw, bool):  # numbers are class ids, strings are names first
            number = float(raw)
        else:
            text = str(raw).strip()
            if text in self.label_names:
                return self.label_names.index(text)
            try:
                number = float(text)
            except ValueError:
                raise TaskError(f"label {raw!r} is not one of {list(self.label_names)}") from None
        if number.is_integer() and 0 <= number < len(self.label_names):
            return int(number)
        raise TaskError(f"label {raw!r} is not a class id in 0..{len(self.label_names) - 1}")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["text_fields"] = list(self.text_fields)
        d["label_names"] = None if self.label_names is None else list(self.label_names)
        d["metrics"] = list(self.metrics)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TaskSpec:
        names = d.get("label_names")
        return cls(
            name=d["name"], text_fields=tuple(d["text_fields"]), label_names=None if names is None else tuple(names),
            metrics=tuple(d["metrics"]), primary_metric=d["primary_metric"], source=d.get("source", ""),
            licence=d.get("licence", ""), description=d.get("description", ""),
        )


def default_metrics(label_names: tuple[str, ...] | None) -> tuple[tuple[str, ...], str]:
    """(metrics, primary) for a task without its own convention: GLUE's choices by label count."""
    if label_names is None:
        return ("pearson", "spearman", "mean_pearson_spearman"), "mean_pearson_spearman"
    if len(label_names) == 2:
        return ("accuracy", "f1"), "accuracy"
    return ("accuracy", "macro_f1"), "accuracy"
