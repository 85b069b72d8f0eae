"""A task's input second moments for the training modes: its own ``M_i`` and the other tasks' ``Σ₋ᵢ``.

``Σ₋ᵢ = Σ_{j≠i} w_j M_j / Σ_{j≠i} w_j`` is the mixture the OSRM subspaces decompose (`subspace`, same
weightings), so the `osrm-reg` penalty, the `osrm-contrast` rows and the `osrm-project` basis measure energy
exactly as the subspaces do. Modules fed the same input share one tensor. Pure float64 tensor maths on
cached statistics.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .errors import StatsError, SubspaceError
from .identity import ModelIdentity
from .stats import TaskStats
from .subspace import shared_input_groups, task_weights


@dataclass
class TaskMoments:
    """`others[m]`: Σ₋ᵢ (d×d float64); `own[m]`: M_i, or None without the task's own statistics."""

    task: str
    others: dict[str, torch.Tensor]
    own: dict[str, torch.Tensor] | None
    other_tasks: list[str]
    weighting: str
    identity: ModelIdentity  # the base model of the statistics

    def sigma(self, module: str) -> torch.Tensor:
        try:
            return self.others[module]
        except KeyError:
            raise SubspaceError(f"task {self.task!r}: the other tasks' statistics have no module {module} (they "
                                f"cover {len(self.others)} modules, e.g. {sorted(self.others)[:3]})") from None

    def own_moment(self, module: str, mode: str) -> torch.Tensor:
        if self.own is None:
            raise SubspaceError(f"init {mode!r} needs task {self.task!r}'s own statistics (own_stats), not only "
                                f"the other tasks'")
        try:
            return self.own[module]
        except KeyError:
            raise SubspaceError(f"task {self.task!r}: its own statistics have no module {module}") from None


def task_moments(task: str, others: Sequence[TaskStats], own: TaskStats | None = None,
                 weighting: str = "equal") -> TaskMoments:
    """`task`'s moments from the other tasks' statistics (its own left out if present) and its own."""
    others = [s for s in others if s.task != task]
    if not others:
        raise SubspaceError(f"task {task!r}: need statistics of at least one other task")
    ref = others[0]
    dims = {m: ref.dim(m) for m in ref.modules}
    for s in [*others, *([own] if own is not None else [])]:
        s.check_matches(model=ref.identity(), modules=dims, source=f"statistics of task {s.task!r} (vs task {ref.task!r})")
        if s.tokens <= 0:
            raise StatsError(f"statistics of task {s.task!r} hold no tokens")
    sigmas, owns = {}, {} if own is not None else None
    for group in shared_input_groups(others, ref.modules):
        m = group[0]
        moments = [s.moment(m) for s in others]
        traces = [M.diagonal().sum() for M in moments]
        if weighting == "trace" and not all(t > 0 for t in traces):
            raise StatsError(f"module {m}: a task's second moment has zero trace, cannot trace-normalise")
        weights = [task_weights(weighting, s.tokens, t) for s, t in zip(others, traces)]
        sigma = sum(w * M for w, M in zip(weights, moments)) / sum(weights)
        own_m = own.moment(m) if own is not None else None
        for name in group:
            sigmas[name] = sigma
            if owns is not None:
                owns[name] = own_m
    return TaskMoments(task, sigmas, owns, [s.task for s in others], weighting, ref.identity())
