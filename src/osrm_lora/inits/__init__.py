"""LoRA inits: a registry of how an adapter starts (PEFT's kaiming and gaussian, OSRM's, the data-free controls,
PiSSA/OLoRA) and OSRM's tensor side.

    spec = get_init("osrm")       # InitSpec: peft_init, needs_stats, variants, mutates_base, options, apply
    list_inits()                  # every init, for listings and validation
    osrm_init(peft_model, subspace, scale="kaiming")  # lora_A on the subspace rows, B = 0
    project_adapter(adapter, subspace)              # post-hoc OSRM of a trained adapter

The registry imports no torch; `osrm_init` and `project_adapter` (torch, peft) load on first use. The maths of
every init is in docs/inits.md.
"""

from .._lazy import lazy_exports
from .registry import InitContext, InitOptions, InitSpec, get_init, list_inits, register

__all__ = [
    "InitContext", "InitOptions", "InitSpec", "get_init", "list_inits", "osrm_init", "project_adapter", "register",
]
__getattr__ = lazy_exports(__name__, {".osrm_tensors": ["osrm_init", "project_adapter"]})
