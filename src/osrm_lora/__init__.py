"""osrm-lora: LoRA adapters that merge without interference (OSRM, ACL 2025, arXiv 2505.22934)."""

__version__ = "0.1.0"
