"""Diagonal Fisher estimation against a brute-force loop of one backward pass per example."""

from __future__ import annotations

import torch
from helpers_merge import tiny_bert, token_batch, trained_like_peft_bert
from transformers import GPT2Config, GPT2LMHeadModel

from osrm_lora.adapters import LoraAdapter
from osrm_lora.merge import apply_to_model, load_head, merge_adapters
from osrm_lora.modules import find_target_modules, weight_out_in
from osrm_lora.runtime.fisher import estimate_fisher, load_fisher, save_fisher


def brute_force_fisher(model, batches, targets, log_likelihood):
    """Mean over examples of (∂ log p(y|x) / ∂W)², one example and one backward pass at a time."""
    layers = find_target_modules(model, targets)
    for layer in layers.values():
        layer.weight.requires_grad_(True)
    total = {n: torch.zeros_like(weight_out_in(layer)) for n, layer in layers.items()}
    count = 0
    for batch in batches:
        for i in range(batch["input_ids"].shape[0]):
            one = {k: v[i:i + 1] for k, v in batch.items()}
            out = model(input_ids=one["input_ids"], attention_mask=one["attention_mask"]).logits
            grads = torch.autograd.grad(log_likelihood(out, one), [layer.weight for layer in layers.values()])
            for (n, layer), g in zip(layers.items(), grads):
                total[n] += (g.T if g.shape != total[n].shape else g) ** 2
            count += 1
    return {n: t / count for n, t in total.items()}


def classification_ll(logits, batch):
    return torch.log_softmax(logits, -1)[0, batch["labels"][0]]


def test_classifier_fisher_matches_per_example_backward_passes():
    model = tiny_bert(1)
    batches = [token_batch(0), token_batch(1)]
    got = estimate_fisher(model, batches, ["query", "value"], labels="empirical")
    expected = brute_force_fisher(model, batches, ["query", "value"], classification_ll)
    assert set(got) == set(expected) and len(got) == 4
    for n in got:
        torch.testing.assert_close(got[n], expected[n], rtol=1e-4, atol=1e-9)


def test_causal_lm_fisher_on_conv1d_is_out_by_in():
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=30, n_embd=12, n_layer=1, n_head=2, n_positions=16)).eval()
    ids = torch.randint(0, 30, (3, 5), generator=torch.Generator().manual_seed(2))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}

    def next_token_ll(logits, one):
        logp = torch.log_softmax(logits[0, :-1], -1)
        return logp.gather(1, one["input_ids"][0, 1:, None]).sum()

    got = estimate_fisher(model, [batch], ["c_attn"], labels="empirical")
    expected = brute_force_fisher(model, [batch], ["c_attn"], next_token_ll)
    assert got["transformer.h.0.attn.c_attn"].shape == (36, 12)
    torch.testing.assert_close(got["transformer.h.0.attn.c_attn"], expected["transformer.h.0.attn.c_attn"],
                               rtol=1e-4, atol=1e-10)


def test_peft_model_fisher_is_taken_at_the_effective_weight(tmp_path):
    peft = trained_like_peft_bert(3)
    peft.save_pretrained(tmp_path / "a")
    merged_model = tiny_bert(0)
    merged = merge_adapters([LoraAdapter.load(tmp_path / "a")], "task_arithmetic")
    apply_to_model(merged_model, merged)
    load_head(merged_model, merged.adapters["a"])
    batches = [token_batch(4)]
    on_peft = estimate_fisher(peft, batches, ["query", "value"], labels="empirical")
    on_plain = estimate_fisher(merged_model, batches, ["query", "value"], labels="empirical")
    for n in on_peft:
        torch.testing.assert_close(on_peft[n], on_plain[n], rtol=1e-3, atol=1e-9)
    assert not any(p.requires_grad for n, p in peft.named_parameters() if "base_layer" in n)


def test_sampled_fisher_is_seeded_and_round_trips(tmp_path):
    model = tiny_bert(1)
    batches = [token_batch(0)]
    a = estimate_fisher(model, batches, ["query"], seed=5)
    b = estimate_fisher(model, batches, ["query"], seed=5)
    for n in a:
        torch.testing.assert_close(a[n], b[n])
    save_fisher(tmp_path / "f.safetensors", a, task="sst")
    loaded = load_fisher(tmp_path / "f.safetensors")
    for n in a:
        torch.testing.assert_close(loaded[n], a[n])
