"""Merged updates in real (tiny) models: applied in memory, saved as models and as PEFT adapters."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from helpers_merge import random_adapters, tiny_bert, token_batch, trained_like_peft_bert
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForSequenceClassification, GPT2Config, GPT2LMHeadModel

from osrm_lora.adapters import LoraAdapter, LoraFactors
from osrm_lora.evaluate import EvaluationModel
from osrm_lora.merge import (
    apply_to_model,
    get_method,
    load_head,
    merge_adapters,
    save_adapter,
    save_merged_model,
    to_adapter,
    truncate_dense,
    truncate_factors,
)
from osrm_lora.runtime.weights import target_weights, task_head


@pytest.fixture(scope="module")
def saved_adapters(tmp_path_factory):
    """Two PEFT BERT adapters (rank 4 and 2) saved to disk, plus their PEFT models."""
    root = tmp_path_factory.mktemp("adapters")
    models, paths = {}, {}
    for name, seed, rank in (("sst", 1, 4), ("rte", 2, 2)):
        model = trained_like_peft_bert(seed, rank=rank)
        model.save_pretrained(root / name)
        models[name], paths[name] = model, root / name
    return models, paths


def logits(model, batch):
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


def test_single_adapter_merge_reproduces_the_peft_model(saved_adapters):
    models, paths = saved_adapters
    batch = token_batch(0)
    merged = merge_adapters([paths["sst"]], "task_arithmetic")
    model = tiny_bert(0)
    written = apply_to_model(model, merged)
    assert len(written) == 4  # query and value of two layers
    assert sorted(load_head(model, merged.adapters["sst"])) == ["classifier.bias", "classifier.weight"]
    torch.testing.assert_close(logits(model, batch), logits(models["sst"], batch), atol=1e-5, rtol=1e-4)


def test_evaluation_model_dresses_and_restores_like_apply_to_model(saved_adapters):
    """The evaluator's W0 + ΔW and head swap give the PEFT model's logits; restore gives back the base model."""
    models, paths = saved_adapters
    model = tiny_bert(0)
    before = {n: p.clone() for n, p in model.state_dict().items()}
    evaluator = EvaluationModel(model, tokenizer=None, name="tiny")
    batch = token_batch(0)
    for name in ("sst", "rte", "sst"):  # re-dressing never adds an update twice
        adapter = LoraAdapter.load(paths[name])
        dressed = evaluator.apply(adapter.deltas(), task_head(adapter), source=f"adapter {name}")
        torch.testing.assert_close(logits(dressed, batch), logits(models[name], batch), atol=1e-5, rtol=1e-4)
    evaluator.restore()
    assert all(torch.equal(p, before[n]) for n, p in model.state_dict().items())
    wrong = {"bert.encoder.layer.0.attention.self.query": torch.zeros(3, 3)}
    with pytest.raises(ValueError, match=r"adapter x: module bert\.encoder\.layer\.0\.attention\.self\.query: update"):
        evaluator.apply(wrong, {}, source="adapter x")
    with pytest.raises(ValueError, match=r"adapter x: module nope: no linear layer"):
        evaluator.apply({"nope": torch.zeros(3, 3)}, {}, source="adapter x")


def test_gpt2_conv1d_weights_get_the_transposed_update():
    torch.manual_seed(0)
    base = GPT2LMHeadModel(GPT2Config(vocab_size=50, n_embd=16, n_layer=2, n_head=2, n_positions=32)).eval()
    peft = get_peft_model(copy.deepcopy(base), LoraConfig(r=3, target_modules=["c_attn"], fan_in_fan_out=True))
    with torch.no_grad():
        for name, p in peft.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.3)
    state = {k.replace(".default", ""): v for k, v in peft.state_dict().items() if "lora_" in k}
    adapter = LoraAdapter.from_state_dict(state, peft.peft_config["default"].to_dict(), name="gpt")
    apply_to_model(base, merge_adapters([adapter], "task_arithmetic"))
    ids = torch.randint(0, 50, (2, 6), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(base(ids).logits, peft.eval()(ids).logits, atol=1e-5, rtol=1e-4)


def test_base_weights_let_merges_be_reapplied(saved_adapters):
    _, paths = saved_adapters
    model = tiny_bert(0)
    merged = merge_adapters(list(paths.values()), "task_arithmetic")
    base = target_weights(model, merged.modules)
    apply_to_model(model, merged, base_weights=base)
    once = {n: w.clone() for n, w in target_weights(model, merged.modules).items()}
    apply_to_model(model, merged, base_weights=base)  # not added twice
    for n, w in target_weights(model, merged.modules).items():
        torch.testing.assert_close(w, once[n])


def test_emr_applies_the_tasks_own_modulated_update(saved_adapters):
    _, paths = saved_adapters
    merged = merge_adapters(list(paths.values()), "emr")
    model = tiny_bert(0)
    with pytest.raises(ValueError, match="pass the task"):
        apply_to_model(model, merged)
    base = target_weights(model, merged.modules)
    apply_to_model(model, merged, "rte", base_weights=base)
    for m in merged:
        expected = base[m.name] + m.task_scales["rte"] * m.task_masks["rte"] * m.delta
        torch.testing.assert_close(target_weights(model, [m.name])[m.name], expected)


def test_exact_task_arithmetic_adapter_loads_in_peft(saved_adapters, tmp_path):
    _, paths = saved_adapters
    merged = merge_adapters(list(paths.values()), "task_arithmetic", weights=[0.7, 0.4])
    export = save_adapter(merged, tmp_path / "ta", heads_from="rte")
    assert export.exact and export.discarded_fraction == 0.0
    assert {f.rank for f in export.adapter.modules.values()} == {6}
    loaded = PeftModel.from_pretrained(tiny_bert(0), tmp_path / "ta").eval()
    reference = tiny_bert(0)
    apply_to_model(reference, merged)
    load_head(reference, merged.adapters["rte"])
    batch = token_batch(3)
    torch.testing.assert_close(logits(loaded, batch), logits(reference, batch), atol=1e-5, rtol=1e-4)


def test_dense_merge_needs_a_rank_and_saves_its_truncation(saved_adapters, tmp_path):
    _, paths = saved_adapters
    merged = merge_adapters(list(paths.values()), "ties", density=0.5)
    with pytest.raises(ValueError, match="pass rank="):
        to_adapter(merged)
    export = save_adapter(merged, tmp_path / "ties", rank=3)
    assert not export.exact and 0.0 < export.discarded_fraction < 1.0
    loaded = PeftModel.from_pretrained(tiny_bert(0), tmp_path / "ties")
    for m in merged:
        layer = loaded.base_model.model.get_submodule(m.name)
        peft_delta = layer.get_delta_weight("default")
        U, S, Vh = torch.linalg.svd(m.dense().double())
        best = (U[:, :3] * S[:3]) @ Vh[:3]
        torch.testing.assert_close(peft_delta.double(), best, atol=1e-5, rtol=1e-4)
        dropped = float((S[3:] ** 2).sum() / (S**2).sum())
        assert export.module_discarded[m.name] == pytest.approx(dropped, rel=1e-4)


def test_truncation_discarded_energy_is_the_dropped_singular_values():
    g = torch.Generator().manual_seed(0)
    dense = torch.randn(20, 15, generator=g)
    cut = truncate_dense(dense, 4)
    S = np.linalg.svd(dense.double().numpy(), compute_uv=False)
    assert cut.discarded_fraction == pytest.approx(float((S[4:] ** 2).sum() / (S**2).sum()), rel=1e-5)
    factors = LoraFactors(torch.randn(6, 15, generator=g), torch.randn(20, 6, generator=g), 0.5)
    cut = truncate_factors(factors, 2)
    U, S, Vt = np.linalg.svd(factors.delta().double().numpy())
    np.testing.assert_allclose(cut.factors.delta().double().numpy(), (U[:, :2] * S[:2]) @ Vt[:2], atol=1e-4)
    assert cut.discarded_fraction == pytest.approx(float((S[2:] ** 2).sum() / (S**2).sum()), rel=1e-5)


def test_low_rank_merge_truncated_below_its_rank_reports_energy():
    merged = merge_adapters(random_adapters(3), "task_arithmetic")
    export = to_adapter(merged, rank=2)
    assert not export.exact
    dropped = total = 0.0
    for m in merged:
        S = np.linalg.svd(m.dense().double().numpy(), compute_uv=False)
        dropped += (S[2:] ** 2).sum()
        total += (S**2).sum()
    assert export.discarded_fraction == pytest.approx(dropped / total, rel=1e-4)


def test_saved_merged_model_reloads_with_the_same_logits(saved_adapters, tmp_path):
    _, paths = saved_adapters
    merged = merge_adapters(list(paths.values()), "average")
    model = tiny_bert(0)
    save_merged_model(model, merged, tmp_path / "model", heads_from="sst")
    reloaded = AutoModelForSequenceClassification.from_pretrained(tmp_path / "model").eval()
    batch = token_batch(5)
    torch.testing.assert_close(logits(reloaded, batch), logits(model, batch))
    assert (tmp_path / "model" / "merge_info.json").is_file()


def test_failed_saves_leave_nothing(saved_adapters, tmp_path, monkeypatch):
    _, paths = saved_adapters
    merged = merge_adapters(list(paths.values()), "average")
    model = tiny_bert(0)

    def half_save(folder, **kwargs):
        (folder / "config.json").write_text("{}")
        raise OSError("disk full")

    monkeypatch.setattr(model, "save_pretrained", half_save)
    with pytest.raises(OSError, match="disk full"):
        save_merged_model(model, merged, tmp_path / "model")
    spec = get_method("average")
    original, seen = spec.fn, []

    def fail_on_second(inputs, params):
        seen.append(inputs.name)
        if len(seen) == 2:
            raise RuntimeError("boom")
        return original(inputs, params)

    monkeypatch.setattr(spec, "fn", fail_on_second)
    with pytest.raises(RuntimeError, match="boom"):
        save_adapter(merged, tmp_path / "adapter")
    assert list(tmp_path.iterdir()) == []


def test_head_of_another_model_is_refused(saved_adapters):
    _, paths = saved_adapters
    adapter = LoraAdapter.load(paths["sst"])
    model = tiny_bert(0, num_labels=5)
    before = {n: p.clone() for n, p in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"'sst'.*classifier\.(weight|bias)"):
        load_head(model, adapter)
    assert all(torch.equal(p, before[n]) for n, p in model.state_dict().items())
