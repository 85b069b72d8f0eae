"""Putting OSRM subspaces into LoRA adapters: before training (`osrm_init`) or after it (`project_adapter`).

The tensor side of the OSRM inits (`inits.osrm` and `inits.official` register them without importing this),
and `set_rows`, which every init that writes its own lora_A rows uses.

Before training, each LoRA layer's ``lora_A`` gets the subspace's first r rows (times the `scale` option's
factor) and ``lora_B`` stays zero, so the model computes exactly what the base model computes until
training moves B. After training, an adapter can be projected onto the subspace instead:
``ΔW' = ΔW Pᵀ(P Pᵀ)⁻¹P`` for the subspace rows P, kept in low rank as ``A' = P`` and ``B' = B (A Pᵀ)(P Pᵀ)⁻¹`` with the adapter's own scale.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from peft.tuners.lora import LoraLayer

from ..adapters import LoraAdapter, LoraFactors
from ..errors import AdapterError
from ..identity import check_same_model
from ..modules import base_name
from ..stats import StatsMismatchError, model_identity
from ..subspace import Subspace, SubspaceMismatchError
from .scales import row_scale


def _lora_layers(peft_model: torch.nn.Module, adapter_name: str) -> dict[str, LoraLayer]:
    """Base-model module name -> LoRA layer carrying `adapter_name` as a linear lora_A."""
    layers: dict[str, LoraLayer] = {}
    for name, module in peft_model.named_modules():
        if not isinstance(module, LoraLayer):
            continue
        if adapter_name in getattr(module, "lora_embedding_A", {}):
            raise SubspaceMismatchError(
                f"module {base_name(name)}: adapter {adapter_name!r} is an embedding LoRA layer; "
                f"these inits set only linear layers"
            )
        if adapter_name in module.lora_A:
            layers[base_name(name)] = module
    if not layers:
        raise AdapterError(f"{type(peft_model).__name__} has no LoRA layer for adapter {adapter_name!r}")
    return layers


def set_rows(
    peft_model: torch.nn.Module, rows_for: Callable[[str, int, int], torch.Tensor], adapter_name: str = "default",
    freeze_A: bool = False,
) -> tuple[dict[str, int], list[str]]:
    """Set every linear LoRA layer's lora_A to ``rows_for(module, r, d_in)`` and its B to 0.

    The rank r is read from each layer, so rank_pattern, alpha and rsLoRA need no special handling (with
    B = 0 the scale does not matter), and with B = 0 the model computes what the base model computes.
    Returns each module's rank and the modules whose B was not already zero.
    """
    layers = _lora_layers(peft_model, adapter_name)
    ranks: dict[str, int] = {}
    zeroed_B: list[str] = []
    for module, layer in sorted(layers.items()):
        weight_A = layer.lora_A[adapter_name].weight
        weight_B = layer.lora_B[adapter_name].weight
        if weight_A.dim() != 2:
            raise SubspaceMismatchError(
                f"module {module}: lora_A has shape {tuple(weight_A.shape)}, not r×in (these inits set only "
                f"linear layers)"
            )
        r, d_in = weight_A.shape
        rows = rows_for(module, int(r), int(d_in))
        with torch.no_grad():
            weight_A.copy_(rows.to(device=weight_A.device, dtype=weight_A.dtype))
            if bool(weight_B.ne(0).any()):
                weight_B.zero_()
                zeroed_B.append(module)
        if freeze_A:
            weight_A.requires_grad_(False)
        ranks[module] = int(r)
    return ranks, zeroed_B


def osrm_init(peft_model: torch.nn.Module, subspace: Subspace, adapter_name: str = "default",
              freeze_A: bool = False, scale: str = "orthonormal") -> dict:
    """Set every LoRA layer's lora_A to its subspace rows (B = 0, base weights untouched).

    `scale` multiplies the orthonormal rows to the expected ‖A‖_F of PEFT's kaiming or gaussian init
    (`inits.scales`); the directions stay the subspace's. Returns a summary of what was set.
    """
    check_same_model(subspace.identity(), model_identity(peft_model, "the model being initialised"),
                     StatsMismatchError)

    def rows_for(module: str, r: int, d_in: int) -> torch.Tensor:
        if subspace.dim(module) != d_in:
            raise SubspaceMismatchError(
                f"subspace of task {subspace.task!r}, module {module}: input dim {subspace.dim(module)} "
                f"!= the layer's {d_in}"
            )
        return subspace.rows(module, r) * row_scale(scale, r, d_in)

    ranks, zeroed_B = set_rows(peft_model, rows_for, adapter_name, freeze_A)
    return {
        "task": subspace.task,
        "variant": subspace.variant,
        "adapter": adapter_name,
        "ranks": ranks,
        "scale": scale,
        "freeze_A": freeze_A,
        "zeroed_B": zeroed_B,
        "mean_energy": sum(subspace.energy.get(m, 0.0) for m in ranks) / len(ranks),
    }


def _frobenius_sq(B: torch.Tensor, A: torch.Tensor, scale: float) -> torch.Tensor:
    """‖scale · B A‖²_F = scale² trace((BᵀB)(AAᵀ)), without forming B A."""
    return scale ** 2 * ((B.T @ B) * (A @ A.T)).sum()


def project_adapter(adapter: LoraAdapter, subspace: Subspace) -> tuple[LoraAdapter, dict[str, float]]:
    """Post-hoc OSRM: project each trained update onto the subspace's rows, in low rank.

    Returns the projected adapter (same ranks, scales, config and extra tensors) and, per module, the
    retained fraction ``‖ΔW'‖²/‖ΔW‖²`` (1.0 for an all-zero update, which loses nothing).
    """
    modules: dict[str, LoraFactors] = {}
    retained: dict[str, float] = {}
    for module, f in sorted(adapter.modules.items()):
        if subspace.dim(module) != f.A.shape[1]:
            raise SubspaceMismatchError(
                f"adapter {adapter.name!r}, module {module}: input dim {f.A.shape[1]} != the subspace's "
                f"{subspace.dim(module)} (task {subspace.task!r})"
            )
        P = subspace.rows(module, f.rank).double()
        A, B = f.A.double(), f.B.double()
        B_new = B @ torch.linalg.solve(P @ P.T, P @ A.T).T  # B (A Pᵀ)(P Pᵀ)⁻¹; P Pᵀ is symmetric
        before = _frobenius_sq(B, A, f.scale)
        after = _frobenius_sq(B_new, P, f.scale)
        retained[module] = float(after / before) if before > 0 else 1.0
        modules[module] = LoraFactors(P.to(f.A.dtype), B_new.to(f.B.dtype), f.scale)
    projected = LoraAdapter(modules=modules, config=dict(adapter.config), extra=dict(adapter.extra),
                            name=adapter.name)
    return projected, retained
