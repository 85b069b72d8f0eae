"""`osrm-contrast`: a task-aware subspace, the directions the task uses and the other tasks do not.

OSRM's criterion looks only at the other tasks' energy; when the tasks share their dominant directions, the
directions it picks are dead for the task itself. `osrm-contrast` sets lora_A to the top-r generalized
eigenvectors of ``(M_i, Σ₋ᵢ + ε·(tr Σ₋ᵢ/d)·I)``, which maximise the task's own energy over the others'
(floored) energy, orthonormalised and sized by `scale`; B = 0 (`forecast.contrast_rows`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from pydantic import Field

from ..forecast import CONTRAST_EPS
from .registry import InitContext, InitSpec, register
from .scales import ScaleOptions

if TYPE_CHECKING:
    from ..subspace import Subspace


class ContrastOptions(ScaleOptions):
    """ε and the size of A."""

    eps: float = Field(CONTRAST_EPS, gt=0, description="floor on the others' energy: ε times its mean eigenvalue")


def apply_contrast(peft_model: Any, subspace: Subspace | None, options: ContrastOptions,
                   context: InitContext) -> None:
    from .contrast_tensors import contrast_init

    contrast_init(peft_model, context, eps=options.eps, scale=options.scale)


register(InitSpec(
    "osrm-contrast", "Beyond the paper: A = top-r generalized eigenvectors of (M_i, Σ₋ᵢ + ε·tr(Σ₋ᵢ)/d·I), "
    "orthonormalised (scale option), B = 0.",
    peft_init=True, needs_stats=True, needs_moments=True, options=ContrastOptions, apply=apply_contrast,
))
