"""Merging LoRA adapters module by module with a registry of typed, documented methods.

    merged = merge_adapters([adapter_a, adapter_b], "ties", density=0.2, scaling=1.0)
    apply_to_model(model, merged)            # W0 + ΔW_merged in the target linear weights
    load_head(model, merged.adapters["a"])   # each task keeps its own classifier head
    save_adapter(merged, "out/", rank=16)    # PEFT adapter (exact when the merge is low rank)
    merge_checkpoint_sharded("base/", adapters, "ties", "merged/", density=0.2)  # models larger than memory

`list_methods()` documents every method and hyper-parameter; `merge_sweep` evaluates a λ grid from one merge.
"""

from .apply import apply_to_model, load_head, save_merged_model, target_weights
from .engine import Merged, load_adapters, merge_adapters, merge_sweep
from .export import AdapterExport, save_adapter, to_adapter
from .fisher_estimate import estimate_fisher, load_fisher, save_fisher
from .lowrank import Truncation, truncate_dense, truncate_factors
from .registry import MethodParams, MethodSpec, get_method, list_methods, register
from .sharded import ShardedMerge, merge_checkpoint_sharded
from .types import MergedModule, ModuleInputs

__all__ = [
    "AdapterExport", "Merged", "MergedModule", "MethodParams", "MethodSpec", "ModuleInputs", "ShardedMerge",
    "Truncation", "apply_to_model", "estimate_fisher", "get_method", "list_methods", "load_adapters",
    "load_fisher", "load_head", "merge_adapters", "merge_checkpoint_sharded", "merge_sweep", "register",
    "save_adapter", "save_fisher", "save_merged_model", "target_weights", "to_adapter", "truncate_dense",
    "truncate_factors",
]
