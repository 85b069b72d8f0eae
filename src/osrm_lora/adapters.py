"""LoRA adapters as per-module factors: read from and written to PEFT's folder format.

A LoRA update of module m is ``ΔW = scale · B @ A`` (out×in) with ``scale = alpha/r`` or ``alpha/√r`` (rsLoRA),
where r and alpha may differ per module through PEFT's ``rank_pattern``/``alpha_pattern``. Everything that
merges, projects or measures adapters works on these factors, never on averaged A and B.
"""

from __future__ import annotations

import json
import math
import pickle
from dataclasses import dataclass, field
from pathlib import Path

import torch
from huggingface_hub.errors import EntryNotFoundError
from peft import LoraConfig, PeftConfig
from peft.utils import load_peft_weights
from peft.utils.other import get_pattern_key
from safetensors import SafetensorError

from .errors import AdapterError
from .identity import ModelIdentity, check_same_model, warn_without_digest
from .io import OsrmFileError, atomic_dir, check_finite, save_tensors, write_json
from .modules import PEFT_PREFIX

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PICKLE_WEIGHTS_NAME = "adapter_model.bin"  # read by PEFT with torch.load(weights_only=True): tensors only
METADATA_NAME = "osrm_lora.json"  # what `train.finetune` records beside the adapter it trained


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
    """A LoRA adapter: its factors by base-model module name, plus the tensors saved beside them (heads).

    `record` is what osrm-lora wrote when it trained the adapter (METADATA_NAME: task, base model and its
    digest, settings), {} for other adapters; `source` is the folder or Hub id it was read from.
    """

    modules: dict[str, LoraFactors]
    config: dict
    extra: dict[str, torch.Tensor] = field(default_factory=dict)
    name: str = ""
    record: dict = field(default_factory=dict)
    source: str = ""

    @property
    def base_model(self) -> str | None:
        return self.config.get("base_model_name_or_path")

    @property
    def task(self) -> str:
        """The task it was trained on, as recorded; else its name (the folder name)."""
        return str(self.record.get("task") or self.name)

    def identity(self) -> ModelIdentity | None:
        """The base model it was trained on, as recorded (None for adapters osrm-lora did not train)."""
        if "config_hash" not in self.record:
            return None
        where = f"adapter {self.source or self.name}"
        return ModelIdentity(str(self.record.get("base_model") or self.base_model), str(self.record["config_hash"]),
                             str(self.record.get("model_digest") or ""), where)

    @classmethod
    def load(cls, source: str | Path, name: str | None = None) -> LoraAdapter:
        """Read a PEFT LoRA adapter: a local folder, else a Hub id `user/repo` or `user/repo@revision`.

        PEFT's own readers do it (`PeftConfig.from_pretrained`, called on LoraConfig so that a config without
        peft_type is LoRA, and `load_peft_weights`): Hub ids download and cache as in PEFT, and an
        `adapter_model.bin` is read with torch's weights_only unpickler, which builds tensors and plain
        containers only. Missing or malformed files are OsrmFileErrors naming the file.
        """
        path = Path(source)
        record: dict = {}
        if path.exists():
            config, tensors = _read_folder(path)
            record = _read_record(path)
            default_name = path.name
        else:
            repo, revision = _split_hub_id(str(source))
            try:
                config = LoraConfig.from_pretrained(repo, revision=revision)
                tensors = load_peft_weights(repo, device="cpu", revision=revision)
            except (OSError, ValueError, EntryNotFoundError) as exc:
                raise OsrmFileError(f"{source}: cannot load the adapter from the Hugging Face Hub ({exc})") from exc
            config = _lora_config(config, str(source))
            default_name = repo.rsplit("/", 1)[-1]
        check_finite(tensors, str(source))
        adapter = cls.from_state_dict(tensors, config, name=name or default_name, source=str(source))
        adapter.record, adapter.source = record, str(source)
        return adapter

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
        """`write` into a new folder that replaces `path` only once complete (`io.atomic_dir`'s rules)."""
        with atomic_dir(path, kind, overwrite=overwrite, inputs=inputs) as tmp:
            self.write(tmp)

    def write(self, folder: Path) -> None:
        """Write a PEFT folder; each module's scale is folded into B (alpha = r per module) so ranks may differ."""
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
        save_tensors(folder / WEIGHTS_NAME, tensors, metadata={"format": "pt"})
        write_json(folder / CONFIG_NAME, config)

    def deltas(self) -> dict[str, torch.Tensor]:
        return {m: f.delta() for m, f in self.modules.items()}


def _split_hub_id(source: str) -> tuple[str, str | None]:
    """`user/repo` or `user/repo@revision` -> (repo id, revision or None); anything else is an OsrmFileError."""
    from .hub import is_repo_id

    repo, at, revision = source.partition("@")
    if not is_repo_id(repo) or (at and not revision):
        raise OsrmFileError(f"{source}: no such adapter folder, and not a Hub id user/repo[@revision]")
    return repo, revision or None


def _lora_config(config: PeftConfig, where: str) -> dict:
    """A LoRA config as the JSON-ready dict PEFT would save (sets as sorted lists)."""
    if not isinstance(config, LoraConfig):
        raise OsrmFileError(f"{where}: peft_type {getattr(config.peft_type, 'value', config.peft_type)!r} is not LORA")
    return {key: sorted(value) if isinstance(value, set) else value for key, value in config.to_dict().items()}


def _read_folder(path: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """Config dict and state dict of a local PEFT folder, every failure naming its file."""
    config_file = path / CONFIG_NAME
    if not config_file.is_file():
        raise OsrmFileError(f"{path}: not a PEFT adapter folder ({CONFIG_NAME} missing)")
    try:
        config = LoraConfig.from_pretrained(str(path))
    except json.JSONDecodeError as exc:
        raise OsrmFileError(f"{config_file}: not valid JSON ({exc})") from None
    except (TypeError, ValueError, KeyError) as exc:
        raise OsrmFileError(f"{config_file}: not a PEFT adapter config ({exc!r})") from None
    config_dict = _lora_config(config, str(config_file))
    weights = next((path / n for n in (WEIGHTS_NAME, PICKLE_WEIGHTS_NAME) if (path / n).is_file()), None)
    if weights is None:
        raise OsrmFileError(f"{path / WEIGHTS_NAME}: file not found")
    try:
        tensors = load_peft_weights(str(path), device="cpu")
    except (SafetensorError, OSError, RuntimeError, pickle.UnpicklingError) as exc:
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise OsrmFileError(f"{weights}: not a readable weights file ({first_line})") from exc
    return config_dict, tensors


def _read_record(folder: Path) -> dict:
    """The folder's METADATA_NAME as a dict ({} when absent); one from before model digests is warned about."""
    path = folder / METADATA_NAME
    if not path.is_file():
        return {}
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise OsrmFileError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(record, dict):
        raise OsrmFileError(f"{path}: not an osrm-lora adapter record (a {type(record).__name__})")
    if "config_hash" in record and "model_digest" not in record:
        warn_without_digest(path, "adapter record")
    return record


def check_compatible(adapters: list[LoraAdapter]) -> None:
    """All adapters must target the same modules with the same shapes (ranks may differ) on one base model:
    by the recorded identity (`identity.check_same_model`) where both have one, else by base model name."""
    ref = adapters[0]
    for other in adapters[1:]:
        missing = set(ref.modules) ^ set(other.modules)
        if missing:
            raise AdapterError(
                f"adapters {ref.name!r} and {other.name!r} target different modules: {sorted(missing)[:5]}"
            )
        known = (ref.identity(), other.identity())
        if known[0] is not None and known[1] is not None:
            check_same_model(known[1], known[0], AdapterError)
        elif ref.base_model and other.base_model and ref.base_model != other.base_model:
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
