"""Fine-tune one LoRA adapter on one task with `transformers.Trainer`, and save it atomically.

The adapter starts from a registered init (`osrm_lora.inits`, with its typed options): PEFT's (``kaiming``, the
default, and ``gaussian``), OSRM's subspace of the other tasks' inputs (``osrm``, ``osrm-mean``,
``osrm-official``), the data-free controls (``random-orthonormal``, ``task-orthogonal``), PEFT's PiSSA/OLoRA, or a
training mode beyond the paper (``osrm-reg``, ``osrm-contrast``, ``osrm-project``: docs/modes.md).
Training is plain `Trainer`, so it runs unchanged on several GPUs::

    torchrun --nproc_per_node 4 -m osrm_lora.cli train ...
    accelerate launch -m osrm_lora.cli train ...

(`batch_size` is per process; statistics and subspaces are computed beforehand, once.)

Output: ``output_dir/`` holds the PEFT adapter (``adapter_config.json``, ``adapter_model.safetensors``, with
the task head inside as a module-to-save, since heads stay per task after merging), the tokenizer files
and ``osrm_lora.json`` (task, init, subspace fingerprint, seed, settings, dev metrics, timings, base model
and its config hash, versions). Training runs in ``output_dir.partial/`` with Trainer checkpoints and the
final folder appears in one rename, so an interrupted run leaves no ``output_dir``; ``resume=True``
continues from the partial folder's last complete checkpoint (`checkpoints`; the last two are kept).

PiSSA and OLoRA subtract the adapter's initial product from the base weights, so their trained adapter is
only valid on that modified base, never on the shared base that merging needs. The adapter is therefore
saved through PEFT's conversion as a standard LoRA of rank 2r, ``ΔW = BA − B₀A₀``, on the unmodified base.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import json
import logging
import math
import os
import shutil
import statistics
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from peft import LoraConfig, TaskType, get_peft_model, get_peft_model_state_dict
from transformers import (
    PrinterCallback,
    Trainer,
    TrainerCallback,
    TrainingArguments,
    set_seed,
)
from transformers.pytorch_utils import Conv1D

from . import __version__
from .adapters import METADATA_NAME, lora_scale
from .checkpoints import KEEP, resumable_checkpoint
from .errors import TrainingError
from .identity import ModelIdentity, check_same_model
from .inits import InitContext, InitOptions, InitSpec, get_init, list_inits
from .inits.hooks import TrainingHook
from .io import OutputError, atomic_dir, check_output, load_tensors, save_tensors, write_json
from .modules import base_name, default_target_modules, find_target_modules, in_out_features
from .moments import TaskMoments, task_moments
from .runtime.models import load_model_and_tokenizer
from .settings import LoraSettings, TrainingSettings
from .stats import StatsMismatchError, TaskStats, model_identity
from .subspace import OFFICIAL, Subspace, SubspaceMismatchError, official_subspaces, subspace_from_others
from .tasks import Task, TaskSpec, compute_metrics, make_collator, tokenize

logger = logging.getLogger(__name__)

METADATA_FORMAT = "osrm-lora/adapter/1"
RUN_NAME = "run.json"
INITIAL_FACTORS = "initial_factors.safetensors"
OUTPUT_KIND = "adapter"  # the io marker kind of a trained adapter folder (as `LoraAdapter.save` writes)
INITIAL_A_NAME = "initial_lora_A.safetensors"  # every adapter's lora_A as its init set it, by module (diagnostics)
_EVAL_BOOKKEEPING = {"runtime", "samples_per_second", "steps_per_second", "epoch"}


@dataclass
class TrainResult:
    """What one fine-tuning run produced; `model` is the trained PEFT model, still in memory."""

    path: Path
    metrics: dict[str, float]  # dev metrics of the saved adapter (empty without a dev split)
    wall_time: float
    train_loss: float
    steps: int
    step_time: float  # median seconds per optimizer step; data loading, evaluation and saving excluded
    metadata: dict[str, Any]
    history: list[dict] = field(default_factory=list)  # the Trainer's log history
    model: Any = None


def _device_name(device: torch.device) -> str:
    """What trained the adapter ("cpu", or the GPU's name): a study records it with each result."""
    return torch.cuda.get_device_name(device) if device.type == "cuda" else device.type


def _resolve_precision(precision: str, cuda: bool) -> str:
    """The concrete precision: bf16/fp16 only on a CUDA GPU (bf16 where it is supported)."""
    if precision == "auto":
        if not cuda:
            return "fp32"
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if precision in ("bf16", "fp16") and not cuda:
        raise TrainingError(f"training.precision={precision!r} needs a CUDA GPU and none is available; "
                         f"use 'auto' or 'fp32'")
    return precision


def _subspace_fingerprint(subspace: Subspace) -> str:
    """Hash of a subspace's bases, so an adapter records exactly which directions it started from."""
    digest = hashlib.sha256()
    for module in sorted(subspace.A):
        basis = subspace.A[module].detach().cpu().float().contiguous()
        digest.update(f"{module}:{tuple(basis.shape)};".encode())
        digest.update(basis.numpy().tobytes())
    return digest.hexdigest()[:16]


def _start_regression_head_at_mean(model: torch.nn.Module, labels: Sequence[float]) -> float | None:
    """Set the bias of the regression head (the model's last 1-output Linear) to the mean training label.

    Targets such as STS-B's 0-5 scores are far from a zero-initialised head's output; Adam moves a bias by about
    one learning rate per step, so a short LoRA run would spend its budget shifting the output instead of
    learning. Returns the bias set, or None when the head has no bias (Llama/GPT-2 `score`)."""
    heads = [m for m in model.modules() if isinstance(m, torch.nn.Linear) and m.out_features == 1]
    if not heads or heads[-1].bias is None or len(labels) == 0:
        return None
    mean = float(statistics.fmean(float(y) for y in labels))
    with torch.no_grad():
        heads[-1].bias.fill_(mean)
    return mean


def _freeze_factor(peft_model, factor: Literal["none", "A", "B"]) -> list[str]:
    """Stop gradients to every `lora_A` (factor "A") or `lora_B` ("B") parameter; returns their names."""
    if factor == "none":
        return []
    frozen = []
    for name, param in peft_model.named_parameters():
        if f".lora_{factor}." in name:
            param.requires_grad_(False)
            frozen.append(name)
    return frozen


def _check_init(init: str, subspace: Subspace | None, other_stats: Sequence[TaskStats] | None,
                options: Mapping[str, Any], own_stats: TaskStats | None = None) -> tuple[InitSpec, InitOptions]:
    """The registered init and its parsed options, with the subspace arguments it takes (those with subspace
    variants need one; the training modes need the other tasks' statistics, and may use a subspace too)."""
    spec = get_init(init)
    parsed = spec.parse(options)
    if spec.needs_moments and not other_stats:
        raise TrainingError(f"init={init!r} needs the other tasks' statistics (other_stats) for their second moments")
    if own_stats is not None and not spec.needs_moments:
        takers = " and ".join(i["name"] for i in list_inits() if i["needs_moments"])
        raise TrainingError(f"init={init!r} uses no statistics of the task itself; own_stats is for {takers}")
    if spec.variants:
        if subspace is None and not other_stats:
            raise TrainingError(f"init={init!r} needs the task's subspace or the other tasks' statistics (other_stats)")
        if subspace is not None and other_stats and not spec.needs_moments:
            raise TrainingError(f"init={init!r}: pass either subspace or other_stats, not both")
    elif subspace is not None or (other_stats and not spec.needs_moments):
        takers = " and ".join(i["name"] for i in list_inits() if i["variants"])
        raise TrainingError(f"init={init!r} uses no subspace; subspace and other_stats are for {takers}")
    return spec, parsed


def _init_subspace(
    spec: InitSpec, task_name: str, subspace: Subspace | None, other_stats: Sequence[TaskStats] | None,
    rank: int, model: ModelIdentity, weighting: str = "equal",
) -> Subspace:
    """The subspace this task's A starts from (computed from `other_stats` in the init's first variant),
    checked against the task, the init's variants and the model."""
    if subspace is None and spec.variants[0] == OFFICIAL:
        subspace = official_subspaces(other_stats, rank, tasks=[task_name])[task_name]
    elif subspace is None:
        subspace = subspace_from_others(task_name, other_stats, rank, variant=spec.variants[0], weighting=weighting)
    if subspace.variant not in spec.variants:
        raise SubspaceMismatchError(
            f"init={spec.name!r} needs a subspace of variant {' or '.join(spec.variants)}, but the subspace "
            f"of task {subspace.task!r} is {subspace.variant!r}"
        )
    if subspace.task != task_name:
        raise SubspaceMismatchError(f"the subspace was computed for task {subspace.task!r}, not for task {task_name!r}")
    check_same_model(subspace.identity(), model, SubspaceMismatchError)
    return subspace


def _init_moments(task_name: str, other_stats: Sequence[TaskStats], own_stats: TaskStats | None, weighting: str,
                  model: ModelIdentity) -> TaskMoments:
    """The task's second moments for a training mode, from statistics of the model being trained."""
    if own_stats is not None and own_stats.task != task_name:
        raise TrainingError(f"own_stats are task {own_stats.task!r}'s statistics, not task {task_name!r}'s")
    for stats in [*other_stats, *([own_stats] if own_stats is not None else [])]:
        check_same_model(stats.identity(), model, StatsMismatchError)
    return task_moments(task_name, other_stats, own_stats, weighting)


def _lora_config(model, lora: LoraSettings, init: InitSpec):
    """PEFT config; SEQ_CLS makes PEFT train and save the head (`classifier`/`score`) with the adapter."""
    targets = lora.target_modules or default_target_modules(model.config.model_type)
    layers = find_target_modules(model, targets)
    for name, layer in layers.items():
        d_in, d_out = in_out_features(layer)
        if lora.r > min(d_in, d_out):  # B·A would have more directions than the weight itself
            raise TrainingError(f"lora.r={lora.r} exceeds module {name}'s size {d_out}×{d_in} (out×in); "
                                f"use r ≤ {min(d_in, d_out)}")
    return LoraConfig(
        task_type=TaskType.SEQ_CLS,
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=targets,
        use_rslora=lora.use_rslora,
        init_lora_weights=init.peft_init,
        fan_in_fan_out=any(isinstance(layer, Conv1D) for layer in layers.values()),  # GPT-2 stores W as in×out
    )


def _metrics_fn(spec: TaskSpec):
    def compute(eval_pred) -> dict[str, float]:
        logits = eval_pred.predictions[0] if isinstance(eval_pred.predictions, tuple) else eval_pred.predictions
        return compute_metrics(spec, logits, eval_pred.label_ids)

    return compute


def _training_arguments(
    training: TrainingSettings, partial: Path, spec: TaskSpec, seed: int, has_dev: bool
) -> tuple[TrainingArguments, str]:
    cuda = torch.cuda.is_available()
    precision = _resolve_precision(training.precision, cuda)
    if training.keep_best and not has_dev:
        raise TrainingError(f"training.keep_best needs a dev split, and task {spec.name!r} has none")
    kwargs: dict[str, Any] = {}
    if training.keep_best:
        # Every task metric (accuracy, F1, MCC, correlations) is better when higher.
        kwargs.update(load_best_model_at_end=True, metric_for_best_model=spec.primary_metric, greater_is_better=True)
    if training.gradient_checkpointing:  # non-reentrant: no input gradients needed with a frozen base
        kwargs.update(activation_checkpointing=True, activation_checkpointing_kwargs={"use_reentrant": False})
    # transformers 5 (pinned in pyproject) always saves safetensors and reads a warmup_steps below 1 as a ratio.
    kwargs["warmup_steps"] = training.warmup_ratio
    args = TrainingArguments(
        output_dir=str(partial),
        learning_rate=training.lr,
        num_train_epochs=training.epochs,
        max_steps=training.max_steps or -1,
        per_device_train_batch_size=training.batch_size,
        per_device_eval_batch_size=training.batch_size,
        gradient_accumulation_steps=training.grad_accum,
        weight_decay=training.weight_decay,
        lr_scheduler_type="linear",
        bf16=precision == "bf16",
        fp16=precision == "fp16",
        eval_strategy="epoch" if training.eval_each_epoch and has_dev else "no",
        save_strategy="steps" if training.save_steps else "epoch",
        save_steps=training.save_steps or 500,
        save_total_limit=KEEP,
        logging_strategy="steps",
        logging_steps=training.logging_steps,
        seed=seed,
        data_seed=seed,
        report_to=[],
        use_cpu=not cuda,
        disable_tqdm=not training.progress,
        **kwargs,
    )
    return args, precision


class _StepTimer(TrainerCallback):
    """Times each optimizer step (forward, backward, update), for comparing inits' cost per step."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self._start = 0.0

    def on_step_begin(self, args, state, control, **kwargs):
        self._start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.times.append(time.perf_counter() - self._start)


def partial_dir(output_dir: Path) -> Path:
    """Where a run trains (its checkpoints) until its adapter is written to `output_dir`."""
    return output_dir.with_name(output_dir.name + ".partial")


def _check_partial(partial: Path) -> None:
    """A new run empties `partial`: refuse unless it is absent, empty, or a run's partial folder (its run.json)."""
    if not os.path.lexists(partial) or (partial / RUN_NAME).is_file():
        return
    if partial.is_dir() and not partial.is_symlink() and not any(partial.iterdir()):
        return
    raise OutputError(f"{partial}: exists and is no interrupted osrm-lora training run (it has no {RUN_NAME}); "
                      f"training keeps its checkpoints there, so move it away first")


def _prepare_partial(partial: Path, run: dict, resume: bool) -> None:
    """Keep the partial folder of an identical interrupted run when resuming; otherwise start it afresh.

    A partial folder left by a run with other settings is stale: continuing it would mix two runs.
    """
    run_file = partial / RUN_NAME
    if resume and run_file.is_file():
        previous = json.loads(run_file.read_text())
        differing = sorted(k for k in run.keys() | previous.keys() if run.get(k) != previous.get(k))
        if not differing:
            return
        logger.warning("not resuming from %s: the interrupted run had a different %s (see %s); starting over",
                       partial, ", ".join(differing), run_file)
    if partial.exists():
        shutil.rmtree(partial)
    partial.mkdir(parents=True)
    write_json(run_file, run)


def _lora_state(peft_model) -> dict[str, torch.Tensor]:
    """Copies of the adapter's lora_A/lora_B tensors, keyed as in PEFT's saved state dict."""
    return {k: v.detach().clone() for k, v in get_peft_model_state_dict(peft_model).items() if ".lora_" in k}


def _initial_lora_A(peft_model) -> dict[str, torch.Tensor]:
    """Copies of the adapter's lora_A by base-model module name: what training starts from (drawn again
    identically on resume, from the same seed)."""
    suffix = ".lora_A.weight"
    return {base_name(k).removesuffix(suffix): v for k, v in _lora_state(peft_model).items() if k.endswith(suffix)}


def _subtract_initial(state: Mapping[str, torch.Tensor], initial: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rewrite a PiSSA/OLoRA adapter as a plain LoRA on the unmodified base, at twice the rank.

    Training saw ``W − s·B₀A₀ + s·BA``, i.e. ``W + s·(BA − B₀A₀) = W + s·[B, −B₀][A; A₀]``. Other tensors
    (the head) pass through unchanged.
    """
    out = dict(state)
    for key, init in initial.items():
        if key.endswith(".lora_A.weight"):
            out[key] = torch.cat([state[key], init.to(state[key])], dim=0)
        elif key.endswith(".lora_B.weight"):
            out[key] = torch.cat([state[key], -init.to(state[key])], dim=1)
    return out


def _save_adapter(peft_model, folder: Path, initial: Mapping[str, torch.Tensor] | None) -> None:
    """PEFT's folder; with `initial`, the converted rank-2r adapter whose alpha keeps the scale unchanged."""
    if initial is None:
        peft_model.save_pretrained(str(folder))
        return
    config = copy.deepcopy(peft_model.peft_config["default"])
    scale = lora_scale(config.lora_alpha, config.r, config.use_rslora)
    config.r *= 2
    config.lora_alpha = scale * (math.sqrt(config.r) if config.use_rslora else config.r)
    config.init_lora_weights = True
    config.inference_mode = True
    config.save_pretrained(str(folder))
    state = _subtract_initial(get_peft_model_state_dict(peft_model), initial)
    save_tensors(folder / "adapter_model.safetensors", state, metadata={"format": "pt"})


def finetune(
    task: Task,
    model_name: str,
    output_dir: str | Path,
    *,
    init: str = "kaiming",
    init_options: Mapping[str, Any] | None = None,
    subspace: Subspace | None = None,
    other_stats: Sequence[TaskStats] | None = None,
    own_stats: TaskStats | None = None,
    weighting: str = "equal",
    tasks: Sequence[str] = (),
    lora: LoraSettings | Mapping[str, Any] | None = None,
    training: TrainingSettings | Mapping[str, Any] | None = None,
    seed: int = 0,
    resume: bool = False,
    trust_remote_code: bool = False,
    callbacks: Sequence[TrainerCallback] = (),
    overwrite: bool = False,
    inputs: Iterable[str | os.PathLike] = (),
) -> TrainResult:
    """Train one LoRA adapter (and the task head) on `task` and write it to `output_dir` atomically.

    `init` is a registered init (`osrm_lora.inits`) and `init_options` its options (e.g. ``{"scale":
    "kaiming"}``). Those starting from a subspace (osrm, osrm-mean, osrm-official) take the task's `subspace`
    (from `subspace.compute_subspaces`, or `official_subspaces` for osrm-official), or compute it here from
    `other_stats`, the statistics of the tasks this adapter must not disturb (for osrm-official, collected by
    `inits.official_tensors.official_stats`). `tasks` are the tasks the adapter will be merged with, in merge
    order (task-orthogonal gives each its own rows). The training modes (osrm-reg, osrm-contrast, osrm-project:
    docs/modes.md) read the other tasks' second moment from `other_stats` (mixed with `weighting`, as the
    subspaces are) and osrm-contrast the task's own from `own_stats`. An existing `output_dir` is
    replaced only once the new adapter is complete, and only when it is a trained adapter, or with `overwrite`;
    never when it is one of `inputs`, the paths the run reads (`io.check_output`). With `resume`, training continues from the last
    checkpoint of an interrupted run with the same settings, if there is one.

    Long because it is one sequence whose order fixes the random draws (head, then adapter) and the
    processes' barriers, kept in one place; each self-contained step is a helper.
    """
    start = time.perf_counter()
    lora = LoraSettings.model_validate(lora or {})
    training = TrainingSettings.model_validate(training or {})
    init_spec, options = _check_init(init, subspace, other_stats, init_options or {}, own_stats)
    spec = task.spec
    output_dir = Path(output_dir)
    inputs = list(inputs)
    check_output(output_dir, OUTPUT_KIND, folder=True, overwrite=overwrite, inputs=inputs)  # now, not after training
    partial = partial_dir(output_dir)
    _check_partial(partial)
    has_dev = task.has_split("dev")
    args, precision = _training_arguments(training, partial, spec, seed, has_dev)

    set_seed(seed)  # the head's and the adapter's random inits
    model, tokenizer = load_model_and_tokenizer(model_name, spec, trust_remote_code=trust_remote_code)
    identity = model_identity(model, "the model being trained", model_name)
    if init_spec.variants:
        subspace = _init_subspace(init_spec, spec.name, subspace, other_stats, lora.r, identity, weighting)
    moments = _init_moments(spec.name, other_stats, own_stats, weighting, identity) if init_spec.needs_moments else None
    if init_spec.mutates_base:
        logger.warning("init=%r trains on a base with the initial adapter subtracted; the adapter is saved "
                       "converted to a rank-%d LoRA on the unmodified base, so it stays mergeable", init, 2 * lora.r)
    with args.main_process_first(desc="tokenize"):
        train_set, dev_set = _tokenized_splits(task, tokenizer, training, seed, has_dev)
    head_bias = _start_regression_head_at_mean(model, train_set["labels"]) if spec.is_regression else None
    peft_model = get_peft_model(model, _lora_config(model, lora, init_spec))
    hook = init_spec.apply(peft_model, subspace, options, InitContext(spec.name, seed, tuple(tasks), moments))
    initial_A = _initial_lora_A(peft_model)
    if hook is not None:
        hook.prepare(peft_model)
    frozen = _freeze_factor(peft_model, lora.freeze)

    run = {
        "task": spec.name, "base_model": model_name, "config_hash": identity.config_hash,
        "model_digest": identity.digest, "init": init,
        "init_options": options.model_dump(mode="json"), "merged_tasks": list(tasks), "seed": seed,
        "subspace_fingerprint": _subspace_fingerprint(subspace) if subspace is not None else None,
        "lora": lora.model_dump(), "training": training.model_dump(exclude={"progress"}),
    }
    with args.main_process_first(desc="prepare the partial folder", local=False):
        if args.process_index == 0:
            _prepare_partial(partial, run, resume)
        checkpoint = resumable_checkpoint(partial, args.process_index == 0) if resume else None
    initial = (_initial_factors(peft_model, partial, checkpoint, args.process_index == 0)
               if init_spec.mutates_base else None)

    timer = _StepTimer()
    trainer = _trainer(peft_model, args, train_set, dev_set, tokenizer, spec, [timer, *callbacks], hook)
    if not training.progress:  # without progress bars, Trainer prints every log line instead
        trainer.remove_callback(PrinterCallback)
    train_output = trainer.train(resume_from_checkpoint=checkpoint)
    metrics = _dev_metrics(trainer) if dev_set is not None else {}
    if hook is not None:
        hook.export(peft_model)
    peft_model.eval()
    step_time = statistics.median(timer.times) if timer.times else math.nan

    metadata = {
        "format": METADATA_FORMAT,
        **run,
        "task_spec": spec.to_dict(),
        "subspace": _subspace_record(subspace),
        "tokenizer": model_name,
        "target_modules": sorted(peft_model.peft_config["default"].target_modules),
        "frozen_parameters": frozen,
        "regression_head_bias_init": head_bias,
        "saved_rank": 2 * lora.r if init_spec.mutates_base else lora.r,
        "precision": precision,
        "device": _device_name(args.device),
        "world_size": args.world_size,
        "dev_metrics": metrics,
        "train_loss": float(train_output.training_loss),
        "steps": int(trainer.state.global_step),
        "train_step_time_s": step_time if timer.times else None,
        "resumed_from": Path(checkpoint).name if checkpoint else None,
        "mode": _mode_record(hook, trainer.state.log_history),
        "versions": _versions(),
    }
    if trainer.is_world_process_zero():
        with atomic_dir(output_dir, OUTPUT_KIND, overwrite=overwrite, inputs=inputs) as tmp:
            _save_adapter(peft_model, tmp, initial)
            save_tensors(tmp / INITIAL_A_NAME, initial_A, metadata={"format": "pt"})
            tokenizer.save_pretrained(str(tmp))
            metadata["wall_time_s"] = time.perf_counter() - start
            write_json(tmp / METADATA_NAME, metadata)
        shutil.rmtree(partial, ignore_errors=True)
    metadata.setdefault("wall_time_s", time.perf_counter() - start)
    trainer.accelerator.wait_for_everyone()
    return TrainResult(
        path=output_dir, metrics=metrics, wall_time=metadata["wall_time_s"], train_loss=metadata["train_loss"],
        steps=metadata["steps"], step_time=step_time, metadata=metadata,
        history=list(trainer.state.log_history), model=peft_model,
    )


def _tokenized_splits(task: Task, tokenizer, training: TrainingSettings, seed: int, has_dev: bool):
    """The tokenized train split and (with one) dev split, each subsampled as the settings say."""
    train_set = tokenize(task.split("train", max_examples=training.max_train_examples, seed=seed),
                         tokenizer, task.spec, max_length=training.max_length)
    dev_set = tokenize(task.split("dev", max_examples=training.max_eval_examples, seed=seed),
                       tokenizer, task.spec, max_length=training.max_length) if has_dev else None
    return train_set, dev_set


def _initial_factors(peft_model, partial: Path, checkpoint: str | None, main: bool) -> dict[str, torch.Tensor]:
    """A base-mutating init's initial lora_A/lora_B, saved in the partial folder so a resumed run subtracts
    the factors the interrupted run drew."""
    initial_file = partial / INITIAL_FACTORS
    if checkpoint and initial_file.is_file():
        return load_tensors(initial_file)[0]
    initial = _lora_state(peft_model)
    if main and not checkpoint:
        save_tensors(initial_file, initial, metadata={"format": "pt"})
    return initial


class _ModeTrainer(Trainer):
    """A Trainer whose training loss adds a training mode's term (`TrainingHook.loss`; evaluation losses stay
    the task's) and whose logs show `task_loss` and the mode's values beside the loss."""

    def __init__(self, *args, hook: TrainingHook, **kwargs):
        super().__init__(*args, **kwargs)
        self.hook = hook
        self._task_losses: list[torch.Tensor] = []

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        result = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        if not model.training:
            return result
        loss, outputs = result if return_outputs else (result, None)
        self._task_losses.append(loss.detach().mean())
        extra = self.hook.loss(model)
        if extra is not None:
            loss = loss + extra
        return (loss, outputs) if return_outputs else loss

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs and self._task_losses:  # every process logs the loss together: reduce is safe
            task_loss = self.accelerator.reduce(torch.stack(self._task_losses).mean(), "mean")
            logs.update(task_loss=float(task_loss), **self.hook.logs())
            self._task_losses = []
        super().log(logs, start_time)


def _trainer(peft_model, args: TrainingArguments, train_set, dev_set, tokenizer, spec: TaskSpec,
             callbacks: list[TrainerCallback], hook: TrainingHook | None = None) -> Trainer:
    """The Trainer (a `_ModeTrainer` for a training mode's `hook`), told that the model's loss is a per-batch mean.

    Sequence-classification heads accept `**kwargs` but ignore `num_items_in_batch`. Taking such a loss for a
    sum over the batch's items, transformers ≥ 4.46 would skip the division by `grad_accum` and, with
    `average_tokens_across_devices` (on by default in 5), multiply by the number of processes: the logged
    losses and the gradients before clipping would be grad_accum × N too large.
    """
    trainer = (Trainer if hook is None else functools.partial(_ModeTrainer, hook=hook))(
        model=peft_model,
        args=args,
        train_dataset=train_set,
        eval_dataset=dev_set,
        data_collator=make_collator(tokenizer, spec.is_regression),
        compute_metrics=_metrics_fn(spec),
        callbacks=callbacks,
    )
    trainer.model_accepts_loss_kwargs = False
    return trainer


def _mode_record(hook: TrainingHook | None, history: Sequence[Mapping[str, Any]]) -> dict[str, Any] | None:
    """What the adapter's metadata records of its training mode: the hook's own record and the mode's log (loss,
    task loss and the mode's values at every logging step)."""
    if hook is None:
        return None
    log = [{k: v for k, v in entry.items() if k in ("step", "loss", "task_loss", *hook.logged)}
           for entry in history if "task_loss" in entry]
    return {**hook.metadata(), "log": log}


def _dev_metrics(trainer: Trainer) -> dict[str, float]:
    """The final dev evaluation's metrics, without the Trainer's timing bookkeeping."""
    evaluated = trainer.evaluate()
    return {k.removeprefix("eval_"): float(v) for k, v in evaluated.items()
            if k.removeprefix("eval_") not in _EVAL_BOOKKEEPING}


def _subspace_record(subspace: Subspace | None) -> dict | None:
    if subspace is None:
        return None
    return {
        "task": subspace.task, "variant": subspace.variant, "weighting": subspace.weighting,
        "others": list(subspace.others), "fingerprint": _subspace_fingerprint(subspace),
        "model": subspace.model, "config_hash": subspace.config_hash, "model_digest": subspace.model_digest,
    }


def _versions() -> dict[str, str]:
    import peft
    import transformers

    return {"osrm_lora": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "peft": peft.__version__}
