"""Before any training, from the statistics alone: what an OSRM subspace costs the task it is for.

OSRM picks the directions the other tasks use least. Whether the task itself uses them is a separate
question, answered by the same second moments: the task's own energy the rows capture,
``tr(A M_i Aᵀ) / tr(M_i)``, next to the other tasks' ``tr(A Σ₋ᵢ Aᵀ) / tr(Σ₋ᵢ)``, each divided by the share
``r/d`` an isotropic (random) r-dim subspace captures. Below 1 the rows see less than a random subspace.
When the task's share is not clearly above the others' (`starves`), the subspace starves the task as much as
it protects the others; the `osrm-contrast` rows (top generalized eigenvectors of ``(M_i, Σ₋ᵢ + ε·tr(Σ₋ᵢ)/d·I)``,
`contrast_rows`) and the `osrm-reg` penalty are the modes to try. The numerical null dimension of Σ₋ᵢ says
whether the data determine the subspace at all: with more null directions than r, any r of them are equally
unused and the choice among them is arbitrary.

Pure float64 tensor maths (`subspace` records the forecast in each subspace file's diagnostics).
"""

from __future__ import annotations

import math

from ._lazy import torch

CONTRAST_EPS = 1e-2  # default ε of osrm-contrast: Σ₋ᵢ floored at 1% of its mean eigenvalue
STARVES_RATIO = 2.0  # the task's share must exceed the others' by this factor for the subspace to favour it


def _isotropic_floor(sigma: torch.Tensor, eps: float) -> torch.Tensor:
    """``Σ + ε·(tr Σ / d)·I``: Σ with every eigenvalue raised by ε times its mean (positive definite)."""
    d = sigma.shape[-1]
    shift = eps * sigma.diagonal(dim1=-2, dim2=-1).sum(-1) / d
    return sigma + shift[..., None, None] * torch.eye(d, dtype=sigma.dtype, device=sigma.device)


def contrast_rows(own: torch.Tensor, others: torch.Tensor, r: int, eps: float = CONTRAST_EPS
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """The top-r generalized eigenvectors of ``(M_i, Σ₋ᵢ + ε·tr(Σ₋ᵢ)/d·I)``, orthonormalised (float64).

    Returns ``(rows ...×r×d, eigenvalues ...×r descending)``. The eigenvectors x maximise the Rayleigh quotient
    ``xᵀ M_i x / xᵀ S x`` (own energy over the others' floored energy). They are S-orthogonal, not orthogonal:
    a QR in descending order orthonormalises them, so that the first j rows span the top-j eigenvectors for
    every j (a lower rank takes the leading rows) and row 1 is the top eigenvector itself.
    """
    if not (math.isfinite(eps) and eps > 0):
        raise ValueError(f"contrast ε must be finite and > 0, got {eps!r}")
    L = torch.linalg.cholesky(_isotropic_floor(others.double(), eps))
    left = torch.linalg.solve_triangular(L, own.double(), upper=False)  # L⁻¹ M
    whitened = torch.linalg.solve_triangular(L, left.transpose(-1, -2), upper=False)  # L⁻¹ M L⁻ᵀ
    values, vectors = torch.linalg.eigh((whitened + whitened.transpose(-1, -2)) / 2)
    top = vectors[..., -r:].flip(-1)  # descending
    X = torch.linalg.solve_triangular(L.transpose(-1, -2), top, upper=True)  # L⁻ᵀ y: the generalized vectors
    pivot = X.gather(-2, X.abs().argmax(-2, keepdim=True))  # a reproducible sign per eigenvector
    X = X * torch.where(pivot < 0, -1.0, 1.0).to(X.dtype)
    Q, R = torch.linalg.qr(X)
    Q = Q * torch.where(R.diagonal(dim1=-2, dim2=-1) < 0, -1.0, 1.0).to(Q.dtype)[..., None, :]
    return Q.transpose(-1, -2), values[..., -r:].flip(-1)


def null_dimension(eigenvalues: torch.Tensor) -> torch.Tensor:
    """The numerical null dimension of a PSD matrix from its eigenvalues (...×d): those at most
    ``λ_max · d · ε_float32``, the resolution of statistics summed in float32."""
    d = eigenvalues.shape[-1]
    tol = eigenvalues.amax(-1, keepdim=True).clamp_min(0) * d * torch.finfo(torch.float32).eps
    return (eigenvalues <= tol).sum(-1)


def _share(rows: torch.Tensor, moment: torch.Tensor) -> float:
    """``tr(A M Aᵀ) / tr(M)`` for orthonormal rows A (0 for an all-zero M)."""
    trace = float(moment.diagonal().sum())
    return max(0.0, float(((rows @ moment) * rows).sum()) / trace) if trace > 0 else 0.0


def module_forecast(rows: torch.Tensor, others: torch.Tensor, own: torch.Tensor | None,
                    contrast: torch.Tensor | None = None, eps: float = CONTRAST_EPS) -> dict:
    """One module's forecast for orthonormal OSRM `rows` (r×d): the task's own and the other tasks' energy
    they capture, and those of the `contrast` rows (computed here at `eps` if not given), each as a multiple
    of the isotropic share r/d; with `own` None (a task outside the statistics pool) only the others' share of
    the OSRM rows."""
    r, d = rows.shape
    iso = r / d
    rows, others = rows.double(), others.double()
    record: dict = {"isotropic_share": iso, "osrm": {"others": _share(rows, others) / iso}}
    if own is not None:
        own = own.double()
        record["osrm"]["own"] = _share(rows, own) / iso
        contrast = contrast_rows(own, others, r, eps)[0] if contrast is None else contrast.double()
        record["contrast"] = {"eps": eps, "own": _share(contrast, own) / iso, "others": _share(contrast, others) / iso}
    return record


def _starves(own: float, others: float) -> bool:
    """Whether a subspace gives the task's inputs no clearly larger share than the other tasks' inputs."""
    return own < STARVES_RATIO * others


def summarise(diagnostics: dict[str, dict]) -> dict | None:
    """A task's forecast over its modules (a subspace's `spectrum` records): the mean shares, the largest null
    dimension of Σ₋ᵢ and the verdict; None when the subspace records no forecast or no own share."""
    records = [s["forecast"] for s in diagnostics.values() if "osrm" in s.get("forecast", {})]
    if not records or any("own" not in f["osrm"] for f in records):
        return None

    def mean(mode: str, who: str) -> float:
        return sum(f[mode][who] for f in records) / len(records)

    summary = {
        "osrm": {"own": mean("osrm", "own"), "others": mean("osrm", "others")},
        "contrast": {"own": mean("contrast", "own"), "others": mean("contrast", "others"),
                     "eps": records[0]["contrast"]["eps"]},
        "others_null_dim": max(int(s.get("others_null_dim", 0)) for s in diagnostics.values()),
    }
    summary["starves"] = _starves(summary["osrm"]["own"], summary["osrm"]["others"])
    return summary


def verdict(task: str, summary: dict) -> str:
    """One plain sentence on a task's forecast."""
    osrm, contrast = summary["osrm"], summary["contrast"]
    shares = (f"OSRM rows: own {osrm['own']:.3g}× vs others {osrm['others']:.3g}× the isotropic share; "
              f"contrast rows: own {contrast['own']:.3g}× vs others {contrast['others']:.3g}×")
    if summary["starves"]:
        return (f"task {task!r}: {shares}. The OSRM subspace starves the task as much as it protects the "
                f"others; try osrm-contrast or osrm-reg.")
    return f"task {task!r}: {shares}."
