"""The data pass of the `osrm-official` init: the mean inputs the official OSRM code (illidanlab/OSRM) takes.

Per task, as that code's `get_pretrained_latent_features` does: `samples` training examples (a seeded shuffle,
its first `samples`), each tokenised alone, truncated from the left and padded on the right to `max_length`
with the eos token as pad (the tokenizer's own pad token where it has no eos, which is logged); the model runs
one example at a time and each target module's input is averaged over all positions, padding included, then
over the examples. Every example has `max_length` positions, so that mean is the plain sum over all positions
divided by examples × max_length: `stats.collect_stats` with ``mask_padding=False`` computes it, and the
result is a `TaskStats` that `subspace.official_subspaces` reads. Differences from that code that leave the
computation the same are listed in docs/inits.md.
"""

from __future__ import annotations

import copy
import logging
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import datasets
import torch

from ..distributed import barrier, is_main, rank, shard_indices, world_size
from ..errors import ModelError
from ..modules import default_target_modules
from ..stats import TaskStats, collect_stats
from ..tasks import Task, TaskSpec, make_rng
from ..tasks.batching import TOKEN_COLUMNS

logger = logging.getLogger(__name__)

OFFICIAL_SAMPLES = 100  # the official code's --max-num-samples
OFFICIAL_MAX_LENGTH = 128  # its --max-seq-len


def _official_sample(data: datasets.Dataset, samples: int, seed: int) -> datasets.Dataset:
    """The first `samples` rows of a seeded shuffle (all rows if there are fewer), not stratified."""
    order = make_rng(seed, "osrm-official").permutation(len(data))[:samples]
    return data.select(sorted(order.tolist()))


def _padded_examples(data: datasets.Dataset, tokenizer, spec: TaskSpec, max_length: int) -> list[dict]:
    """One batch per example: truncated from the left, right-padded to `max_length` with eos as pad."""
    tok = copy.deepcopy(tokenizer)  # the caller's tokenizer keeps its pad token and sides
    if tok.eos_token is None:
        if tok.pad_token is None:
            raise ModelError(f"tokenizer {type(tok).__name__} has neither an eos nor a pad token to pad with")
        logger.info("osrm-official: %s has no eos token; padding with its pad token %r as the closest to the "
                    "official code", type(tok).__name__, tok.pad_token)
    else:
        tok.pad_token = tok.eos_token
    tok.padding_side, tok.truncation_side = "right", "left"
    pairs = list(data["text_pair"]) if spec.is_pair else None
    encoded = tok(list(data["text"]), pairs, padding="max_length", truncation=True, max_length=max_length,
                  return_tensors="pt")
    keys = [k for k in TOKEN_COLUMNS if k in encoded]
    return [{k: encoded[k][i:i + 1] for k in keys} for i in range(len(data))]


def official_stats(
    task: Task, model: torch.nn.Module, tokenizer, target_modules: str | Sequence[str] | None = None, *,
    samples: int = OFFICIAL_SAMPLES, seed: int = 0, max_length: int = OFFICIAL_MAX_LENGTH, split: str = "train",
    model_id: str | None = None, out_path: str | os.PathLike | None = None, progress: bool = False,
    overwrite: bool = False, inputs: Iterable[str | os.PathLike] = (),
) -> TaskStats:
    """`task`'s statistics over the official code's padded sample; their `mean` is its mean input vector.

    `target_modules=None` targets the model type's query and value projections. Under torch.distributed every
    rank runs its share of the examples and the sums are all-reduced; rank 0 alone writes `out_path`
    (`overwrite` and `inputs` are `TaskStats.save`'s: what it may replace).
    """
    if target_modules is None:
        target_modules = default_target_modules(model.config.model_type)
    data = _official_sample(task.split(split), samples, seed)
    shard = data.select(shard_indices(len(data), rank(), world_size()))
    batches = _padded_examples(shard, tokenizer, task.spec, max_length) if len(shard) else []
    stats = collect_stats(model, batches, target_modules, task=task.name, model_id=model_id, mask_padding=False,
                          progress=progress and is_main())
    stats.extra.update({"split": split, "examples": str(len(data)), "seed": str(seed),
                        "max_length": str(max_length), "padding": "max_length"})
    if out_path is not None:
        if is_main():
            stats.save(Path(out_path), overwrite=overwrite, inputs=inputs)
        barrier()
    return stats
