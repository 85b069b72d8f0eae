"""`osrm-official`: the init the official OSRM code (illidanlab/OSRM, `utils.py`) computes, which is not the
paper's.

For each other task of the statistics pool: the mean input of every target module over a padded sample
(`official_tensors.official_stats`); stack those k vectors (k×d), take a full SVD and let A be the last r rows
of Vᵀ (`subspace.official_subspaces`); B = 0. PEFT first builds the adapter with `init_lora_weights="gaussian"`,
as that code does. With k ≪ d most of those rows lie in the null space, whose basis LAPACK completes with
Householder vectors: A is then close to a fixed selection of the last r input coordinates (docs/inits.md).
"""

from __future__ import annotations

from .osrm import apply_subspace
from .registry import InitSpec, register

register(InitSpec(
    "osrm-official", "The official OSRM code: A = last r rows of Vᵀ (full SVD) of the other tasks' stacked "
    "padded mean inputs, B = 0.",
    peft_init="gaussian", needs_stats=True, variants=("official",), apply=apply_subspace,
))
