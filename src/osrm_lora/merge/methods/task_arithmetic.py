"""Task arithmetic (Ilharco et al., 2023) and plain averaging of LoRA updates.

`ΔW = λ Σ_i w_i s_i B_i A_i` is exactly low rank (≤ Σ r_i): stacking the factors, A = [A_1; …; A_T] and
B = [λ w_1 s_1 B_1, …, λ w_T s_T B_T], represents it with no dense matrix and no approximation. The paper tunes
λ on validation data (0.3–0.5 for full fine-tunes); the default λ = 1 with unit weights is the plain sum
``W0 + Σ_j ΔW_j`` that OSRM merges with.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..._lazy import torch
from ..registry import ScaledParams, WeightedParams, register
from ..types import MergedModule, ModuleInputs, resolve_weights

if TYPE_CHECKING:
    from ...adapters import LoraFactors


def _weighted_sum_factors(factors: list[LoraFactors], coefficients: list[float]) -> LoraFactors:
    """Exact factors of Σ_i c_i s_i B_i A_i: rows of A stacked, scaled columns of B side by side."""
    from ...adapters import LoraFactors

    A = torch.cat([f.A for f in factors], dim=0)
    B = torch.cat([c * f.scale * f.B for f, c in zip(factors, coefficients)], dim=1)
    return LoraFactors(A, B, 1.0)


class TaskArithmeticParams(WeightedParams):
    """λ Σ_i w_i ΔW_i."""


class AverageParams(ScaledParams):
    """λ · (1/T) Σ_i ΔW_i."""


@register(
    "task_arithmetic", TaskArithmeticParams, "λ·Σ w_i ΔW_i (Ilharco et al. 2023); exact rank-Σr_i adapter.",
    exact_low_rank=True,
)
def task_arithmetic(inputs: ModuleInputs, params: TaskArithmeticParams) -> MergedModule:
    weights = resolve_weights(params.weights, len(inputs.factors))
    factors = _weighted_sum_factors(inputs.factors, [params.scaling * w for w in weights])
    return MergedModule(inputs.name, factors=factors)


@register("average", AverageParams, "Mean of the task updates, λ·(1/T)·Σ ΔW_i; exact low-rank adapter.",
          exact_low_rank=True)
def average(inputs: ModuleInputs, params: AverageParams) -> MergedModule:
    n = len(inputs.factors)
    factors = _weighted_sum_factors(inputs.factors, [params.scaling / n] * n)
    return MergedModule(inputs.name, factors=factors)
