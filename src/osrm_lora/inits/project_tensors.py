"""The tensor side of `osrm-project` (`inits.project`): A = C·U_k as a torch parametrisation of lora_A."""

from __future__ import annotations

from typing import Any

import torch
from torch.nn.utils import parametrize

from ..errors import SubspaceError
from ..subspace import captured_energy, smallest_eigvecs
from .hooks import TrainingHook
from .osrm_tensors import _lora_layers, set_rows
from .project import DEFAULT_K_PER_RANK
from .registry import InitContext
from .scales import row_scale


class SpanRows(torch.nn.Module):
    """weight = C·U for the fixed rows U (k×d, a buffer left out of state dicts); C (r×k) is the trained
    tensor. `right_inverse` maps a weight to the C of its projection onto span(U)."""

    def __init__(self, basis: torch.Tensor):
        super().__init__()
        self.register_buffer("basis", basis, persistent=False)

    def forward(self, C: torch.Tensor) -> torch.Tensor:
        return C @ self.basis

    def right_inverse(self, A: torch.Tensor) -> torch.Tensor:
        return A @ self.basis.T


class ProjectHook(TrainingHook):
    """Registers the parametrisation before training (after the initial A is recorded) and removes it before
    saving, leaving lora_A = C·U_k as a plain parameter."""

    name = "osrm-project"

    def __init__(self, bases: dict[str, torch.Tensor], starts: dict[str, torch.Tensor], energy: dict[str, float],
                 adapter_name: str):
        self.bases, self.starts, self.energy, self.adapter = bases, starts, energy, adapter_name

    def _linears(self, peft_model) -> dict[str, torch.nn.Module]:
        return {m: layer.lora_A[self.adapter] for m, layer in _lora_layers(peft_model, self.adapter).items()}

    def prepare(self, peft_model: Any) -> None:
        for module, linear in self._linears(peft_model).items():
            weight = linear.weight
            basis = self.bases[module].to(device=weight.device, dtype=weight.dtype)
            parametrize.register_parametrization(linear, "weight", SpanRows(basis), unsafe=True)
            with torch.no_grad():
                linear.parametrizations.weight.original.copy_(self.starts[module])
            linear.parametrizations.weight.original.requires_grad_(weight.requires_grad)

    def export(self, peft_model: Any) -> None:
        for linear in self._linears(peft_model).values():
            if parametrize.is_parametrized(linear, "weight"):
                parametrize.remove_parametrizations(linear, "weight", leave_parametrized=True)

    def metadata(self) -> dict[str, Any]:
        return {"mode": self.name, "k": {m: int(b.shape[0]) for m, b in sorted(self.bases.items())},
                "others_energy_in_span": sum(self.energy.values()) / len(self.energy)}


def project_init(peft_model: torch.nn.Module, context: InitContext, k: int | None, scale: str = "orthonormal",
                 adapter_name: str = "default") -> ProjectHook:
    """lora_A ← the first r rows of U_k (scaled), B ← 0; the hook keeps A in span(U_k) during training."""
    moments = context.moments
    if moments is None:
        raise SubspaceError(f"task {context.task!r}: osrm-project needs the other tasks' second moments "
                            f"(other_stats)")
    bases: dict[str, torch.Tensor] = {}
    starts: dict[str, torch.Tensor] = {}
    energy: dict[str, float] = {}
    cache: dict[tuple[int, int], torch.Tensor] = {}

    def rows_for(module: str, r: int, d: int) -> torch.Tensor:
        sigma = moments.sigma(module)
        size = min(DEFAULT_K_PER_RANK * r, d) if k is None else k
        if not r <= size <= d:
            raise SubspaceError(f"init 'osrm-project', module {module}: k={size} must lie between the rank {r} "
                                f"and the input dim {d}")
        if (id(sigma), size) not in cache:
            cache[id(sigma), size] = smallest_eigvecs(sigma, size)[0]
        basis = cache[id(sigma), size]
        c = row_scale(scale, r, d)
        bases[module] = basis.float()
        starts[module] = torch.cat([c * torch.eye(r), torch.zeros(r, size - r)], dim=1)
        energy[module] = float(captured_energy(basis, sigma))
        return basis[:r] * c

    set_rows(peft_model, rows_for, adapter_name)
    return ProjectHook(bases, starts, energy, adapter_name)
