"""Merging LoRA adapters module by module with a registry of typed, documented methods.

    merged = merge_adapters([adapter_a, adapter_b], "ties", density=0.2, scaling=1.0)
    apply_to_model(model, merged)            # W0 + ΔW_merged in the target linear weights
    load_head(model, merged.adapters["a"])   # each task keeps its own classifier head
    save_adapter(merged, "out/", rank=16)    # PEFT adapter (exact when the merge is low rank)
    merge_checkpoint_sharded("base/", adapters, "ties", "merged/", density=0.2)  # models larger than memory

`list_methods()` documents every method and hyper-parameter; `merge_sweep` evaluates a λ grid from one merge.
Each name is imported from its module on first use, so `merge.registry` (and experiment validation) loads
without torch.
"""

from .._lazy import lazy_exports

__all__ = [
    "AdapterExport", "InputKind", "Merged", "MergedModule", "MethodParams", "MethodSpec", "ModuleInputs",
    "ShardedMerge", "Truncation", "apply_to_model", "get_method", "list_methods", "load_adapters", "load_head",
    "merge_adapters", "merge_checkpoint_sharded", "merge_sweep", "register", "register_input", "save_adapter",
    "save_merged_model", "to_adapter", "truncate_dense", "truncate_factors",
]
__getattr__ = lazy_exports(__name__, {
    ".apply": ["apply_to_model", "load_head", "save_merged_model"],
    ".engine": ["Merged", "load_adapters", "merge_adapters", "merge_sweep"],
    ".export": ["AdapterExport", "save_adapter", "to_adapter"],
    ".inputs": ["InputKind", "register_input"],
    ".lowrank": ["Truncation", "truncate_dense", "truncate_factors"],
    ".registry": ["MethodParams", "MethodSpec", "get_method", "list_methods", "register"],
    ".sharded": ["ShardedMerge", "merge_checkpoint_sharded"],
    ".types": ["MergedModule", "ModuleInputs"],
})
