"""Writing merged updates into a plain transformers model, loading task heads, saving merged models.

The merged layer is W0 + ΔW_merged, written into the target linear weights (GPT-2's Conv1D stores its weight
in×out, so the update is transposed). Modules are applied one at a time as the lazy merge yields them. The
classification heads (PEFT's `modules_to_save`) are not merged: each task keeps its own and `load_head` puts
it into the model before that task is served.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch
from torch import nn

from ..adapters import LoraAdapter
from ..io import atomic_dir, write_json
from ..modules import base_name, is_linear, weight_out_in
from .engine import Merged
from .types import MergedModule

MODULES_TO_SAVE = re.compile(r"\.modules_to_save\.[^.]+(?=\.)")


def _linear_layers(model: nn.Module, names: Iterable[str]) -> dict[str, nn.Module]:
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
            raise ValueError(f"module {name}: no linear layer of that name in {type(model).__name__}")
        layers[name] = layer
    return layers


def target_weights(model: nn.Module, modules: Iterable[str]) -> dict[str, torch.Tensor]:
    """Copies of the current out×in weights of `modules`: the W0 to re-apply merges onto (λ sweeps, EMR tasks)."""
    return {n: weight_out_in(layer).detach().clone() for n, layer in _linear_layers(model, modules).items()}


@torch.no_grad()
def apply_to_model(
    model: nn.Module, merged: Merged | Iterable[MergedModule], task: str | None = None, *,
    base_weights: Mapping[str, torch.Tensor] | None = None,
) -> list[str]:
    """Write W0 + ΔW into each merged module's weight; returns the module names written.

    W0 is `base_weights[module]` when given (from `target_weights`, to re-apply another merge onto the same
    base), else the model's current weight. `task` selects the per-task update of EMR merges. On an error
    part-way the model is left partly merged: reload it.
    """
    modules = merged.modules if isinstance(merged, Merged) else None
    layers = _linear_layers(model, modules) if modules is not None else None
    written = []
    for m in merged:
        layer = layers[m.name] if layers is not None else _linear_layers(model, [m.name])[m.name]
        weight = weight_out_in(layer)
        delta = m.for_task(task)
        if tuple(delta.shape) != tuple(weight.shape):
            raise ValueError(f"module {m.name}: merged update is {tuple(delta.shape)} but the weight is "
                             f"{tuple(weight.shape)} (out×in)")
        base = base_weights[m.name] if base_weights is not None else weight
        weight.copy_((base.to(torch.float32) + delta.to(device=weight.device, dtype=torch.float32)).to(weight.dtype))
        written.append(m.name)
    return written


@torch.no_grad()
def load_head(model: nn.Module, adapter: LoraAdapter) -> list[str]:
    """Copy an adapter's extra tensors (classifier head, modules_to_save) into the model; returns their names."""
    params = {base_name(n): p for n, p in model.named_parameters()}
    params.update({base_name(n): b for n, b in model.named_buffers()})
    pairs = []
    for key, value in adapter.extra.items():
        name = MODULES_TO_SAVE.sub("", base_name(key))
        target = params.get(name)
        if target is None:
            raise ValueError(f"adapter {adapter.name!r}: tensor {key} has no parameter {name} in the model")
        if tuple(target.shape) != tuple(value.shape):
            raise ValueError(
                f"adapter {adapter.name!r}: tensor {key} is {tuple(value.shape)} but {name} is {tuple(target.shape)}"
            )
        pairs.append((name, target, value))
    for _, target, value in pairs:  # only once every tensor fits, so a refused head changes nothing
        target.copy_(value.to(device=target.device, dtype=target.dtype))
    loaded = [name for name, _, _ in pairs]
    return loaded


def save_merged_model(
    model: nn.Module, merged: Merged, path: str | Path, *, task: str | None = None,
    heads_from: str | None = None, tokenizer=None,
) -> Path:
    """Apply the merge (and `heads_from`'s head) to `model` and `save_pretrained` it atomically, with a
    `merge_info.json` describing the merge; a failure leaves no folder behind."""
    apply_to_model(model, merged, task)
    if heads_from is not None:
        if heads_from not in merged.adapters:
            raise ValueError(f"heads_from={heads_from!r} is not one of the merged adapters {merged.tasks}")
        load_head(model, merged.adapters[heads_from])
    path = Path(path)
    with atomic_dir(path) as tmp:
        model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        write_json(tmp / "merge_info.json", {**merged.describe(), "task": task, "heads_from": heads_from})
    return path
