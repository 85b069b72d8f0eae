"""TIES-merging (Yadav et al., 2023): trim, elect sign, disjoint merge.

Per task, keep the `density` fraction of entries with the largest magnitude (trim); per entry, elect the sign
of the sum of the trimmed values ("total" sign election); average, per entry, only the (weighted) values that
agree with the elected sign (disjoint mean); multiply by λ. Conventions follow `peft.utils.merge_utils.ties`
(weights multiply the trimmed values after the election; a zero sum elects +). Trimming is done per module
here (the paper trims the whole flattened task vector), which is what lets the engine work module by module.
"""

from __future__ import annotations

import torch
from pydantic import Field

from .registry import WeightedParams, register
from .types import MergedModule, ModuleInputs, resolve_weights


def trim_by_magnitude_(tensor: torch.Tensor, density: float) -> torch.Tensor:
    """In place: zero all but the int(density·numel) entries of largest |value| (ties at the cut are kept)."""
    if density >= 1.0:
        return tensor
    keep = int(density * tensor.numel())
    if keep == 0:
        return tensor.zero_()
    magnitude = tensor.abs()
    threshold = torch.kthvalue(magnitude.flatten(), magnitude.numel() - keep + 1).values
    return tensor.mul_(magnitude >= threshold)


def elect_sign(stacked: torch.Tensor) -> torch.Tensor:
    """Per entry, +1 or -1: the sign of the sum over tasks (dim 0); a zero sum elects +1."""
    return torch.where(stacked.sum(dim=0) >= 0, 1.0, -1.0).to(stacked.dtype)


def disjoint_mean(stacked: torch.Tensor, weights: list[float], sign: torch.Tensor) -> torch.Tensor:
    """Mean over tasks of the weighted values whose sign equals the elected one (zeros never count).

    Accumulates task by task so the temporaries are the size of one task's tensor, not of the stack."""
    total = torch.zeros_like(stacked[0])
    count = torch.zeros_like(stacked[0])
    for values, w in zip(stacked, weights):
        agree = torch.sign(values) == sign
        total.add_(values * agree, alpha=w)
        count.add_(agree)
    return total.div_(count.clamp_(min=1))


def sign_consensus_merge(stacked: torch.Tensor, weights: list[float], density: float = 1.0) -> torch.Tensor:
    """TIES combination of task tensors stacked on dim 0 (trimmed in place): trim, elect signs, disjoint mean."""
    for values in stacked:
        trim_by_magnitude_(values, density)
    return disjoint_mean(stacked, weights, elect_sign(stacked))


class TiesParams(WeightedParams):
    density: float = Field(0.2, gt=0.0, le=1.0, description="k: fraction of each task's entries kept by magnitude.")


@register("ties", TiesParams, "TIES (Yadav et al. 2023): trim to top-k magnitude, elect sign, disjoint mean, ×λ.")
def ties(inputs: ModuleInputs, params: TiesParams) -> MergedModule:
    weights = resolve_weights(params.weights, len(inputs.factors))
    merged = sign_consensus_merge(inputs.stacked_deltas(), weights, params.density)
    return MergedModule(inputs.name, delta=params.scaling * merged)
