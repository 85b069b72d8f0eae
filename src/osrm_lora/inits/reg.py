"""`osrm-reg`: the paper's future work, orthogonality kept during training rather than only at the start.

The adapter starts from another init (`start`, default `osrm`) and trains on the task loss plus
μ·P, where P is the other tasks' expected squared output shift relative to their base output energy,
``mean_m tr(ΔW Σ₋ᵢ ΔWᵀ) / tr(W₀ Σ₋ᵢ W₀ᵀ)``, exact from the factors and the cached moments (`penalty`).
μ = 0 trains exactly as `start` does. The Trainer logs `task_loss` and `penalty` beside the loss.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from pydantic import Field, field_validator

from .registry import InitContext, InitSpec, get_init, register
from .scales import ScaleOptions

if TYPE_CHECKING:
    from ..subspace import Subspace
    from .hooks import TrainingHook

# Chosen by bench/reg_mu_sweep.py (docs/modes.md): the tiny setting's best trade-off, μ·P₀ ≈ 0.16, carried to
# MiniLM, whose plain runs end with P₀ ≈ 0.26.
DEFAULT_MU = 0.6
START_VARIANTS = {"cov", "centered"}  # the subspaces osrm-reg is given (those of `osrm`)


def _check_start(name: str, mode: str, modes: tuple[str, ...]) -> str:
    """`name` as the start of a mode: a registered init that PEFT builds with its default init and that needs
    at most the mode's own inputs (an OSRM cov/centered subspace, the moments), not another mode."""
    spec = get_init(name)
    if name in modes or spec.mutates_base or spec.peft_init is not True or not set(spec.variants) <= START_VARIANTS:
        raise ValueError(f"{mode} cannot start from {name!r}: a start is an init PEFT builds with its default "
                         f"init, on the unchanged base, from at most an osrm (cov/centered) subspace and the "
                         f"moments (e.g. osrm, osrm-contrast, kaiming, random-orthonormal)")
    return name


class RegOptions(ScaleOptions):
    """μ, the init to start from, and its `scale` (passed on when the start has one)."""

    mu: float = Field(DEFAULT_MU, ge=0, description="weight of the interference penalty (0: plain `start`)")
    start: str = Field("osrm", description="the init the adapter starts from")

    @field_validator("start")
    @classmethod
    def _known_start(cls, name: str) -> str:
        return _check_start(name, "osrm-reg", ("osrm-reg", "osrm-project"))


def _start_init(peft_model: Any, subspace: Subspace | None, options: RegOptions, context: InitContext) -> None:
    """Apply the `start` init, with this mode's `scale` if it takes one."""
    spec = get_init(options.start)
    start_options = spec.parse({"scale": options.scale} if "scale" in spec.options.model_fields else {})
    spec.apply(peft_model, subspace, start_options, context)


def apply_reg(peft_model: Any, subspace: Subspace | None, options: RegOptions, context: InitContext) -> TrainingHook:
    from .reg_tensors import reg_hook

    _start_init(peft_model, subspace, options, context)
    return reg_hook(peft_model, options, context)


register(InitSpec(
    "osrm-reg", "Beyond the paper: start from `start` (osrm), train with μ·mean tr(ΔW Σ₋ᵢ ΔWᵀ)/tr(W₀ Σ₋ᵢ W₀ᵀ) "
    "added to the loss.",
    peft_init=True, needs_stats=True, variants=("cov", "centered"), needs_moments=True, options=RegOptions,
    apply=apply_reg,
))
