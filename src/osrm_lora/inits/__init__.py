"""LoRA inits: a registry of how an adapter starts (PEFT's default, OSRM, PiSSA/OLoRA) and OSRM's tensor side.

    spec = get_init("osrm")       # InitSpec: peft_init, needs_stats, variants, mutates_base, options, apply
    list_inits()                  # every init, for listings and validation
    osrm_init(peft_model, subspace)                 # lora_A on the subspace rows, B = 0
    project_adapter(adapter, subspace)              # post-hoc OSRM of a trained adapter

The registry imports no torch; `osrm_init` and `project_adapter` (torch, peft) load on first use.
"""

from .._lazy import lazy_exports
from .registry import InitOptions, InitSpec, get_init, list_inits, register

__all__ = ["InitOptions", "InitSpec", "get_init", "list_inits", "osrm_init", "project_adapter", "register"]
__getattr__ = lazy_exports(__name__, {".osrm_tensors": ["osrm_init", "project_adapter"]})
