"""TIES-merging (Yadav et al., 2023): trim, elect sign, disjoint merge.

Per task, keep the `density` fraction of entries with the largest magnitude (trim); per entry, elect the sign
of the sum of the trimmed values ("total" sign election); average, per entry, only the (weighted) values that
agree with the elected sign (disjoint mean); multiply by λ. Conventions follow `peft.utils.merge_utils.ties`
(weights multiply the trimmed values after the election; a zero sum elects +). Trimming is done per module
here (the paper trims the whole flattened task vector), which is what lets the engine work module by module.

TIES needs every entry of every dense update ΔW_i, so it cannot work on the factors alone. It forms them a block
of rows at a time: one pass per task finds its trim threshold, a second pass trims, elects and averages each row
block for all tasks at once. Peak memory is about three dense out×in matrices, whatever the number of tasks.
"""

from __future__ import annotations

import torch
from pydantic import Field

from ..adapters import LoraFactors
from .registry import WeightedParams, register
from .types import MergedModule, ModuleInputs, resolve_weights

BLOCK_ELEMENTS = 1 << 22  # entries in one T×rows×in block of the second pass (16 MB in float32)
# Non-negative IEEE floats sort like their bit patterns read as integers; the top 16 bits make the histogram.
_BITS = {torch.float32: (torch.int32, 16), torch.float64: (torch.int64, 48)}


def magnitude_threshold(tensor: torch.Tensor, keep: int) -> torch.Tensor:
    """The keep-th largest |value| of `tensor` (1 ≤ keep ≤ numel), exactly.

    A radix select: histogram the top 16 bits of |value|, find the bucket holding the cut, and select within that
    bucket only; 2-3× faster than `kthvalue` over all entries at d = 2048-4096."""
    magnitude = tensor.abs().flatten()
    if magnitude.dtype not in _BITS:
        magnitude = magnitude.float()  # fp16/bf16 are exact in float32
    int_dtype, shift = _BITS[magnitude.dtype]
    bits = magnitude.view(int_dtype)
    bucket = bits >> shift
    at_or_above = torch.bincount(bucket).flip(0).cumsum(0).flip(0)  # [b]: entries in buckets ≥ b
    cut = int(torch.nonzero(at_or_above >= keep).max())
    above = int(at_or_above[cut + 1]) if cut + 1 < at_or_above.numel() else 0
    candidates = bits[bucket == cut]
    threshold = torch.kthvalue(candidates, candidates.numel() - (keep - above) + 1).values
    return threshold.reshape(1).view(magnitude.dtype)[0]


def trim_threshold(tensor: torch.Tensor, density: float) -> torch.Tensor | None:
    """The |value| an entry needs to survive a trim to `density` (None: everything is kept; ties at the cut are
    kept, so exactly int(density·numel) entries survive unless values repeat at the cut)."""
    if density >= 1.0:
        return None
    keep = int(density * tensor.numel())
    return magnitude_threshold(tensor, keep) if keep > 0 else torch.tensor(torch.inf, dtype=tensor.dtype)


def trim_by_magnitude_(tensor: torch.Tensor, density: float) -> torch.Tensor:
    """In place: zero all but the int(density·numel) entries of largest |value|."""
    threshold = trim_threshold(tensor, density)
    return tensor if threshold is None else tensor.mul_(tensor.abs() >= threshold)


def elect_sign(stacked: torch.Tensor) -> torch.Tensor:
    """Per entry, +1 or -1: the sign of the sum over tasks (dim 0); a zero sum elects +1."""
    return torch.where(stacked.sum(dim=0) >= 0, 1.0, -1.0).to(stacked.dtype)


def disjoint_mean(stacked: torch.Tensor, weights: list[float], sign: torch.Tensor) -> torch.Tensor:
    """Mean over tasks of the weighted values whose sign equals the elected one (zeros never count).

    A value agrees when value·sign > 0, and then equals sign·|value|, so the sum is sign·Σ w·max(value·sign, 0);
    accumulated task by task, the temporaries are the size of one task's tensor, not of the stack."""
    total = torch.zeros_like(stacked[0])
    count = torch.zeros_like(stacked[0])
    agreeing = torch.empty_like(stacked[0])
    for values, w in zip(stacked, weights):
        torch.mul(values, sign, out=agreeing).clamp_(min=0)
        count.add_(agreeing > 0)
        total.add_(agreeing, alpha=w)
    return total.mul_(sign).div_(count.clamp_(min=1))


def sign_consensus_merge(stacked: torch.Tensor, weights: list[float], density: float = 1.0) -> torch.Tensor:
    """TIES combination of task tensors stacked on dim 0 (trimmed in place): trim, elect signs, disjoint mean."""
    for values in stacked:
        trim_by_magnitude_(values, density)
    return disjoint_mean(stacked, weights, elect_sign(stacked))


def _delta_rows_(out: torch.Tensor, factors: LoraFactors, rows: slice) -> torch.Tensor:
    """out ← rows of s·B A. Both passes of `ties_from_factors` form entries through this one call on the same
    row blocks, so the values compared with a threshold are bit for bit those it was computed from."""
    return torch.matmul(factors.B[rows], factors.A, out=out).mul_(factors.scale)


def ties_from_factors(factors: list[LoraFactors], weights: list[float], density: float) -> torch.Tensor:
    """TIES of the dense updates s_i B_i A_i, built a block of rows at a time (same result as stacking them all)."""
    out_features, in_features = int(factors[0].B.shape[0]), int(factors[0].A.shape[1])
    block_rows = max(1, BLOCK_ELEMENTS // (len(factors) * in_features))
    row_blocks = [slice(start, min(start + block_rows, out_features)) for start in range(0, out_features, block_rows)]
    device = factors[0].B.device
    merged = torch.empty(out_features, in_features, device=device)
    thresholds: list[torch.Tensor | None] = [None] * len(factors)
    if density < 1.0:
        for i, f in enumerate(factors):
            delta = torch.empty_like(merged)
            for rows in row_blocks:
                _delta_rows_(delta[rows], f, rows)
            thresholds[i] = trim_threshold(delta, density)
            del delta
    block = torch.empty(len(factors), block_rows, in_features, device=device)
    for rows in row_blocks:
        stacked = block[:, : rows.stop - rows.start]
        for values, f, threshold in zip(stacked, factors, thresholds):
            _delta_rows_(values, f, rows)
            if threshold is not None:
                values.mul_(values.abs() >= threshold)
        merged[rows] = disjoint_mean(stacked, weights, elect_sign(stacked))
    return merged


class TiesParams(WeightedParams):
    density: float = Field(0.2, gt=0.0, le=1.0, description="k: fraction of each task's entries kept by magnitude.")


@register("ties", TiesParams, "TIES (Yadav et al. 2023): trim to top-k magnitude, elect sign, disjoint mean, ×λ.")
def ties(inputs: ModuleInputs, params: TiesParams) -> MergedModule:
    weights = resolve_weights(params.weights, len(inputs.factors))
    merged = ties_from_factors(inputs.factors, weights, params.density)
    return MergedModule(inputs.name, delta=params.scaling * merged)
