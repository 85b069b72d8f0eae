"""osrm-lora: LoRA adapters that merge without interference (OSRM, ACL 2025, arXiv 2505.22934).

The public API, one name per step of the workflow::

    task = get_task("trec")
    stats = collect_task_stats(task, "builtin:minilm", samples=64)   # Σ xxᵀ of each target module's input
    subspaces = compute_subspaces([stats_a, stats_b], rank=8)          # leave-one-out OSRM subspaces
    finetune(task, "builtin:minilm", "adapters/trec", init="osrm", subspace=subspaces["trec"])
    merged = merge_adapters(["adapters/trec", "adapters/sms_spam"], "ties", density=0.2)
    save_adapter(merged, "adapters/merged")
    run_experiment(load_experiment("study.yaml"))                      # the whole study from one file

The registries: `get_init`/`list_inits` (how adapters start) and `get_method`/`list_methods` (how they merge);
a new init or method registers itself in its own file (see docs/architecture.md). Every name is imported on
first use, so `import osrm_lora` (and the torch-free `osrm_lora.settings`) does not load torch.
"""

from ._lazy import lazy_exports

__version__ = "0.1.0"

__all__ = [
    "LoraAdapter", "Subspace", "TaskStats", "__version__", "collect_stats", "collect_task_stats",
    "compute_subspaces", "evaluate_task", "finetune", "get_init", "get_method", "get_task", "interference_matrix",
    "list_inits", "list_methods", "load_experiment", "load_model_and_tokenizer", "merge_adapters", "merge_sweep",
    "osrm_init", "project_adapter", "run_experiment", "save_adapter",
]
__getattr__ = lazy_exports(__name__, {
    ".adapters": ["LoraAdapter"],
    ".distributed": ["collect_task_stats"],
    ".evaluate": ["evaluate_task"],
    ".inits": ["get_init", "list_inits", "osrm_init", "project_adapter"],
    ".interference": ["interference_matrix"],
    ".merge": ["get_method", "list_methods", "merge_adapters", "merge_sweep", "save_adapter"],
    ".pipeline": ["run_experiment"],
    ".runtime.models": ["load_model_and_tokenizer"],
    ".settings": ["load_experiment"],
    ".stats": ["TaskStats", "collect_stats"],
    ".subspace": ["Subspace", "compute_subspaces"],
    ".tasks": ["get_task"],
    ".train": ["finetune"],
})


def __dir__() -> list[str]:
    return sorted(__all__)
