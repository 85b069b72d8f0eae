"""RegMean (Jin et al., 2023): the linear map closest to every task's map on that task's inputs.

For a linear layer y = W x with task Gram matrices G_i = Σ_x x xᵀ (in×in, the second-moment sums of
`TaskStats`), minimising Σ_i ||W X_iᵀ − W_i X_iᵀ||² gives ``W* = (Σ_i W_i G_i)(Σ_i G_i)⁻¹`` (W is out×in).
The paper shrinks the off-diagonal part, G̃ = α G + (1−α) diag(G) with α = 0.9. With W_i = W0 + ΔW_i and a
shared W0, (Σ W0 G̃_i)(Σ G̃_i)⁻¹ = W0, so ``W* = W0 + (Σ_i ΔW_i G̃_i)(Σ_i G̃_i)⁻¹``.

That update is exactly low rank: ΔW_i G̃_i (ΣG̃)⁻¹ = s_i B_i · [A_i G̃_i (ΣG̃)⁻¹], so the result keeps the
stacked B's and replaces each A_i by A_i G̃_i (ΣG̃)⁻¹ (rank ≤ Σ r_i, no dense per-task matrix). A singular
ΣG̃ (input directions no task ever uses) is handled with the pseudo-inverse: those directions get no update.
"""

from __future__ import annotations

from pydantic import Field

from ..._lazy import torch
from ..registry import ScaledParams, register
from ..types import MergedModule, ModuleInputs


def _shrink_gram(gram: torch.Tensor, alpha: float) -> torch.Tensor:
    """α G + (1−α) diag(G): keeps the diagonal, scales the off-diagonal entries by α."""
    return alpha * gram + (1.0 - alpha) * torch.diag(torch.diagonal(gram))


def _right_solve_symmetric(rhs: torch.Tensor, matrix: torch.Tensor) -> torch.Tensor:
    """rhs · matrix⁻¹ for a symmetric positive semi-definite matrix (Cholesky, else pseudo-inverse)."""
    chol, info = torch.linalg.cholesky_ex(matrix)
    if int(info) == 0:
        return torch.cholesky_solve(rhs.T, chol).T
    return rhs @ torch.linalg.pinv(matrix, hermitian=True)


class RegMeanParams(ScaledParams):
    alpha: float = Field(
        0.9, ge=0.0, le=1.0, description="Off-diagonal shrinkage α of each Gram matrix: αG + (1−α)diag(G)."
    )


@register(
    "regmean", RegMeanParams, "RegMean (Jin et al. 2023): (Σ ΔW_i G_i)(Σ G_i)⁻¹ with input Grams; exact low rank.",
    requires=("stats",), exact_low_rank=True,
)
def regmean(inputs: ModuleInputs, params: RegMeanParams) -> MergedModule:
    from ...adapters import LoraFactors

    # Shrinkage is linear, so Σ G̃_i = shrink(Σ G_i) and A_i G̃_i = α A_i G_i + (1−α) A_i diag(G_i):
    # no shrunk Gram is ever formed.
    d_in = inputs.shape[1]
    total = torch.zeros(d_in, d_in, dtype=torch.float64, device=inputs.factors[0].A.device)
    projected = []
    for f, gram in zip(inputs.factors, inputs.extra("stats")):
        A, G = f.A.double(), gram.double()
        projected.append(params.alpha * (A @ G) + (1.0 - params.alpha) * A * torch.diagonal(G))
        total.add_(G)
    A = _right_solve_symmetric(torch.cat(projected, dim=0), _shrink_gram(total, params.alpha)).to(torch.float32)
    B = torch.cat([params.scaling * f.scale * f.B for f in inputs.factors], dim=1)
    return MergedModule(inputs.name, factors=LoraFactors(A, B, 1.0))
