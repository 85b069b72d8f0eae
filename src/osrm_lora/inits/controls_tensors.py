"""The tensor side of the data-free controls (`inits.controls`): Haar-random orthonormal rows, drawn
reproducibly from the names of what they depend on (seed, task, module), whatever the process or machine."""

from __future__ import annotations

import hashlib

import torch

from ..errors import SubspaceError
from .osrm_tensors import set_rows
from .registry import InitContext
from .scales import row_scale


def _named_generator(*parts: object) -> torch.Generator:
    """A CPU generator seeded from the sha256 of `parts` (Python's `hash` differs between processes)."""
    digest = hashlib.sha256("/".join(map(str, parts)).encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)


def _haar_rows(gaussian: torch.Tensor) -> torch.Tensor:
    """k orthonormal rows (...×k×d) from a ...×d×k standard Gaussian: Qᵀ of its QR with R's diagonal made
    positive, which makes them Haar-distributed; the first j rows depend on the first j columns only."""
    Q, R = torch.linalg.qr(gaussian)
    signs = torch.where(R.diagonal(dim1=-2, dim2=-1) < 0, -1.0, 1.0).to(Q.dtype)
    return (Q * signs[..., None, :]).transpose(-1, -2)


def _random_orthonormal_rows(seed: int, task: str, module: str, r: int, d: int) -> torch.Tensor:
    """r Haar-random orthonormal rows for one task, seed and module (float64)."""
    g = _named_generator("random-orthonormal", seed, task, module)
    return _haar_rows(torch.randn(d, r, generator=g, dtype=torch.float64))


def _task_orthogonal_rows(seed: int, module: str, index: int, r: int, d: int) -> torch.Tensor:
    """Rows [index·r, (index+1)·r) of the module's Haar basis for `seed` (float64).

    The basis's columns are drawn r at a time, block b from its own named stream, so task `index` needs the
    first index + 1 blocks only and its rows do not depend on how many tasks are merged.
    """
    blocks = [torch.randn(d, r, generator=_named_generator("task-orthogonal", seed, module, b), dtype=torch.float64)
              for b in range(index + 1)]
    return _haar_rows(torch.cat(blocks, dim=1))[index * r:]


def random_orthonormal_init(peft_model: torch.nn.Module, context: InitContext, scale: str = "orthonormal",
                            adapter_name: str = "default") -> dict[str, int]:
    """lora_A ← fresh Haar rows for (seed, task, module), scaled as `scale` says; B ← 0. Returns the ranks."""
    def rows_for(module: str, r: int, d: int) -> torch.Tensor:
        return _random_orthonormal_rows(context.seed, context.task, module, r, d) * row_scale(scale, r, d)

    return set_rows(peft_model, rows_for, adapter_name)[0]


def task_orthogonal_init(peft_model: torch.nn.Module, context: InitContext, scale: str = "orthonormal",
                         adapter_name: str = "default") -> dict[str, int]:
    """lora_A ← the task's own block of rows of each module's Haar basis, scaled; B ← 0. Returns the ranks.

    The task's index is its place in `context.tasks` (the merged tasks); T·r > d cannot be orthogonal and is
    refused before any row is set.
    """
    if context.task not in context.tasks:
        raise SubspaceError(f"init 'task-orthogonal' gives each merged task its own rows, so it needs the merged "
                            f"tasks, and task {context.task!r} is not among {list(context.tasks)}")
    index, n_tasks = context.tasks.index(context.task), len(context.tasks)

    def rows_for(module: str, r: int, d: int) -> torch.Tensor:
        if n_tasks * r > d:
            raise SubspaceError(f"init 'task-orthogonal', module {module}: {n_tasks} tasks × rank {r} = "
                                f"{n_tasks * r} orthogonal rows do not fit in its input dim {d}")
        return _task_orthogonal_rows(context.seed, module, index, r, d) * row_scale(scale, r, d)

    return set_rows(peft_model, rows_for, adapter_name)[0]
