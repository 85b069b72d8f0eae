"""Fisher-weighted averaging (Matena & Raffel, 2022) of LoRA-merged weights.

Each task's fine-tuned weight is W_i = W0 + ΔW_i and its diagonal Fisher F_i (out×in, from
`estimate_fisher`) measures how much the task's log-likelihood depends on each entry. The merge is the
entrywise weighted mean ``W* = Σ_i w_i F̂_i W_i / Σ_i w_i F̂_i`` with F̂_i = max(F_i, floor). Because every
W_i shares the same W0 and the weights of each entry sum to one, this is exactly
``W* = W0 + Σ_i w_i F̂_i ΔW_i / Σ_i w_i F̂_i`` — so only the deltas are averaged, with the same result for
any floor. Where every Fisher is below the floor the entry falls back to the w-weighted mean of the deltas.
λ (`scaling`, default 1) multiplies the merged delta.
"""

from __future__ import annotations

from collections.abc import Iterable

from pydantic import Field, field_validator

from ..._lazy import torch
from ..registry import ScaledParams, register
from ..types import MergedModule, ModuleInputs, resolve_weights


def _fisher_weighted_mean(
    deltas: Iterable[torch.Tensor], fishers: list[torch.Tensor], weights: list[float], floor: float
) -> torch.Tensor:
    """Σ w_i max(F_i, floor) ΔW_i / Σ w_i max(F_i, floor), entrywise; `deltas` may be produced one at a time."""
    numerator = denominator = None
    for delta, fisher, w in zip(deltas, fishers, weights):
        f = fisher.to(delta).clamp(min=floor).mul_(w)
        numerator = f * delta if numerator is None else numerator.addcmul_(f, delta)
        denominator = f if denominator is None else denominator.add_(f)
    return numerator.div_(denominator)


class FisherParams(ScaledParams):
    weights: list[float] | None = Field(None, description="Per-task positive weights w_i (default 1 each).")
    floor: float = Field(1e-6, gt=0.0, description="Lower bound on each Fisher entry (keeps the mean defined).")

    @field_validator("weights")
    @classmethod
    def _positive(cls, weights: list[float] | None) -> list[float] | None:
        if weights is not None and any(w <= 0 for w in weights):
            raise ValueError("Fisher merging needs positive weights")
        return weights


@register(
    "fisher", FisherParams, "Fisher merging (Matena & Raffel 2022): entrywise Fisher-weighted mean of W0+ΔW_i.",
    requires=("fisher",),
)
def fisher(inputs: ModuleInputs, params: FisherParams) -> MergedModule:
    weights = resolve_weights(params.weights, len(inputs.factors))
    deltas = (f.delta(torch.float32) for f in inputs.factors)  # one dense task update alive at a time
    merged = _fisher_weighted_mean(deltas, inputs.extra("fisher"), weights, params.floor)
    return MergedModule(inputs.name, delta=params.scaling * merged)
