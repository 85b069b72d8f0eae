"""`osrm-project`: training inside a subspace budget, a hard version of the `osrm-reg` penalty.

lora_A is reparametrised as ``A = C·U_k`` for the whole training: U_k (k×d, fixed) holds the k
lowest-energy eigenvectors of the other tasks' second moment Σ₋ᵢ and C (r×k) is what trains, starting at
``[c·I_r, 0]`` so that A starts on the OSRM rows (c: the `scale` option's factor). k = r keeps A's row space
fixed (the frozen-A ablation, up to an r×r mix that B absorbs); k = d leaves A free (plain `osrm` training,
up to Adam's dependence on the basis C is expressed in). The adapter is saved as plain PEFT LoRA with
A = C·U_k, so it loads anywhere.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from pydantic import Field

from .registry import InitContext, InitSpec, register
from .scales import ScaleOptions

if TYPE_CHECKING:
    from ..subspace import Subspace
    from .hooks import TrainingHook

DEFAULT_K_PER_RANK = 4  # k = 4·r (at most d) when `k` is not set


class ProjectOptions(ScaleOptions):
    """k (at least each module's rank, at most its input dim) and the size of A."""

    k: int | None = Field(None, ge=1, description=f"directions A may use; default {DEFAULT_K_PER_RANK}·r, at most d")


def apply_project(peft_model: Any, subspace: Subspace | None, options: ProjectOptions,
                  context: InitContext) -> TrainingHook:
    from .project_tensors import project_init

    return project_init(peft_model, context, k=options.k, scale=options.scale)


register(InitSpec(
    "osrm-project", "Beyond the paper: A = C·U_k during training (C trainable, U_k the k lowest-energy directions "
    "of Σ₋ᵢ), starting on the OSRM rows; saved as plain LoRA.",
    peft_init=True, needs_stats=True, needs_moments=True, options=ProjectOptions, apply=apply_project,
))
