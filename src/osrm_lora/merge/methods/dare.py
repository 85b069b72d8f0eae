"""DARE (Yu et al., 2024): drop each delta entry with probability p and rescale the survivors by 1/(1-p).

The random masks come from a generator seeded by (seed, module name), so a merge is reproducible run to run
and independent of the order in which modules are processed. The dropped updates are then combined linearly
(λ Σ w_i ΔW̃_i, PEFT's `dare_linear`) or with TIES' sign election and disjoint mean (PEFT's `dare_ties`).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator
from typing import Literal

from pydantic import Field

from ..._lazy import torch
from ..registry import WeightedParams, register
from ..types import MergedModule, ModuleInputs, resolve_weights
from .ties import disjoint_mean, elect_sign


def _module_seed(seed: int, module: str) -> int:
    """A stable 63-bit seed per (seed, module) pair (Python's hash() is salted per process)."""
    digest = hashlib.sha256(f"{seed}:{module}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def _drop_and_rescale_(tensor: torch.Tensor, drop_rate: float, generator: torch.Generator) -> torch.Tensor:
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


def _dropped_deltas(inputs: ModuleInputs, params: DareParams) -> Iterator[torch.Tensor]:
    """Each task's dense update after drop-and-rescale, one at a time; every call draws the same masks."""
    generator = torch.Generator(device=inputs.device).manual_seed(_module_seed(params.seed, inputs.name))
    for task in range(len(inputs.factors)):
        yield _drop_and_rescale_(inputs.delta(task), params.drop_rate, generator)


def _weighted_sum(values_by_task: Iterable[torch.Tensor], weights: list[float]) -> torch.Tensor:
    """Σ w_i values_i, reading (and overwriting) one task's tensor at a time."""
    total = None
    for values, w in zip(values_by_task, weights):
        total = values.mul_(w) if total is None else total.add_(values, alpha=w)
    return total


@register("dare", DareParams, "DARE (Yu et al. 2024): random drop p, rescale 1/(1-p), then linear or TIES, ×λ.")
def dare(inputs: ModuleInputs, params: DareParams) -> MergedModule:
    """Streams the tasks, one dense update at a time; TIES reads them twice (the sum elects the sign, then the
    disjoint mean), drawing the same masks both times."""
    weights = resolve_weights(params.weights, len(inputs.factors))
    if params.combine == "ties":
        sign = elect_sign(_weighted_sum(_dropped_deltas(inputs, params), [1.0] * len(weights)))
        merged = disjoint_mean(_dropped_deltas(inputs, params), weights, sign)
    else:
        merged = _weighted_sum(_dropped_deltas(inputs, params), weights)
    return MergedModule(inputs.name, delta=params.scaling * merged)
