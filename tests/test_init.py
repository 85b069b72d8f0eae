"""The init registry; osrm_init on tiny PEFT models and project_adapter against dense projections."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from helpers_core import OneLinear, anisotropic_inputs, stats_from_inputs
from peft import LoraConfig, get_peft_model
from transformers import BertConfig, BertForSequenceClassification, GPT2Config, GPT2LMHeadModel

from osrm_lora.adapters import LoraAdapter, LoraFactors
from osrm_lora.inits import (
    InitContext,
    InitOptions,
    InitSpec,
    get_init,
    list_inits,
    osrm_init,
    project_adapter,
)
from osrm_lora.inits import registry as init_registry
from osrm_lora.inits.scales import ScaleOptions, row_scale
from osrm_lora.modules import find_target_modules, in_out_features
from osrm_lora.stats import StatsMismatchError, _model_config_hash
from osrm_lora.subspace import OFFICIAL, VARIANTS, SubspaceMismatchError, compute_subspaces


def tiny_bert() -> BertForSequenceClassification:
    torch.manual_seed(0)
    config = BertConfig(vocab_size=60, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=32, num_labels=3)
    return BertForSequenceClassification(config).eval()


def tiny_gpt2() -> GPT2LMHeadModel:
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(vocab_size=60, n_positions=32, n_embd=16, n_layer=2, n_head=2)).eval()


def subspaces_for(model, targets, rank=4, **options):
    """Synthetic statistics for every target module of `model` (per-layer shared inputs), three tasks."""
    layers = find_target_modules(model, targets)
    stats = []
    for seed, task in enumerate("abc"):
        inputs, by_dim = {}, {}
        for name, layer in layers.items():
            d_in = in_out_features(layer)[0]
            key = (name.rsplit(".", 1)[0], d_in)  # modules of one block see one input
            inputs[name] = by_dim.setdefault(key, anisotropic_inputs(50, d_in, seed + 7 * len(by_dim)))
        stats.append(stats_from_inputs(task, inputs, model="tiny", config_hash=_model_config_hash(model)))
    return compute_subspaces(stats, rank, **options)


def non_lora_params(model) -> dict[str, torch.Tensor]:
    """Base parameters under the names they have in the plain model (PEFT's `base_layer.` removed)."""
    return {
        n.replace("base_model.model.", "").replace(".base_layer", ""): p.detach().clone()
        for n, p in model.named_parameters() if "lora_" not in n
    }


def lora_layers(peft_model):
    return {
        n.replace("base_model.model.", ""): m for n, m in peft_model.named_modules()
        if "default" in getattr(m, "lora_A", {})
    }


INPUT_IDS = torch.randint(0, 60, (3, 9), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("use_rslora,alpha", [(False, 8), (True, 16)])
def test_bert_osrm_init_sets_rows_keeps_base_and_logits(use_rslora, alpha):
    model = tiny_bert()
    subs = subspaces_for(model, ["query", "value"], rank=4)
    base_params = non_lora_params(model)
    with torch.no_grad():
        base_logits = model(INPUT_IDS).logits
    config = LoraConfig(r=4, lora_alpha=alpha, use_rslora=use_rslora, target_modules=["query", "value"],
                        rank_pattern={"layer.1.attention.self.value": 2}, lora_dropout=0.1)
    peft_model = get_peft_model(model, config).eval()
    summary = osrm_init(peft_model, subs["b"])

    layers = lora_layers(peft_model)
    assert len(layers) == 4
    short = "bert.encoder.layer.1.attention.self.value"
    assert summary["ranks"] == {m: (2 if m == short else 4) for m in layers}
    assert summary["zeroed_B"] == [] and summary["task"] == "b"
    for name, layer in layers.items():
        A = layer.lora_A["default"].weight
        r = summary["ranks"][name]
        assert A.shape == (r, 16)
        assert torch.equal(A.detach(), subs["b"].A[name][:r])
        assert torch.count_nonzero(layer.lora_B["default"].weight) == 0
    after = non_lora_params(peft_model)
    assert after.keys() == base_params.keys()
    for n, p in base_params.items():
        assert torch.equal(after[n], p), n
    with torch.no_grad():
        logits = peft_model(INPUT_IDS).logits
    assert torch.equal(logits, base_logits)
    # the adapter is in the forward path: any non-zero B would change the logits
    with torch.no_grad():
        next(iter(layers.values())).lora_B["default"].weight.fill_(0.5)
        assert not torch.allclose(peft_model(INPUT_IDS).logits, base_logits)


def test_gpt2_conv1d_c_attn():
    model = tiny_gpt2()
    subs = subspaces_for(model, ["c_attn"], rank=6)
    base_params = non_lora_params(model)
    with torch.no_grad():
        base_logits = model(INPUT_IDS).logits
    peft_model = get_peft_model(model, LoraConfig(r=5, target_modules=["c_attn"], fan_in_fan_out=True)).eval()
    osrm_init(peft_model, subs["c"])
    layers = lora_layers(peft_model)
    assert sorted(layers) == ["transformer.h.0.attn.c_attn", "transformer.h.1.attn.c_attn"]
    for name, layer in layers.items():
        assert torch.equal(layer.lora_A["default"].weight.detach(), subs["c"].A[name][:5])
        assert layer.lora_B["default"].weight.shape == (48, 5)
    after = non_lora_params(peft_model)
    assert all(torch.equal(after[n], p) for n, p in base_params.items())
    with torch.no_grad():
        assert torch.equal(peft_model(INPUT_IDS).logits, base_logits)


def test_freeze_A_freezes_exactly_lora_A():
    model = tiny_bert()
    subs = subspaces_for(model, ["query", "value"])
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules=["query", "value"]))
    trainable_before = {n for n, p in peft_model.named_parameters() if p.requires_grad}
    osrm_init(peft_model, subs["a"], freeze_A=True)
    trainable_after = {n for n, p in peft_model.named_parameters() if p.requires_grad}
    frozen = trainable_before - trainable_after
    assert frozen == {n for n in trainable_before if ".lora_A." in n}
    assert len(frozen) == 4 and all(".lora_B." in n for n in trainable_after)


def test_non_zero_B_is_zeroed_and_reported():
    model = tiny_bert()
    subs = subspaces_for(model, ["query"])
    with torch.no_grad():
        base_logits = model(INPUT_IDS).logits
    config = LoraConfig(r=4, target_modules=["query"], init_lora_weights=False)
    peft_model = get_peft_model(model, config).eval()
    summary = osrm_init(peft_model, subs["a"])
    assert summary["zeroed_B"] == sorted(lora_layers(peft_model))
    with torch.no_grad():
        assert torch.equal(peft_model(INPUT_IDS).logits, base_logits)


def test_osrm_init_errors_name_the_module():
    model = tiny_bert()
    subs = subspaces_for(model, ["query", "value"], rank=4)
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules=["query", "value"]))

    partial = subspaces_for(tiny_bert(), ["query"], rank=4)["a"]
    missing = r"task 'a' has no module bert\.encoder\.layer\.0\.attention\.self\.value"
    with pytest.raises(SubspaceMismatchError, match=missing):
        osrm_init(peft_model, partial)

    small = subspaces_for(tiny_bert(), ["query", "value"], rank=3)["a"]
    with pytest.raises(SubspaceMismatchError, match=r"module bert\.encoder\.layer\.0\..*rank 4 needs 4 rows"):
        osrm_init(peft_model, small)

    foreign = copy.deepcopy(subs["a"])
    foreign.config_hash = "another-model"
    with pytest.raises(StatsMismatchError, match=r"config_hash another-model.*has config_hash"):
        osrm_init(peft_model, foreign)

    wrong_dim = copy.deepcopy(subs["a"])
    module = "bert.encoder.layer.1.attention.self.query"
    wrong_dim.A[module] = torch.zeros(4, 12)
    with pytest.raises(SubspaceMismatchError, match=rf"module {module}: input dim 12 != the layer's 16"):
        osrm_init(peft_model, wrong_dim)

    with pytest.raises(ValueError, match="no LoRA layer for adapter 'other'"):
        osrm_init(peft_model, subs["a"], adapter_name="other")


@pytest.mark.parametrize("scale,peft_init", [("kaiming", True), ("gaussian", "gaussian")])
def test_scales_match_the_expected_norm_of_peft_baselines(scale, peft_init):
    r, d = 8, 64
    norms = []
    for seed in range(20):
        config = LoraConfig(r=r, target_modules=["proj"], init_lora_weights=peft_init)
        norms.append(get_peft_model(OneLinear(d, 8, seed), config).base_model.model.proj.lora_A["default"].weight)
    expected = {"kaiming": r / 3, "gaussian": d / r}[scale]  # E‖A‖²_F of PEFT's draw (see inits.scales)
    assert np.mean([float(A.square().sum()) for A in norms]) == pytest.approx(expected, rel=0.03)

    model = OneLinear(d, 8)
    stats = [stats_from_inputs(t, {"proj": anisotropic_inputs(80, d, i)}, config_hash=_model_config_hash(model))
             for i, t in enumerate("ab")]
    sub = compute_subspaces(stats, r)["a"]
    plain = osrm_init(get_peft_model(OneLinear(d, 8), LoraConfig(r=r, target_modules=["proj"])), sub)
    peft_model = get_peft_model(model, LoraConfig(r=r, target_modules=["proj"]))
    scaled = osrm_init(peft_model, sub, scale=scale)
    A = peft_model.base_model.model.proj.lora_A["default"].weight.detach()
    assert float(A.double().square().sum()) == pytest.approx(expected, rel=1e-5)  # exactly the expectation
    torch.testing.assert_close(A / row_scale(scale, r, d), sub.A["proj"][:r])  # same directions
    assert scaled["scale"] == scale and scaled["mean_energy"] == plain["mean_energy"]  # energy: the directions'


# --- project_adapter ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def toy_subspaces():
    stats = []
    for seed, task in enumerate("abc"):
        inputs = {"m0": anisotropic_inputs(40, 12, seed), "m1": anisotropic_inputs(40, 8, seed + 5)}
        stats.append(stats_from_inputs(task, inputs))
    orthonormal = compute_subspaces(stats, 5)["a"]
    kaiming = copy.deepcopy(orthonormal)
    kaiming.A = {m: A * row_scale("kaiming", 5, A.shape[1]) for m, A in orthonormal.A.items()}
    return {"orthonormal": orthonormal, "kaiming": kaiming}


def random_adapter(seed: int, A_rows=None) -> LoraAdapter:
    g = torch.Generator().manual_seed(seed)
    shapes = {"m0": (4, 12, 7), "m1": (3, 8, 5)}  # r, in, out
    modules = {}
    for m, (r, d_in, d_out) in shapes.items():
        A = torch.randn(r, d_in, generator=g) if A_rows is None else A_rows[m]
        modules[m] = LoraFactors(A, torch.randn(d_out, r, generator=g), scale=1.5)
    return LoraAdapter(modules=modules, config={"r": 4, "lora_alpha": 6},
                       extra={"head.weight": torch.ones(2)}, name="toy")


def test_project_adapter_matches_dense_projection(toy_subspaces):
    sub = toy_subspaces["orthonormal"]
    adapter = random_adapter(0)
    projected, retained = project_adapter(adapter, sub)
    assert projected.config == adapter.config and projected.extra.keys() == adapter.extra.keys()
    for m, f in adapter.modules.items():
        dense = f.delta().double().numpy()
        P = sub.A[m][: f.rank].double().numpy()
        expected = dense @ P.T @ P
        g = projected.modules[m]
        assert g.rank == f.rank and g.scale == f.scale
        assert torch.equal(g.A, sub.A[m][: f.rank])
        np.testing.assert_allclose(g.delta().double().numpy(), expected, rtol=1e-5, atol=1e-5)
        ratio = np.linalg.norm(expected) ** 2 / np.linalg.norm(dense) ** 2
        assert retained[m] == pytest.approx(ratio, rel=1e-5)
        assert 0 < retained[m] < 1


def test_project_adapter_uses_the_row_space_whatever_the_row_scale(toy_subspaces):
    adapter = random_adapter(1)
    plain, kept_plain = project_adapter(adapter, toy_subspaces["orthonormal"])
    scaled, kept_scaled = project_adapter(adapter, toy_subspaces["kaiming"])
    for m in adapter.modules:
        torch.testing.assert_close(scaled.modules[m].delta(), plain.modules[m].delta(), rtol=1e-5, atol=1e-5)
        assert kept_scaled[m] == pytest.approx(kept_plain[m], rel=1e-6)


def test_adapter_already_in_the_subspace_is_kept(toy_subspaces):
    sub = toy_subspaces["orthonormal"]
    g = torch.Generator().manual_seed(3)
    rows = {m: torch.randn(r, r, generator=g) @ sub.A[m][:r] for m, r in (("m0", 4), ("m1", 3))}
    adapter = random_adapter(2, A_rows=rows)
    projected, retained = project_adapter(adapter, sub)
    for m, f in adapter.modules.items():
        assert retained[m] == pytest.approx(1.0, abs=1e-5)
        torch.testing.assert_close(projected.modules[m].delta(), f.delta(), rtol=1e-4, atol=1e-5)


def test_project_adapter_errors(toy_subspaces):
    sub = toy_subspaces["orthonormal"]
    adapter = random_adapter(0)
    adapter.modules["m2"] = adapter.modules["m1"]
    with pytest.raises(SubspaceMismatchError, match="has no module m2"):
        project_adapter(adapter, sub)
    wide = random_adapter(0)
    wide.modules["m0"] = LoraFactors(torch.randn(6, 12), torch.randn(7, 6), 1.0)
    with pytest.raises(SubspaceMismatchError, match="module m0: LoRA rank 6 needs 6 rows"):
        project_adapter(wide, sub)


def test_registry_declares_each_init():
    assert [i["name"] for i in list_inits()] == [
        "kaiming", "gaussian", "osrm", "osrm-mean", "osrm-official", "random-orthonormal", "task-orthogonal",
        "pissa", "olora", "osrm-reg", "osrm-contrast", "osrm-project",
    ]
    declared = {i["name"]: (i["peft_init"], i["needs_stats"], tuple(i["variants"]), i["mutates_base"])
                for i in list_inits()}
    assert declared == {
        "kaiming": (True, False, (), False),
        "gaussian": ("gaussian", False, (), False),
        "osrm": (True, True, ("cov", "centered"), False),
        "osrm-mean": (True, True, ("mean",), False),
        "osrm-official": ("gaussian", True, ("official",), False),
        "random-orthonormal": (True, False, (), False),
        "task-orthogonal": (True, False, (), False),
        "pissa": ("pissa", False, (), True),
        "olora": ("olora", False, (), True),
        "osrm-reg": (True, True, ("cov", "centered"), False),  # the training modes: tests/test_modes.py
        "osrm-contrast": (True, True, (), False),
        "osrm-project": (True, True, (), False),
    }
    scaled = {"osrm", "osrm-mean", "random-orthonormal", "task-orthogonal"}
    for info in list_inits():
        spec = get_init(info["name"])
        assert spec.summary
        if info["name"] in scaled:
            assert spec.options is ScaleOptions and [o["name"] for o in info["options"]] == ["scale"]
            assert info["options"][0]["default"] == "orthonormal"
        elif info["needs_moments"]:
            assert issubclass(spec.options, ScaleOptions)  # their own options: tests/test_modes.py
        else:
            assert info["options"] == [] and spec.options is InitOptions
        # only variants `compute_subspaces` or `official_subspaces` implement
        assert set(spec.variants) <= {*VARIANTS, OFFICIAL}


def test_subspace_variant_follows_the_init_and_the_configured_variant():
    assert get_init("osrm").subspace_variant("centered") == "centered"
    assert get_init("osrm-mean").subspace_variant("cov") == "mean"
    assert get_init("kaiming").subspace_variant("cov") is None
    assert get_init("osrm-official").subspace_variant("centered") == "official"
    with pytest.raises(ValueError, match="cov or centered, not 'mean'"):
        get_init("osrm").subspace_variant("mean")


def test_registry_errors():
    with pytest.raises(ValueError, match="init 'orsm' is unknown; did you mean osrm.*known inits: gaussian"):
        get_init("orsm")
    with pytest.raises(ValueError, match="already registered"):
        init_registry.register(InitSpec("osrm", "again", peft_init=True))
    with pytest.raises(ValueError, match="set needs_stats"):
        InitSpec("x", "a subspace without statistics", peft_init=True, variants=("cov",))
    with pytest.raises(ValueError, match="init 'kaiming': unknown option 'rank'"):
        get_init("kaiming").parse({"rank": 4})
    with pytest.raises(ValueError, match=r"init 'osrm': unknown option 'scal' \(accepted: scale\)"):
        get_init("osrm").parse({"scal": "kaiming"})
    with pytest.raises(ValueError, match=r"init 'osrm': scale: .*'orthonormal', 'kaiming' or 'gaussian'"):
        get_init("osrm").parse({"scale": "xavier"})
    with pytest.raises(ValueError, match="task 'a': the OSRM inits need the task's subspace"):
        get_init("osrm").apply(None, None, ScaleOptions(), InitContext("a"))
