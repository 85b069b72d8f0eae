"""A merged full model written straight from the base checkpoint's files, for models larger than memory.

`merge_checkpoint_sharded` never builds the model. It reads the base checkpoint's safetensors files one
tensor at a time (with or without ``model.safetensors.index.json``), adds the merged update to each
targeted weight as it passes (computing that one module's merge on demand), copies every other tensor
unchanged, and writes the result as shards of at most `max_shard_size` with Hugging Face's index layout,
plus the base folder's config and tokenizer files and a ``merge_info.json``. Everything goes to a temporary
folder renamed into place at the end, so a failure leaves no output.

Peak host memory ≈ one output shard (≤ `max_shard_size`, or the largest single tensor) + the pages read
from the current input shard (≤ the largest input shard; they are released when it is closed) + one
module's merged update in float32 and that module's per-task inputs + the adapters themselves.

The checkpoint's tensor names may differ from the adapters' module names by a leading prefix on either
side (a ``BertModel`` checkpoint stores ``encoder.layer.0...`` where an adapter trained on
``BertForSequenceClassification`` names ``bert.encoder.layer.0...``): each module matches the one tensor
named ``<module>.weight`` up to such a prefix. GPT-2's Conv1D weights are stored in×out; the adapters'
PEFT ``fan_in_fan_out`` flag (what PEFT itself uses to merge them) says so, and the update is transposed.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from huggingface_hub import StateDictSplit, split_torch_state_dict_into_shards
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from ..errors import MergeError
from ..io import OsrmFileError, atomic_dir, check_output, write_json
from ..runtime.weights import head_parameters
from .apply import MERGED_MODEL
from .engine import AdapterLike, Merged, merge_adapters

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
SHARD_PATTERN = "model{suffix}.safetensors"  # Hugging Face's: model.safetensors or model-0000i-of-0000n...
# Weight files of other formats are never copied: they would hold the unmerged base weights.
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf", ".index.json")


@dataclass(frozen=True)
class TensorEntry:
    """One tensor of a safetensors file, as its header describes it (nothing loaded)."""

    name: str
    file: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    nbytes: int


@dataclass
class ShardedMerge:
    """What `merge_checkpoint_sharded` wrote."""

    path: Path
    files: list[str]  # the weight files, in order
    total_size: int  # bytes of tensor data
    modules: dict[str, str] = field(default_factory=dict)  # merged module -> checkpoint tensor name
    heads: dict[str, str] = field(default_factory=dict)  # adapter head tensor -> checkpoint tensor name


def _read_header(path: Path) -> list[TensorEntry]:
    """The tensors a safetensors file holds, in storage order, from its header alone.

    safetensors itself parses the header; the dtype comes from an empty slice (no data read), so every dtype
    safetensors maps to torch is known without a table of our own. A 0-d tensor is read whole (one value).
    """
    try:
        with safe_open(str(path), framework="pt") as f:
            entries = []
            for name in f.offset_keys():
                view = f.get_slice(name)
                shape = tuple(view.get_shape())
                dtype = (view[:0] if shape else f.get_tensor(name)).dtype
                entries.append(TensorEntry(name, path.name, dtype, shape, math.prod(shape) * dtype.itemsize))
    except (SafetensorError, OSError) as exc:
        raise OsrmFileError(f"{path}: not a readable safetensors file ({exc})") from exc
    return entries


def _checkpoint_layout(base_dir: str | os.PathLike) -> list[TensorEntry]:
    """Every tensor of a Hugging Face safetensors checkpoint folder, file by file in storage order."""
    base = Path(base_dir)
    index_file = base / INDEX_NAME
    if index_file.is_file():
        try:
            weight_map: dict[str, str] = json.loads(index_file.read_text())["weight_map"]
        except (ValueError, KeyError, TypeError) as exc:
            raise OsrmFileError(f"{index_file}: not a safetensors index ({exc!r})") from exc
        entries = []
        for file in sorted(set(weight_map.values())):
            in_file = [e for e in _read_header(base / file) if weight_map.get(e.name) == file]
            missing = sorted({n for n, f in weight_map.items() if f == file} - {e.name for e in in_file})
            if missing:
                raise OsrmFileError(
                    f"{base / file}: lacks tensors the index assigns to it, e.g. {missing[:3]}"
                )
            entries.extend(in_file)
        return entries
    if (base / SINGLE_NAME).is_file():
        return _read_header(base / SINGLE_NAME)
    others = sorted(p.name for p in base.glob("*") if p.name.endswith((".bin", ".pt", ".pth")))
    hint = f" (found {others[:3]}; re-save it with save_pretrained to get safetensors)" if others else ""
    raise OsrmFileError(
        f"{base}: no {SINGLE_NAME} or {INDEX_NAME}; only safetensors checkpoints are read{hint}"
    )


def _match_names(wanted: Sequence[str], names: Sequence[str], what: str) -> dict[str, str]:
    """The checkpoint tensor for each wanted name: the same name with one leading prefix replaced.

    The prefix pair (checkpoint side, adapter side) is found by matching each wanted name's longest tail that
    names exactly one tensor, and taking the pair most names agree on; then every wanted name must exist
    under that pair exactly, so a module missing from the checkpoint is reported rather than matched to
    another layer by its tail. Errors name the first `what` (module, head tensor) without a tensor.
    """
    available = set(names)
    by_suffix: dict[str, list[str]] = {}
    for name in names:
        parts = name.split(".")
        for i in range(len(parts)):
            by_suffix.setdefault(".".join(parts[i:]), []).append(name)
    votes: Counter[tuple[str, str]] = Counter()
    for want in wanted:
        parts = want.split(".")
        for i in range(max(len(parts) - 1, 1)):  # never down to the bare ".weight"
            tail = ".".join(parts[i:])
            candidates = by_suffix.get(tail, [])
            if candidates:
                if len(candidates) == 1:
                    votes[(candidates[0].removesuffix(tail), want.removesuffix(tail))] += 1
                break
    (added, dropped), _ = votes.most_common(1)[0] if votes else (("", ""), 0)
    found = {}
    for want in wanted:
        key = added + want.removeprefix(dropped) if want.startswith(dropped) else want
        if key not in available:
            renamed = (f" (checkpoint names have {added!r} where the adapters have {dropped!r})"
                       if key != want else "")
            raise MergeError(
                f"{what} {want.removesuffix('.weight')}: no tensor {key} in the checkpoint{renamed}"
            )
        found[want] = key
    return found


def _fan_in_fan_out(merged: Merged) -> bool:
    """Whether the targeted weights are stored in×out (GPT-2 Conv1D), as every adapter's PEFT config says."""
    flags = {name: bool(a.config.get("fan_in_fan_out", False)) for name, a in merged.adapters.items()}
    if len(set(flags.values())) > 1:
        raise MergeError(f"adapters disagree on fan_in_fan_out (weights stored in×out): {flags}")
    return next(iter(flags.values()))


def _module_tensors(merged: Merged, layout: Sequence[TensorEntry], transposed: bool) -> dict[str, str]:
    """Merged module -> checkpoint tensor name, with each stored shape checked before anything is written."""
    entries = {e.name: e for e in layout}
    names = _match_names([f"{m}.weight" for m in merged.modules], list(entries), "module")
    reference = next(iter(merged.adapters.values()))
    mapping = {}
    for m in merged.modules:
        key = names[f"{m}.weight"]
        factors = reference.modules[m]
        out_in = (int(factors.B.shape[0]), int(factors.A.shape[1]))
        expected = out_in[::-1] if transposed else out_in
        if entries[key].shape != expected:
            layout_note = "in×out (fan_in_fan_out)" if transposed else "out×in"
            raise MergeError(
                f"module {m}: checkpoint tensor {key} ({entries[key].file}) is {entries[key].shape} but the "
                f"merged update is out×in {out_in}, expected stored {layout_note} as {expected}"
            )
        mapping[m] = key
    return mapping


def _head_tensors(
    merged: Merged, heads_from: str, layout: Sequence[TensorEntry]
) -> dict[str, tuple[str, torch.Tensor]]:
    """Checkpoint tensor name -> (adapter key, the head tensor replacing it), shapes checked."""
    if heads_from not in merged.adapters:
        raise MergeError(f"heads_from={heads_from!r} is not one of the merged adapters {merged.tasks}")
    adapter = merged.adapters[heads_from]
    entries = {e.name: e for e in layout}
    wanted = head_parameters(adapter)
    names = _match_names(list(wanted), list(entries), f"head of adapter {heads_from!r}, tensor")
    heads = {}
    for param, key in wanted.items():
        target, value = names[param], adapter.extra[key]
        if entries[target].shape != tuple(value.shape):
            raise MergeError(
                f"adapter {heads_from!r}: tensor {key} is {tuple(value.shape)} but checkpoint tensor "
                f"{target} is {entries[target].shape}"
            )
        heads[target] = (key, value)
    return heads


def _plan_shards(layout: Sequence[TensorEntry], max_shard_size: int | str) -> StateDictSplit:
    """The shard files, their tensors and the index, as `huggingface_hub` plans a `save_pretrained`
    (consecutive tensors up to `max_shard_size`, a larger tensor alone), from meta tensors of the stored
    shapes and dtypes. `max_shard_size` is bytes or a string such as "2GB" (KB, MB, GB, TB: powers of 10)."""
    if isinstance(max_shard_size, int) and max_shard_size <= 0:
        raise MergeError(f"max_shard_size must be positive, got {max_shard_size!r}")
    meta = {e.name: torch.empty(e.shape, dtype=e.dtype, device="meta") for e in layout}
    try:
        split = split_torch_state_dict_into_shards(meta, filename_pattern=SHARD_PATTERN, max_shard_size=max_shard_size)
    except ValueError as exc:
        raise MergeError(f"max_shard_size={max_shard_size!r}: {exc}") from None
    return split


class _Reader:
    """Reads tensors from a checkpoint's files, keeping only the current file open (and mapped)."""

    def __init__(self, base: Path):
        self.base = base
        self.file: str | None = None
        self._stack = contextlib.ExitStack()
        self._handle = None

    def get(self, entry: TensorEntry) -> torch.Tensor:
        if entry.file != self.file:
            self.close()
            try:
                path = str(self.base / entry.file)
                self._handle = self._stack.enter_context(safe_open(path, framework="pt"))
            except (SafetensorError, OSError) as exc:
                raise OsrmFileError(f"{self.base / entry.file}: cannot open ({exc})") from exc
            self.file = entry.file
        return self._handle.get_tensor(entry.name)

    def close(self) -> None:
        self._stack.close()
        self._stack = contextlib.ExitStack()
        self._handle, self.file = None, None


def _merged_weight(weight: torch.Tensor, delta: torch.Tensor, transposed: bool, module: str) -> torch.Tensor:
    """W0 + ΔW in float32 (float64 stays float64), stored back in W0's dtype and layout."""
    delta = delta.T if transposed else delta
    if tuple(delta.shape) != tuple(weight.shape):
        raise MergeError(
            f"module {module}: merged update {tuple(delta.shape)} does not fit the stored weight "
            f"{tuple(weight.shape)}"
        )
    work = torch.promote_types(weight.dtype, torch.float32)
    return (weight.to(work) + delta.to(device="cpu", dtype=work)).to(weight.dtype).contiguous()


def _write_shards(
    base: Path, out: Path, layout: Sequence[TensorEntry], split: StateDictSplit,
    replace: Callable[[TensorEntry, torch.Tensor], torch.Tensor],
) -> None:
    """Stream the planned shards: each tensor read from the base files, passed through `replace`, and
    written with its shard, one output shard in memory at a time."""
    entries = {e.name: e for e in layout}
    reader = _Reader(base)
    try:
        for file, names in split.filename_to_tensors.items():
            tensors = {name: replace(entries[name], reader.get(entries[name])) for name in names}
            save_file(tensors, str(out / file), metadata={"format": "pt"})
            del tensors
    finally:
        reader.close()


def _copy_side_files(base: Path, out: Path) -> None:
    """Config, generation config, tokenizer and other small files of the base folder (no weights)."""
    for path in sorted(base.iterdir()):
        if path.is_file() and not path.name.endswith(WEIGHT_SUFFIXES) and path.name != "merge_info.json":
            shutil.copy2(path, out / path.name)


def merge_checkpoint_sharded(
    base_dir: str | os.PathLike,
    adapters: Sequence[AdapterLike] | Merged,
    method: str | None,
    out_dir: str | os.PathLike,
    *,
    max_shard_size: int | str = "2GB",
    task: str | None = None,
    heads_from: str | None = None,
    device: str | torch.device | None = None,
    overwrite: bool = False,
    inputs: Iterable[str | os.PathLike] = (),
    **options: Any,
) -> ShardedMerge:
    """Write base checkpoint + merged LoRA updates as a sharded safetensors model folder, tensor by tensor.

    `adapters` are LoraAdapter objects or PEFT folders merged with `method`, `device` and `options` (as in
    `merge_adapters`: the method's per-task inputs such as `stats=` and its hyper-parameters), or an
    existing `Merged` (then `method` is None). `task` picks the task of a per-task (EMR) merge; `heads_from`
    writes that adapter's task head over the checkpoint's. Every module, head and shape is matched against
    the checkpoint's headers before any tensor is read. The output loads with `from_pretrained(out_dir)`.
    `out_dir` is checked before anything is merged (`io.check_output`: an existing folder that is no merged
    model needs `overwrite`; the base checkpoint and `inputs`, the files the merge read, never).
    Long because of its many documented keyword arguments; the body (41 lines) is a short sequence of steps.
    """
    base, out = Path(base_dir), Path(out_dir)
    inputs = [base, *inputs]
    check_output(out, MERGED_MODEL, folder=True, overwrite=overwrite, inputs=inputs)
    if isinstance(adapters, Merged):
        if method is not None or device is not None or options:
            raise MergeError("pass method and its options only with adapters, not with an existing Merged")
        merged = adapters
    else:
        if method is None:
            raise MergeError("give the merge method")
        merged = merge_adapters(adapters, method, device=device, **options)
    if merged.per_task and task not in merged.tasks:
        raise MergeError(f"merge method {merged.method!r} keeps per-task updates: pass task= one of {merged.tasks}"
                         f" (got {task!r})")

    layout = _checkpoint_layout(base)
    transposed = _fan_in_fan_out(merged)
    modules = _module_tensors(merged, layout, transposed)
    module_of = {key: m for m, key in modules.items()}
    heads = _head_tensors(merged, heads_from, layout) if heads_from is not None else {}
    split = _plan_shards(layout, max_shard_size)

    def replace(entry: TensorEntry, tensor: torch.Tensor) -> torch.Tensor:
        if entry.name in module_of:
            m = module_of[entry.name]
            return _merged_weight(tensor, merged.module(m).for_task(task), transposed, m)
        if entry.name in heads:
            return heads[entry.name][1].to(tensor.dtype).contiguous()
        return tensor

    with atomic_dir(out, MERGED_MODEL, overwrite=overwrite, inputs=inputs) as tmp:
        _write_shards(base, tmp, layout, split, replace)
        if split.is_sharded:
            write_json(tmp / INDEX_NAME, {"metadata": split.metadata, "weight_map": split.tensor_to_filename})
        _copy_side_files(base, tmp)
        write_json(tmp / "merge_info.json", {
            **merged.describe(), "task": task, "heads_from": heads_from, "base_checkpoint": str(base),
            "modules": modules, "max_shard_size": max_shard_size,
        })
    return ShardedMerge(out, list(split.filename_to_tensors), split.metadata["total_size"], modules,
                        {key: target for target, (key, _) in heads.items()})
