"""Tokenisation and batches with dynamic padding.

Each batch is padded only to its own longest example, and carries the attention mask, so statistics count
real tokens only and no compute is spent on a global maximum length. With `by_length`, evaluation and
statistics batches take the rows longest first, so each batch holds rows of similar length and little
padding is computed; `restore_order` puts per-row outputs back in the dataset's order.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence

import datasets
import numpy as np
import torch
from torch.utils.data import DataLoader, Sampler
from transformers import DataCollatorWithPadding

from .sampling import make_rng
from .spec import TaskError, TaskSpec

TOKEN_COLUMNS = ("input_ids", "attention_mask", "token_type_ids")
ENCODE_CHUNK = 1024


def tokenize(dataset: datasets.Dataset, tokenizer, spec: TaskSpec, max_length: int = 128) -> datasets.Dataset:
    """Token ids (truncated to `max_length`, unpadded), attention mask, token types if the model uses them,
    and `labels`, one row per example in the same order."""
    if max_length < 2:
        raise TaskError(f"task {spec.name!r}: max_length must be at least 2, got {max_length}")
    if spec.is_pair and "text_pair" not in dataset.column_names:
        raise TaskError(f"task {spec.name!r} is a sentence-pair task but the dataset has no text_pair column")
    columns: dict[str, list] = {"input_ids": [], "attention_mask": []}
    for start in range(0, len(dataset), ENCODE_CHUNK):
        chunk = dataset[start:start + ENCODE_CHUNK]
        pairs = chunk["text_pair"] if spec.is_pair else None
        encoded = tokenizer(chunk["text"], pairs, truncation=True, max_length=max_length, padding=False)
        for key in TOKEN_COLUMNS:
            if key in encoded:
                columns.setdefault(key, []).extend(encoded[key])
    columns["labels"] = dataset[:]["label"]
    return datasets.Dataset.from_dict(columns)


class _RegressionAware:
    """transformers' `DataCollatorWithPadding` (one collator for training, statistics and evaluation), with
    float32 labels for a regression head even when the file's scores were whole numbers."""

    def __init__(self, tokenizer, regression: bool):
        self.pad = DataCollatorWithPadding(tokenizer, return_tensors="pt")
        self.regression = regression

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        batch = self.pad(rows)
        batch["labels"] = batch["labels"].to(torch.float32 if self.regression else torch.long)
        return dict(batch)


def make_collator(tokenizer, regression: bool) -> _RegressionAware:
    """The collator of every batch: pads to the batch's longest row on the tokenizer's side; a tokenizer
    without a pad token pads with end-of-sequence (masked anyway), as `load_model_and_tokenizer` sets it."""
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise TaskError(f"tokenizer {type(tokenizer).__name__} has neither a pad nor an eos token to pad with")
        tokenizer.pad_token = tokenizer.eos_token
    return _RegressionAware(tokenizer, regression)


class _SeededShuffle(Sampler[int]):
    """A fresh PCG64 permutation per epoch, fixed by (seed, epoch), identical on every machine."""

    def __init__(self, n: int, seed: int):
        self.n, self.seed, self.epoch = n, seed, 0

    def __iter__(self) -> Iterator[int]:
        order = make_rng(self.seed, f"epoch-{self.epoch}").permutation(self.n)
        self.epoch += 1
        return iter(order.tolist())

    def __len__(self) -> int:
        return self.n


class _LengthSorted(Sampler[int]):
    """Rows longest first (ties in row order); `order[k]` is the row at position k of the pass."""

    def __init__(self, lengths: Sequence[int]):
        self.order = np.argsort(-np.asarray(lengths, dtype=np.int64), kind="stable")

    def __iter__(self) -> Iterator[int]:
        return iter(self.order.tolist())

    def __len__(self) -> int:
        return len(self.order)


def restore_order(values: Sequence, batches: Iterable) -> list:
    """Per-row outputs of one pass over `batches` in the dataset's row order (unchanged unless the batches
    come from a `by_length` dataloader)."""
    sampler = getattr(batches, "sampler", None)
    if not isinstance(sampler, _LengthSorted):
        return list(values)
    if len(values) != len(sampler):
        raise ValueError(f"{len(values)} outputs for a pass over {len(sampler)} rows")
    out = [None] * len(values)
    for value, row in zip(values, sampler.order.tolist()):
        out[row] = value
    return out


class _Rows(torch.utils.data.Dataset):
    """Column lists read once from the Arrow table: indexing Python lists is far cheaper per row."""

    def __init__(self, columns: dict[str, list]):
        self.columns = columns
        self.n = len(columns["input_ids"])

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict:
        return {key: values[i] for key, values in self.columns.items()}


def make_dataloader(
    dataset: datasets.Dataset,
    tokenizer,
    spec: TaskSpec,
    batch_size: int,
    max_length: int = 128,
    shuffle: bool = False,
    seed: int = 0,
    by_length: bool = False,
) -> DataLoader:
    """Batches of `input_ids`, `attention_mask`, (`token_type_ids`), `labels`, dynamically padded.

    `dataset` may be a task split (it is tokenised here) or the output of `tokenize`. `by_length` sorts the
    rows longest first (less padding; for passes whose outputs are put back with `restore_order` or summed).
    """
    if batch_size < 1:
        raise TaskError(f"task {spec.name!r}: batch_size must be positive, got {batch_size}")
    if shuffle and by_length:
        raise TaskError(f"task {spec.name!r}: batches are either shuffled or sorted by length, not both")
    if "input_ids" not in dataset.column_names:
        dataset = tokenize(dataset, tokenizer, spec, max_length)
    if len(dataset) == 0:
        raise TaskError(f"task {spec.name!r}: no examples to batch")
    rows = dataset[:]
    columns = {k: rows[k] for k in (*TOKEN_COLUMNS, "labels") if k in rows}
    collate = make_collator(tokenizer, spec.is_regression)
    sampler = _SeededShuffle(len(dataset), seed) if shuffle else None
    if by_length:
        sampler = _LengthSorted([len(ids) for ids in columns["input_ids"]])
    return DataLoader(_Rows(columns), batch_size=batch_size, sampler=sampler, collate_fn=collate)

