"""Several processes (GPUs, nodes) for statistics: shard a task's sample across ranks, reduce, write once.

Launch any script or the CLI with ``torchrun --nproc_per_node N`` (or ``accelerate launch``); every rank
calls the same functions. `init_from_env` joins the process group torchrun describes in the environment
(NCCL on CUDA, Gloo on CPU) and does nothing in a single process, so the same code runs unchanged on one
device. Statistics are sums over tokens, so each rank feeds its own shard of the seeded sample through the
model and `stats.collect_stats` all-reduces the sums: the result equals one process seeing every example
(up to the order of floating-point additions). The shards partition the sample exactly; unlike
`DistributedSampler` nothing is padded or repeated, since a repeated example would be counted twice.
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import torch
import torch.distributed as dist

from .stats import TaskStats, collect_stats
from .tasks import Task, make_dataloader

# torchrun's variables; a process without them is a single-process run.
_WORLD_ENV, _RANK_ENV, _LOCAL_RANK_ENV = "WORLD_SIZE", "RANK", "LOCAL_RANK"


def _initialised() -> bool:
    return dist.is_available() and dist.is_initialized()


def init_from_env(backend: str | None = None, timeout_s: float = 1800.0) -> bool:
    """Join the default process group torchrun/accelerate describe (WORLD_SIZE > 1); True when distributed.

    A no-op returning False in a single process, and returning True if a group already exists (e.g. one
    made by `accelerate`). On CUDA each rank is pinned to GPU ``LOCAL_RANK`` and uses NCCL; otherwise Gloo.
    """
    if _initialised():
        return True
    world = int(os.environ.get(_WORLD_ENV, "1"))
    if world <= 1:
        return False
    if not dist.is_available():
        raise RuntimeError(f"{_WORLD_ENV}={world} but this torch build has no torch.distributed support")
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(_local_rank())
    dist.init_process_group(
        backend=backend or ("nccl" if cuda else "gloo"), timeout=datetime.timedelta(seconds=timeout_s)
    )
    return True


def rank() -> int:
    """This process's global rank: from the process group, else torchrun's RANK, else 0."""
    return dist.get_rank() if _initialised() else int(os.environ.get(_RANK_ENV, "0"))


def world_size() -> int:
    """Number of processes: from the process group, else torchrun's WORLD_SIZE, else 1."""
    return dist.get_world_size() if _initialised() else int(os.environ.get(_WORLD_ENV, "1"))


def _local_rank() -> int:
    """This process's index on its node (which GPU it drives)."""
    return int(os.environ.get(_LOCAL_RANK_ENV, "0"))


def is_main() -> bool:
    """True on the one process that writes shared outputs (global rank 0)."""
    return rank() == 0


def barrier() -> None:
    """Wait for every rank (no-op in a single process)."""
    if _initialised():
        dist.barrier()


def shard_indices(n: int, rank: int, world: int) -> list[int]:
    """Rank `rank`'s examples among `n`: every `world`-th one starting at `rank`.

    The shards partition range(n) exactly (no example dropped or repeated) and differ in size by at most
    one; striding rather than cutting contiguous blocks also spreads long and short examples evenly.
    """
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"rank {rank} is not in a world of {world} processes")
    if n < 0:
        raise ValueError(f"cannot shard {n} examples")
    return list(range(rank, n, world))


def model_device() -> torch.device:
    """Where this rank's model runs: its GPU under torchrun on CUDA, the GPU or CPU otherwise."""
    return torch.device("cuda", _local_rank()) if torch.cuda.is_available() else torch.device("cpu")


def load_on_device(name: str, task: Task, *, trust_remote_code: bool = False,
                   model_dtype: torch.dtype | None = None) -> tuple[torch.nn.Module, object]:
    """(model, tokenizer) of a model name, loaded as in `osrm-lora train` (sequence classification head sized
    for `task`, float32) onto this rank's device, cast to `model_dtype` if given: how the statistics commands
    (plain and padded) load the model they feed."""
    from .runtime.models import load_model_and_tokenizer

    model, tokenizer = load_model_and_tokenizer(name, task.spec, trust_remote_code=trust_remote_code)
    model.to(device=model_device(), dtype=model_dtype)
    return model, tokenizer


def collect_task_stats(
    task: Task,
    model_name_or_model: str | torch.nn.Module,
    tokenizer=None,
    *,
    split: str = "train",
    samples: int | None = None,
    seed: int = 0,
    batch_size: int = 16,
    max_length: int = 128,
    target_modules: str | Sequence[str] | None = None,
    out_path: str | os.PathLike | None = None,
    model_id: str | None = None,
    extra: Mapping[str, str] | None = None,
    dtype: torch.dtype = torch.float32,
    model_dtype: torch.dtype | None = None,
    offload_to_cpu: bool = False,
    mask_padding: bool = True,
    trust_remote_code: bool = False,
    progress: bool = False,
    overwrite: bool = False,
    inputs: Iterable[str | os.PathLike] = (),
) -> TaskStats:
    """A task's statistics over a seeded sample of `split`, sharded across the ranks if distributed.

    Every rank selects the same seeded sample (`samples` examples, all with None), keeps its
    `shard_indices` share, and `collect_stats` sums the shards over the process group, so every rank
    returns the full statistics. Rank 0 alone writes `out_path` (atomically); the others wait for it, so
    the file exists everywhere once this returns. A model name is loaded as in `osrm-lora train` (sequence
    classification head, float32) onto this rank's device, with its tokenizer; a model object is used
    where it is, and then `tokenizer` is required. `model_dtype` (e.g. torch.bfloat16) casts a loaded model
    to halve its accelerator memory; the sums still accumulate in `dtype`. `target_modules=None` targets
    the model type's query and value projections. `extra` adds entries to the saved `stats.extra` (which
    already records the split, seed, sample size and max_length). `overwrite` and `inputs` are
    `TaskStats.save`'s: what `out_path` may replace.
    Long because of its many documented keyword arguments; the body (40 lines) is a short sequence of steps.
    """
    from .modules import default_target_modules

    if isinstance(model_name_or_model, (str, os.PathLike)):
        name = str(model_name_or_model)
        model, loaded_tokenizer = load_on_device(name, task, trust_remote_code=trust_remote_code,
                                                 model_dtype=model_dtype)
        tokenizer = tokenizer or loaded_tokenizer
        model_id = model_id or name
    else:
        model = model_name_or_model
        if tokenizer is None:
            raise ValueError(f"task {task.name!r}: pass the tokenizer along with a model object")
    if target_modules is None:
        target_modules = default_target_modules(model.config.model_type)

    data = task.split(split, max_examples=samples, seed=seed)
    shard = data.select(shard_indices(len(data), rank(), world_size()))
    # A rank whose shard is empty still joins the all-reduce with zero sums. Sums need no row order, so
    # the rows go longest first (less padding computed).
    batches = (
        make_dataloader(shard, tokenizer, task.spec, batch_size=batch_size, max_length=max_length, by_length=True)
        if len(shard) else []
    )
    stats = collect_stats(
        model, batches, target_modules, task=task.name, model_id=model_id, mask_padding=mask_padding,
        dtype=dtype, offload_to_cpu=offload_to_cpu, progress=progress and is_main(),
    )
    stats.extra.update(
        {"split": split, "examples": str(len(data)), "seed": str(seed), "max_length": str(max_length)}
    )
    stats.extra.update(extra or {})
    if out_path is not None:
        if is_main():
            stats.save(Path(out_path), overwrite=overwrite, inputs=inputs)
        barrier()
    return stats
