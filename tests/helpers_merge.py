"""Shared helpers for the merge tests: random LoRA adapters and tiny PEFT models built from configs."""

from __future__ import annotations

import numpy as np
import torch
from peft import LoraConfig, get_peft_model
from transformers import BertConfig, BertForSequenceClassification

from osrm_lora.adapters import LoraAdapter, LoraFactors

SHAPES = {"layer.0.q": (12, 10), "layer.0.v": (12, 10), "layer.1.q": (9, 10)}


def random_adapter(name: str, seed: int, rank: int = 3, shapes=SHAPES, base: str = "toy-base") -> LoraAdapter:
    """An adapter with non-trivial scales (alpha/r differs per task) and ranks that may differ across tasks."""
    g = torch.Generator().manual_seed(seed)
    modules = {}
    for m, (d_out, d_in) in shapes.items():
        A = torch.randn(rank, d_in, generator=g)
        B = torch.randn(d_out, rank, generator=g)
        modules[m] = LoraFactors(A, B, scale=(2.0 * rank + seed) / rank)
    return LoraAdapter(modules, {"base_model_name_or_path": base, "peft_type": "LORA"}, name=name)


def random_adapters(count: int, ranks=(2, 3, 4, 2)) -> list[LoraAdapter]:
    return [random_adapter(f"task{i}", seed=10 + i, rank=ranks[i % len(ranks)]) for i in range(count)]


def dense_deltas(adapters: list[LoraAdapter], module: str) -> list[np.ndarray]:
    """ΔW_i = s_i B_i A_i in float64 numpy, written out independently of LoraFactors.delta."""
    out = []
    for a in adapters:
        f = a.modules[module]
        out.append(f.scale * f.B.double().numpy() @ f.A.double().numpy())
    return out


def tiny_bert(seed: int = 0, num_labels: int = 3) -> BertForSequenceClassification:
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=37, max_position_embeddings=64, num_labels=num_labels)
    return BertForSequenceClassification(config).eval()


def trained_like_peft_bert(seed: int, rank: int = 4, base_seed: int = 0):
    """A PEFT LoRA BERT whose lora_B and classifier are random (as after training) — the model under test."""
    model = get_peft_model(
        tiny_bert(base_seed),
        LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=["query", "value"], modules_to_save=["classifier"]),
    )
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name or "modules_to_save" in name:
                p.copy_(0.3 * torch.randn(p.shape, generator=g))
    return model.eval()


def token_batch(seed: int, batch: int = 4, length: int = 7) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 100, (batch, length), generator=g)
    mask = torch.ones(batch, length, dtype=torch.long)
    mask[0, -2:] = 0
    return {"input_ids": ids, "attention_mask": mask, "labels": torch.randint(0, 3, (batch,), generator=g)}
