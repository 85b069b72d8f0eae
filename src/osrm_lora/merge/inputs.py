"""The per-task inputs a merge method may need beyond the LoRA factors, registered by name.

As in mergekit's `tensor_parameters()`, a method lists the input kinds it needs in `register(requires=...)`
and the caller passes one object per task under the kind's name (``merge_adapters(..., stats=[...])``).
The kind checks that object against the adapters' modules, naming the adapter in its errors, and gives
the engine a {module: tensor} mapping; the method reads one module's tensors as ``inputs.extra(name)``.
A kind also says which task an object records (`task_of`) and which base model (`model_of`), so the engine
matches a list of objects to the adapters by task, never by position, and refuses another model's.
A new kind is one `register_input` call; `register` refuses a method requiring an unknown one.

No torch import: the registry validates `requires=` when a method is registered, before any tensor exists.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..errors import MergeError

if TYPE_CHECKING:
    import torch

    from ..identity import ModelIdentity
    from ..stats import TaskStats

Shapes = Mapping[str, tuple[int, int]]  # module -> (out, in) of the adapters' updates
Provide = Callable[[Any, str, Shapes], Mapping[str, "torch.Tensor"]]


def _recorded_task(value: Any) -> str:
    """The `task` an object records (TaskStats, a Fisher file's diagonals); "" for a plain mapping."""
    return str(getattr(value, "task", "") or "")


def _no_model(value: Any) -> ModelIdentity | None:
    """For kinds whose objects record no base model."""
    return None


@dataclass(frozen=True)
class InputKind:
    """`provide(per-task object, adapter name, shapes)` checks one task's object and returns {module: tensor}.

    `what` names the objects in errors ("statistics"); `hint` says what to pass ("TaskStats per adapter");
    `task_of(object)` is the task it records ("" if none) and `model_of(object)` its base model (or None).
    """

    name: str
    what: str
    hint: str
    provide: Provide
    task_of: Callable[[Any], str] = _recorded_task
    model_of: Callable[[Any], ModelIdentity | None] = _no_model

    def describe(self, value: Any) -> str:
        """One object in messages: its file and task where known."""
        task, source = self.task_of(value), getattr(value, "source", "")
        if source:
            return f"{self.what} {source}" + (f" (task {task!r})" if task else "")
        return f"{self.what} of task {task!r}" if task else f"{self.what} without a task"


_KINDS: dict[str, InputKind] = {}


def register_input(name: str, what: str, hint: str, provide: Provide, *, task_of: Callable[[Any], str] = _recorded_task,
                   model_of: Callable[[Any], ModelIdentity | None] = _no_model) -> None:
    """Make `name` a per-task input that methods may require and `merge_adapters` accepts as `name=`."""
    if name in _KINDS:
        raise ValueError(f"merge input {name!r} is already registered")
    _KINDS[name] = InputKind(name, what, hint, provide, task_of, model_of)


def input_kinds() -> dict[str, InputKind]:
    """Every registered input kind by name."""
    return dict(_KINDS)


def check_requires(method: str, requires: tuple[str, ...], hyperparameters: Iterable[str]) -> None:
    """Refuse a method that requires an unregistered input kind, or has a hyper-parameter named like one
    (`merge_adapters` tells inputs from hyper-parameters by name)."""
    unknown = [r for r in requires if r not in _KINDS]
    if unknown:
        raise ValueError(
            f"merge method {method!r} requires unknown inputs {unknown}; known inputs: {sorted(_KINDS)} "
            f"(add one with merge.inputs.register_input)"
        )
    clash = sorted(set(hyperparameters) & set(_KINDS))
    if clash:
        raise ValueError(f"merge method {method!r}: hyper-parameters {clash} are named like merge inputs")


def _grams(stats: TaskStats, adapter: str, shapes: Shapes) -> Mapping[str, torch.Tensor]:
    """Each module's input Gram matrix Σ x xᵀ (in×in) from the task's statistics."""
    stats.check_matches(modules={m: d_in for m, (_, d_in) in shapes.items()}, source=f"statistics for adapter {adapter!r}")
    return stats.second


def _fisher(fisher: Mapping[str, torch.Tensor], adapter: str, shapes: Shapes) -> Mapping[str, torch.Tensor]:
    """Each module's diagonal Fisher (out×in), as `runtime.fisher.estimate_fisher` gives it."""
    for m, shape in shapes.items():
        if m not in fisher:
            raise MergeError(f"Fisher diagonal of adapter {adapter!r} has no module {m}")
        if tuple(fisher[m].shape) != tuple(shape):
            raise MergeError(
                f"Fisher diagonal of adapter {adapter!r}, module {m}: shape {tuple(fisher[m].shape)} != out×in {shape}"
            )
    return fisher


register_input("stats", "statistics", "TaskStats per adapter", _grams, model_of=lambda stats: stats.identity())
register_input("fisher", "Fisher diagonals", "per-adapter Fisher diagonals", _fisher)
