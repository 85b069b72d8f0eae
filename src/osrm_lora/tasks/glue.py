"""The eight GLUE tasks, from a local directory in GLUE's TSV layout or from the Hugging Face hub.

GLUE's labelled "dev" set is our evaluation split `dev`; GLUE's test labels are hidden, so there is no
`test` split. Local files are read exactly as GLUE writes them: tab-separated with no quoting at all
(many sentences contain `"`), CoLA without a header, MRPC's header behind a byte-order mark, MNLI by
position (sentence1 = column 8, sentence2 = column 9, label = last column, the columns in between vary).
"""

from __future__ import annotations

import csv
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import datasets

from ..io import OsrmFileError
from .rows import BadRow, delimited_rows, open_text, parse_rows, require_text
from .sampling import make_rng, partition_indices
from .spec import TaskSpec
from .task import Task, column, records_to_dataset

GLUE_DIR_ENV = "OSRM_LORA_GLUE_DIR"
HUB_DATASET = "nyu-mll/glue"  # the canonical hub repository of `load_dataset("glue", name)`
GLUE_LICENCE = "GLUE (Wang et al., ICLR 2019); each task keeps its source dataset's licence, see docs"
CARVED_DEV_FRACTION = 0.1  # GLUE's own QQP dev set is 10% of the size of its train set
CARVE_SEED = 20190101


@dataclass(frozen=True)
class _GlueLayout:
    """Where a task's files live and which (0-based) columns hold text and label; negative = from the end."""

    folder: str
    files: dict[str, tuple[str, ...]]  # split -> file names (concatenated, later ones de-duplicated)
    header: bool
    text: int
    pair: int | None
    label: int
    min_fields: int
    hub_config: str
    hub_columns: tuple[str, ...]
    hub_splits: dict[str, str]  # our split -> hub split


def _spec(name: str, fields: tuple[str, ...], labels, metrics: tuple[str, ...], primary: str, what: str) -> TaskSpec:
    return TaskSpec(name, fields, labels, metrics, primary, source="GLUE", licence=GLUE_LICENCE, description=what)


GLUE_SPECS: dict[str, TaskSpec] = {
    "cola": _spec("cola", ("sentence",), ("unacceptable", "acceptable"), ("matthews", "accuracy"), "matthews",
                  "CoLA: grammatical acceptability of English sentences"),
    "sst2": _spec("sst2", ("sentence",), ("negative", "positive"), ("accuracy",), "accuracy",
                  "SST-2: binary sentiment of movie-review sentences"),
    "mrpc": _spec("mrpc", ("sentence1", "sentence2"), ("not_equivalent", "equivalent"),
                  ("f1", "accuracy", "mean_f1_accuracy"), "mean_f1_accuracy", "MRPC: news sentence paraphrases"),
    "stsb": _spec("stsb", ("sentence1", "sentence2"), None, ("pearson", "spearman", "mean_pearson_spearman"),
                  "mean_pearson_spearman", "STS-B: semantic similarity score 0-5 (regression)"),
    "qqp": _spec("qqp", ("question1", "question2"), ("not_duplicate", "duplicate"),
                 ("f1", "accuracy", "mean_f1_accuracy"), "mean_f1_accuracy", "QQP: duplicate Quora questions"),
    "mnli": _spec("mnli", ("premise", "hypothesis"), ("entailment", "neutral", "contradiction"), ("accuracy",),
                  "accuracy", "MNLI: natural language inference (dev = matched; dev_mismatched also loaded)"),
    "qnli": _spec("qnli", ("question", "sentence"), ("entailment", "not_entailment"), ("accuracy",), "accuracy",
                  "QNLI: does the sentence answer the question (from SQuAD)"),
    "rte": _spec("rte", ("sentence1", "sentence2"), ("entailment", "not_entailment"), ("accuracy",), "accuracy",
                 "RTE: textual entailment"),
}

_TRAIN_DEV = {"train": ("train.tsv",), "dev": ("dev.tsv",)}
_HUB_TRAIN_DEV = {"train": "train", "dev": "validation"}

GLUE_LAYOUTS: dict[str, _GlueLayout] = {
    "cola": _GlueLayout("CoLA", _TRAIN_DEV, False, 3, None, 1, 4, "cola", ("sentence",), _HUB_TRAIN_DEV),
    "sst2": _GlueLayout("SST-2", _TRAIN_DEV, True, 0, None, 1, 2, "sst2", ("sentence",), _HUB_TRAIN_DEV),
    "mrpc": _GlueLayout("MRPC", _TRAIN_DEV, True, 3, 4, 0, 5, "mrpc", ("sentence1", "sentence2"), _HUB_TRAIN_DEV),
    "stsb": _GlueLayout("STS-B", _TRAIN_DEV, True, 7, 8, -1, 10, "stsb", ("sentence1", "sentence2"), _HUB_TRAIN_DEV),
    "qqp": _GlueLayout("QQP", _TRAIN_DEV, True, 3, 4, 5, 6, "qqp", ("question1", "question2"), _HUB_TRAIN_DEV),
    "mnli": _GlueLayout(
        "MNLI", {"train": ("train.tsv", "train_extra_subset.tsv"), "dev": ("dev_matched.tsv",),
                 "dev_mismatched": ("dev_mismatched.tsv",)},
        True, 8, 9, -1, 11, "mnli", ("premise", "hypothesis"),
        {"train": "train", "dev": "validation_matched", "dev_mismatched": "validation_mismatched"},
    ),
    "qnli": _GlueLayout("QNLI", {"train": ("train.tsv", "train_extra_subset.tsv"), "dev": ("dev.tsv",)},
                       True, 1, 2, 3, 4, "qnli", ("question", "sentence"), _HUB_TRAIN_DEV),
    "rte": _GlueLayout("RTE", _TRAIN_DEV, True, 1, 2, 3, 4, "rte", ("sentence1", "sentence2"), _HUB_TRAIN_DEV),
}

EXTRA_TRAIN_FILE = "train_extra_subset.tsv"


def _expected_layout() -> str:
    """The directory layout a local GLUE copy must have, for error messages and docs."""
    lines = []
    for name, layout in GLUE_LAYOUTS.items():
        files = sorted({f for group in layout.files.values() for f in group})
        optional = [f for f in files if f == EXTRA_TRAIN_FILE or (name == "qqp" and f == "dev.tsv")]
        shown = ", ".join(f + (" (optional)" if f in optional else "") for f in files)
        lines.append(f"  {layout.folder}/: {shown}")
    return "\n".join(lines)


def glue_dir_from(glue_dir: str | os.PathLike | None = None) -> Path | None:
    """The local GLUE directory: the argument, else $OSRM_LORA_GLUE_DIR, else None (use the hub)."""
    value = glue_dir if glue_dir is not None else os.environ.get(GLUE_DIR_ENV) or None
    return None if value is None else Path(value).expanduser()


def _row_parser(spec: TaskSpec, layout: _GlueLayout) -> Callable[[list[str]], dict]:
    def parse(fields: list[str]) -> dict:
        if len(fields) < layout.min_fields:
            raise BadRow(f"{len(fields)} columns, expected {layout.min_fields}")
        record = {"text": require_text(fields[layout.text], spec.text_fields[0])}
        if layout.pair is not None:
            record["text_pair"] = require_text(fields[layout.pair], spec.text_fields[1])
        try:
            record["label"] = spec.label_value(fields[layout.label])
        except ValueError as exc:
            raise BadRow(str(exc)) from None
        return record

    return parse


def _read_glue_file(spec: TaskSpec, layout: _GlueLayout, path: Path) -> list[dict]:
    """The rows of one GLUE TSV file as records (malformed rows skipped with a warning, >1% an error)."""
    with open_text(path, f"GLUE task {spec.name!r}") as handle:
        rows = delimited_rows(handle, "\t", csv.QUOTE_NONE)
        if layout.header:
            next(rows, None)
        return parse_rows(f"{path} (GLUE task {spec.name!r})", rows, _row_parser(spec, layout))


def _union_without_duplicates(parts: list[list[dict]]) -> list[dict]:
    """The first part whole, then rows of later parts whose text (pair) is not already present."""
    seen = {(r["text"], r.get("text_pair")) for r in parts[0]}
    merged = list(parts[0])
    for part in parts[1:]:
        for record in part:
            key = (record["text"], record.get("text_pair"))
            if key not in seen:
                seen.add(key)
                merged.append(record)
    return merged


def load_glue_local(name: str, glue_dir: str | os.PathLike, include_extra_train: bool = True) -> Task:
    """A GLUE task from TSV files under `glue_dir`.

    MNLI and QNLI: `train_extra_subset.tsv`, where present, is added to train (rows whose text pair is already
    in train.tsv dropped) unless `include_extra_train` is False. QQP without dev.tsv: a stratified 10% of
    train, fixed by a constant seed, becomes dev; the two never overlap.
    """
    spec, layout = GLUE_SPECS[name], GLUE_LAYOUTS[name]
    folder = Path(glue_dir) / layout.folder
    carve_dev = name == "qqp" and not (folder / "dev.tsv").is_file()
    for split, files in layout.files.items():
        if carve_dev and split == "dev":
            continue
        required = folder / files[0]
        if not required.is_file():
            raise OsrmFileError(
                f"GLUE task {name!r}: file not found: {required}\n"
                f"Expected the standard GLUE layout under {Path(glue_dir)} (set glue_dir or ${GLUE_DIR_ENV}):\n"
                f"{_expected_layout()}"
            )

    def loader(split: str) -> Callable[[], datasets.Dataset]:
        def load() -> datasets.Dataset:
            files = layout.files[split]
            if split == "train" and not include_extra_train:
                files = files[:1]
            parts = [_read_glue_file(spec, layout, folder / f) for f in files if (folder / f).is_file()]
            return records_to_dataset(spec, _union_without_duplicates(parts), f"{folder}/{split}")

        return load

    if not carve_dev:
        return Task(spec, {split: loader(split) for split in layout.files})
    full = loader("train")()
    train_idx, dev_idx = partition_indices(
        column(full, "label"), len(full), [1 - CARVED_DEV_FRACTION, CARVED_DEV_FRACTION], make_rng(CARVE_SEED, name)
    )
    return Task(spec, {"train": full.select(train_idx), "dev": full.select(dev_idx)})


def load_glue_hub(name: str, **load_kwargs) -> Task:
    """A GLUE task from the Hugging Face hub (`datasets.load_dataset`), columns renamed to ours."""
    spec, layout = GLUE_SPECS[name], GLUE_LAYOUTS[name]

    def convert(split: str) -> datasets.Dataset:
        data = datasets.load_dataset(HUB_DATASET, layout.hub_config, split=layout.hub_splits[split], **load_kwargs)
        table = data[:]
        columns = {"text": table[layout.hub_columns[0]]}
        if spec.is_pair:
            columns["text_pair"] = table[layout.hub_columns[1]]
        columns["label"] = table["label"]
        records = [dict(zip(columns, values)) for values in zip(*columns.values())]
        return records_to_dataset(spec, records, f"{HUB_DATASET}/{layout.hub_config}:{layout.hub_splits[split]}")

    return Task(spec, {split: (lambda s=split: convert(s)) for split in layout.hub_splits})


def local_sizes(name: str, glue_dir: str | os.PathLike, include_extra_train: bool = True) -> dict[str, int] | None:
    """Data-row counts of a local task's files by counting lines (cheap; duplicates of the extra file not removed)."""
    layout = GLUE_LAYOUTS[name]
    folder = Path(glue_dir) / layout.folder
    sizes: dict[str, int] = {}
    for split, files in layout.files.items():
        if split == "train" and not include_extra_train:
            files = files[:1]
        paths = [folder / f for f in files if (folder / f).is_file()]
        if not paths:
            if name == "qqp" and split == "dev":
                continue
            return None
        sizes[split] = sum(_count_data_lines(p, layout.header) for p in paths)
    return sizes


def _count_data_lines(path: Path, header: bool) -> int:
    with open(path, "rb") as f:
        lines = sum(1 for line in f if line.strip())
    return lines - (1 if header else 0)
