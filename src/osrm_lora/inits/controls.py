"""The data-free controls of OSRM's claim: orthonormal A without data (`random-orthonormal`), and orthogonality
between the tasks' A without data (`task-orthogonal`, the paper's parameter-orthogonalisation ablation).

- ``random-orthonormal``: per task, seed and module, A = r Haar-random orthonormal rows. Against `osrm` at the
  same `scale` it separates the data-aware direction from the size and orthonormality of A.
- ``task-orthogonal``: per module and seed one Haar-random orthonormal basis of the input space; the i-th of
  the T merged tasks takes its rows [i·r, (i+1)·r), so A_i A_jᵀ = 0 exactly. It needs T·r ≤ d and the merged
  tasks (`InitContext.tasks`).

B = 0 for both. Haar rows come from the QR of a Gaussian matrix with R's diagonal made positive.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .registry import InitContext, InitSpec, register
from .scales import ScaleOptions

if TYPE_CHECKING:
    from ..subspace import Subspace


def apply_random_orthonormal(peft_model: Any, subspace: Subspace | None, options: ScaleOptions,
                             context: InitContext) -> None:
    from .controls_tensors import random_orthonormal_init

    random_orthonormal_init(peft_model, context, scale=options.scale)


def apply_task_orthogonal(peft_model: Any, subspace: Subspace | None, options: ScaleOptions,
                          context: InitContext) -> None:
    from .controls_tensors import task_orthogonal_init

    task_orthogonal_init(peft_model, context, scale=options.scale)


register(InitSpec(
    "random-orthonormal", "Control: A = Haar-random orthonormal rows, fresh per task and seed (scale option), B = 0.",
    peft_init=True, options=ScaleOptions, apply=apply_random_orthonormal,
))
register(InitSpec(
    "task-orthogonal", "Control (the paper's ablation): one Haar basis per module and seed, task i takes rows "
    "[i·r, (i+1)·r), so A_i A_jᵀ = 0; B = 0.",
    peft_init=True, needs_tasks=True, options=ScaleOptions, apply=apply_task_orthogonal,
))
