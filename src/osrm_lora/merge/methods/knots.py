"""KnOTS (Stoica et al., 2024): merge LoRA updates in the shared basis of their concatenation's SVD.

``[ΔW_1 … ΔW_T] = U S [V_1ᵀ … V_Tᵀ]`` aligns the tasks: every task's update is U (S V_iᵀ), with the same U.
The per-task blocks S V_iᵀ are merged (TIES by default, as in the paper's KnOTS-TIES, or a weighted sum) and
mapped back with U: ΔW = λ U · merge_i(S V_iᵀ). Components with a zero singular value are dropped.

The SVD never touches the dense out×(T·in) matrix. With B̂_i = s_i B_i, the concatenation is
[B̂_1 … B̂_T] · blockdiag(A_1, …, A_T). QR of the stacked B̂'s (B̂ = Q R) and of each A_iᵀ (A_iᵀ = P_i T_i)
turn it into Q · C · blockdiag(P_1ᵀ, …, P_Tᵀ) with the small (Σr_i)×(Σr_i) core C = [R_i T_iᵀ]; the SVD of C,
C = U_c S W_cᵀ, gives U = Q U_c and V_iᵀ = W_cᵀ[:, block i] P_iᵀ. The result is exactly low rank (≤ Σ r_i).
Trimming is per module (the paper trims the flattened whole-model blocks).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

from pydantic import Field

from ..._lazy import torch
from ..registry import WeightedParams, register
from ..types import MergedModule, ModuleInputs, resolve_weights
from .ties import sign_consensus_merge

if TYPE_CHECKING:
    from ...adapters import LoraFactors

RELATIVE_RANK_TOLERANCE = 1e-10


def _concatenated_svd(factors: list[LoraFactors]) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """U (out×k), S (k), [V_iᵀ (k×in)] of [ΔW_1 … ΔW_T] from the factors alone, in float64; k = its rank."""
    Q, R = torch.linalg.qr(torch.cat([f.scale * f.B.double() for f in factors], dim=1))
    bases, blocks, start = [], [], 0
    for f in factors:
        P, T = torch.linalg.qr(f.A.double().T)  # A_iᵀ = P_i T_i
        bases.append(P)
        blocks.append(R[:, start:start + f.rank] @ T.T)
        start += f.rank
    U_c, S, W_ct = torch.linalg.svd(torch.cat(blocks, dim=1), full_matrices=False)
    keep = S > S[0] * RELATIVE_RANK_TOLERANCE
    keep[0] = True  # all-zero updates (untrained B = 0) still give a valid rank-1 zero factorisation
    U_c, S, W_ct = U_c[:, keep], S[keep], W_ct[keep]
    Vts, start = [], 0
    for P in bases:
        Vts.append(W_ct[:, start:start + P.shape[1]] @ P.T)
        start += P.shape[1]
    return Q @ U_c, S, Vts


class KnotsParams(WeightedParams):
    combine: Literal["ties", "linear"] = Field(
        "ties", description="How the aligned S·V_iᵀ blocks are merged: TIES or weighted sum."
    )
    density: float = Field(
        1.0, gt=0.0, le=1.0,
        description="TIES trim: fraction of each task's S·V_iᵀ entries kept (the released KnOTS-TIES uses 1.0).",
    )


@register(
    "knots", KnotsParams, "KnOTS (Stoica et al. 2024): TIES/linear merge of S·V_iᵀ in the joint SVD basis; exact low rank.",
    exact_low_rank=True,
)
def knots(inputs: ModuleInputs, params: KnotsParams) -> MergedModule:
    from ...adapters import LoraFactors

    weights = resolve_weights(params.weights, len(inputs.factors))
    U, S, Vts = _concatenated_svd(inputs.factors)
    blocks = [S[:, None] * Vt for Vt in Vts]
    if params.combine == "ties":
        merged = sign_consensus_merge(torch.stack(blocks), weights, params.density)
    else:
        merged = sum(w * b for w, b in zip(weights, blocks))
    factors = LoraFactors(merged.to(torch.float32), U.to(torch.float32), params.scaling)
    return MergedModule(inputs.name, factors=factors)
