"""LoRA adapters as per-module factors: read from and written to PEFT's folder format.

A LoRA update of module m is ``ΔW = scale · B @ A`` (out×in) with ``scale = alpha/r`` or ``alpha/√r`` (rsLoRA),
where r and alpha may differ per module through PEFT's ``rank_pattern``/``alpha_pattern``. Everything that
merges, projects or measures adapters works on these factors, never on averaged A and B.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
from peft.utils.other import get_pattern_key

from .errors import AdapterError
from .io import OsrmFileError, load_tensors, save_tensors, write_json
from .modules import PEFT_PREFIX

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"


@dataclass
class LoraFactors:
    """One module's low-rank update; `A` is r×in, `B` is out×r."""

    A: torch.Tensor
    B: torch.Tensor
    scale: float

    @property
    def rank(self) -> int:
        return int(self.A.shape[0])

    def delta(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The dense out×in update ``scale · B A``."""
        return self.scale * (self.B.to(dtype) @ self.A.to(dtype))


def lora_scale(alpha: float, r: int, use_rslora: bool) -> float:
    return alpha / math.sqrt(r) if use_rslora else alpha / r


@dataclass
class LoraAdapter:
    """A LoRA adapter: its factors by base-model module name, plus the tensors saved beside them (heads)."""

    modules: dict[str, LoraFactors]
    config: dict
    extra: dict[str, torch.Tensor] = field(default_factory=dict)
    name: str = ""

    @property
    def base_model(self) -> str | None:
        return self.config.get("base_model_name_or_path")

    @classmethod
    def load(cls, path: str | Path, name: str | None = None) -> LoraAdapter:
        """Read a PEFT LoRA folder (`adapter_config.json` + `adapter_model.safetensors`)."""
        path = Path(path)
        config_file = path / CONFIG_NAME
        if not config_file.is_file():
            raise OsrmFileError(f"{path}: not a PEFT adapter folder ({CONFIG_NAME} missing)")
        try:
            config = json.loads(config_file.read_text())
        except json.JSONDecodeError as exc:
            raise OsrmFileError(f"{config_file}: not valid JSON ({exc})") from None
        if config.get("peft_type", "LORA") != "LORA":
            raise OsrmFileError(f"{config_file}: peft_type {config.get('peft_type')!r} is not LORA")
        tensors, _ = load_tensors(path / WEIGHTS_NAME)
        return cls.from_state_dict(tensors, config, name=name or path.name, source=str(path))

    @classmethod
    def from_state_dict(
        cls, tensors: dict[str, torch.Tensor], config: dict, name: str = "", source: str = "<memory>"
    ) -> LoraAdapter:
        """Split a PEFT adapter state dict (adapter name already stripped) into factors and extra tensors."""
        factors: dict[str, dict[str, torch.Tensor]] = {}
        extra: dict[str, torch.Tensor] = {}
        for key, value in tensors.items():
            for part in ("lora_A", "lora_B"):
                marker = f".{part}.weight"
                if key.endswith(marker):
                    module = key[: -len(marker)]
                    module = module.removeprefix(PEFT_PREFIX)
                    factors.setdefault(module, {})[part] = value
                    break
            else:
                extra[key] = value
        rank_pattern = config.get("rank_pattern") or {}
        alpha_pattern = config.get("alpha_pattern") or {}
        modules = {}
        for module, parts in sorted(factors.items()):
            if set(parts) != {"lora_A", "lora_B"}:
                raise OsrmFileError(f"{source}: module {module} has {sorted(parts)} but needs lora_A and lora_B")
            A, B = parts["lora_A"], parts["lora_B"]
            if A.shape[0] != B.shape[1]:
                raise OsrmFileError(
                    f"{source}: module {module}: lora_A is {tuple(A.shape)} but lora_B is {tuple(B.shape)}"
                )
            r = rank_pattern.get(get_pattern_key(rank_pattern.keys(), module), config.get("r", A.shape[0]))
            alpha = alpha_pattern.get(get_pattern_key(alpha_pattern.keys(), module), config.get("lora_alpha", r))
            modules[module] = LoraFactors(A, B, lora_scale(alpha, A.shape[0], bool(config.get("use_rslora"))))
        if not modules:
            raise OsrmFileError(f"{source}: no lora_A/lora_B tensors found")
        return cls(modules=modules, config=config, extra=extra, name=name)

    def save(self, path: str | Path, *, kind: str = "adapter", overwrite: bool = False, inputs=()) -> None:
        """Write a PEFT folder; each module's scale is folded into B (alpha = r per module) so ranks may differ."""
        from .io import atomic_dir

        tensors = dict(self.extra)
        rank_pattern, alpha_pattern = {}, {}
        for module, f in self.modules.items():
            tensors[f"{PEFT_PREFIX}{module}.lora_A.weight"] = f.A
            tensors[f"{PEFT_PREFIX}{module}.lora_B.weight"] = f.B * f.scale
            rank_pattern[module] = f.rank
            alpha_pattern[module] = f.rank
        ranks = {f.rank for f in self.modules.values()}
        config = dict(self.config)
        config.update(
            r=max(ranks), lora_alpha=max(ranks), use_rslora=False, rank_pattern=rank_pattern,
            alpha_pattern=alpha_pattern, target_modules=sorted(self.modules), init_lora_weights=True,
        )
        config.setdefault("peft_type", "LORA")
        with atomic_dir(path, kind, overwrite=overwrite, inputs=inputs) as tmp:
            save_tensors(tmp / WEIGHTS_NAME, tensors, metadata={"format": "pt"})
            write_json(tmp / CONFIG_NAME, config)

    def deltas(self) -> dict[str, torch.Tensor]:
        return {m: f.delta() for m, f in self.modules.items()}


def check_compatible(adapters: list[LoraAdapter]) -> None:
    """All adapters must target the same modules with the same shapes (ranks may differ)."""
    ref = adapters[0]
    for other in adapters[1:]:
        missing = set(ref.modules) ^ set(other.modules)
        if missing:
            raise AdapterError(
                f"adapters {ref.name!r} and {other.name!r} target different modules: {sorted(missing)[:5]}"
            )
        if ref.base_model and other.base_model and ref.base_model != other.base_model:
            raise AdapterError(
                f"adapter {other.name!r} is on base model {other.base_model!r}, but {ref.name!r} is on "
                f"{ref.base_model!r}"
            )
        for m, f in ref.modules.items():
            g = other.modules[m]
            if (f.A.shape[1], f.B.shape[0]) != (g.A.shape[1], g.B.shape[0]):
                raise AdapterError(
                    f"adapter {other.name!r}, module {m}: shape out×in {g.B.shape[0]}×{g.A.shape[1]} differs "
                    f"from {ref.name!r}'s {f.B.shape[0]}×{f.A.shape[1]}"
                )
