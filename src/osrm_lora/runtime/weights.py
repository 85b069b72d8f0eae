"""Dressing a plain model as a fine-tuned or merged one: W0 + ΔW in its target weights, a task's head.

The one implementation behind `merge.apply_to_model`/`load_head`, the sharded merge's head matching and
`evaluate.EvaluationModel`. Updates are out×in; GPT-2's Conv1D stores its weight in×out, so the update is
written transposed. The task head is an adapter's extra tensors (PEFT's `modules_to_save`), named after
the wrapper's copy; `head_parameters` gives the base-model parameter each one replaces.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

import torch
from torch import nn

from ..adapters import LoraAdapter
from ..errors import AdapterError
from ..modules import base_name, is_linear, weight_out_in

_MODULES_TO_SAVE = re.compile(r"\.modules_to_save\.[^.]+(?=\.)")


def head_parameters(adapter: LoraAdapter) -> dict[str, str]:
    """Base-model parameter name -> the adapter's key, for each extra tensor (the task head)."""
    return {_MODULES_TO_SAVE.sub("", base_name(key)): key for key in adapter.extra}


def task_head(adapter: LoraAdapter) -> dict[str, torch.Tensor]:
    """An adapter's extra tensors (PEFT modules_to_save: the task head), keyed by base-model parameter."""
    return {name: adapter.extra[key] for name, key in head_parameters(adapter).items()}


def linear_layers(model: nn.Module, names: Iterable[str], source: str = "") -> dict[str, nn.Module]:
    """The linear layers named `names` (base-model names); `source` prefixes the errors ("adapter x: ")."""
    if hasattr(model, "peft_config"):
        raise ValueError(
            "apply merged updates to a plain transformers model, not a PeftModel (its LoRA layers would add "
            "their own updates on top)"
        )
    by_name = {base_name(n): m for n, m in model.named_modules()}
    layers = {}
    for name in names:
        layer = by_name.get(name)
        if layer is None or not is_linear(layer):
            raise AdapterError(f"{source}module {name}: no linear layer of that name in {type(model).__name__}")
        layers[name] = layer
    return layers


def target_weights(model: nn.Module, modules: Iterable[str]) -> dict[str, torch.Tensor]:
    """Copies of the current out×in weights of `modules`: the W0 to re-apply merges onto (λ sweeps, EMR tasks)."""
    return {n: weight_out_in(layer).detach().clone() for n, layer in linear_layers(model, modules).items()}


@torch.no_grad()
def write_update(
    layer: nn.Module, delta: torch.Tensor, base: torch.Tensor | None = None, *, where: str
) -> None:
    """The layer's weight ← W0 + ΔW, summed in float32 and stored in the weight's dtype.

    W0 is `base` (out×in) when given, else the current weight. A ΔW of another shape is refused before
    anything is written; `where` names the module in that error.
    """
    weight = weight_out_in(layer)
    if tuple(delta.shape) != tuple(weight.shape):
        raise AdapterError(
            f"{where}: update is {tuple(delta.shape)} but the model weight is {tuple(weight.shape)} (out×in)"
        )
    base = weight if base is None else base
    weight.copy_((base.to(torch.float32) + delta.to(device=weight.device, dtype=torch.float32)).to(weight.dtype))
