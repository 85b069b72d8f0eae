"""Merged updates as a PEFT LoRA adapter: exact where the merge is low rank, truncated SVD otherwise.

Task arithmetic, averaging, RegMean and KnOTS give exactly low-rank updates (rank ≤ Σ r_i) that are saved as
they are. Dense results (TIES, DARE, Fisher, EMR per task), or a requested rank below the exact one, are
replaced by their best rank-k approximation and the discarded energy fraction Σ_dropped σ² / Σ σ² is
reported per module and overall.

Task heads are not merged: each task keeps its own. `heads_from` says which the folder carries, and the
adapter config always agrees with it, so `PeftModel.from_pretrained` never expects a head it lacks:

- ``None`` (default): no head. ``modules_to_save`` is None and a task type that makes PEFT add its own head
  (SEQ_CLS, TOKEN_CLS, QUESTION_ANS) becomes None; the base model keeps the head it was loaded with.
- a task name: that adapter's head as PEFT's ``modules_to_save`` (its task type and module list), so
  ``AutoModelForSequenceClassification`` + ``PeftModel.from_pretrained`` is that task's merged model.
- ``"all"``: no head in the adapter (as with None) and every task's head in ``heads/<task>.safetensors``,
  keyed by base-model parameter name (``classifier.weight``): load one into the base model with
  ``model.load_state_dict(load_file(path), strict=False)``. "all" wins over a task of that name.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..adapters import LoraAdapter, LoraFactors
from ..errors import MergeError
from ..io import atomic_dir, check_output, save_tensors
from ..runtime.weights import task_head
from .engine import Merged
from .lowrank import squared_norm, truncate_dense, truncate_factors

ALL_HEADS = "all"
HEADS_DIR = "heads"
MERGED_ADAPTER = "merged-adapter"  # the output kind of merged PEFT adapter folders
HEAD_TASK_TYPES = frozenset({"SEQ_CLS", "TOKEN_CLS", "QUESTION_ANS"})  # PEFT adds a head module for these


@dataclass
class AdapterExport:
    adapter: LoraAdapter
    exact: bool  # True when no module was approximated
    discarded_fraction: float  # over all modules: Σ dropped σ² / Σ σ²
    module_discarded: dict[str, float] = field(default_factory=dict)
    heads: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)  # task -> heads/<task>.safetensors

    def report(self) -> dict:
        ranks = sorted({f.rank for f in self.adapter.modules.values()})
        return {"exact": self.exact, "discarded_fraction": self.discarded_fraction, "ranks": ranks,
                "module_discarded": self.module_discarded}


def _head_config(merged: Merged, heads_from: str | None) -> tuple[dict, dict[str, torch.Tensor]]:
    """The adapter config and extra tensors for `heads_from` (see the module docstring)."""
    config = dict(merged.config)
    if heads_from is None or heads_from == ALL_HEADS:
        config["modules_to_save"] = None
        if config.get("task_type") in HEAD_TASK_TYPES:
            config["task_type"] = None
        return config, {}
    if heads_from not in merged.adapters:
        raise MergeError(
            f"heads_from={heads_from!r} is not one of the merged adapters {merged.tasks} (nor {ALL_HEADS!r})"
        )
    source = merged.adapters[heads_from]
    if not source.extra:
        raise MergeError(f"heads_from={heads_from!r}: that adapter saved no head (modules_to_save)")
    config["task_type"] = source.config.get("task_type")
    config["modules_to_save"] = source.config.get("modules_to_save") or sorted(
        {name.rsplit(".", 1)[0] for name in task_head(source)}
    )
    return config, dict(source.extra)


def to_adapter(
    merged: Merged, rank: int | None = None, *, task: str | None = None, heads_from: str | None = None,
    name: str = "merged",
) -> AdapterExport:
    """One PEFT adapter holding the merged update of every module.

    `rank=None` keeps exact low-rank results as they are (and refuses dense ones); a rank truncates anything
    above it. `task` picks the task's update for per-task merges (EMR); `heads_from` is None, a task or
    "all" (module docstring).
    """
    if rank is not None and rank < 1:
        raise MergeError(f"rank must be ≥ 1, got {rank}")
    config, extra = _head_config(merged, heads_from)
    modules: dict[str, LoraFactors] = {}
    discarded: dict[str, float] = {}
    dropped_energy = total_energy = 0.0
    approximated = 0
    for m in merged:
        if m.factors is not None and not m.per_task and (rank is None or m.factors.rank <= rank):
            modules[m.name] = m.factors
            discarded[m.name] = 0.0
            total_energy += squared_norm(m.factors)
            continue
        if rank is None:
            raise MergeError(
                f"merge method {merged.method!r} gives a dense update for module {m.name}; pass rank= to save a "
                f"truncated-SVD adapter"
            )
        if m.factors is not None and not m.per_task:
            cut = truncate_factors(m.factors, rank)
        else:
            cut = truncate_dense(m.for_task(task), rank)
        approximated += 1
        modules[m.name] = cut.factors
        discarded[m.name] = cut.discarded_fraction
        dropped_energy += cut.discarded
        total_energy += cut.total
    adapter = LoraAdapter(modules=modules, config=config, extra=extra, name=name)
    heads = {t: task_head(a) for t, a in merged.adapters.items() if a.extra} if heads_from == ALL_HEADS else {}
    if heads_from == ALL_HEADS and not heads:
        raise MergeError(f"heads_from={ALL_HEADS!r}: none of the adapters {merged.tasks} saved a head")
    fraction = dropped_energy / total_energy if total_energy > 0 else 0.0
    return AdapterExport(adapter, exact=approximated == 0, discarded_fraction=fraction, module_discarded=discarded,
                         heads=heads)


def save_adapter(
    merged: Merged, path: str | Path, rank: int | None = None, *, task: str | None = None,
    heads_from: str | None = None, overwrite: bool = False, inputs: Iterable[str | os.PathLike] = (),
) -> AdapterExport:
    """`to_adapter`, then write it as a PEFT folder (with `heads/` for heads_from="all") atomically: all
    modules are merged before anything is written, so a failure leaves no folder. `path` is checked first
    (`io.check_output`: an existing folder that is no merged adapter needs `overwrite`, an input never)."""
    inputs = list(inputs)
    check_output(path, MERGED_ADAPTER, folder=True, overwrite=overwrite, inputs=inputs)
    export = to_adapter(merged, rank, task=task, heads_from=heads_from, name=Path(path).name)
    with atomic_dir(path, MERGED_ADAPTER, overwrite=overwrite, inputs=inputs) as tmp:
        export.adapter.write(tmp)
        for head_task, tensors in export.heads.items():
            save_tensors(tmp / HEADS_DIR / f"{head_task}.safetensors", tensors,
                         metadata={"format": "pt", "task": head_task})
    return export
