"""Registry of merge methods: each is a pure per-module function plus a typed, documented hyper-parameter model.

A method is registered under a name with a pydantic model whose fields (type, default, description) are its
hyper-parameters, so the CLI can list them (`osrm-lora merge --list`) and validate user input before any tensor
is touched. The function itself sees ONE module at a time (`ModuleInputs` -> `MergedModule`); the engine does
the iteration, which keeps peak memory at one module's dense updates for all tasks. The registry and the method
modules import no torch until a kernel runs (`osrm_lora._lazy`), so listing and validating methods is cheap.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, Field

from .._registry import describe_fields, import_entries, parse_options, unknown_name
from .inputs import check_requires
from .types import MergedModule, ModuleInputs

if TYPE_CHECKING:
    import torch

MethodFn = Callable[[ModuleInputs, Any], MergedModule]
TotalsFn = Callable[[ModuleInputs, Any], "torch.Tensor"]


class MethodParams(BaseModel):
    """Base of every method's hyper-parameters: unknown names are errors, values immutable and finite."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class ScaledParams(MethodParams):
    """Methods whose result is multiplied by a global λ at the end (so a λ sweep reuses one merge)."""

    scaling: float = Field(1.0, description="λ: global factor multiplying the merged update (W0 + λ·ΔW_merged).")


class WeightedParams(ScaledParams):
    weights: list[float] | None = Field(
        None, description="Per-task weights w_i, in adapter order (default: 1 for every task)."
    )


@dataclass
class MethodSpec:
    """A registered method. `totals` (optional) is a per-module reduction summed over all modules in a first
    pass and handed to `fn` as `inputs.totals` (EMR's model-wide rescalers need it)."""

    name: str
    fn: MethodFn
    params: type[MethodParams]
    summary: str
    requires: tuple[str, ...] = ()
    exact_low_rank: bool = False
    totals: TotalsFn | None = None

    @property
    def post_scale(self) -> bool:
        """True when `scaling` is a pure post-factor, so a λ grid can reuse one unscaled merge."""
        return "scaling" in self.params.model_fields

    def needs_totals(self, params: MethodParams) -> bool:
        return self.totals is not None and getattr(params, "rescale_scope", "model") == "model"

    def parse(self, hyperparams: dict[str, Any]) -> MethodParams:
        """Validate user hyper-parameters; the error names the method, the parameter and what it accepts."""
        return parse_options(self.params, hyperparams, f"merge method {self.name!r}", "hyper-parameter")


_REGISTRY: dict[str, MethodSpec] = {}


def register(
    name: str, params: type[MethodParams], summary: str, *, requires: tuple[str, ...] = (),
    exact_low_rank: bool = False, totals: TotalsFn | None = None,
) -> Callable[[MethodFn], MethodFn]:
    """Decorator: register `fn(inputs, params) -> MergedModule` as merge method `name`; every name in
    `requires` must be a registered input kind (`merge.inputs`)."""
    check_requires(name, requires, params.model_fields)

    def wrap(fn: MethodFn) -> MethodFn:
        if name in _REGISTRY:
            raise ValueError(f"merge method {name!r} is already registered")
        _REGISTRY[name] = MethodSpec(name, fn, params, summary, requires, exact_low_rank, totals)
        return fn

    return wrap


def get_method(name: str) -> MethodSpec:
    """The registered method `name`; an unknown name is an error listing the closest known names."""
    _load_builtin_methods()
    try:
        return _REGISTRY[name]
    except KeyError:
        raise unknown_name(f"unknown merge method {name!r}", name, _REGISTRY, "known methods") from None


def list_methods() -> list[dict[str, Any]]:
    """Name, summary, requirements and documented hyper-parameters (type, default) of every method."""
    _load_builtin_methods()
    return [
        {
            "name": name, "summary": spec.summary, "requires": list(spec.requires),
            "exact_low_rank": spec.exact_low_rank, "parameters": describe_fields(spec.params),
        }
        for name, spec in sorted(_REGISTRY.items())
    ]


def _load_builtin_methods() -> None:
    """Import every method module of `merge/methods/` so their @register decorators run."""
    import_entries(f"{__package__}.methods")
