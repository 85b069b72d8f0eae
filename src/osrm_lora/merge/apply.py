"""Writing merged updates into a plain transformers model, loading task heads, saving merged models.

The merged layer is W0 + ΔW_merged, written into the target linear weights by `runtime.weights`. Modules
are applied one at a time as the lazy merge yields them. The classification heads (PEFT's
`modules_to_save`) are not merged: each task keeps its own and `load_head` puts it into the model before
that task is served.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path

import torch
from torch import nn

from ..adapters import LoraAdapter
from ..errors import MergeError
from ..io import atomic_dir, check_output, write_json
from ..modules import base_name
from ..runtime.weights import head_parameters, linear_layers, write_update
from .engine import Merged
from .types import MergedModule

MERGED_MODEL = "merged-model"  # the output kind of full merged checkpoints, sharded or not


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
    layers = linear_layers(model, merged.modules) if isinstance(merged, Merged) else {}
    written = []
    for m in merged:
        layer = layers[m.name] if m.name in layers else linear_layers(model, [m.name])[m.name]
        base = base_weights[m.name] if base_weights is not None else None
        write_update(layer, m.for_task(task), base, where=f"module {m.name}")
        written.append(m.name)
    return written


@torch.no_grad()
def load_head(model: nn.Module, adapter: LoraAdapter) -> list[str]:
    """Copy an adapter's extra tensors (classifier head, modules_to_save) into the model; returns their names."""
    params = {base_name(n): p for n, p in model.named_parameters()}
    params.update({base_name(n): b for n, b in model.named_buffers()})
    pairs = []
    for name, key in head_parameters(adapter).items():
        target, value = params.get(name), adapter.extra[key]
        if target is None:
            raise MergeError(f"adapter {adapter.name!r}: tensor {key} has no parameter {name} in the model")
        if tuple(target.shape) != tuple(value.shape):
            raise MergeError(
                f"adapter {adapter.name!r}: tensor {key} is {tuple(value.shape)} but {name} is {tuple(target.shape)}"
            )
        pairs.append((name, target, value))
    for _, target, value in pairs:  # only once every tensor fits, so a refused head changes nothing
        target.copy_(value.to(device=target.device, dtype=target.dtype))
    return [name for name, _, _ in pairs]


def save_merged_model(
    model: nn.Module, merged: Merged, path: str | Path, *, task: str | None = None,
    heads_from: str | None = None, tokenizer=None, overwrite: bool = False, inputs: Iterable[str | Path] = (),
) -> Path:
    """Apply the merge (and `heads_from`'s head) to `model` and `save_pretrained` it atomically, with a
    `merge_info.json` describing the merge; a failure leaves no folder behind. `path` is checked first, so a
    refused one (`io.check_output`: not a merged model, an input, ...) leaves `model` untouched."""
    inputs = list(inputs)
    check_output(path, MERGED_MODEL, folder=True, overwrite=overwrite, inputs=inputs)
    apply_to_model(model, merged, task)
    if heads_from is not None:
        if heads_from not in merged.adapters:
            raise MergeError(f"heads_from={heads_from!r} is not one of the merged adapters {merged.tasks}")
        load_head(model, merged.adapters[heads_from])
    path = Path(path)
    with atomic_dir(path, MERGED_MODEL, overwrite=overwrite, inputs=inputs) as tmp:
        model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        write_json(tmp / "merge_info.json", {**merged.describe(), "task": task, "heads_from": heads_from})
    return path
