"""Which base model a file belongs to, by content rather than by the path text it was loaded from.

A model's digest hashes its config (without path and version fields), every weight tensor's name, dtype and
shape (from the safetensors headers, across shards), and a fixed handful of each tensor's values. The same
model under `/abs/path` and `rel/path`, re-sharded or re-downloaded, has one digest; other weights under the
same path text have another. Statistics, subspaces, trained adapters and pipeline caches record it, and
`check_same_model` compares it wherever two of them meet. Files written before digests existed carry none:
they are compared by config hash, as before, with a warning when they are read.

Reading files only (no torch): headers are parsed and the sampled values read as raw bytes, so every dtype
(bf16, fp8, ...) is sampled alike and a 70B checkpoint costs a few thousand small reads.
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import struct
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from .errors import ModelError, OsrmLoraError
from .io import fingerprint

# Config fields that say nothing about the weights: where they were loaded from, with which version, and the
# task head a loader sizes afresh. `stats._model_config_hash` leaves out the same ones.
CONFIG_IGNORED = frozenset({
    "_name_or_path", "transformers_version", "torch_dtype", "dtype", "architectures", "id2label", "label2id",
    "problem_type", "finetuning_task", "_attn_implementation_autoset",
})
SAMPLES_PER_TENSOR = 8
MAX_HEADER = 100 << 20  # safetensors' own limit on the JSON header
SAFE_INDEX, SAFE_WEIGHTS = "model.safetensors.index.json", "model.safetensors"
PICKLE_INDEX, PICKLE_WEIGHTS = "pytorch_model.bin.index.json", "pytorch_model.bin"
HUB_PATTERNS = (["config.json", "*.safetensors", SAFE_INDEX], ["config.json", "*.bin", PICKLE_INDEX])
MISMATCH_HINT = "--allow-model-mismatch (in Python: identity.allow_model_mismatch()) uses them together anyway"

_ALLOWED: contextvars.ContextVar[bool] = contextvars.ContextVar("allow_model_mismatch", default=False)


class ModelMismatchError(OsrmLoraError):
    """Two inputs of one command that come from different base models."""


@dataclass(frozen=True)
class ModelIdentity:
    """The base model an object records: `name` as written (for messages), its config hash and its content
    `digest` ("" when unknown: an in-memory model, or a file from before digests). `source` says whose it is."""

    name: str
    config_hash: str
    digest: str = ""
    source: str = "the model"


def check_same_model(first: ModelIdentity, second: ModelIdentity, error: type[Exception] = ModelMismatchError) -> None:
    """Refuse two different base models: by digest when both record one, else by config hash. Inside
    `allow_model_mismatch()` a mismatch is a warning instead."""
    if first.digest and second.digest:
        if first.digest == second.digest:
            return
        problem = (f"{first.source} is on model {first.name!r} (digest {first.digest}), but {second.source} is on "
                   f"model {second.name!r} (digest {second.digest}): not the same base model")
    elif first.config_hash == second.config_hash:
        return
    else:
        problem = (f"{first.source} is on model {first.name!r} (config_hash {first.config_hash}), but "
                   f"{second.source} has config_hash {second.config_hash} (model {second.name!r})")
    if _ALLOWED.get():
        warnings.warn(f"{problem}; used together anyway (model mismatch allowed)", stacklevel=2)
        return
    raise error(f"{problem}; {MISMATCH_HINT}")


@contextlib.contextmanager
def allow_model_mismatch(allowed: bool = True) -> Iterator[None]:
    """Within the block, `check_same_model` warns instead of refusing (the CLI's --allow-model-mismatch): one
    switch for every comparison a command makes, however deep in the library it happens."""
    token = _ALLOWED.set(allowed)
    try:
        yield
    finally:
        _ALLOWED.reset(token)


def warn_without_digest(path: object, kind: str) -> None:
    """A file from before digests: say that its base model is only checked by config hash."""
    warnings.warn(f"{path}: {kind} written without a model digest (an older osrm-lora); its base model is "
                  f"checked by config hash only", stacklevel=3)


def model_digest(name: str) -> str:
    """The content digest of a model given as a folder, `builtin:<key>` or a Hub id; "" when its files cannot
    be found (an unknown name, a Hub model neither cached nor reachable)."""
    folder = _local_folder(name) if name else None
    if folder is None:
        return ""
    files = _weight_files(folder)
    if not files:
        return ""
    signature = tuple((f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in [folder / "config.json", *files])
    return _folder_digest(str(folder.resolve()), signature)


@lru_cache(maxsize=32)
def _folder_digest(folder: str, signature: tuple) -> str:
    """Cached on the files' names, sizes and modification times (`signature`), so a changed file re-hashes."""
    path = Path(folder)
    try:
        config = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ModelError(f"{path / 'config.json'}: not a readable model config ({exc})") from None
    tensors: dict[str, list] = {}
    for name, *_ in signature[1:]:
        file = path / name
        tensors.update(_safetensors_entries(file) if file.suffix == ".safetensors" else _byte_samples(file))
    kept = {k: v for k, v in config.items() if k not in CONFIG_IGNORED} if isinstance(config, dict) else config
    return fingerprint({"config": kept, "tensors": sorted(tensors.items())})


def _local_folder(name: str) -> Path | None:
    """The folder holding the model's files: as given, the built-in model's cache, or the Hub snapshot."""
    from .tasks import resolve_model_path

    path = Path(resolve_model_path(str(name), progress=False)).expanduser()
    if (path / "config.json").is_file():
        return path
    if path.exists() or str(name).startswith((".", "/", "~")) or str(name).count("/") > 1:
        return None
    return _hub_snapshot(str(name))


def _hub_snapshot(repo_id: str) -> Path | None:
    """The cached snapshot of a Hub model with its weights, fetched (config and weights only) if missing."""
    from huggingface_hub import snapshot_download

    for local in (True, False):
        for patterns in HUB_PATTERNS:
            try:
                folder = Path(snapshot_download(repo_id, allow_patterns=patterns, local_files_only=local))
            except (OSError, ValueError):
                continue
            if (folder / "config.json").is_file() and _weight_files(folder):
                return folder
    return None


def _weight_files(folder: Path) -> list[Path]:
    """The weight files transformers would load: safetensors first (sharded or not), else pickles."""
    for index, single in ((SAFE_INDEX, SAFE_WEIGHTS), (PICKLE_INDEX, PICKLE_WEIGHTS)):
        if (folder / index).is_file():
            try:
                shards = sorted(set(json.loads((folder / index).read_text(encoding="utf-8"))["weight_map"].values()))
            except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
                raise ModelError(f"{folder / index}: not a readable weight index ({exc!r})") from None
            return [folder / s for s in shards if (folder / s).is_file()]
        if (folder / single).is_file():
            return [folder / single]
    return []


def _safetensors_entries(file: Path) -> dict[str, list]:
    """name -> [dtype, shape, sampled bytes] for every tensor of a safetensors file (header + raw reads)."""
    try:
        with open(file, "rb") as f:
            (size,) = struct.unpack("<Q", f.read(8))
            if size > MAX_HEADER:
                raise ValueError(f"header of {size} bytes")
            header = json.loads(f.read(size))
            start = 8 + size
            entries = {}
            for name, info in header.items():
                if name == "__metadata__":
                    continue
                begin, end = info["data_offsets"]
                entries[name] = [info["dtype"], info["shape"], _sampled(f, start + begin, end - begin, info["shape"])]
    except (OSError, ValueError, KeyError, TypeError, struct.error) as exc:
        raise ModelError(f"{file}: not a readable safetensors file ({exc!r})") from None
    return entries


def _sampled(f, offset: int, nbytes: int, shape: list[int]) -> str:
    """Hex of SAMPLES_PER_TENSOR evenly spaced elements (first and last included) of one tensor's data."""
    count = 1
    for n in shape:
        count *= n
    if count == 0:
        return ""
    item = nbytes // count
    picks = sorted({(i * (count - 1)) // max(SAMPLES_PER_TENSOR - 1, 1) for i in range(SAMPLES_PER_TENSOR)})
    out = bytearray()
    for index in picks:
        f.seek(offset + index * item)
        out += f.read(item)
    return out.hex()


def _byte_samples(file: Path) -> dict[str, list]:
    """A pickled weights file has no header to read without unpickling: its size and evenly spaced bytes."""
    size = file.stat().st_size
    chunks = []
    with open(file, "rb") as f:
        for i in range(16):
            f.seek(i * max(size - 64, 0) // 15)
            chunks.append(f.read(64).hex())
    return {file.name: [size, chunks]}
