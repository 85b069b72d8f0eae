"""The OSRM inits (arXiv 2505.22934): lora_A starts on the task's subspace of inputs the other tasks barely use.

PEFT builds the adapter with its default init; `osrm_init` then sets every lora_A to the subspace rows and B = 0,
so the model starts as the base model. The subspace comes from the other tasks' statistics (`osrm_lora.subspace`).
The `scale` option sizes the orthonormal rows like a baseline's A (`inits.scales`), so that the direction of A
can be compared with its size.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ..errors import SubspaceError
from .registry import InitContext, InitOptions, InitSpec, register
from .scales import ScaleOptions

if TYPE_CHECKING:
    from ..subspace import Subspace


def apply_subspace(peft_model: Any, subspace: Subspace | None, options: InitOptions, context: InitContext) -> None:
    """lora_A ← the subspace rows (scaled as `options.scale` says, if it has one), B ← 0; torch and peft load
    here, not when the registry is read."""
    from .osrm_tensors import osrm_init

    if subspace is None:
        raise SubspaceError(f"task {context.task!r}: the OSRM inits need the task's subspace")
    osrm_init(peft_model, subspace, scale=getattr(options, "scale", "orthonormal"))


register(InitSpec(
    "osrm", "OSRM (the paper): A on the eigenvectors of the other tasks' input moment (cov or centered), B = 0.",
    peft_init=True, needs_stats=True, variants=("cov", "centered"), options=ScaleOptions, apply=apply_subspace,
))
register(InitSpec(
    "osrm-mean", "OSRM on the null space of the other tasks' mean inputs (real tokens, weighted), B = 0.",
    peft_init=True, needs_stats=True, variants=("mean",), options=ScaleOptions, apply=apply_subspace,
))
