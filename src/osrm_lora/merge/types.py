"""What a merge method receives for one module and what it returns.

Methods never see the whole model: the engine hands them one module's per-task LoRA factors (and any per-task
statistics such as Gram matrices or Fisher diagonals) and gets back that module's merged update, either as an
exact low-rank factorisation, as a dense matrix, or (EMR) as a unified update with per-task modulators.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

from .._lazy import torch
from ..errors import MergeError

if TYPE_CHECKING:
    from ..adapters import LoraFactors

BLOCK_ELEMENTS = 1 << 22  # entries of one T×rows×in block of dense updates (16 MB in float32)


def _delta_rows_(out: torch.Tensor, factors: LoraFactors, rows: slice) -> torch.Tensor:
    """out ← rows of s·B A; every blocked dense update goes through this one call."""
    return torch.matmul(factors.B[rows], factors.A, out=out).mul_(factors.scale)


@dataclass
class ModuleInputs:
    """One module's inputs: factors of every task (float32, on the merge device) and per-task extras."""

    name: str
    tasks: list[str]
    factors: list[LoraFactors]
    extras: dict[str, list[torch.Tensor]] = field(default_factory=dict)
    totals: torch.Tensor | None = None

    @property
    def shape(self) -> tuple[int, int]:
        f = self.factors[0]
        return int(f.B.shape[0]), int(f.A.shape[1])

    @property
    def device(self) -> torch.device:
        return self.factors[0].B.device

    def row_blocks(self) -> list[slice]:
        """Row ranges such that one T×rows×in block of dense updates holds about BLOCK_ELEMENTS entries."""
        out_features, in_features = self.shape
        rows = max(1, BLOCK_ELEMENTS // (len(self.factors) * in_features))
        return [slice(start, min(start + rows, out_features)) for start in range(0, out_features, rows)]

    def delta(self, task: int) -> torch.Tensor:
        """Task `task`'s dense update, formed by the same row blocks as `delta_blocks` (so bit for bit equal)."""
        out = torch.empty(self.shape, dtype=torch.float32, device=self.device)
        for rows in self.row_blocks():
            _delta_rows_(out[rows], self.factors[task], rows)
        return out

    def delta_blocks(self) -> Iterator[tuple[slice, torch.Tensor]]:
        """(rows, T×rows×in dense updates of all tasks) block by block, for methods that work entry by entry:
        peak memory is one block, not T dense updates. The block's buffer is reused by the next step."""
        blocks = self.row_blocks()
        buffer = torch.empty(len(self.factors), blocks[0].stop, self.shape[1], dtype=torch.float32, device=self.device)
        for rows in blocks:
            stacked = buffer[:, : rows.stop - rows.start]
            for values, f in zip(stacked, self.factors):
                _delta_rows_(values, f, rows)
            yield rows, stacked

    def extra(self, key: str) -> list[torch.Tensor]:
        try:
            return self.extras[key]
        except KeyError:
            raise MergeError(f"module {self.name}: the merge method needs per-task {key!r} tensors") from None


@dataclass
class MergedModule:
    """One module's merged update.

    `factors` is set when the result is exactly low rank (ΔW = factors.delta()), otherwise `delta` holds the
    dense out×in update. EMR results also carry per-task boolean masks and rescalers: task t's update is
    `task_scales[t] · task_masks[t] ⊙ delta`, so the task must be known at inference.
    """

    name: str
    delta: torch.Tensor | None = None
    factors: LoraFactors | None = None
    task_masks: dict[str, torch.Tensor] | None = None
    task_scales: dict[str, float] | None = None

    def __post_init__(self) -> None:
        if (self.delta is None) == (self.factors is None):
            raise ValueError(f"module {self.name}: a merged module needs exactly one of delta or factors")

    @property
    def per_task(self) -> bool:
        return self.task_masks is not None

    @property
    def shape(self) -> tuple[int, int]:
        if self.factors is not None:
            return int(self.factors.B.shape[0]), int(self.factors.A.shape[1])
        return tuple(self.delta.shape)  # type: ignore[union-attr,return-value]

    def dense(self) -> torch.Tensor:
        """The shared (task-independent) merged update as a dense out×in matrix."""
        return self.factors.delta(torch.float32) if self.factors is not None else self.delta  # type: ignore

    def for_task(self, task: str | None) -> torch.Tensor:
        """The update to apply when serving `task`; only per-task methods (EMR) need it."""
        if not self.per_task:
            return self.dense()
        if task is None:
            raise MergeError(
                f"module {self.name}: this merge keeps per-task modulators (EMR); pass the task to apply "
                f"(one of {sorted(self.task_masks)})"  # type: ignore[arg-type]
            )
        if task not in self.task_masks:  # type: ignore[operator]
            raise MergeError(f"module {self.name}: unknown task {task!r}; merged tasks: {sorted(self.task_masks)}")
        return self.task_scales[task] * (self.task_masks[task] * self.dense())  # type: ignore[index]

    def scaled(self, factor: float) -> MergedModule:
        """The same update multiplied by `factor` (λ); exact for low-rank and dense results alike."""
        if self.per_task:
            raise MergeError(f"module {self.name}: per-task (EMR) results have no global scaling")
        if self.factors is not None:
            from ..adapters import LoraFactors

            f = self.factors
            return replace(self, factors=LoraFactors(f.A, f.B, f.scale * factor))
        return replace(self, delta=self.delta * factor)  # type: ignore[operator]


def resolve_weights(weights: list[float] | None, n_tasks: int) -> list[float]:
    """Per-task weights, defaulting to 1; a list of the wrong length is an error."""
    if weights is None:
        return [1.0] * n_tasks
    if len(weights) != n_tasks:
        raise MergeError(f"weights has {len(weights)} entries but {n_tasks} adapters are merged")
    return [float(w) for w in weights]
