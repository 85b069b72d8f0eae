"""EMR-merging (Huang et al., NeurIPS 2024): Elect a unified update, then Mask and Rescale it per task.

Elect: σ = sign(Σ_i τ_i) and τ_uni = σ ⊙ max_i{|τ_i| : τ_i agrees with σ}. Mask: M_i = (τ_i ⊙ τ_uni > 0).
Rescale: λ_i = Σ|τ_i| / Σ|M_i ⊙ τ_uni|, summed over the whole model (the paper; `rescale_scope="model"`,
computed in a first pass over the modules) or per module. Task i is served with W0 + λ_i M_i ⊙ τ_uni, so the
TASK MUST BE KNOWN AT INFERENCE: there is no single merged model, and the result is not low rank.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from ..._lazy import torch
from ..registry import MethodParams, register
from ..types import MergedModule, ModuleInputs


def _elect_unified(stacked: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(τ_uni, boolean masks M (T×…)) from task updates stacked on dim 0, one task's temporaries at a time."""
    sign = torch.sign(stacked.sum(dim=0))
    magnitude = torch.zeros_like(sign)
    for values in stacked:
        torch.maximum(magnitude, values.abs().mul_(values * sign > 0), out=magnitude)
    unified = magnitude.mul_(sign)
    masks = torch.empty(stacked.shape, dtype=torch.bool, device=stacked.device)
    for values, mask in zip(stacked, masks):
        torch.gt(values * unified, 0, out=mask)
    return unified, masks


def _rescaler_sums(stacked: torch.Tensor, unified: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """T×2: per task, Σ|τ_i| and Σ|M_i ⊙ τ_uni| (float64, so sums over many modules stay exact)."""
    magnitude = unified.abs()
    rows = [
        torch.stack([values.abs().sum(dtype=torch.float64), (magnitude * mask).sum(dtype=torch.float64)])
        for values, mask in zip(stacked, masks)
    ]
    return torch.stack(rows)


def _rescalers(sums: torch.Tensor) -> torch.Tensor:
    """λ_i = Σ|τ_i| / Σ|M_i ⊙ τ_uni|; 0 for a task whose mask keeps nothing."""
    own, kept = sums[:, 0], sums[:, 1]
    return torch.where(kept > 0, own / kept.clamp(min=torch.finfo(kept.dtype).tiny), torch.zeros_like(own))


class EmrParams(MethodParams):
    rescale_scope: Literal["model", "module"] = Field(
        "model", description="Sum the rescaler's magnitudes over all merged modules (paper) or per module."
    )


def emr_totals(inputs: ModuleInputs, params: EmrParams) -> torch.Tensor:
    return sum(_rescaler_sums(stacked, *_elect_unified(stacked)) for _, stacked in inputs.delta_blocks())


@register(
    "emr", EmrParams, "EMR (Huang et al. 2024): elected unified update + per-task masks and rescalers; task needed "
    "at inference.", totals=emr_totals,
)
def emr(inputs: ModuleInputs, params: EmrParams) -> MergedModule:
    """Elects, masks and sums entry by entry, so it runs a block of rows of the dense updates at a time."""
    unified = torch.empty(inputs.shape, dtype=torch.float32, device=inputs.device)
    masks = torch.empty((len(inputs.factors), *inputs.shape), dtype=torch.bool, device=inputs.device)
    per_module = inputs.totals is None  # otherwise the engine summed them over the whole model (emr_totals)
    sums = inputs.totals if not per_module else torch.zeros(len(inputs.factors), 2, dtype=torch.float64,
                                                             device=inputs.device)
    for rows, stacked in inputs.delta_blocks():
        unified[rows], masks[:, rows] = _elect_unified(stacked)
        if per_module:
            sums += _rescaler_sums(stacked, unified[rows], masks[:, rows])
    scales = _rescalers(sums).tolist()
    return MergedModule(
        inputs.name, delta=unified,
        task_masks={t: masks[i] for i, t in enumerate(inputs.tasks)},
        task_scales={t: float(scales[i]) for i, t in enumerate(inputs.tasks)},
    )
