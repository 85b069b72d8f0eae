"""The OSRM inits (arXiv 2505.22934): lora_A starts on the task's subspace of inputs the other tasks barely use.

PEFT builds the adapter with its default init; `osrm_init` then sets every lora_A to the subspace rows and B = 0,
so the model starts as the base model. The subspace comes from the other tasks' statistics (`osrm_lora.subspace`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ..errors import SubspaceError
from .registry import InitOptions, InitSpec, register

if TYPE_CHECKING:
    from ..subspace import Subspace


def apply_subspace(peft_model: Any, subspace: Subspace | None, options: InitOptions) -> None:
    """lora_A ← the subspace rows, B ← 0 (torch and peft load here, not when the registry is read)."""
    from .osrm_tensors import osrm_init

    if subspace is None:
        raise SubspaceError("the OSRM inits need the task's subspace")
    osrm_init(peft_model, subspace)


register(InitSpec(
    "osrm", "OSRM (the paper): A on the eigenvectors of the other tasks' input moment (cov or centered), B = 0.",
    peft_init=True, needs_stats=True, variants=("cov", "centered"), apply=apply_subspace,
))
register(InitSpec(
    "osrm-mean", "OSRM as in the official code: A on the null space of the other tasks' mean inputs, B = 0.",
    peft_init=True, needs_stats=True, variants=("mean",), apply=apply_subspace,
))
