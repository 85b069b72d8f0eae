"""Each merge method against an independent reference: dense naive formulas, numpy, or PEFT's merge_utils."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from helpers_core import stats_from_inputs
from helpers_merge import SHAPES, dense_deltas, random_adapter, random_adapters
from peft.utils import merge_utils

from osrm_lora.adapters import LoraAdapter, LoraFactors
from osrm_lora.merge import (
    MergedModule,
    MethodParams,
    get_method,
    list_methods,
    merge_adapters,
    merge_sweep,
    register,
    register_input,
)
from osrm_lora.merge import inputs as merge_inputs
from osrm_lora.merge import registry as merge_registry
from osrm_lora.merge import types as merge_types
from osrm_lora.merge.methods.dare import _module_seed
from osrm_lora.merge.methods.emr import _elect_unified, _rescaler_sums, _rescalers
from osrm_lora.merge.methods.ties import _magnitude_threshold
from osrm_lora.merge.types import ModuleInputs

ATOL = 1e-4


def merged_dense(merged) -> dict[str, np.ndarray]:
    return {m.name: m.dense().double().numpy() for m in merged}


def torch_deltas(adapters, module):
    return [torch.from_numpy(d).float() for d in dense_deltas(adapters, module)]


# --- task arithmetic / average -------------------------------------------------------------------------


def test_task_arithmetic_is_the_weighted_sum_and_exactly_low_rank():
    adapters = random_adapters(3)
    weights, lam = [0.5, -1.0, 2.0], 0.7
    for m in merge_adapters(adapters, "task_arithmetic", weights=weights, scaling=lam):
        expected = lam * sum(w * d for w, d in zip(weights, dense_deltas(adapters, m.name)))
        assert m.factors is not None and m.factors.rank == sum(a.modules[m.name].rank for a in adapters)
        np.testing.assert_allclose(m.dense().double().numpy(), expected, atol=ATOL)
        peft = lam * merge_utils.task_arithmetic(torch_deltas(adapters, m.name), torch.tensor(weights))
        np.testing.assert_allclose(m.dense().numpy(), peft.numpy(), atol=ATOL)


def test_average_is_the_mean():
    adapters = random_adapters(4)
    for name, got in merged_dense(merge_adapters(adapters, "average")).items():
        np.testing.assert_allclose(got, np.mean(dense_deltas(adapters, name), axis=0), atol=ATOL)


# --- TIES / DARE against PEFT ----------------------------------------------------------------------------


@pytest.mark.parametrize("density", [0.2, 0.55])
def test_ties_matches_peft(density):
    adapters = random_adapters(3)
    weights, lam = [1.0, 0.5, 2.0], 1.3
    for m in merge_adapters(adapters, "ties", density=density, weights=weights, scaling=lam):
        ref = merge_utils.ties(torch_deltas(adapters, m.name), torch.tensor(weights), density, "total")
        np.testing.assert_allclose(m.dense().numpy(), lam * ref.numpy(), atol=ATOL)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_magnitude_threshold_is_the_kth_largest_magnitude(dtype):
    g = torch.Generator().manual_seed(3)
    values = torch.randn(5003, generator=g).to(dtype)
    values[::7] = values[1]  # repeated magnitudes, some of them at the cut
    values[::11] = -values[1]
    values[5] = 0.0
    for keep in (1, 2, 700, 2500, 5002, 5003):
        expected = np.sort(np.abs(values.double().numpy()))[::-1][keep - 1]
        assert float(_magnitude_threshold(values, keep)) == expected


def test_ties_row_blocks_match_peft(monkeypatch):
    """Blocks of 2 rows (the last one partial) give the same merge as PEFT's ties on the whole dense updates."""
    adapters = [random_adapter(f"task{i}", seed=20 + i, rank=3, shapes={"m": (13, 10)}) for i in range(3)]
    monkeypatch.setattr(merge_types, "BLOCK_ELEMENTS", 2 * 3 * 10)
    weights, lam = [1.0, -0.5, 2.0], 0.9
    (m,) = merge_adapters(adapters, "ties", density=0.3, weights=weights, scaling=lam)
    ref = merge_utils.ties(torch_deltas(adapters, "m"), torch.tensor(weights), 0.3, "total")
    np.testing.assert_allclose(m.dense().numpy(), lam * ref.numpy(), atol=ATOL)


def test_ties_default_density_is_the_papers():
    assert get_method("ties").parse({}).density == 0.2


@pytest.mark.parametrize("combine, peft_fn", [("linear", merge_utils.dare_linear), ("ties", merge_utils.dare_ties)])
def test_dare_matches_peft_with_the_same_seeded_masks(combine, peft_fn):
    adapters = random_adapters(3)
    weights, p, seed = [1.0, 0.5, 2.0], 0.6, 7
    for m in merge_adapters(adapters, "dare", drop_rate=p, combine=combine, weights=weights, seed=seed):
        torch.manual_seed(_module_seed(seed, m.name))
        ref = peft_fn(torch_deltas(adapters, m.name), torch.tensor(weights), 1 - p)
        np.testing.assert_allclose(m.dense().numpy(), ref.numpy(), atol=ATOL)


def test_dare_is_deterministic_per_seed_and_module():
    adapters = random_adapters(2)
    first = merged_dense(merge_adapters(adapters, "dare", seed=3))
    again = merged_dense(merge_adapters(adapters, "dare", seed=3))
    other = merged_dense(merge_adapters(adapters, "dare", seed=4))
    for name in first:
        np.testing.assert_array_equal(first[name], again[name])
        assert not np.allclose(first[name], other[name])
    # Masks depend on the module, not on the order modules are processed in.
    assert _module_seed(3, "layer.0.q") != _module_seed(3, "layer.0.v")


def test_dare_is_unbiased_over_seeds():
    adapters = random_adapters(2)
    spec = get_method("dare")
    merged = merge_adapters(adapters, "dare")
    inputs = merged.inputs("layer.0.q")
    runs = [spec.fn(inputs, spec.parse({"drop_rate": 0.5, "seed": s})).dense() for s in range(3000)]
    mean = torch.stack(runs).mean(0).double().numpy()
    expected = sum(dense_deltas(adapters, "layer.0.q"))
    assert np.abs(mean - expected).max() < 0.1 * np.abs(expected).max()


# --- Fisher ----------------------------------------------------------------------------------------------


def test_fisher_merge_is_the_fisher_weighted_mean_of_full_weights():
    adapters = random_adapters(3)
    g = torch.Generator().manual_seed(0)
    fishers = [{m: torch.rand(s, generator=g) ** 3 for m, s in SHAPES.items()} for _ in adapters]
    fishers[0]["layer.0.q"][0, :] = 0.0  # below the floor for one task only
    weights, floor = [1.0, 2.0, 0.5], 1e-3
    merged = merged_dense(merge_adapters(adapters, "fisher", fisher=fishers, weights=weights, floor=floor))
    for name, (d_out, d_in) in SHAPES.items():
        W0 = np.random.default_rng(1).normal(size=(d_out, d_in))
        Ws = [W0 + d for d in dense_deltas(adapters, name)]
        Fs = [w * np.maximum(f[name].double().numpy(), floor) for w, f in zip(weights, fishers)]
        W_star = sum(F * W for F, W in zip(Fs, Ws)) / sum(Fs)
        np.testing.assert_allclose(W0 + merged[name], W_star, atol=ATOL)


def test_fisher_with_equal_fishers_is_the_weighted_average():
    adapters = random_adapters(2)
    ones = [{m: torch.ones(s) for m, s in SHAPES.items()} for _ in adapters]
    merged = merged_dense(merge_adapters(adapters, "fisher", fisher={a.name: f for a, f in zip(adapters, ones)}))
    for name, got in merged.items():
        np.testing.assert_allclose(got, np.mean(dense_deltas(adapters, name), axis=0), atol=ATOL)


# --- RegMean ---------------------------------------------------------------------------------------------


def _stats(adapters, seed, rank_deficient=False):
    out = []
    for i, a in enumerate(adapters):
        g = torch.Generator().manual_seed(seed + i)
        x = torch.randn(50, 10, generator=g) * torch.linspace(0.5, 2.0, 10)
        if rank_deficient:
            x[:, -2:] = 0.0  # no task ever feeds the last two input directions
        out.append(stats_from_inputs(a.name, {m: x for m in SHAPES}))
    return out


@pytest.mark.parametrize("alpha", [0.9, 0.5])
def test_regmean_matches_the_closed_form(alpha):
    adapters = random_adapters(3)
    stats = _stats(adapters, seed=5)
    merged = merged_dense(merge_adapters(adapters, "regmean", stats=stats, alpha=alpha, scaling=0.8))
    for name, (d_out, d_in) in SHAPES.items():
        W0 = np.random.default_rng(2).normal(size=(d_out, d_in))
        Gs = []
        for s in stats:
            G = s.second[name].double().numpy()
            Gs.append(alpha * G + (1 - alpha) * np.diag(np.diag(G)))
        Ws = [W0 + d for d in dense_deltas(adapters, name)]
        W_star = sum(W @ G for W, G in zip(Ws, Gs)) @ np.linalg.inv(sum(Gs))
        np.testing.assert_allclose(merged[name], 0.8 * (W_star - W0), atol=ATOL)


def test_regmean_with_identical_grams_is_the_average():
    adapters = random_adapters(3)
    same = _stats(adapters[:1], seed=9)[0]
    merged = merged_dense(merge_adapters(adapters, "regmean", stats={a.name: same for a in adapters}))
    for name, got in merged.items():
        np.testing.assert_allclose(got, np.mean(dense_deltas(adapters, name), axis=0), atol=ATOL)


def test_regmean_singular_grams_use_the_pseudo_inverse():
    adapters = random_adapters(2)
    stats = _stats(adapters, seed=3, rank_deficient=True)
    merged = merged_dense(merge_adapters(adapters, "regmean", stats=stats, alpha=0.9))
    for name in SHAPES:
        Gs = [0.9 * s.second[name].double().numpy() + 0.1 * np.diag(np.diag(s.second[name].double().numpy()))
              for s in stats]
        expected = sum(d @ G for d, G in zip(dense_deltas(adapters, name), Gs)) @ np.linalg.pinv(sum(Gs))
        np.testing.assert_allclose(merged[name], expected, atol=ATOL)
        assert np.abs(merged[name][:, -2:]).max() < 1e-6


# --- KnOTS -----------------------------------------------------------------------------------------------


def _knots_dense_reference(adapters, name, combine, density, weights):
    """SVD of the dense concatenation [ΔW_1 … ΔW_T], truncated to its rank, merged with PEFT's functions."""
    deltas = dense_deltas(adapters, name)
    U, S, Vt = np.linalg.svd(np.concatenate(deltas, axis=1), full_matrices=False)
    k = sum(a.modules[name].rank for a in adapters)
    U, S, Vt = U[:, :k], S[:k], Vt[:k]
    d_in = deltas[0].shape[1]
    blocks = [torch.from_numpy(S[:, None] * Vt[:, i * d_in:(i + 1) * d_in]) for i in range(len(deltas))]
    if combine == "ties":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # PEFT warns that density 1 trims nothing
            merged = merge_utils.ties(blocks, torch.tensor(weights, dtype=torch.float64), density, "total")
    else:
        merged = merge_utils.task_arithmetic(blocks, torch.tensor(weights, dtype=torch.float64))
    return U @ merged.numpy()


@pytest.mark.parametrize("combine, density", [("ties", 1.0), ("ties", 0.4), ("linear", 1.0)])
def test_knots_low_rank_path_equals_the_dense_svd_path(combine, density):
    adapters = random_adapters(3)
    weights = [1.0, 0.5, 1.5]
    merged = merge_adapters(adapters, "knots", combine=combine, density=density, weights=weights)
    for m in merged:
        assert m.factors is not None and m.factors.rank <= sum(a.modules[m.name].rank for a in adapters)
        ref = _knots_dense_reference(adapters, m.name, combine, density, weights)
        np.testing.assert_allclose(m.dense().double().numpy(), ref, atol=ATOL)


def test_knots_linear_is_task_arithmetic():
    adapters = random_adapters(3)
    knots = merged_dense(merge_adapters(adapters, "knots", combine="linear", scaling=0.6))
    ta = merged_dense(merge_adapters(adapters, "task_arithmetic", scaling=0.6))
    for name in knots:
        np.testing.assert_allclose(knots[name], ta[name], atol=ATOL)


def test_knots_of_untrained_adapters_is_a_valid_zero_factorisation():
    adapters = random_adapters(2)
    for a in adapters:
        a.modules = {m: LoraFactors(f.A, torch.zeros_like(f.B), f.scale) for m, f in a.modules.items()}
    for m in merge_adapters(adapters, "knots"):
        assert m.factors.rank >= 1 and torch.count_nonzero(m.dense()) == 0


# --- EMR -------------------------------------------------------------------------------------------------

WORKED = [
    [[1.0, -2.0], [3.0, 0.5]],
    [[2.0, 1.0], [-1.0, -0.5]],
    [[-4.0, 3.0], [2.0, 1.0]],
]


def _identity_adapters(matrices_by_module: dict[str, list]) -> list[LoraAdapter]:
    """Adapters whose ΔW is exactly the given matrix (A = I, B = matrix, scale 1)."""
    count = len(next(iter(matrices_by_module.values())))
    return [
        LoraAdapter({m: LoraFactors(torch.eye(2), torch.tensor(ms[i]), 1.0) for m, ms in matrices_by_module.items()},
                    {"base_model_name_or_path": "toy"}, name=f"t{i}")
        for i in range(count)
    ]


def test_emr_worked_example():
    # Sum = [[-1, 2], [4, 1]] -> elected signs [[-, +], [+, +]]; unified = sign * max agreeing |τ|.
    stacked = torch.tensor(WORKED)
    unified, masks = _elect_unified(stacked)
    torch.testing.assert_close(unified, torch.tensor([[-4.0, 3.0], [3.0, 1.0]]))
    torch.testing.assert_close(masks, torch.tensor([[[0, 0], [1, 1]], [[0, 1], [0, 0]], [[1, 1], [1, 1]]]).bool())
    # λ_1 = (1+2+3+.5)/(3+1), λ_2 = (2+1+1+.5)/3, λ_3 = (4+3+2+1)/(4+3+3+1)
    scales = _rescalers(_rescaler_sums(stacked, unified, masks))
    torch.testing.assert_close(scales, torch.tensor([6.5 / 4, 4.5 / 3, 10 / 11], dtype=torch.float64))
    merged = next(iter(merge_adapters(_identity_adapters({"m": WORKED}), "emr")))
    torch.testing.assert_close(merged.for_task("t1"), 1.5 * torch.tensor([[0.0, 3.0], [0.0, 0.0]]))


def test_emr_model_scope_rescalers_sum_over_modules():
    second = [[[0.5, 0.5], [-1.0, 2.0]], [[-3.0, 1.0], [1.0, 1.0]], [[1.0, 1.0], [1.0, -2.0]]]
    adapters = _identity_adapters({"a": WORKED, "b": second})
    stacks = {"a": torch.tensor(WORKED), "b": torch.tensor(second)}
    sums = sum(_rescaler_sums(s, *_elect_unified(s)) for s in stacks.values())
    expected = _rescalers(sums)
    by_module = {m.name: m for m in merge_adapters(adapters, "emr")}
    for i in range(3):
        assert by_module["a"].task_scales[f"t{i}"] == pytest.approx(float(expected[i]))
        assert by_module["b"].task_scales[f"t{i}"] == pytest.approx(float(expected[i]))
    local = {m.name: m for m in merge_adapters(adapters, "emr", rescale_scope="module")}
    own = _rescalers(_rescaler_sums(stacks["b"], *_elect_unified(stacks["b"])))
    assert local["b"].task_scales["t0"] == pytest.approx(float(own[0]))


@pytest.mark.parametrize("scope", ["model", "module"])
def test_emr_row_blocks_match_the_whole_updates(monkeypatch, scope):
    """Blocks of 2 rows give the unified update, masks and rescalers of the whole stacked updates."""
    shapes = {"m": (13, 10), "n": (7, 10)}
    adapters = [random_adapter(f"task{i}", seed=30 + i, rank=3, shapes=shapes) for i in range(3)]
    monkeypatch.setattr(merge_types, "BLOCK_ELEMENTS", 2 * 3 * 10)
    stacks = {name: torch.from_numpy(np.stack(dense_deltas(adapters, name))).float() for name in shapes}
    whole = {name: _elect_unified(stack) for name, stack in stacks.items()}
    sums = {name: _rescaler_sums(stacks[name], *whole[name]) for name in shapes}
    for m in merge_adapters(adapters, "emr", rescale_scope=scope):
        unified, masks = whole[m.name]
        torch.testing.assert_close(m.delta, unified, atol=ATOL, rtol=0)
        assert all(torch.equal(m.task_masks[a.name], masks[i]) for i, a in enumerate(adapters))
        expected = _rescalers(sum(sums.values()) if scope == "model" else sums[m.name])
        assert [m.task_scales[a.name] for a in adapters] == pytest.approx(expected.tolist(), rel=1e-5)


def test_emr_needs_the_task():
    m = next(iter(merge_adapters(_identity_adapters({"m": WORKED}), "emr")))
    with pytest.raises(ValueError, match="pass the task"):
        m.for_task(None)
    with pytest.raises(ValueError, match="unknown task"):
        m.for_task("nope")


# --- λ sweep, laziness, registry -------------------------------------------------------------------------


@pytest.mark.parametrize("method, kwargs", [("ties", {"density": 0.3}), ("task_arithmetic", {})])
def test_sweep_matches_direct_merges_and_merges_once(method, kwargs, monkeypatch):
    adapters = random_adapters(2)
    spec = get_method(method)
    calls = []
    original = spec.fn
    monkeypatch.setattr(spec, "fn", lambda inputs, params: calls.append(inputs.name) or original(inputs, params))
    lambdas = [0.25, 1.0, 1.7]
    swept = {lam: merged_dense(m) for lam, m in merge_sweep(adapters, method, lambdas, **kwargs)}
    assert len(calls) == len(SHAPES)
    for lam in lambdas:
        direct = merged_dense(merge_adapters(adapters, method, scaling=lam, **kwargs))
        for name in direct:
            np.testing.assert_allclose(swept[lam][name], direct[name], atol=ATOL)


def test_sweep_refuses_methods_without_lambda():
    with pytest.raises(ValueError, match="no global scaling"):
        next(merge_sweep(random_adapters(2), "emr", [1.0]))


def test_merge_is_lazy_module_by_module(monkeypatch):
    spec = get_method("ties")
    calls = []
    original = spec.fn
    monkeypatch.setattr(spec, "fn", lambda inputs, params: calls.append(inputs.name) or original(inputs, params))
    iterator = iter(merge_adapters(random_adapters(2), "ties"))
    assert calls == []
    next(iterator)
    assert calls == ["layer.0.q"]


def test_registry_lists_every_method_with_documented_parameters():
    methods = {m["name"]: m for m in list_methods()}
    assert {"task_arithmetic", "average", "ties", "dare", "fisher", "regmean", "knots", "emr"} <= set(methods)
    for m in methods.values():
        assert m["summary"]
        for p in m["parameters"]:
            assert p["description"], (m["name"], p["name"])
    dare = {p["name"]: p for p in methods["dare"]["parameters"]}
    assert dare["drop_rate"]["default"] == 0.9 and dare["combine"]["default"] == "linear"


def test_unknown_method_and_bad_hyperparameters_are_clear_errors():
    adapters = random_adapters(2)
    with pytest.raises(ValueError, match="did you mean ties"):
        merge_adapters(adapters, "tiess")
    with pytest.raises(ValueError, match="density"):
        merge_adapters(adapters, "ties", density=1.5)
    with pytest.raises(ValueError, match="unknown hyper-parameter 'lambda_'.*accepted: scaling"):
        merge_adapters(adapters, "ties", lambda_=1.0)
    with pytest.raises(ValueError, match="weights has 3 entries but 2 adapters"):
        merge_adapters(adapters, "task_arithmetic", weights=[1, 1, 1])
    with pytest.raises(ValueError, match="needs stats="):
        merge_adapters(adapters, "regmean")
    with pytest.raises(ValueError, match="positive"):
        merge_adapters(adapters, "fisher", fisher=[{}, {}], weights=[1.0, -1.0])


def test_a_registered_input_kind_reaches_the_method_that_requires_it(monkeypatch):
    """Per-task inputs are generic: a new kind is one register_input call, passed to merge_adapters by name."""
    monkeypatch.setattr(merge_inputs, "_KINDS", dict(merge_inputs._KINDS))
    monkeypatch.setattr(merge_registry, "_REGISTRY", dict(merge_registry._REGISTRY))
    with pytest.raises(ValueError, match=r"requires unknown inputs \['mask'\]"):
        register("masked", MethodParams, "masked sum", requires=("mask",))
    register_input("mask", "masks", "{module: out×in 0/1 mask} per adapter", lambda masks, adapter, shapes: masks)

    @register("masked", MethodParams, "Σ_i mask_i ⊙ ΔW_i", requires=("mask",))
    def masked(inputs, params):
        deltas = [m * inputs.delta(t) for t, m in enumerate(inputs.extra("mask"))]
        return MergedModule(inputs.name, delta=sum(deltas))

    class Clashing(MethodParams):
        mask: float = 1.0

    with pytest.raises(ValueError, match=r"hyper-parameters \['mask'\] are named like merge inputs"):
        register("clashing", Clashing, "x")
    adapters = random_adapters(2)
    g = torch.Generator().manual_seed(0)
    masks = [{m: (torch.rand(s, generator=g) > 0.5).float() for m, s in SHAPES.items()} for _ in adapters]
    merged = merged_dense(merge_adapters(adapters, "masked", mask={a.name: m for a, m in zip(adapters, masks)}))
    for module in SHAPES:
        expected = sum(m[module].double().numpy() * d for m, d in zip(masks, dense_deltas(adapters, module)))
        np.testing.assert_allclose(merged[module], expected, atol=ATOL)
    with pytest.raises(ValueError, match=r"needs mask= \(\{module: out×in 0/1 mask\} per adapter\)"):
        merge_adapters(adapters, "masked")
    with pytest.raises(ValueError, match="does not use mask="):
        merge_adapters(adapters, "average", mask=masks)
    with pytest.raises(ValueError, match=r"1 masks given for 2 adapters"):
        merge_adapters(adapters, "masked", mask=masks[:1])


# --- input validation ------------------------------------------------------------------------------------


def test_mismatched_adapters_name_the_adapter_and_module():
    a = random_adapter("alpha", 1)
    fewer = random_adapter("beta", 2, shapes={k: v for k, v in SHAPES.items() if k != "layer.1.q"})
    with pytest.raises(ValueError, match=r"'alpha' and 'beta'.*layer\.1\.q"):
        merge_adapters([a, fewer], "average")
    wider = random_adapter("gamma", 3, shapes={**SHAPES, "layer.0.v": (12, 11)})
    with pytest.raises(ValueError, match=r"'gamma', module layer\.0\.v"):
        merge_adapters([a, wider], "average")
    other_base = random_adapter("delta", 4, base="another-model")
    with pytest.raises(ValueError, match="'delta'.*another-model"):
        merge_adapters([a, other_base], "average")
    with pytest.raises(ValueError, match="unique"):
        merge_adapters([a, random_adapter("alpha", 5)], "average")
    dora = random_adapter("epsilon", 6)
    dora.config["use_dora"] = True
    with pytest.raises(ValueError, match="'epsilon' is a DoRA adapter"):
        merge_adapters([a, dora], "average")


def test_mismatched_statistics_name_the_task_and_module():
    adapters = random_adapters(2)
    stats = _stats(adapters, seed=1)
    bad = stats_from_inputs("task1", {"layer.0.q": torch.randn(5, 10), "layer.0.v": torch.randn(5, 10),
                                      "layer.1.q": torch.randn(5, 8)})
    with pytest.raises(ValueError, match=r"task1.*layer\.1\.q.*8"):
        merge_adapters(adapters, "regmean", stats=[stats[0], bad])
    fisher = [{m: torch.ones(s) for m, s in SHAPES.items()} for _ in adapters]
    fisher[1]["layer.0.v"] = torch.ones(3, 3)
    with pytest.raises(ValueError, match=r"'task1', module layer\.0\.v"):
        merge_adapters(adapters, "fisher", fisher=fisher)


def test_module_inputs_are_float32_whatever_the_adapter_dtype():
    a = random_adapter("half", 1)
    a.modules = {m: LoraFactors(f.A.bfloat16(), f.B.bfloat16(), f.scale) for m, f in a.modules.items()}
    inputs: ModuleInputs = merge_adapters([a, random_adapter("b", 2)], "average").inputs("layer.0.q")
    assert all(f.A.dtype == torch.float32 and f.B.dtype == torch.float32 for f in inputs.factors)
