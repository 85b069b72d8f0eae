"""The `osrm-reg` interference penalty, exact from the LoRA factors and the cached second moments.

For a module with base weight W₀ (out×in), update ΔW = s·B·A and the other tasks' input second moment Σ₋ᵢ,
``tr(ΔW Σ₋ᵢ ΔWᵀ)`` is the other tasks' expected squared output shift ``E‖ΔW x‖²`` and ``tr(W₀ Σ₋ᵢ W₀ᵀ)`` their
base output energy. The penalty is their ratio, averaged over the adapter's modules:

    P = mean_m  s_m² · tr(B_m (A_m Σ₋ᵢ A_mᵀ) B_mᵀ) / tr(W₀ Σ₋ᵢ W₀ᵀ)

computed without data and without any d×d product per step: A Σ₋ᵢ is r×d (O(r·d²)), then r×r and out×r
products, and the backward reuses A Σ₋ᵢ. Modules fed the same input share Σ₋ᵢ and one stacked product. The
denominators are computed once.
It runs in float32 outside autocast (a bf16 trace of a few-percent shift would be noise).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .errors import SubspaceError
from .modules import weight_out_in
from .moments import TaskMoments


def _base_energy(W0: torch.Tensor, sigma: torch.Tensor) -> float:
    """``tr(W₀ Σ W₀ᵀ)`` in float64: the other tasks' output energy through the base weight."""
    W0 = W0.detach().double().cpu()
    return float(((W0 @ sigma.double().cpu()) * W0).sum())


class _GroupEnergy(torch.autograd.Function):
    """``tr(B_k (A_k Σ A_kᵀ) B_kᵀ)`` for the modules k sharing one input Σ, from one stacked product [A_k] Σ.

    The backward reuses that product (Σ is symmetric): ``∂/∂A_k = 2·B_kᵀB_k·(A_k Σ)`` and
    ``∂/∂B_k = 2·B_k·(A_k Σ A_kᵀ)``, so a step costs one r×d×d product per module, not the three autograd's
    generic matmul backward takes.
    """

    @staticmethod
    def forward(ctx, sigma: torch.Tensor, *factors: torch.Tensor) -> torch.Tensor:
        As, Bs = factors[0::2], factors[1::2]
        projections = list((torch.cat(As) @ sigma).split([A.shape[0] for A in As]))
        inners = [P @ A.T for P, A in zip(projections, As)]
        ctx.save_for_backward(*Bs, *projections, *inners)
        return torch.stack([((B @ K) * B).sum() for B, K in zip(Bs, inners)])

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        saved = ctx.saved_tensors
        n = len(saved) // 3
        Bs, projections, inners = saved[:n], saved[n:2 * n], saved[2 * n:]
        grads: list[torch.Tensor | None] = [None]
        for g, B, P, K in zip(grad, Bs, projections, inners):
            grads += [2 * g * (B.T @ B) @ P, 2 * g * B @ K]
        return tuple(grads)


@dataclass
class _Term:
    """One module of the penalty: its LoRA layer and the denominator of its ratio."""

    module: str
    layer: torch.nn.Module
    base: float


class InterferencePenalty:
    """P (module docstring) of the adapter `adapter_name` of a PEFT model, from `moments.others`.

    Calling it returns P as a differentiable scalar of the current factors (float32, on their device);
    `per_module()` gives each module's ratio.
    """

    def __init__(self, layers: dict[str, torch.nn.Module], moments: TaskMoments, adapter_name: str = "default"):
        self.adapter = adapter_name
        groups: dict[int, tuple[torch.Tensor, list[_Term]]] = {}
        for module, layer in sorted(layers.items()):
            sigma = moments.sigma(module)
            W0 = weight_out_in(layer.get_base_layer())
            if sigma.shape[-1] != W0.shape[1]:
                raise SubspaceError(f"module {module}: the other tasks' moment is {tuple(sigma.shape)}, the layer's "
                                    f"input dim {W0.shape[1]}")
            base = _base_energy(W0, sigma)
            if not base > 0:
                raise SubspaceError(f"module {module}: the other tasks' base output energy tr(W₀ Σ W₀ᵀ) is {base}; "
                                    f"the penalty's ratio is undefined (all-zero inputs?)")
            groups.setdefault(id(sigma), (sigma, []))[1].append(_Term(module, layer, base))
        self._groups = [(sigma.float(), terms) for sigma, terms in groups.values()]
        self.modules = [t.module for _, terms in self._groups for t in terms]

    @property
    def shared_inputs(self) -> int:
        """How many distinct inputs (one Σ₋ᵢ and one stacked product each) the modules read."""
        return len(self._groups)

    def _ratios(self) -> list[torch.Tensor]:
        ratios = []
        for gi, (sigma, terms) in enumerate(self._groups):
            factors = [(t.layer.lora_A[self.adapter].weight.float(), t.layer.lora_B[self.adapter].weight.float())
                       for t in terms]
            if sigma.device != factors[0][0].device:  # the Trainer moves the model after the penalty is built
                sigma = sigma.to(factors[0][0].device)
                self._groups[gi] = (sigma, terms)
            energies = _GroupEnergy.apply(sigma, *(f for pair in factors for f in pair))
            ratios += [t.layer.scaling[self.adapter] ** 2 * e / t.base for t, e in zip(terms, energies)]
        return ratios

    def __call__(self) -> torch.Tensor:
        device = self._groups[0][1][0].layer.lora_A[self.adapter].weight.device
        with torch.autocast(device.type, enabled=False):
            return torch.stack(self._ratios()).mean()

    def per_module(self) -> dict[str, float]:
        with torch.no_grad():
            return {m: float(v) for m, v in zip(self.modules, self._ratios())}

