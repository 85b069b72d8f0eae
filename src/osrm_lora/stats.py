"""Per-task activation statistics of the target modules' inputs.

For each target module we keep the uncentred sums ``Σ x xᵀ`` and ``Σ x`` and the token count over the
task's non-padding tokens. These are all OSRM (and RegMean, and the interference diagnostics) need; they
add across batches, shards and processes, so they are collected once and cached.

Memory: one d×d matrix (plus a d vector) in the accumulation dtype per *group* of modules, where modules fed
the same input tensor (q/k/v of one attention block, gate/up of one MLP) form one group and share one sum.
For a Llama-7B-like model (d = 4096, 32 layers) targeting q/k/v that is 32 × 4096² × 4 bytes = 2 GiB in
float32; ``offload_to_cpu`` keeps those sums in host memory instead of on the accelerator.
"""

from __future__ import annotations

import json
import weakref
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from rich.progress import track

from . import __version__
from .errors import StatsError
from .identity import CONFIG_IGNORED, ModelIdentity, check_same_model, model_digest, warn_without_digest
from .io import OsrmFileError, check_finite, fingerprint, load_tensors, save_tensors
from .modules import find_target_modules, in_out_features

FORMAT = "osrm-lora/task-stats/1"
PSD_TOL = 1e-4  # relative to the trace: float32 sums of many batches stay far above -1e-6·trace


class StatsMismatchError(StatsError):
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
    model_digest: str = ""  # the base model's content digest (`identity`); "" when unknown
    source: str = field(default="", compare=False, repr=False)  # the file it was read from, for messages

    @property
    def modules(self) -> list[str]:
        return sorted(self.second)

    def identity(self, source: str | None = None) -> ModelIdentity:
        """The base model these statistics were collected on; `source` names them in mismatch errors."""
        where = source or (f"statistics {self.source} (task {self.task!r})" if self.source
                           else f"statistics of task {self.task!r}")
        return ModelIdentity(self.model, self.config_hash, self.model_digest, where)

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
            "model_digest": self.model_digest,
            "modules": json.dumps({m: self.dim(m) for m in self.modules}),
            "tokens": str(self.tokens),
            "dtype": str(self.dtype).removeprefix("torch."),
            "version": self.version,
            **{f"extra.{k}": v for k, v in self.extra.items()},
        }

    def check_matches(
        self,
        *,
        model: ModelIdentity | None = None,
        modules: dict[str, int] | None = None,
        source: str = "statistics",
    ) -> None:
        """Refuse statistics collected on another base `model` (`identity.check_same_model`: by content
        digest, else config hash) or on other modules; the error names the field."""
        if model is not None:
            check_same_model(self.identity(), model, StatsMismatchError)
        if modules is not None:
            mine = {m: self.dim(m) for m in self.modules}
            missing = sorted(set(modules) - set(mine))
            if missing:
                raise StatsMismatchError(
                    f"{source} (task {self.task!r}): no statistics for modules {missing[:5]}"
                )
            for m, d in modules.items():
                if mine[m] != d:
                    raise StatsMismatchError(
                        f"{source} (task {self.task!r}), module {m}: input dim {mine[m]} != expected {d}"
                    )

    def combine(self, other: TaskStats) -> TaskStats:
        """Sum of two shards of the same task on the same model and modules."""
        other.check_matches(model=self.identity(), modules={m: self.dim(m) for m in self.modules})
        if other.task != self.task:
            raise StatsMismatchError(f"cannot combine statistics of task {other.task!r} into {self.task!r}")
        shared: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        second, first = {}, {}
        for m in self.modules:
            key = id(self.second[m])
            if key not in shared:
                shared[key] = (self.second[m] + other.second[m], self.first[m] + other.first[m])
            second[m], first[m] = shared[key]
        return TaskStats(
            self.task, self.model, self.config_hash, second, first, self.tokens + other.tokens, self.dtype,
            model_digest=self.model_digest,
        )

    def save(self, path: str | Path, *, overwrite: bool = False, inputs: Iterable[str | Path] = ()) -> None:
        """Atomic safetensors file; modules that share an input share one stored tensor. An existing `path`
        that is no statistics file is replaced only with `overwrite`, an input never (`io.check_output`)."""
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
        save_tensors(path, tensors, meta, overwrite=overwrite, inputs=inputs)

    @classmethod
    def load(cls, path: str | Path) -> TaskStats:
        """Read a statistics file; NaN/Inf, or sums that are no second moment, are refused naming modules."""
        tensors, meta = load_tensors(path, FORMAT, "statistics", finite=False)
        try:
            module_keys = json.loads(meta["storage"])
            dims = json.loads(meta["modules"])
            second = {m: tensors[f"{k}.second"] for m, k in module_keys.items()}
            first = {m: tensors[f"{k}.first"] for m, k in module_keys.items()}
            tokens = int(meta["tokens"])
            identity = {key: meta[key] for key in ("task", "model", "config_hash")}
            dtype = getattr(torch, meta.get("dtype", "float32"))
            if not isinstance(dtype, torch.dtype):
                raise TypeError(f"dtype {meta['dtype']!r}")
        except (KeyError, ValueError, TypeError, AttributeError) as exc:
            raise OsrmFileError(
                f"{path}: statistics file is incomplete ({exc!r} missing or malformed)"
            ) from exc
        if set(dims) != set(module_keys):
            odd = sorted(set(dims) ^ set(module_keys))[:5]
            raise OsrmFileError(f"{path}: module list and stored tensors disagree on {odd}")
        # Re-share tensors of modules that were stored under one key.
        by_key: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        for m, k in module_keys.items():
            second[m], first[m] = by_key.setdefault(k, (second[m], first[m]))
            if second[m].shape != (dims[m], dims[m]) or first[m].shape != (dims[m],):
                raise OsrmFileError(
                    f"{path}: module {m}: stored shape {tuple(second[m].shape)} != dim {dims[m]}"
                )
        _check_sums(second, first, str(path))
        extra = {k.removeprefix("extra."): v for k, v in meta.items() if k.startswith("extra.")}
        if "model_digest" not in meta:
            warn_without_digest(path, "statistics")
        return cls(
            **identity,
            model_digest=meta.get("model_digest", ""),
            source=str(path),
            second=second,
            first=first,
            tokens=tokens,
            dtype=dtype,
            version=meta.get("version", ""),
            extra=extra,
        )


def _shared_by(tensors: dict[str, torch.Tensor]) -> dict[int, list[str]]:
    """Modules by the id of the tensor they share, each list sorted."""
    groups: dict[int, list[str]] = {}
    for m in sorted(tensors):
        groups.setdefault(id(tensors[m]), []).append(m)
    return groups


def _second_moment_problem(second: torch.Tensor, tol: float = PSD_TOL) -> str | None:
    """Why `second` cannot be a sum of x xᵀ, or None: a negative diagonal entry, asymmetry beyond
    `tol`·max diagonal, or an eigenvalue below -`tol`·trace (a negated or corrupted Σ). The PSD test is one
    Cholesky of Σ/trace + tol·I; eigenvalues are computed only to report a failure."""
    work = second if second.dtype in (torch.float32, torch.float64) else second.float()
    tol = max(tol, 10 * torch.finfo(second.dtype).eps)
    diagonal = work.diagonal()
    trace, lowest, highest = float(diagonal.sum()), float(diagonal.min()), float(diagonal.max())
    if lowest < -tol * abs(trace) or trace < 0:
        return f"negative on the diagonal (entry {lowest:.3g}, trace {trace:.3g})"
    asymmetry = float((work - work.T).abs().max())
    if asymmetry > tol * highest:
        return f"not symmetric (max |Σ - Σᵀ| = {asymmetry:.3g}, max diagonal {highest:.3g})"
    if trace == 0:
        return None if not bool(work.any()) else "non-zero off the diagonal of a zero diagonal"
    shifted = work / trace
    shifted.diagonal().add_(tol)
    if int(torch.linalg.cholesky_ex(shifted).info) == 0:
        return None
    least = float(torch.linalg.eigvalsh(work.double()).min())
    return f"not positive semi-definite (eigenvalue {least:.3g} < -{tol:g} × trace {trace:.3g})"


def _check_sums(second: dict[str, torch.Tensor], first: dict[str, torch.Tensor], source: str) -> None:
    """Refuse sums that no inputs could give: NaN/Inf, or a Σ x xᵀ that is no second moment (see
    `_second_moment_problem`). Checked once per shared tensor; the error names `source` and its modules."""
    for modules in _shared_by(second).values():
        where = f"{source}, module{'s' if len(modules) > 1 else ''} {', '.join(modules)}"
        m = modules[0]
        check_finite({"Σ x xᵀ": second[m], "Σ x": first[m]}, where)
        problem = _second_moment_problem(second[m])
        if problem is not None:
            raise StatsError(f"{where}: Σ x xᵀ is {problem}; these are not input statistics")


def _model_config_hash(model) -> str:
    """Hash of the base model's architecture config: what files without a content digest are compared by."""
    config = getattr(model, "config", None)
    if config is None:
        return "none"
    return fingerprint({k: v for k, v in config.to_dict().items() if k not in CONFIG_IGNORED})


def model_identity(model, source: str = "the model", name: str | None = None) -> ModelIdentity:
    """A loaded model's identity: its config hash and the digest of the files it was loaded from
    (`config._name_or_path`, or `name`); no digest for a model built in memory."""
    base = _unwrap_peft(model)
    loaded_from = str(getattr(getattr(base, "config", None), "_name_or_path", "") or "")
    return ModelIdentity(name or loaded_from or type(base).__name__, _model_config_hash(base),
                         model_digest(loaded_from), source)


def _add_input_sums_(
    second: torch.Tensor, first: torch.Tensor, inputs: torch.Tensor, rows: torch.Tensor | None
) -> None:
    """Add Σ x xᵀ and Σ x over the selected rows of `inputs` (…×d) to the running sums, in their dtype.

    One matmul per call: the counted tokens are gathered first, so padding never enters the sums.
    """
    x = inputs.reshape(-1, inputs.shape[-1])
    if rows is not None:
        x = x.index_select(0, rows.to(x.device))
    x = x.to(second.dtype)
    if second.device == x.device:
        second.addmm_(x.T, x)
        first.add_(x.sum(0))
    else:
        second.add_((x.T @ x).to(second.device))
        first.add_(x.sum(0).to(first.device))


def _counted_rows(batch: dict, mask_padding: bool) -> tuple[int, torch.Tensor | None]:
    """(positions in the batch, flat indices of the tokens that count or None for all of them)."""
    mask = batch.get("attention_mask")
    if mask is not None:
        if mask.dim() != 2:
            raise ValueError(f"attention_mask must be batch×sequence, got shape {tuple(mask.shape)}")
        positions = mask.numel()
    elif batch.get("input_ids") is not None:
        positions = batch["input_ids"].numel()
    elif batch.get("inputs_embeds") is not None:
        positions = batch["inputs_embeds"].shape[:-1].numel()
    else:
        raise ValueError(
            f"batch has neither attention_mask, input_ids nor inputs_embeds (keys: {sorted(batch)})"
        )
    if not mask_padding or mask is None:
        return positions, None
    rows = mask.reshape(-1).nonzero().squeeze(1)
    return positions, (None if rows.numel() == positions else rows)


@dataclass
class _Group:
    """Running sums of one input tensor and the modules that receive it."""

    modules: list[str]
    second: torch.Tensor
    first: torch.Tensor


class _InputSums:
    """Forward-pre-hook state: routes each module's input to its group's sums, one batch at a time.

    Modules fed the same tensor object in the first batch form a group and share one accumulation; later
    batches must show the same sharing (checked through weak references, so a freed tensor whose memory
    is reused can never be mistaken for a shared one).
    """

    def __init__(
        self, layers: dict, task: str, dtype: torch.dtype, offload_to_cpu: bool, model_device: torch.device
    ):
        self.task = task
        self.dtype = dtype
        self.offload_to_cpu = offload_to_cpu
        self.model_device = model_device
        self.dims = {name: in_out_features(layer)[0] for name, layer in layers.items()}
        self.groups: list[_Group] = []
        self.group_of: dict[str, int] = {}
        self.tokens = 0
        self.batches = 0
        self._positions = 0
        self._rows: torch.Tensor | None = None
        self._inputs: dict[int, weakref.ref] = {}
        self._fired: list[str] = []

    def start_batch(self, positions: int, rows: torch.Tensor | None) -> None:
        self._positions, self._rows = positions, rows
        self._inputs, self._fired = {}, []

    def observe(self, name: str, inputs: torch.Tensor) -> None:
        where = f"task {self.task!r}, batch {self.batches}, module {name}"
        if name in self._fired:
            raise RuntimeError(
                f"{where}: called more than once in one forward pass; its token count would be wrong"
            )
        self._fired.append(name)
        d = self.dims[name]
        if inputs.shape[-1] != d or inputs.shape[:-1].numel() != self._positions:
            raise StatsError(
                f"{where}: input of shape {tuple(inputs.shape)} is not one {d}-vector per token of the batch "
                f"({self._positions} positions); statistics need per-token inputs"
            )
        group = self._group_to_update(name, inputs)
        if group is not None:
            _add_input_sums_(group.second, group.first, inputs, self._rows)

    def _group_to_update(self, name: str, inputs: torch.Tensor) -> _Group | None:
        """The group whose sums this input goes into, or None when a module sharing it already counted it."""
        same = next((g for g, ref in self._inputs.items() if ref() is inputs), None)
        known = self.group_of.get(name)
        if known is None and same is not None:
            self.group_of[name] = same
            self.groups[same].modules.append(name)
            return None
        if known is None:
            known = self._new_group(name, inputs.device)
        elif same is not None or known in self._inputs:
            if same != known:
                raise RuntimeError(
                    f"task {self.task!r}, batch {self.batches}, module {name}: the modules sharing its input "
                    f"changed since the first batch (were {self.groups[known].modules})"
                )
            return None
        self._inputs[known] = weakref.ref(inputs)
        return self.groups[known]

    def _new_group(self, name: str, device: torch.device) -> int:
        d = self.dims[name]
        device = torch.device("cpu") if self.offload_to_cpu else device
        self.groups.append(
            _Group(
                [name],
                torch.zeros(d, d, dtype=self.dtype, device=device),
                torch.zeros(d, dtype=self.dtype, device=device),
            )
        )
        self.group_of[name] = len(self.groups) - 1
        return self.group_of[name]

    def finish_batch(self) -> None:
        silent = [m for m in self.dims if m not in self._fired]
        if silent:
            raise RuntimeError(
                f"task {self.task!r}, batch {self.batches}: target modules {silent[:5]} received no input "
                "in the forward pass; every target module must see every token"
            )
        for g in dict.fromkeys(self.group_of[name] for name in self._fired):
            group = self.groups[g]
            if not (torch.isfinite(group.second.diagonal()).all() and torch.isfinite(group.first).all()):
                raise FloatingPointError(
                    f"task {self.task!r}, batch {self.batches}: non-finite (NaN/Inf) input activations at "
                    f"module {group.modules[0]} (input shared by {group.modules})"
                )
        self.tokens += self._positions if self._rows is None else int(self._rows.numel())
        self.batches += 1
        self._inputs = {}

    def hooks(self, layers: dict) -> list:
        def make(name):
            def hook(module, args, kwargs):
                self.observe(name, args[0] if args else next(iter(kwargs.values())))

            return hook

        return [
            layer.register_forward_pre_hook(make(name), with_kwargs=True) for name, layer in layers.items()
        ]


def _collective_device(tensor: torch.Tensor) -> torch.device:
    """Where torch.distributed can reduce `tensor`: NCCL needs CUDA, Gloo-only groups need CPU."""
    backend = str(dist.get_backend()).lower()
    if "nccl" in backend and "gloo" not in backend:
        return torch.device("cuda", torch.cuda.current_device())
    if "nccl" not in backend:
        return torch.device("cpu")
    return tensor.device


def _all_reduce_sum_(tensor: torch.Tensor) -> None:
    device = _collective_device(tensor)
    buffer = tensor if tensor.device == device else tensor.to(device)
    dist.all_reduce(buffer, op=dist.ReduceOp.SUM)
    if buffer is not tensor:
        tensor.copy_(buffer)


def _agree_on_groups(sums: _InputSums) -> None:
    """Give every rank the same grouping (a rank with an empty shard has none) and refuse disagreement.

    Each module's group is encoded as 1 + the index of its first member in sorted order (0: no data); one
    MAX-reduction of [code, -code] yields both the largest and the smallest code among ranks that saw data.
    """
    names = sorted(sums.dims)
    index = {m: i for i, m in enumerate(names)}
    code = torch.zeros(len(names), dtype=torch.int64)
    for group in sums.groups:
        leader = min(index[m] for m in group.modules)
        for m in group.modules:
            code[index[m]] = leader + 1
    has_data = bool(sums.groups)
    both = torch.cat([code, -code if has_data else torch.full_like(code, -len(names) - 1)])
    device = _collective_device(both)
    both = both.to(device)
    dist.all_reduce(both, op=dist.ReduceOp.MAX)
    largest, smallest = both[: len(names)].cpu(), -both[len(names) :].cpu()
    if int(largest.min()) == 0:
        raise StatsError(f"task {sums.task!r}: no batches on any of the {dist.get_world_size()} ranks")
    if not torch.equal(largest, smallest):
        odd = [m for m, a, b in zip(names, largest, smallest) if a != b]
        raise RuntimeError(f"task {sums.task!r}: ranks disagree on which modules share an input ({odd[:5]})")
    if not has_data:
        for i, m in enumerate(names):
            leader = names[int(largest[i]) - 1]
            if leader == m:
                sums._new_group(m, sums.model_device)
            else:
                sums.group_of[m] = sums.group_of[leader]
                sums.groups[sums.group_of[m]].modules.append(m)
    order = {m: i for i, m in enumerate(names)}
    sums.groups.sort(key=lambda g: min(order[m] for m in g.modules))
    sums.group_of = {m: i for i, g in enumerate(sums.groups) for m in g.modules}


def _all_reduce(sums: _InputSums) -> None:
    """Sum every group (once, however many modules share it) and the token count over all ranks."""
    _agree_on_groups(sums)
    for group in sums.groups:
        _all_reduce_sum_(group.second)
        _all_reduce_sum_(group.first)
    tokens = torch.tensor([sums.tokens], dtype=torch.int64)
    _all_reduce_sum_(tokens)
    sums.tokens = int(tokens.item())


def _unwrap_peft(model: torch.nn.Module) -> torch.nn.Module:
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _input_device(model: torch.nn.Module) -> torch.device:
    """Where the batch must go: the device of the input embeddings (first parameter as a fallback)."""
    try:
        return model.get_input_embeddings().weight.device
    except (AttributeError, NotImplementedError):
        return next(model.parameters()).device


def collect_stats(
    model: torch.nn.Module,
    batches: Iterable[dict],
    target_modules: str | Sequence[str],
    *,
    task: str = "",
    model_id: str | None = None,
    mask_padding: bool = True,
    dtype: torch.dtype = torch.float32,
    offload_to_cpu: bool = False,
    progress: bool = False,
) -> TaskStats:
    """Σ x xᵀ, Σ x and the token count of every target module's input over `batches`.

    The attention mask decides which tokens count (all of them with ``mask_padding=False``); the `labels`
    key is dropped. The model runs in eval mode without gradients, with its training flags and hooks
    restored whatever happens. Sums are kept in `dtype` on the model's device, or on CPU with
    `offload_to_cpu`; memory is one d×d matrix per group of modules sharing an input (see the module doc).
    Under torch.distributed every rank must call this with its own shard: the result on each rank is the
    all-reduced sum, identical to one process seeing every shard.
    Long because of its many documented keyword arguments; the body (50 lines) is a short sequence of steps.
    """
    base = _unwrap_peft(model)
    config = getattr(base, "config", None)
    if model_id is None:
        model_id = getattr(config, "_name_or_path", type(base).__name__)
    layers = find_target_modules(model, target_modules)
    device = _input_device(model)
    sums = _InputSums(layers, task, dtype, offload_to_cpu, device)

    training = {module: module.training for module in model.modules()}
    handles = sums.hooks(layers)
    try:
        model.eval()
        with torch.no_grad():
            iterator = (
                track(batches, description=f"statistics {task}", transient=True) if progress else batches
            )
            for batch in iterator:
                inputs = {
                    k: v.to(device) if isinstance(v, torch.Tensor) else v
                    for k, v in batch.items()
                    if k != "labels"
                }
                sums.start_batch(*_counted_rows(inputs, mask_padding))
                model(**inputs)
                sums.finish_batch()
    finally:
        for handle in handles:
            handle.remove()
        for module, flag in training.items():
            module.training = flag

    if dist.is_available() and dist.is_initialized():
        _all_reduce(sums)
    elif not sums.groups:
        raise StatsError(f"task {task!r}: no batches to collect statistics from")
    second = {m: sums.groups[g].second for m, g in sums.group_of.items()}
    first = {m: sums.groups[g].first for m, g in sums.group_of.items()}
    _check_sums(second, first, f"statistics of task {task!r}")
    identity = model_identity(base)
    return TaskStats(
        task=task,
        model=model_id,
        config_hash=identity.config_hash,
        model_digest=identity.digest,
        second=second,
        first=first,
        tokens=sums.tokens,
        dtype=dtype,
        extra={"mask_padding": str(mask_padding).lower()},
    )
