"""Scoring a model on a task's evaluation split with the task's own metric on its primary score.

Batches are sorted by length (less padding computed) and run under `torch.inference_mode`; predictions come
back in row order, identical to unsorted batches.

The aggregates over tasks (average, normalised scores) are in `osrm_lora.scores`, which needs no torch.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from .errors import AdapterError, EvaluationError


def predictions_from_logits(logits: torch.Tensor, regression: bool) -> torch.Tensor:
    """Class ids (argmax) or, for a regression head, its single output."""
    return logits[..., 0].float() if regression else logits.argmax(dim=-1)


def _model_device(model: torch.nn.Module) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


@torch.inference_mode()
def predict(
    model: torch.nn.Module,
    batches,
    *,
    regression: bool,
    progress: bool = False,
    description: str = "evaluating",
) -> tuple[list, list]:
    """Run `model` over labelled batches in eval mode; returns (predictions, labels) as Python lists in the
    dataset's row order (batches sorted `by_length` are put back with `restore_order`)."""
    from rich.progress import track

    from .tasks.batching import restore_order

    device = _model_device(model)
    was_training = model.training
    model.eval()
    predictions, labels = [], []
    try:
        iterator = track(batches, description=description, transient=True) if progress else batches
        for batch in iterator:
            batch = dict(batch)
            gold = batch.pop("labels")
            inputs = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
            logits = model(**inputs).logits
            predictions.extend(predictions_from_logits(logits, regression).cpu().tolist())
            labels.extend(gold.tolist())
    finally:
        model.train(was_training)
    return restore_order(predictions, batches), restore_order(labels, batches)


@dataclass
class PartScores:
    """One part of a task's evaluation rows: its metrics and, per row, the prediction and gold label."""

    rows: np.ndarray
    metrics: dict[str, float]
    predictions: list
    labels: list


def evaluate_rows(
    model: torch.nn.Module,
    tokenizer,
    task,
    parts: Mapping[str, Sequence[int]],
    *,
    split: str = "dev",
    batch_size: int = 32,
    max_length: int = 128,
    progress: bool = False,
) -> dict[str, PartScores]:
    """The task's metrics on each named part (row indices of `split`), from one pass over all their rows."""
    from .tasks import compute_metrics, make_dataloader

    spec = task.spec
    union = np.unique(np.concatenate([np.asarray(rows, dtype=np.int64) for rows in parts.values()]))
    if union.size == 0:
        raise EvaluationError(f"task {spec.name!r}: no {split} rows to evaluate on")
    batches = make_dataloader(task.full_split(split).select(union), tokenizer, spec, batch_size=batch_size,
                              max_length=max_length, by_length=True)
    predictions, labels = predict(model, batches, regression=spec.label_names is None, progress=progress,
                                  description=f"eval {spec.name}")
    out = {}
    for name, rows in parts.items():
        rows = np.asarray(rows, dtype=np.int64)
        at = np.searchsorted(union, rows)
        pred, gold = [predictions[i] for i in at], [labels[i] for i in at]
        metrics = {k: float(v) for k, v in compute_metrics(spec, pred, gold).items()}
        out[name] = PartScores(rows, metrics, pred, gold)
    return out


def evaluate_task(
    model: torch.nn.Module,
    tokenizer,
    task,
    *,
    split: str = "dev",
    max_examples: int | None = None,
    batch_size: int = 32,
    max_length: int = 128,
    seed: int = 0,
    progress: bool = False,
) -> dict[str, float]:
    """All of the task's metrics on `split` (first `max_examples` after the task's seeded sampling)."""
    from .tasks import compute_metrics, make_dataloader

    spec = task.spec
    dataset = task.split(split, max_examples=max_examples, seed=seed)
    if len(dataset) == 0:
        raise EvaluationError(f"task {spec.name!r}: split {split!r} has no examples to evaluate on")
    batches = make_dataloader(
        dataset, tokenizer, spec, batch_size=batch_size, max_length=max_length, by_length=True
    )
    predictions, labels = predict(
        model,
        batches,
        regression=spec.label_names is None,
        progress=progress,
        description=f"eval {spec.name}",
    )
    return {k: float(v) for k, v in compute_metrics(spec, predictions, labels).items()}


class EvaluationModel:
    """One base model kept in memory and re-dressed for each evaluation: target weights ``W0 + ΔW``, a head.

    Merged models of many tasks differ only in their target-module updates and their task heads, so loading
    the base once and swapping those is much cheaper than loading a model per task and per merge. The head of
    another task may have another number of labels; its parameters are replaced whole.
    """

    def __init__(self, model: torch.nn.Module, tokenizer, name: str = ""):
        self.model = model
        self.tokenizer = tokenizer
        self.name = name
        self._params = dict(model.named_parameters())
        self._layers: dict[str, torch.nn.Module] = {}  # every target layer dressed so far
        self._base: dict[str, torch.Tensor] = {}  # and its W0 (out×in), kept to restore and re-dress
        self._dressed: set[str] = set()
        self._original_head: dict[str, torch.Tensor] = {}

    @classmethod
    def load(cls, model_name: str, spec, trust_remote_code: bool = False) -> EvaluationModel:
        from .runtime.models import load_model_and_tokenizer

        model, tokenizer = load_model_and_tokenizer(model_name, spec, trust_remote_code=trust_remote_code)
        return cls(model.eval(), tokenizer, model_name)

    def restore(self) -> None:
        """Back to the base weights and the head the model was loaded with."""
        from .modules import weight_out_in

        with torch.no_grad():
            for module in self._dressed:
                weight_out_in(self._layers[module]).copy_(self._base[module])
            for key, value in self._original_head.items():
                self._params[key].data = value
        self._dressed.clear()
        self._original_head.clear()

    def apply(
        self, deltas: dict[str, torch.Tensor], head: dict[str, torch.Tensor], *, source: str = "adapter"
    ):
        """Set each target module to ``W0 + delta`` and the head to `head`; returns the dressed model."""
        from .runtime.weights import linear_layers, target_weights, write_update

        self.restore()
        unknown = sorted(k for k in head if k not in self._params)
        if unknown:
            raise AdapterError(f"{source}: head tensors {unknown[:3]} are not parameters of {self.name!r}")
        new = [m for m in deltas if m not in self._layers]
        self._layers.update(linear_layers(self.model, new, source=f"{source}: "))
        self._base.update(target_weights(self.model, new))
        for module, delta in deltas.items():
            write_update(self._layers[module], delta, self._base[module], where=f"{source}: module {module}")
            self._dressed.add(module)
        with torch.no_grad():
            for key, value in head.items():
                param = self._params[key]
                self._original_head[key] = param.data
                param.data = value.to(device=param.device, dtype=param.dtype).clone()
        return self.model
