"""Users' own tasks from CSV, TSV or JSONL files with a column mapping.

Labels may be class names or class ids; without `label_names` the classes are the distinct labels of the
train file (ids 0..N-1 when all are non-negative integers, else the sorted names). A label only another split
has, or ids with gaps, would be a class never trained: refused, as `label_names` states the classes when that
is meant. `label_names` and `metrics` may be one comma-separated string (`--task-option label_names=neg,pos`).
With `regression=True` the label is a number. CSV/TSV files need a header row. Without a dev file, a seeded
stratified 10% of train becomes dev.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from ..io import OsrmFileError
from .rows import BadRow, delimited_rows, jsonl_rows, open_text, parse_rows, require_text
from .sampling import make_rng, partition_indices
from .spec import TaskError, TaskSpec, default_metrics
from .task import Task, column, records_to_dataset

FORMATS = {".csv": "csv", ".tsv": "tsv", ".tab": "tsv", ".jsonl": "jsonl", ".ndjson": "jsonl"}
QUOTING = {"minimal": csv.QUOTE_MINIMAL, "none": csv.QUOTE_NONE}
DEV_FRACTION = 0.1
CARVE_SEED = 7


def _file_format(path: Path, format: str | None) -> str:
    if format is not None:
        if format not in ("csv", "tsv", "jsonl"):
            raise TaskError(f"{path}: unknown format {format!r} (csv, tsv or jsonl)")
        return format
    try:
        return FORMATS[path.suffix.lower()]
    except KeyError:
        raise TaskError(f"{path}: cannot tell the format from the suffix {path.suffix!r}; "
                        f"use .csv, .tsv or .jsonl or pass format=") from None


def _column_getter(path: Path, header: list[str], columns: list[str]) -> Callable[[list[str]], dict[str, str]]:
    missing = [c for c in columns if c not in header]
    if missing:
        raise OsrmFileError(f"{path}: no column(s) {missing}; the header has {header}")
    positions = {c: header.index(c) for c in columns}

    def get(fields: list[str]) -> dict[str, str]:
        if len(fields) != len(header):
            raise BadRow(f"{len(fields)} fields, the header has {len(header)}")
        return {c: fields[i] for c, i in positions.items()}

    return get


def _read_records(
    path: Path, columns: Mapping[str, str | None], label_of: Callable[[Any], Any], *,
    format: str | None = None, quoting: str = "minimal",
) -> list[dict]:
    """Rows of one file as records {text, (text_pair), label}; `columns` maps those keys to file columns."""
    fmt = _file_format(path, format)
    wanted = {key: col for key, col in columns.items() if col is not None}

    def build(values: Mapping[str, Any]) -> dict:
        record = {}
        for key, col in wanted.items():
            if key == "label":
                if values.get(col) is None or str(values[col]).strip() == "":
                    raise BadRow(f"label column {col!r} is empty")
                try:
                    record["label"] = label_of(values[col])
                except ValueError as exc:
                    raise BadRow(str(exc)) from None
            else:
                record[key] = require_text(values.get(col), f"column {col!r}")
        return record

    with open_text(path, f"data file for column mapping {wanted}") as handle:
        if fmt == "jsonl":
            def parse_json(obj: Any) -> dict:
                if not isinstance(obj, dict):
                    raise BadRow("not a JSON object")
                return build(obj)

            return parse_rows(str(path), jsonl_rows(handle), parse_json)
        if quoting not in QUOTING:
            raise TaskError(f"{path}: quoting must be one of {sorted(QUOTING)}, got {quoting!r}")
        rows = delimited_rows(handle, "," if fmt == "csv" else "\t", QUOTING[quoting])
        first = next(rows, None)
        if first is None or isinstance(first[1], Exception):
            raise OsrmFileError(f"{path}: no header row (a {fmt.upper()} file needs column names on line 1)")
        get = _column_getter(path, [h.strip() for h in first[1]], list(wanted.values()))
        return parse_rows(str(path), rows, lambda fields: build(get(fields)))


def _infer_label_names(raw_labels: Sequence[Any], where: str = "labels") -> tuple[str, ...]:
    """Class names from the labels seen: '0'..'N-1' if all are non-negative integers, else sorted names.
    Integer ids with gaps ({0, 1, 5}) are refused: the missing ids would be classes without examples."""
    values = {str(v).strip() for v in raw_labels}
    if not all(v.isdigit() for v in values):
        return tuple(sorted(values))
    ids = sorted({int(v) for v in values})
    missing = sorted(set(range(ids[-1] + 1)) - set(ids))
    if missing:
        raise TaskError(f"{where}: label ids {ids} skip {missing}, classes without examples; renumber them "
                        f"0..{len(ids) - 1}, or give label_names (one name per id 0..{ids[-1]}) to keep "
                        f"empty classes")
    return tuple(str(i) for i in ids)


def _train_classes(name: str, raw: Mapping[str, list[dict]], paths: Mapping[str, Path]) -> tuple[str, ...]:
    """The classes of the train file's labels; a label only another split has is refused, not added."""
    names = _infer_label_names([r["label"] for r in raw["train"]], f"task {name!r}, {paths['train']}")
    for split, rows in raw.items():
        unseen = sorted({r["label"] for r in rows} - set(names))
        if unseen:
            raise TaskError(f"task {name!r}: {paths[split]} has label(s) {unseen[:5]} that the train file "
                            f"{paths['train']} never has, so no class could learn them; fix the labels, or "
                            f"give label_names to state the classes")
    return names


def _name_list(value: str | Sequence[str] | None) -> Sequence[str] | None:
    """A list option given as one string is comma-separated (`label_names=negative,positive`)."""
    if isinstance(value, str):
        return [part.strip() for part in value.split(",") if part.strip()]
    return value


def load_file_task(
    name: str,
    files: str | os.PathLike | Mapping[str, str | os.PathLike],
    *,
    text_column: str = "text",
    text_pair_column: str | None = None,
    label_column: str = "label",
    label_names: Sequence[str] | None = None,
    regression: bool = False,
    metrics: Sequence[str] | None = None,
    primary_metric: str | None = None,
    format: str | None = None,
    quoting: str = "minimal",
) -> Task:
    """A task from files per split (`{"train": path, "dev": path, "test": path}`; a single path is train)."""
    paths = {"train": Path(files)} if isinstance(files, (str, os.PathLike)) else {k: Path(v) for k, v in files.items()}
    if "train" not in paths:
        raise TaskError(f"task {name!r}: files must include a 'train' file, got splits {sorted(paths)}")
    label_names, metrics = _name_list(label_names), _name_list(metrics)
    if regression and label_names is not None:
        raise TaskError(f"task {name!r}: give either label_names or regression=True, not both")
    columns = {"text": text_column, "text_pair": text_pair_column, "label": label_column}
    text_fields = (text_column,) if text_pair_column is None else (text_column, text_pair_column)

    def spec_for(labels: Sequence[str] | None) -> TaskSpec:
        chosen, primary = default_metrics(None if labels is None else tuple(labels))
        sources = ", ".join(f"{k}={v}" for k, v in paths.items())
        return TaskSpec(name, text_fields, labels, tuple(metrics or chosen), primary_metric or primary,
                        source=f"files: {sources}")

    if regression or label_names is not None:
        spec = spec_for(None if regression else label_names)
        raw = {s: _read_records(p, columns, spec.label_value, format=format, quoting=quoting) for s, p in paths.items()}
    else:
        raw = {s: _read_records(p, columns, lambda v: str(v).strip(), format=format, quoting=quoting)
               for s, p in paths.items()}
        spec = spec_for(_train_classes(name, raw, paths))
    data = {s: records_to_dataset(spec, rows, str(paths[s])) for s, rows in raw.items()}
    if "dev" not in data:
        train = data["train"]
        labels = None if spec.is_regression else column(train, "label")
        keep, dev = partition_indices(labels, len(train), [1 - DEV_FRACTION, DEV_FRACTION], make_rng(CARVE_SEED, name))
        data["train"], data["dev"] = train.select(keep), train.select(dev)
    return Task(spec, data)
