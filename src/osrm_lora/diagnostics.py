"""Per-adapter diagnostics, exact from the cached statistics: what training did to A, and what it costs others.

For adapter i at module m (A r×d, ΔW = s·B A, Σ_j = E[x xᵀ] of task j's inputs there, Σ₋ᵢ the leave-one-out
mixture of the other tasks' moments as OSRM builds it):

- ``‖ΔW‖_F`` per module, and of all modules together (√Σ_m ‖ΔW_m‖²_F), from r×r Gram matrices;
- retention ``‖A P₀ᵀ‖²_F / ‖A‖²_F``, P₀ an orthonormal basis of the initial A's rows: 1 when training kept
  A in its initial row space;
- captured energy ``tr(P Σ₋ᵢ Pᵀ) / tr(Σ₋ᵢ)``, P an orthonormal basis of A's rows, at init and after
  training: the share of the other tasks' input energy the adapter can read (OSRM starts it near 0);
- coordinate mass: the share of ‖A‖²_F on the r input coordinates where A is largest (1 for a selection of
  r coordinates, r/d on average for a random A);
- absolute interference ``Σ_m E‖ΔW_j x_i‖² / Σ_m E‖W₀ x_i‖²`` on task i's inputs, beside today's ratio to
  task i's own adapter (`interference.interference_matrix`);
- overlap ``‖A_i A_jᵀ‖²_F / (‖A_i‖²_F ‖A_j‖²_F)`` averaged over modules (0 for orthogonal row spaces).

Module averages weight every module equally. Pure float64 tensor maths, no I/O; T ≥ 2 tasks.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping
from dataclasses import asdict, dataclass

import numpy as np
import torch

from .adapters import LoraAdapter, LoraFactors
from .errors import AdapterError
from .interference import interference_matrix
from .stats import TaskStats
from .subspace import captured_energy, others_moments, shared_input_groups, task_weights

PER_MODULE = ("delta_norm", "retention", "captured_init", "captured_trained", "coordinate_mass")


def _delta_norm(factors: LoraFactors) -> float:
    """``‖s B A‖_F = |s| √tr((BᵀB)(A Aᵀ))``: no dense out×in update is formed."""
    A, B = factors.A.double(), factors.B.double()
    return abs(factors.scale) * math.sqrt(max(float(((B.T @ B) * (A @ A.T)).sum()), 0.0))


def _row_basis(A: torch.Tensor) -> torch.Tensor:
    """Orthonormal rows (k×d, float64) spanning A's row space; k is A's numerical rank."""
    _, s, vh = torch.linalg.svd(A.double(), full_matrices=False)
    tol = (s.max() if s.numel() else 0.0) * max(A.shape) * torch.finfo(torch.float64).eps
    return vh[s > tol]


def _retention(A: torch.Tensor, A0: torch.Tensor) -> float:
    """``‖A P₀ᵀ‖²_F / ‖A‖²_F`` with P₀ a basis of A0's rows; NaN for A = 0."""
    A = A.double()
    total = float(A.square().sum())
    return float((A @ _row_basis(A0).T).square().sum()) / total if total > 0 else math.nan


def _coordinate_mass(A: torch.Tensor) -> float:
    """Share of ‖A‖²_F on the r (= rows of A) input coordinates with the largest column energy."""
    columns = A.double().square().sum(0)
    total = float(columns.sum())
    return float(columns.topk(min(A.shape[0], columns.numel())).values.sum()) / total if total > 0 else math.nan


def _overlap(A_i: torch.Tensor, A_j: torch.Tensor) -> float:
    """``‖A_i A_jᵀ‖²_F / (‖A_i‖²_F ‖A_j‖²_F)``; NaN when either is 0."""
    a, b = A_i.double(), A_j.double()
    norms = float(a.square().sum() * b.square().sum())
    return float((a @ b.T).square().sum()) / norms if norms > 0 else math.nan


def _base_energy(W0: torch.Tensor, moment: torch.Tensor) -> float:
    """``E‖W₀ x‖² = tr(W₀ M W₀ᵀ)`` for ``M = E[x xᵀ]`` (W₀ out×in)."""
    W = W0.to(device=moment.device, dtype=torch.float64)
    return float(((W @ moment) * W).sum())


@dataclass
class AdapterDiagnostics:
    """One adapter's numbers: totals over modules (module means for the ratios) and each module's."""

    task: str
    delta_norm: float
    retention: float | None  # None without the initial A
    captured_init: float | None
    captured_trained: float
    coordinate_mass: float
    per_module: dict[str, dict[str, float | None]]


@dataclass
class Diagnostics:
    """Every adapter's diagnostics and the T×T cross-task matrices (rows: inputs of task i)."""

    tasks: list[str]
    adapters: dict[str, AdapterDiagnostics]
    absolute_interference: np.ndarray  # [i, j] = Σ_m E‖ΔW_j x_i‖² / Σ_m E‖W₀ x_i‖²
    interference_ratio: np.ndarray  # [i, j] = Σ_m E‖ΔW_j x_i‖² / Σ_m E‖ΔW_i x_i‖² (interference_matrix)
    overlap: np.ndarray  # [i, j] = module mean of ‖A_i A_jᵀ‖²/(‖A_i‖²‖A_j‖²)

    @property
    def mean_overlap(self) -> float:
        """Mean over pairs i ≠ j."""
        return float(self.overlap[~np.eye(len(self.tasks), dtype=bool)].mean())

    def to_dict(self) -> dict:
        """JSON-ready (NaN becomes None)."""
        def clean(v):
            return None if isinstance(v, float) and math.isnan(v) else v

        def matrix(a: np.ndarray) -> list[list[float | None]]:
            return [[clean(float(x)) for x in row] for row in a]

        adapters = {}
        for t, d in self.adapters.items():
            item = {k: clean(v) for k, v in asdict(d).items() if k != "per_module"}
            item["per_module"] = {m: {k: clean(v) for k, v in row.items()} for m, row in d.per_module.items()}
            adapters[t] = item
        return {"tasks": self.tasks, "adapters": adapters, "mean_overlap": clean(self.mean_overlap),
                "absolute_interference": matrix(self.absolute_interference),
                "interference_ratio": matrix(self.interference_ratio), "overlap": matrix(self.overlap)}


def _check_shapes(adapters: Mapping[str, LoraAdapter], initial: Mapping[str, Mapping[str, torch.Tensor]] | None,
                  base_weights: Mapping[str, torch.Tensor], modules: list[str]) -> None:
    ref = next(iter(adapters.values()))
    for m in modules:
        want = (ref.modules[m].B.shape[0], ref.modules[m].A.shape[1])
        if m not in base_weights or tuple(base_weights[m].shape) != want:
            got = tuple(base_weights[m].shape) if m in base_weights else "missing"
            raise AdapterError(f"base weight of module {m}: {got}, expected out×in {want}")
    for t in adapters if initial is not None else ():
        for m in modules:
            A0 = initial.get(t, {}).get(m)
            if A0 is None or A0.shape[1] != adapters[t].modules[m].A.shape[1]:
                raise AdapterError(f"initial A of task {t!r}, module {m}: "
                                   f"{'missing' if A0 is None else tuple(A0.shape)}, expected r×"
                                   f"{adapters[t].modules[m].A.shape[1]}")


def _module_values(
    adapters: Mapping[str, LoraAdapter], initial: Mapping[str, Mapping[str, torch.Tensor]] | None,
    stats: Mapping[str, TaskStats], base_weights: Mapping[str, torch.Tensor], modules: list[str], weighting: str,
) -> tuple[dict[str, dict[str, dict]], np.ndarray]:
    """Per task and module: the PER_MODULE values; per task: Σ_m E‖W₀ x‖² on its inputs."""
    tasks = list(adapters)
    pool = [stats[t] for t in tasks]
    values = {t: {} for t in tasks}
    base = np.zeros(len(tasks))
    for group in shared_input_groups(pool, modules):
        moments = [s.moment(group[0]) for s in pool]  # finite: interference_matrix checked them
        weights = [task_weights(weighting, s.tokens, M.diagonal().sum()) for s, M in zip(pool, moments)]
        others = others_moments([w * M for w, M in zip(weights, moments)], weights)
        for i, (t, sigma) in enumerate(zip(tasks, others)):
            for m in group:
                A = adapters[t].modules[m].A
                A0 = initial[t][m] if initial is not None else None
                base[i] += _base_energy(base_weights[m], moments[i])
                values[t][m] = {
                    "delta_norm": _delta_norm(adapters[t].modules[m]),
                    "retention": _retention(A, A0) if A0 is not None else None,
                    "captured_init": float(captured_energy(_row_basis(A0), sigma)) if A0 is not None else None,
                    "captured_trained": float(captured_energy(_row_basis(A), sigma)),
                    "coordinate_mass": _coordinate_mass(A),
                }
    return values, base


def _summary(task: str, per_module: dict[str, dict]) -> AdapterDiagnostics:
    def mean(key: str) -> float | None:
        vals = [row[key] for row in per_module.values()]
        return None if vals[0] is None else statistics.fmean(vals)

    total = math.sqrt(sum(row["delta_norm"] ** 2 for row in per_module.values()))
    return AdapterDiagnostics(task, total, mean("retention"), mean("captured_init"), mean("captured_trained"),
                              mean("coordinate_mass"), per_module)


def diagnose(
    adapters: Mapping[str, LoraAdapter],
    stats: Mapping[str, TaskStats],
    base_weights: Mapping[str, torch.Tensor],
    initial: Mapping[str, Mapping[str, torch.Tensor]] | None = None,
    *,
    weighting: str = "equal",
) -> Diagnostics:
    """All diagnostics of the trained `adapters` (task -> adapter) on their tasks' statistics.

    `base_weights[m]` is module m's W₀ (out×in); `initial[task][m]` the A the adapter started from (without
    it, retention and captured_init are None). `weighting` mixes the other tasks' moments as OSRM does.
    """
    interference = interference_matrix(adapters, stats)  # also checks adapters and statistics agree
    tasks = interference.tasks
    modules = sorted(adapters[tasks[0]].modules)
    _check_shapes(adapters, initial, base_weights, modules)
    values, base = _module_values(adapters, initial, stats, base_weights, modules, weighting)
    with np.errstate(divide="ignore", invalid="ignore"):
        absolute = np.where(base[:, None] > 0, interference.energy / np.where(base > 0, base, 1.0)[:, None], np.nan)
    pair = np.array([[statistics.fmean(_overlap(adapters[a].modules[m].A, adapters[b].modules[m].A)
                                       for m in modules) for b in tasks] for a in tasks])
    return Diagnostics(tasks=tasks, adapters={t: _summary(t, values[t]) for t in tasks},
                       absolute_interference=absolute, interference_ratio=interference.matrix, overlap=pair)
