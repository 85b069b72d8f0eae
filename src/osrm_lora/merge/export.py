"""Merged updates as a PEFT LoRA adapter: exact where the merge is low rank, truncated SVD otherwise.

Task arithmetic, averaging, RegMean and KnOTS give exactly low-rank updates (rank ≤ Σ r_i) that are saved as
they are. Dense results (TIES, DARE, Fisher, EMR per task), or a requested rank below the exact one, are
replaced by their best rank-k approximation and the discarded energy fraction Σ_dropped σ² / Σ σ² is
reported per module and overall.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ..adapters import LoraAdapter, LoraFactors
from ..errors import MergeError
from .engine import Merged
from .lowrank import squared_norm, truncate_dense, truncate_factors


@dataclass
class AdapterExport:
    adapter: LoraAdapter
    exact: bool  # True when no module was approximated
    discarded_fraction: float  # over all modules: Σ dropped σ² / Σ σ²
    module_discarded: dict[str, float] = field(default_factory=dict)

    def report(self) -> dict:
        ranks = sorted({f.rank for f in self.adapter.modules.values()})
        return {"exact": self.exact, "discarded_fraction": self.discarded_fraction, "ranks": ranks,
                "module_discarded": self.module_discarded}


def to_adapter(
    merged: Merged, rank: int | None = None, *, task: str | None = None, heads_from: str | None = None,
    name: str = "merged",
) -> AdapterExport:
    """One PEFT adapter holding the merged update of every module.

    `rank=None` keeps exact low-rank results as they are (and refuses dense ones); a rank truncates anything
    above it. `task` picks the task's update for per-task merges (EMR); `heads_from` copies that adapter's
    extra tensors (classification head, modules_to_save) into the result.
    """
    if rank is not None and rank < 1:
        raise MergeError(f"rank must be ≥ 1, got {rank}")
    if heads_from is not None and heads_from not in merged.adapters:
        raise MergeError(f"heads_from={heads_from!r} is not one of the merged adapters {merged.tasks}")
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
    config = dict(merged.config)
    extra = dict(merged.adapters[heads_from].extra) if heads_from is not None else {}
    if heads_from is None:
        config["modules_to_save"] = None
    adapter = LoraAdapter(modules=modules, config=config, extra=extra, name=name)
    fraction = dropped_energy / total_energy if total_energy > 0 else 0.0
    return AdapterExport(adapter, exact=approximated == 0, discarded_fraction=fraction, module_discarded=discarded)


def save_adapter(
    merged: Merged, path: str | Path, rank: int | None = None, *, task: str | None = None,
    heads_from: str | None = None,
) -> AdapterExport:
    """`to_adapter`, then write it as a PEFT folder atomically (all modules are merged before anything is
    written, so a failure leaves no folder)."""
    export = to_adapter(merged, rank, task=task, heads_from=heads_from, name=Path(path).name)
    export.adapter.save(path)
    return export
