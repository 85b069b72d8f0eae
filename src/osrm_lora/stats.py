"""Per-task activation statistics of the target modules' inputs.

For each target module we keep the uncentred sums ``Σ x xᵀ`` and ``Σ x`` and the token count over the
task's non-padding tokens. These are all OSRM (and RegMean, and the interference diagnostics) need; they
add across batches, shards and processes, so they are collected once and cached.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import __version__
from .io import OsrmFileError, load_tensors, save_tensors

FORMAT = "osrm-lora/task-stats/1"


class StatsMismatchError(ValueError):
    """Statistics that do not belong to the model, modules or task they are used with."""


@dataclass
class TaskStats:
    """Sums of one task's target-module inputs. Modules fed the same tensor share one sum object."""

    task: str
    model: str
    config_hash: str
    second: dict[str, torch.Tensor]  # module -> Σ x xᵀ (d×d)
    first: dict[str, torch.Tensor]  # module -> Σ x (d)
    tokens: int
    dtype: torch.dtype = torch.float32
    version: str = __version__
    extra: dict[str, str] = field(default_factory=dict)

    @property
    def modules(self) -> list[str]:
        return sorted(self.second)

    def dim(self, module: str) -> int:
        return int(self.second[module].shape[0])

    def moment(self, module: str) -> torch.Tensor:
        """Uncentred second moment E[x xᵀ] in float64."""
        return self.second[module].double() / max(self.tokens, 1)

    def mean(self, module: str) -> torch.Tensor:
        """Mean input E[x] in float64."""
        return self.first[module].double() / max(self.tokens, 1)

    def metadata(self) -> dict[str, str]:
        return {
            "format": FORMAT,
            "task": self.task,
            "model": self.model,
            "config_hash": self.config_hash,
            "modules": json.dumps({m: self.dim(m) for m in self.modules}),
            "tokens": str(self.tokens),
            "dtype": str(self.dtype).removeprefix("torch."),
            "version": self.version,
            **{f"extra.{k}": v for k, v in self.extra.items()},
        }

    def check_matches(
        self, *, model: str | None = None, config_hash: str | None = None, modules: dict[str, int] | None = None,
        source: str = "statistics",
    ) -> None:
        """Refuse statistics collected on another model or other modules; the error names the field."""
        if config_hash is not None and config_hash != self.config_hash:
            raise StatsMismatchError(
                f"{source} (task {self.task!r}): config_hash {self.config_hash} != expected {config_hash} "
                f"(collected on model {self.model!r})"
            )
        if model is not None and model != self.model:
            raise StatsMismatchError(f"{source} (task {self.task!r}): model {self.model!r} != expected {model!r}")
        if modules is not None:
            mine = {m: self.dim(m) for m in self.modules}
            missing = sorted(set(modules) - set(mine))
            if missing:
                raise StatsMismatchError(f"{source} (task {self.task!r}): no statistics for modules {missing[:5]}")
            for m, d in modules.items():
                if mine[m] != d:
                    raise StatsMismatchError(
                        f"{source} (task {self.task!r}), module {m}: input dim {mine[m]} != expected {d}"
                    )

    def combine(self, other: "TaskStats") -> "TaskStats":
        """Sum of two shards of the same task on the same model and modules."""
        other.check_matches(
            model=self.model, config_hash=self.config_hash, modules={m: self.dim(m) for m in self.modules}
        )
        if other.task != self.task:
            raise StatsMismatchError(f"cannot combine statistics of task {other.task!r} into {self.task!r}")
        shared: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        second, first = {}, {}
        for m in self.modules:
            key = id(self.second[m])
            if key not in shared:
                shared[key] = (self.second[m] + other.second[m], self.first[m] + other.first[m])
            second[m], first[m] = shared[key]
        return TaskStats(self.task, self.model, self.config_hash, second, first, self.tokens + other.tokens, self.dtype)

    def save(self, path: str | Path) -> None:
        """Atomic safetensors file; modules that share an input share one stored tensor."""
        storage: dict[int, str] = {}
        tensors: dict[str, torch.Tensor] = {}
        module_keys: dict[str, str] = {}
        for m in self.modules:
            key = storage.setdefault(id(self.second[m]), f"g{len(storage)}")
            module_keys[m] = key
            tensors[f"{key}.second"] = self.second[m]
            tensors[f"{key}.first"] = self.first[m]
        meta = self.metadata()
        meta["storage"] = json.dumps(module_keys)
        save_tensors(path, tensors, meta)

    @classmethod
    def load(cls, path: str | Path) -> "TaskStats":
        tensors, meta = load_tensors(path)
        if meta.get("format") != FORMAT:
            raise OsrmFileError(f"{path}: not an osrm-lora statistics file (format={meta.get('format')!r})")
        try:
            module_keys = json.loads(meta["storage"])
            dims = json.loads(meta["modules"])
            second = {m: tensors[f"{k}.second"] for m, k in module_keys.items()}
            first = {m: tensors[f"{k}.first"] for m, k in module_keys.items()}
            tokens = int(meta["tokens"])
        except (KeyError, ValueError) as exc:
            raise OsrmFileError(f"{path}: statistics file is incomplete ({exc!r} missing or malformed)") from exc
        # Re-share tensors of modules that were stored under one key.
        by_key: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        for m, k in module_keys.items():
            second[m], first[m] = by_key.setdefault(k, (second[m], first[m]))
            if second[m].shape != (dims[m], dims[m]) or first[m].shape != (dims[m],):
                raise OsrmFileError(f"{path}: module {m}: stored shape {tuple(second[m].shape)} != dim {dims[m]}")
        extra = {k.removeprefix("extra."): v for k, v in meta.items() if k.startswith("extra.")}
        return cls(
            task=meta["task"], model=meta["model"], config_hash=meta["config_hash"], second=second, first=first,
            tokens=tokens, dtype=getattr(torch, meta.get("dtype", "float32")), version=meta.get("version", ""),
            extra=extra,
        )


def model_config_hash(model) -> str:
    """Hash of the base model's architecture config, so statistics refuse to load into another model."""
    from .io import fingerprint

    config = getattr(model, "config", None)
    if config is None:
        return "none"
    d = config.to_dict()
    keep = {k: v for k, v in d.items() if k not in {"_name_or_path", "transformers_version", "torch_dtype", "dtype",
                                                  "architectures", "id2label", "label2id", "problem_type",
                                                  "finetuning_task", "_attn_implementation_autoset"}}
    return fingerprint(keep)
