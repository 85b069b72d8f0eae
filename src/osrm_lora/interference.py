"""How much each adapter disturbs the other tasks' activations, exactly, from second moments.

For task i's inputs x at module m, ``E‖ΔW x‖² = trace(ΔW M ΔWᵀ)`` with ``M = E[x xᵀ]``; in low rank
``s² · trace(B (A M Aᵀ) Bᵀ)``, so no dense out×in update is ever formed. ``I[i][j]`` compares the output
energy adapter j adds on task i's data with the energy task i's own adapter adds there: 1 on the
diagonal, and the smaller off the diagonal, the less merging j into i's model can hurt task i.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import TypeVar

import numpy as np
import torch

from .adapters import LoraAdapter, LoraFactors, check_compatible
from .errors import StatsError
from .stats import TaskStats
from .subspace import shared_input_groups

Item = TypeVar("Item")


@dataclass
class InterferenceResult:
    """`matrix[i, j]`: adapter j's output energy on task i's inputs over adapter i's, summed over modules."""

    tasks: list[str]
    matrix: np.ndarray  # T×T
    per_module: dict[str, np.ndarray]  # module -> T×T, the same ratio for one module
    energy: np.ndarray  # T×T, E_{x~task i} Σ_m ‖ΔW_j x‖² (the unnormalised numerators)


def _output_energy(factors: LoraFactors, moment: torch.Tensor) -> float:
    """``E‖ΔW x‖² = s² trace(B (A M Aᵀ) Bᵀ)`` for the input second moment ``M = E[x xᵀ]`` (float64)."""
    A = factors.A.to(device=moment.device, dtype=torch.float64)
    B = factors.B.to(device=moment.device, dtype=torch.float64)
    inner = A @ moment.double() @ A.T  # r×r
    return float(factors.scale ** 2 * ((B.T @ B) * inner).sum())


def _ratio(energy: np.ndarray) -> np.ndarray:
    """Divide each row by its diagonal; a task whose own adapter adds no energy gets NaN."""
    own = np.diag(energy)[:, None]
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(own > 0, energy / np.where(own > 0, own, 1.0), np.nan)


def by_task(items: Iterable[Item], what: str, error: type[Exception] = StatsError) -> dict[str, Item]:
    """Adapters or statistics by the task each records (`.task`); two of one task are refused, naming both
    (`.source`), since one would silently replace the other."""
    found: dict[str, Item] = {}
    for item in items:
        task = item.task  # type: ignore[attr-defined]
        if task in found:
            first, second = (getattr(i, "source", "") or task for i in (found[task], item))
            raise error(f"{what} {first} and {second} both record task {task!r}; give one per task")
        found[task] = item
    return found


def interference_matrix(
    adapters: Mapping[str, LoraAdapter], stats: Mapping[str, TaskStats]
) -> InterferenceResult:
    """Exact interference of every adapter on every task's inputs (stats[t] are task t's activations)."""
    tasks = list(adapters)
    missing = [t for t in tasks if t not in stats]
    if missing:
        raise StatsError(f"no statistics for tasks {missing} (have {sorted(stats)})")
    check_compatible([adapters[t] for t in tasks])
    modules = sorted(adapters[tasks[0]].modules)
    pool = [stats[t] for t in tasks]
    dims = {m: int(adapters[tasks[0]].modules[m].A.shape[1]) for m in modules}
    for t, s in zip(tasks, pool):
        s.check_matches(model=pool[0].identity(), modules=dims, source=f"statistics of task {t!r}")
    T = len(tasks)
    per_energy = {m: np.zeros((T, T)) for m in modules}
    for group in shared_input_groups(pool, modules):
        for i, s in enumerate(pool):
            moment = s.moment(group[0])  # one float64 d×d at a time, shared by the group's modules
            if not torch.isfinite(moment).all():
                raise StatsError(f"statistics of task {tasks[i]!r}, module {group[0]}: NaN/Inf entries")
            for m in group:
                for j, t in enumerate(tasks):
                    per_energy[m][i, j] = _output_energy(adapters[t].modules[m], moment)
    energy = sum(per_energy.values())
    return InterferenceResult(
        tasks=tasks, matrix=_ratio(energy), per_module={m: _ratio(e) for m, e in per_energy.items()},
        energy=energy,
    )
