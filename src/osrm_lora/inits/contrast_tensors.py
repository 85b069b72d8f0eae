"""The tensor side of `osrm-contrast` (`inits.contrast`)."""

from __future__ import annotations

import torch

from ..errors import SubspaceError
from ..forecast import contrast_rows
from .osrm_tensors import set_rows
from .registry import InitContext
from .scales import row_scale


def contrast_init(peft_model: torch.nn.Module, context: InitContext, eps: float, scale: str = "orthonormal",
                  adapter_name: str = "default") -> dict[str, int]:
    """lora_A ← the contrast rows of each module (computed once per shared input), scaled; B ← 0. Returns the
    ranks."""
    moments = context.moments
    if moments is None:
        raise SubspaceError(f"task {context.task!r}: osrm-contrast needs the task's own and the other tasks' "
                            f"second moments (own_stats, other_stats)")
    cache: dict[tuple[int, int], torch.Tensor] = {}

    def rows_for(module: str, r: int, d: int) -> torch.Tensor:
        sigma = moments.sigma(module)
        if sigma.shape[-1] != d:
            raise SubspaceError(f"module {module}: the moments have input dim {sigma.shape[-1]}, the layer {d}")
        key = (id(sigma), r)
        if key not in cache:
            cache[key] = contrast_rows(moments.own_moment(module, "osrm-contrast"), sigma, r, eps)[0]
        return cache[key] * row_scale(scale, r, d)

    return set_rows(peft_model, rows_for, adapter_name)[0]
