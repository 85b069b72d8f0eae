"""DARE (Yu et al., 2024): drop each delta entry with probability p and rescale the survivors by 1/(1-p).

The random masks come from a generator seeded by (seed, module name), so a merge is reproducible run to run
and independent of the order in which modules are processed. The dropped updates are then combined linearly
(λ Σ w_i ΔW̃_i, PEFT's `dare_linear`) or with TIES' sign election and disjoint mean (PEFT's `dare_ties`).
"""

from __future__ import annotations

import hashlib
from typing import Literal

import torch
from pydantic import Field

from .registry import WeightedParams, register
from .ties import disjoint_mean, elect_sign
from .types import MergedModule, ModuleInputs, resolve_weights


def module_seed(seed: int, module: str) -> int:
    """A stable 63-bit seed per (seed, module) pair (Python's hash() is salted per process)."""
    digest = hashlib.sha256(f"{seed}:{module}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def drop_and_rescale_(tensor: torch.Tensor, drop_rate: float, generator: torch.Generator) -> torch.Tensor:
    """In place: keep each entry with probability 1-p and divide the kept ones by 1-p (unbiased: E = tensor)."""
    keep = 1.0 - drop_rate
    mask = torch.bernoulli(torch.full_like(tensor, keep), generator=generator)
    return tensor.mul_(mask).div_(keep)


class DareParams(WeightedParams):
    drop_rate: float = Field(0.9, ge=0.0, lt=1.0, description="p: probability of dropping each delta entry.")
    combine: Literal["linear", "ties"] = Field(
        "linear", description="How the dropped updates are combined: weighted sum, or TIES sign election."
    )
    seed: int = Field(0, description="Base seed; each module's masks use a generator seeded by (seed, module).")


@register("dare", DareParams, "DARE (Yu et al. 2024): random drop p, rescale 1/(1-p), then linear or TIES, ×λ.")
def dare(inputs: ModuleInputs, params: DareParams) -> MergedModule:
    weights = resolve_weights(params.weights, len(inputs.factors))
    stacked = inputs.stacked_deltas()
    generator = torch.Generator(device=stacked.device).manual_seed(module_seed(params.seed, inputs.name))
    for values in stacked:
        drop_and_rescale_(values, params.drop_rate, generator)
    if params.combine == "ties":
        merged = disjoint_mean(stacked, weights, elect_sign(stacked))
    else:
        merged = torch.zeros_like(stacked[0])
        for values, w in zip(stacked, weights):
            merged.add_(values, alpha=w)
    return MergedModule(inputs.name, delta=params.scaling * merged)
