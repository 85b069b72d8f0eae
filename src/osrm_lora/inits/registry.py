"""Registry of LoRA inits: how each adapter starts, what it needs and what PEFT does for it.

An init is one `InitSpec`, registered by the module of its family (`default`, `osrm`, `official`,
`controls`, `svd`): its PEFT `init_lora_weights` value, whether it starts from the statistics (and which
subspace variants it accepts), whether it changes the base weights, its typed options and the step that
finishes the adapter once PEFT has built it. That step sees the task's subspace, the options and an
`InitContext` (the task, the training seed and the tasks it will be merged with), which is all a data-free
init needs to draw its rows. Experiment validation, the CLI and `finetune` read inits from here only, so
adding one is one spec in its family's module plus a test. Nothing here imports torch: only `apply` loads
the runtime, lazily.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict

from .._registry import describe_fields, import_entries, parse_options, unknown_name
from ..errors import SubspaceError

if TYPE_CHECKING:
    from ..moments import TaskMoments
    from ..subspace import Subspace
    from .hooks import TrainingHook


class InitOptions(BaseModel):
    """Base of every init's options: unknown names are errors, values are immutable and finite."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


@dataclass(frozen=True)
class InitContext:
    """What an init may depend on besides its options: the task, the training seed, the tasks the adapter
    will be merged with (in merge order; empty when the caller did not say) and, for the training modes
    (`needs_moments`), the task's own and the other tasks' second moments."""

    task: str
    seed: int = 0
    tasks: tuple[str, ...] = ()
    moments: TaskMoments | None = None


# Finishes an adapter on the PEFT model built with the spec's `peft_init`: (peft_model, subspace, options, context);
# a training mode returns the hook that changes training (`inits.hooks`), a plain init None.
ApplyFn = Callable[[Any, "Subspace | None", InitOptions, InitContext], "TrainingHook | None"]


def _peft_only(peft_model: Any, subspace: Subspace | None, options: InitOptions, context: InitContext) -> None:
    """For inits PEFT performs entirely through `init_lora_weights`: nothing left to do."""


@dataclass(frozen=True)
class InitSpec:
    """A registered init. `variants` are the subspace variants it accepts (empty: it uses no subspace);
    `needs_tasks`: its rows depend on the set of merged tasks (`InitContext.tasks`); `needs_moments`: it reads
    the task's own and the other tasks' second moments (`InitContext.moments`, from the statistics pool)."""

    name: str
    summary: str
    peft_init: bool | str
    needs_stats: bool = False
    variants: tuple[str, ...] = ()
    mutates_base: bool = False
    needs_tasks: bool = False
    needs_moments: bool = False
    options: type[InitOptions] = InitOptions
    apply: ApplyFn = _peft_only

    def __post_init__(self) -> None:
        if self.variants and not self.needs_stats:
            raise ValueError(f"init {self.name!r}: a subspace comes from the statistics; set needs_stats")
        if self.needs_moments and not self.needs_stats:
            raise ValueError(f"init {self.name!r}: the moments come from the statistics; set needs_stats")

    def subspace_variant(self, configured: str) -> str | None:
        """The variant this init's subspace has, given the experiment's `subspace.variant`: its only one if it
        accepts one (osrm-mean: mean), else the configured one; None for an init without a subspace."""
        if not self.variants:
            return None
        if len(self.variants) == 1:
            return self.variants[0]
        if configured not in self.variants:
            raise SubspaceError(f"init {self.name!r} takes a subspace of variant {' or '.join(self.variants)}, "
                             f"not {configured!r}")
        return configured

    def parse(self, options: Mapping[str, Any]) -> InitOptions:
        """Validate user options; the error names the init, the option and the accepted ones."""
        return parse_options(self.options, options, f"init {self.name!r}", "option")


_REGISTRY: dict[str, InitSpec] = {}
# The family modules, in the order `list_inits` shows their inits: PEFT's (the baselines), OSRM's, the controls,
# then the training modes beyond the paper (docs/modes.md).
FAMILIES = ("default", "osrm", "official", "controls", "svd", "reg", "contrast", "project")
_NOT_FAMILIES = {"registry", "hooks", "scales"}


def register(spec: InitSpec) -> InitSpec:
    """Add `spec` under its name; a name registered twice is an error."""
    if spec.name in _REGISTRY:
        raise ValueError(f"init {spec.name!r} is already registered")
    _REGISTRY[spec.name] = spec
    return spec


def get_init(name: str) -> InitSpec:
    """The registered init `name`; an unknown name is an error listing the closest known names."""
    _load_builtin_inits()
    try:
        return _REGISTRY[name]
    except KeyError:
        raise unknown_name(f"init {name!r} is unknown", name, _REGISTRY, "known inits") from None


def list_inits() -> list[dict[str, Any]]:
    """Name, summary, PEFT init, requirements and documented options of every init, in registration order."""
    _load_builtin_inits()
    return [
        {
            "name": spec.name, "summary": spec.summary, "peft_init": spec.peft_init,
            "needs_stats": spec.needs_stats, "variants": list(spec.variants), "mutates_base": spec.mutates_base,
            "needs_tasks": spec.needs_tasks, "needs_moments": spec.needs_moments,
            "options": describe_fields(spec.options),
        }
        for spec in _REGISTRY.values()
    ]


def _load_builtin_inits() -> None:
    """Import the family modules so their `register` calls run: `FAMILIES` first, in listing order (the baseline
    first), then any other family module of this package, so a new family is one new module. The torch halves
    (`*_tensors`) and the registry's own helpers are not families."""
    for family in FAMILIES:
        importlib.import_module(f".{family}", __package__)
    import_entries(__package__, skip=lambda name: name.endswith("_tensors") or name in _NOT_FAMILIES)
