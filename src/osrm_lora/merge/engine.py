"""The merge engine: validate inputs once, then produce merged modules one at a time.

`merge_adapters` checks everything that can be checked up front (method, hyper-parameters, adapter
compatibility, per-task statistics) and returns a lazy `Merged`. Iterating it builds each module's inputs,
calls the method's pure per-module function and yields the result, so a caller that applies or writes each
module and drops it never holds more than one module's dense updates for all tasks.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from ..adapters import LoraAdapter, LoraFactors, check_compatible
from ..errors import MergeError
from ..identity import check_same_model
from .inputs import InputKind, input_kinds
from .registry import MethodParams, MethodSpec, get_method
from .types import MergedModule, ModuleInputs, resolve_weights

AdapterLike = LoraAdapter | str | os.PathLike
PerTask = Sequence[Any] | Mapping[str, Any]


def load_adapters(adapters: Sequence[AdapterLike]) -> list[LoraAdapter]:
    """Adapters from objects or PEFT folders; names must be unique since they identify the tasks."""
    if not adapters:
        raise MergeError("no adapters to merge")
    loaded = [a if isinstance(a, LoraAdapter) else LoraAdapter.load(Path(a)) for a in adapters]
    for i, a in enumerate(loaded):
        if not a.name:
            a.name = f"adapter{i}"
    for a in loaded:
        if a.config.get("use_dora"):
            raise MergeError(f"adapter {a.name!r} is a DoRA adapter: its update is not s·B·A and cannot be merged here")
    names = [a.name for a in loaded]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise MergeError(f"adapter names must be unique (they name the tasks); repeated: {duplicates}")
    check_compatible(loaded)
    return loaded


def _per_task(values: PerTask, adapters: list[LoraAdapter], kind: InputKind) -> list[Any]:
    """One input per adapter. A mapping is by adapter name, as given. A sequence is matched by the task
    each object records (`kind.task_of`) to each adapter's task (`LoraAdapter.task`), whatever the order;
    objects that record no task (plain mappings) go in adapter order."""
    names = [a.name for a in adapters]
    if isinstance(values, Mapping):
        missing = [n for n in names if n not in values]
        if missing:
            raise MergeError(f"no {kind.what} for adapters {missing} (have {sorted(values)})")
        return [values[n] for n in names]
    values = list(values)
    recorded = [kind.task_of(v) for v in values]
    if all(recorded):
        return _by_task(values, recorded, adapters, kind)
    if len(values) != len(adapters):
        raise MergeError(f"{len(values)} {kind.what} given for {len(adapters)} adapters {names}")
    for value, task, adapter in zip(values, recorded, adapters):
        if task and task != adapter.task:
            raise MergeError(f"{kind.describe(value)} is given for adapter {adapter.name!r} of task {adapter.task!r}")
    return values


def _by_task(values: list[Any], recorded: list[str], adapters: list[LoraAdapter], kind: InputKind) -> list[Any]:
    """`values` reordered to the adapters by recorded task; a missing, extra or repeated task is refused."""
    tasks = [a.task for a in adapters]
    given = ", ".join(kind.describe(v) for v in values)
    for task in dict.fromkeys(tasks):
        if tasks.count(task) > 1:
            same = [a.name for a in adapters if a.task == task]
            raise MergeError(f"adapters {same} record the same task {task!r}, so {kind.what} cannot be matched "
                             f"to them by task; pass a mapping by adapter name")
        if task not in recorded:
            name = adapters[tasks.index(task)].name
            raise MergeError(f"no {kind.what} for adapter {name!r} (task {task!r}); given: {given}")
    for value, task in zip(values, recorded):
        if recorded.count(task) > 1:
            raise MergeError(f"{kind.what} of task {task!r} given {recorded.count(task)} times: {given}")
        if task not in tasks:
            raise MergeError(f"{kind.describe(value)} matches none of the adapters' tasks {tasks}")
    return [values[recorded.index(task)] for task in tasks]


def _check_models(adapters: list[LoraAdapter], given: Mapping[str, list[Any]], kinds: Mapping[str, InputKind]) -> None:
    """Every input that records its base model must record the one the adapters were trained on."""
    known = [a.identity() for a in adapters]
    known += [kinds[name].model_of(v) for name, values in given.items() for v in values]
    known = [identity for identity in known if identity is not None]
    for other in known[1:]:
        check_same_model(other, known[0], MergeError)


class Merged:
    """A lazy merge result: iterate it for `MergedModule`s in module order (each iteration recomputes).

    `on_module`, when set, is called with each module's name once its merged update is ready (the CLI's
    progress bars), whichever writer asks for it.
    """

    def __init__(
        self, spec: MethodSpec, params: MethodParams, adapters: list[LoraAdapter],
        extras: dict[str, list[Mapping[str, torch.Tensor]]], device: torch.device | None,
        results: list[MergedModule] | None = None, factor: float = 1.0,
    ) -> None:
        self.spec = spec
        self.params = params
        self.adapters = {a.name: a for a in adapters}
        self.modules: list[str] = sorted(adapters[0].modules)
        self._extras = extras
        self._device = device
        self._results = results
        self._factor = factor
        self._model_totals: torch.Tensor | None = None
        self.on_module: Callable[[str], None] | None = None

    @property
    def method(self) -> str:
        return self.spec.name

    @property
    def tasks(self) -> list[str]:
        return list(self.adapters)

    @property
    def config(self) -> dict:
        """The first adapter's PEFT config (base model, task type) as the template for exported adapters."""
        return next(iter(self.adapters.values())).config

    @property
    def per_task(self) -> bool:
        """True when each task needs its own update at inference (EMR)."""
        return self.spec.totals is not None

    def describe(self) -> dict[str, Any]:
        return {
            "method": self.method, "params": self.params.model_dump(), "tasks": self.tasks,
            "modules": len(self.modules), "base_model": next(iter(self.adapters.values())).base_model,
        }

    def inputs(self, module: str, totals: torch.Tensor | None = None) -> ModuleInputs:
        """One module's inputs for the method: float32 factors and per-task extras on the merge device."""
        def move(t: torch.Tensor) -> torch.Tensor:
            return t.to(device=self._device, dtype=torch.float32) if self._device else t.to(torch.float32)

        factors = [
            LoraFactors(move(a.modules[module].A), move(a.modules[module].B), a.modules[module].scale)
            for a in self.adapters.values()
        ]
        extras = {key: [move(per[module]) for per in values] for key, values in self._extras.items()}
        return ModuleInputs(module, self.tasks, factors, extras, totals=totals)

    def _totals(self) -> torch.Tensor:
        total = None
        for module in self.modules:
            part = self.spec.totals(self.inputs(module), self.params)  # type: ignore[misc]
            total = part if total is None else total + part
        return total  # type: ignore[return-value]

    def __iter__(self) -> Iterator[MergedModule]:
        results = (self._stored(r) for r in self._results) if self._results is not None else self._compute()
        for result in results:
            self._report(result.name)
            yield result

    def _report(self, name: str) -> None:
        if self.on_module is not None:
            self.on_module(name)

    def _stored(self, result: MergedModule) -> MergedModule:
        """A materialized result with λ applied (per-task EMR results are never rescaled)."""
        return result if self._factor == 1.0 else result.scaled(self._factor)

    def module(self, name: str) -> MergedModule:
        """One module's merged update on demand, for writers that visit modules in their own order (checkpoint
        shards). Model-wide totals, for the methods that need them, are computed once and kept."""
        if name not in self.modules:
            raise MergeError(f"module {name}: not one of the merged modules (e.g. {self.modules[:3]})")
        if self._results is not None:
            result = self._stored(next(r for r in self._results if r.name == name))
        else:
            if self.spec.needs_totals(self.params) and self._model_totals is None:
                self._model_totals = self._totals()
            result = self.spec.fn(self.inputs(name, self._model_totals), self.params)
        self._report(name)
        return result

    def _compute(self) -> Iterator[MergedModule]:
        totals = self._totals() if self.spec.needs_totals(self.params) else None
        for module in self.modules:
            yield self.spec.fn(self.inputs(module, totals), self.params)

    def materialize(self) -> Merged:
        """Compute every module once and keep the results (memory: one merged update per module)."""
        return Merged(self.spec, self.params, list(self.adapters.values()), self._extras, self._device,
                      results=list(self), factor=1.0)

    def rescaled(self, scaling: float) -> Merged:
        """A materialized merge with λ replaced by `scaling` (exact: λ is a pure post-factor), validated as
        the method's own hyper-parameter (a NaN or infinite λ is refused)."""
        if self._results is None or not self.spec.post_scale:
            raise MergeError(f"merge method {self.method!r}: only a materialized post-scaled merge can be rescaled")
        base = self.params.scaling  # type: ignore[attr-defined]
        if base == 0:
            raise MergeError("cannot rescale a merge computed with scaling=0")
        params = self.spec.parse({**self.params.model_dump(), "scaling": scaling})
        return Merged(self.spec, params, list(self.adapters.values()), self._extras, self._device,
                      results=self._results, factor=params.scaling / base)  # type: ignore[attr-defined]


def merge_adapters(
    adapters: Sequence[AdapterLike], method: str, *, device: str | torch.device | None = None, **options: Any
) -> Merged:
    """Merge LoRA adapters (objects or PEFT folders) with a registered method; returns a lazy `Merged`.

    `options` are the method's hyper-parameters and, under their input kind's name, the per-task inputs
    it requires (`merge.inputs`: ``stats=`` TaskStats for RegMean's Gram matrices, ``fisher=``
    {module: out×in diagonal Fisher}), each a sequence matched to the adapters by the task each object
    records (in adapter order for objects that record none), or a mapping by adapter name. Inputs that
    record their base model must record the adapters' (`identity.check_same_model`).
    Everything is validated here, before any module is merged; errors name the adapter, the module and
    the mismatch.
    """
    spec = get_method(method)
    kinds = input_kinds()
    given = {k: v for k, v in options.items() if k in kinds and v is not None}
    params = spec.parse({k: v for k, v in options.items() if k not in kinds})
    loaded = load_adapters(adapters)
    tasks = [a.name for a in loaded]
    if "weights" in spec.params.model_fields:
        resolve_weights(params.weights, len(loaded))  # type: ignore[attr-defined]
    for name in spec.requires:
        if name not in given:
            raise MergeError(f"merge method {method!r} needs {name}= ({kinds[name].hint})")
    for name in given:
        if name not in spec.requires:
            raise MergeError(f"merge method {method!r} does not use {name}=")
    shapes = {m: (f.B.shape[0], f.A.shape[1]) for m, f in loaded[0].modules.items()}
    aligned = {name: _per_task(value, loaded, kinds[name]) for name, value in given.items()}
    _check_models(loaded, aligned, kinds)
    extras = {name: [kinds[name].provide(v, task, shapes) for v, task in zip(values, tasks)]
              for name, values in aligned.items()}
    return Merged(spec, params, loaded, extras, torch.device(device) if device is not None else None)


def merge_sweep(
    adapters: Sequence[AdapterLike], method: str, lambdas: Iterable[float], **kwargs: Any
) -> Iterator[tuple[float, Merged]]:
    """(λ, merge) over a grid, merging only once: λ multiplies the unscaled merge (exact for every method
    with a `scaling` hyper-parameter). The unscaled per-module results are kept in memory for the sweep."""
    spec = get_method(method)
    if not spec.post_scale:
        raise MergeError(f"merge method {method!r} has no global scaling λ to sweep")
    if "scaling" in kwargs:
        raise MergeError("merge_sweep sets scaling itself from lambdas; do not pass scaling=")
    unscaled = merge_adapters(adapters, method, scaling=1.0, **kwargs).materialize()
    for lam in lambdas:
        yield float(lam), unscaled.rescaled(lam)
