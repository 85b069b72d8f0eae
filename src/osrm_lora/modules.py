"""Finding the linear modules an adapter targets, with PEFT's name-matching rules.

Module names are always given relative to the *base* model (``bert.encoder.layer.0.attention.self.query``),
whether the model passed in is a plain transformers model or a PEFT-wrapped one, so statistics, subspaces
and adapters collected on either line up.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from .errors import ModelError

PEFT_PREFIX = "base_model.model."

# Attention query/value projections per architecture: the paper's default targets.
DEFAULT_TARGETS: dict[str, list[str]] = {
    "bert": ["query", "value"],
    "roberta": ["query", "value"],
    "xlm-roberta": ["query", "value"],
    "deberta-v2": ["query_proj", "value_proj"],
    "distilbert": ["q_lin", "v_lin"],
    "llama": ["q_proj", "v_proj"],
    "mistral": ["q_proj", "v_proj"],
    "qwen2": ["q_proj", "v_proj"],
    "qwen3": ["q_proj", "v_proj"],
    "gemma": ["q_proj", "v_proj"],
    "gemma2": ["q_proj", "v_proj"],
    "phi3": ["qkv_proj"],
    "gpt2": ["c_attn"],
}


def default_target_modules(model_type: str) -> list[str]:
    """The q/v projections for a transformers `model_type`; an unknown type is an error naming the known ones."""
    try:
        return list(DEFAULT_TARGETS[model_type])
    except KeyError:
        known = ", ".join(sorted(DEFAULT_TARGETS))
        raise ModelError(
            f"no default target modules for model type {model_type!r}; pass target_modules explicitly "
            f"(known types: {known})"
        ) from None


def base_name(name: str) -> str:
    """Strip PEFT's wrapper prefix so names match those of the plain base model."""
    return name.removeprefix(PEFT_PREFIX)


def _name_matches(name: str, targets: str | Sequence[str]) -> bool:
    """PEFT's rule: a string is a full-match regex; a list matches a name equal to or ending in `.item`."""
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return any(name == t or name.endswith("." + t) for t in targets)


def is_linear(module: nn.Module) -> bool:
    return isinstance(module, (nn.Linear, Conv1D))


def find_target_modules(model: nn.Module, targets: str | Sequence[str]) -> dict[str, nn.Module]:
    """Map base-model names to the plain linear layers matching `targets` (PEFT LoRA layers are unwrapped)."""
    found: dict[str, nn.Module] = {}
    for name, module in model.named_modules():
        if ".lora_" in name or name.endswith("base_layer") or not _name_matches(base_name(name), targets):
            continue
        layer = getattr(module, "base_layer", module)
        if is_linear(layer):
            found[base_name(name)] = layer
    if not found:
        raise ModelError(f"no linear module of {type(model).__name__} matches target_modules={targets!r}")
    return found


def in_out_features(layer: nn.Module) -> tuple[int, int]:
    """(in, out) of an nn.Linear or a GPT-2 Conv1D (whose weight is stored transposed, in×out)."""
    if isinstance(layer, Conv1D):
        d_in, d_out = layer.weight.shape
        return int(d_in), int(d_out)
    return int(layer.in_features), int(layer.out_features)


def weight_out_in(layer: nn.Module) -> torch.Tensor:
    """The layer weight as out×in, whatever its storage layout."""
    return layer.weight.T if isinstance(layer, Conv1D) else layer.weight
