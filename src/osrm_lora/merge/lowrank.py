"""Best rank-k approximations of merged updates, with the energy they discard.

By Eckart–Young the truncated SVD is the best rank-k approximation in Frobenius norm; the discarded energy
is Σ_{j>k} σ_j² (and the total Σ_j σ_j² = ||ΔW||_F²). A low-rank input B A (rank R) is truncated without
forming the dense matrix: QR of B and of Aᵀ reduce it to the SVD of an R×R core.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..adapters import LoraFactors


@dataclass
class Truncation:
    factors: LoraFactors
    discarded: float  # Σ of dropped σ²
    total: float  # Σ of all σ²

    @property
    def discarded_fraction(self) -> float:
        return self.discarded / self.total if self.total > 0 else 0.0


def _from_svd(U: torch.Tensor, S: torch.Tensor, Vh: torch.Tensor, rank: int) -> Truncation:
    energy = S.double() ** 2
    k = min(rank, S.numel())
    root = S[:k].sqrt()
    factors = LoraFactors(
        (root[:, None] * Vh[:k]).to(torch.float32), (U[:, :k] * root).to(torch.float32), 1.0
    )
    return Truncation(factors, float(energy[k:].sum()), float(energy.sum()))


def truncate_dense(delta: torch.Tensor, rank: int) -> Truncation:
    """Rank-`rank` factors (σ split evenly between A and B) of a dense out×in update."""
    U, S, Vh = torch.linalg.svd(delta.to(torch.float32), full_matrices=False)
    return _from_svd(U, S, Vh, rank)


def truncate_factors(factors: LoraFactors, rank: int) -> Truncation:
    """Rank-`rank` factors of scale·B A via QR of B and Aᵀ and the SVD of the small core."""
    Qb, Rb = torch.linalg.qr(factors.scale * factors.B.double())
    Qa, Ra = torch.linalg.qr(factors.A.double().T)
    Uc, S, Vch = torch.linalg.svd(Rb @ Ra.T, full_matrices=False)
    return _from_svd(Qb @ Uc, S, Vch @ Qa.T, rank)


def squared_norm(factors: LoraFactors) -> float:
    """||scale·B A||_F² = scale²·tr((BᵀB)(A Aᵀ)) without the dense product."""
    B, A = factors.B.double(), factors.A.double()
    return float(factors.scale**2 * torch.sum((B.T @ B) * (A @ A.T)))
