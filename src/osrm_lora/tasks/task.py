"""A task's data: named splits of (text, optional text_pair, label) rows plus its spec.

Every source (GLUE files, the hub, users' files, the built-in suite, in-memory records) ends up here, so
sampling and tokenisation see one shape: columns `text`, `text_pair` for pair tasks, and `label` (class id,
or float for regression).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import datasets

from .sampling import make_rng, sample_indices
from .spec import TaskError, TaskSpec


def _dataset_features(spec: TaskSpec) -> datasets.Features:
    columns = {"text": datasets.Value("string")}
    if spec.is_pair:
        columns["text_pair"] = datasets.Value("string")
    columns["label"] = (
        datasets.Value("float32") if spec.is_regression else datasets.ClassLabel(names=list(spec.label_names))
    )
    return datasets.Features(columns)


def records_to_dataset(spec: TaskSpec, records: Iterable[Mapping[str, Any]], where: str = "records") -> datasets.Dataset:
    """Normalised rows as a Dataset; a record without text or with a label the spec cannot read is an error."""
    columns: dict[str, list] = {"text": [], "label": []}
    if spec.is_pair:
        columns["text_pair"] = []
    for i, record in enumerate(records):
        try:
            text = record["text"]
            pair = record["text_pair"] if spec.is_pair else None
            label = spec.label_value(record["label"])
        except KeyError as exc:
            raise TaskError(f"task {spec.name!r}, {where} row {i}: missing field {exc.args[0]!r}") from None
        except ValueError as exc:
            raise TaskError(f"task {spec.name!r}, {where} row {i}: {exc}") from None
        if not isinstance(text, str) or (spec.is_pair and not isinstance(pair, str)):
            raise TaskError(f"task {spec.name!r}, {where} row {i}: text fields must be strings")
        columns["text"].append(text)
        if spec.is_pair:
            columns["text_pair"].append(pair)
        columns["label"].append(label)
    return datasets.Dataset.from_dict(columns, features=_dataset_features(spec))


def column(data: datasets.Dataset, name: str) -> list:
    """One column as a list; much faster than iterating `data[name]`, which reads row by row."""
    return data.select_columns([name])[:][name]


class Task:
    """A task spec with its splits; splits may be given as loaders that run on first use."""

    def __init__(self, spec: TaskSpec, splits: Mapping[str, datasets.Dataset | Callable[[], datasets.Dataset]]):
        if not splits:
            raise TaskError(f"task {spec.name!r}: no splits")
        self.spec = spec
        self._splits = dict(splits)

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def split_names(self) -> list[str]:
        return list(self._splits)

    def has_split(self, name: str) -> bool:
        return name in self._splits

    def full_split(self, name: str) -> datasets.Dataset:
        if name not in self._splits:
            raise TaskError(f"task {self.name!r} has no split {name!r} (it has {self.split_names})")
        data = self._splits[name]
        if callable(data) and not isinstance(data, datasets.Dataset):
            data = self._splits[name] = data()
        return data

    def split(self, name: str, max_examples: int | None = None, seed: int = 0) -> datasets.Dataset:
        """The split, or a seeded subset of at most `max_examples` rows (stratified by class, in row order)."""
        data = self.full_split(name)
        if max_examples is None or max_examples >= len(data):
            return data
        if max_examples < 1:
            raise TaskError(f"task {self.name!r}: max_examples must be positive, got {max_examples}")
        labels = None if self.spec.is_regression else column(data, "label")
        return data.select(sample_indices(labels, len(data), max_examples, make_rng(seed)))

    def sizes(self) -> dict[str, int]:
        return {name: len(self.full_split(name)) for name in self._splits}

    @classmethod
    def from_records(cls, spec: TaskSpec, splits: Mapping[str, Iterable[Mapping[str, Any]]]) -> Task:
        """A task from in-memory rows with keys text, (text_pair), label (name, id, or number for regression)."""
        return cls(spec, {name: records_to_dataset(spec, rows, f"split {name!r}") for name, rows in splits.items()})

    def __repr__(self) -> str:
        return f"Task({self.name!r}, splits={self.split_names})"
