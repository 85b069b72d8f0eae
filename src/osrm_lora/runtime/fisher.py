"""Diagonal Fisher information of a fine-tuned model w.r.t. its target linear weights (for Fisher merging).

F = E_x E_{y~p(y|x)} [(∂ log p(y|x) / ∂W)²], estimated entrywise over the samples of `batches` with
per-example gradients. The gradient is taken w.r.t. the layer's *effective* weight W0 + ΔW: on a PeftModel
the gradient of the base layer's output is that of the whole LoRA layer's output, so hooking the base layer
gives exactly ∂/∂(W0 + ΔW). Per-example gradients of a linear layer are Σ_t g_t x_tᵀ over the example's
positions (g: gradient of the layer output, x: its input), so one backward pass per batch suffices.

`labels="sampled"` draws y from the model's own predictive distribution (the true Fisher, as in Matena &
Raffel); `"empirical"` uses the batch's labels (the empirical Fisher). Sequence classification (logits b×C),
regression (b×1, unit-variance Gaussian likelihood) and causal LM (b×t×V, next-token) heads are supported.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Literal

import torch
from torch import nn

from ..errors import StatsError
from ..io import load_tensors, save_tensors
from ..modules import find_target_modules, in_out_features

FORMAT = "osrm-lora/fisher/1"


def _log_likelihood(
    logits: torch.Tensor, batch: Mapping[str, torch.Tensor], labels: str, generator: torch.Generator
) -> torch.Tensor:
    """Σ over the batch of log p(y|x) for sampled or given labels (per-example terms are independent)."""
    if logits.dim() == 2 and logits.shape[-1] == 1:
        prediction = logits[:, 0].float()
        if labels == "sampled":
            noise = torch.randn(prediction.shape, generator=generator, device="cpu").to(prediction.device)
            target = prediction.detach() + noise
        else:
            target = batch["labels"].to(prediction)
        return -0.5 * ((target - prediction) ** 2).sum()
    logp = torch.log_softmax(logits.float(), dim=-1)
    if logits.dim() == 2:
        if labels == "sampled":
            target = torch.multinomial(logp.detach().exp().cpu(), 1, generator=generator)[:, 0].to(logits.device)
        else:
            target = batch["labels"].to(logits.device)
        return logp.gather(1, target[:, None]).sum()
    if logits.dim() == 3:
        logp = logp[:, :-1]
        if labels == "sampled":
            flat = logp.detach().exp().reshape(-1, logp.shape[-1]).cpu()
            target = torch.multinomial(flat, 1, generator=generator).view(logp.shape[:2]).to(logits.device)
            given = batch.get("labels", batch["input_ids"])[:, 1:]
        else:
            target = given = batch.get("labels", batch["input_ids"])[:, 1:].to(logits.device)
        keep = given.to(logits.device) != -100
        if "attention_mask" in batch:
            keep &= batch["attention_mask"][:, 1:].to(logits.device).bool()
        picked = logp.gather(2, target.clamp(min=0)[..., None])[..., 0]
        return (picked * keep).sum()
    raise ValueError(f"cannot estimate a Fisher from logits of shape {tuple(logits.shape)}")


def estimate_fisher(
    model: nn.Module, batches: Iterable[Mapping[str, torch.Tensor]], modules: str | Sequence[str], *,
    labels: Literal["sampled", "empirical"] = "sampled", seed: int = 0,
) -> dict[str, torch.Tensor]:
    """{module: diagonal Fisher (out×in, float32)} averaged over every example of `batches`.

    `model` is the task's fine-tuned model (a PeftModel with the task's adapter, or a merged plain model);
    `modules` uses PEFT's target_modules rules (base-model names).
    """
    if labels not in ("sampled", "empirical"):
        raise ValueError(f"labels must be 'sampled' or 'empirical', got {labels!r}")
    layers = find_target_modules(model, modules)
    device = next(model.parameters()).device
    generator = torch.Generator().manual_seed(seed)
    fisher = {name: torch.zeros(_out_in(layer), dtype=torch.float32, device=device) for name, layer in layers.items()}
    calls: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {name: [] for name in layers}

    def hook(name: str):
        def record(layer, args, output):
            calls[name].append((args[0].detach(), output))
        return record

    was_training = model.training
    grad_flags = {name: layer.weight.requires_grad for name, layer in layers.items()}
    handles = [layer.register_forward_hook(hook(name)) for name, layer in layers.items()]
    samples = 0
    try:
        model.eval()
        for layer in layers.values():
            layer.weight.requires_grad_(True)
        for batch in batches:
            inputs = {k: v.to(device) for k, v in batch.items() if k != "labels" and isinstance(v, torch.Tensor)}
            for c in calls.values():
                c.clear()
            logits = model(**inputs).logits
            log_likelihood = _log_likelihood(logits, batch, labels, generator)
            records = [(name, x, out) for name in layers for x, out in calls[name]]
            grads = torch.autograd.grad(log_likelihood, [out for _, _, out in records], allow_unused=True)
            per_example: dict[str, torch.Tensor] = {}
            for (name, x, _), g in zip(records, grads):
                if g is None:
                    continue
                b = x.shape[0]
                part = torch.einsum("bto,bti->boi", g.reshape(b, -1, g.shape[-1]).float(),
                                    x.reshape(b, -1, x.shape[-1]).float())
                per_example[name] = per_example[name] + part if name in per_example else part
            for name, g in per_example.items():
                fisher[name] += (g**2).sum(dim=0)
            samples += int(logits.shape[0])
    finally:
        for handle in handles:
            handle.remove()
        for name, layer in layers.items():
            layer.weight.requires_grad_(grad_flags[name])
        model.train(was_training)
    if samples == 0:
        raise StatsError("estimate_fisher got no batches")
    return {name: (f / samples).cpu() for name, f in fisher.items()}


def _out_in(layer: nn.Module) -> tuple[int, int]:
    d_in, d_out = in_out_features(layer)
    return d_out, d_in


class FisherDiagonals(dict):
    """{module: diagonal Fisher} as read from a file, with the `task` it records ("" when none), so a merge
    matches it to that task's adapter, and the `source` file for messages."""

    def __init__(self, diagonals: Mapping[str, torch.Tensor], task: str = "", source: str = "") -> None:
        super().__init__(diagonals)
        self.task = task
        self.source = source


def save_fisher(path: str | Path, fisher: Mapping[str, torch.Tensor], *, task: str = "") -> None:
    save_tensors(path, dict(fisher), {"format": FORMAT, "task": task})


def load_fisher(path: str | Path) -> FisherDiagonals:
    tensors, meta = load_tensors(path, FORMAT, "Fisher")
    return FisherDiagonals(tensors, meta.get("task", ""), str(path))
