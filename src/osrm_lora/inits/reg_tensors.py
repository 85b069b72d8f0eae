"""The tensor side of `osrm-reg` (`inits.reg`): the penalty as a training hook."""

from __future__ import annotations

from typing import Any

import torch

from ..errors import SubspaceError
from ..penalty import InterferencePenalty
from .hooks import TrainingHook
from .osrm_tensors import _lora_layers
from .registry import InitContext


class RegHook(TrainingHook):
    """Adds μ·P to every training micro-batch's loss and logs P's mean since the last log as `penalty`.

    With μ = 0 it adds nothing (P is still measured, without gradients), so training is the start init's, bit
    for bit. Under DDP every rank adds the same μ·P and DDP averages the gradients, so P's gradient counts once;
    with gradient accumulation the Trainer divides every micro-batch's loss by the steps, so it counts once
    per optimizer step.
    """

    name = "osrm-reg"
    logged = ("penalty",)

    def __init__(self, penalty: InterferencePenalty, mu: float, start: str):
        self.penalty, self.mu, self.start = penalty, mu, start
        self.initial = penalty.per_module()
        self._sum: torch.Tensor | float = 0.0
        self._count = 0

    def loss(self, peft_model: Any) -> torch.Tensor | None:
        if self.mu == 0:
            with torch.no_grad():
                value = self.penalty()
        else:
            value = self.penalty()
        self._sum = self._sum + value.detach()
        self._count += 1
        return self.mu * value if self.mu != 0 else None

    def logs(self) -> dict[str, float]:
        if not self._count:
            return {}
        mean = float(self._sum) / self._count
        self._sum, self._count = 0.0, 0
        return {"penalty": mean}

    def metadata(self) -> dict[str, Any]:
        final = self.penalty.per_module()
        return {"mode": self.name, "mu": self.mu, "start": self.start,
                "penalty_initial": sum(self.initial.values()) / len(self.initial),
                "penalty_final": sum(final.values()) / len(final), "penalty_final_per_module": final}


def reg_hook(peft_model: torch.nn.Module, options: Any, context: InitContext, adapter_name: str = "default") -> RegHook:
    if context.moments is None:
        raise SubspaceError(f"task {context.task!r}: osrm-reg needs the other tasks' second moments (other_stats)")
    layers = _lora_layers(peft_model, adapter_name)
    return RegHook(InterferencePenalty(layers, context.moments, adapter_name), options.mu, options.start)
