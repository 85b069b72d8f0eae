"""Interference from second moments against brute force over the sample rows, and OSRM's reason to exist."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers_core import OneLinear, anisotropic_inputs, stats_from_inputs, subspace_inputs
from peft import LoraConfig, get_peft_model, get_peft_model_state_dict

from osrm_lora.adapters import LoraAdapter, LoraFactors
from osrm_lora.inits import osrm_init
from osrm_lora.interference import _output_energy, interference_matrix
from osrm_lora.stats import StatsMismatchError
from osrm_lora.subspace import compute_subspaces

SHAPES = {"l0.q": (10, 7), "l0.v": (10, 5), "l1.q": (6, 4)}  # in, out
TASKS = ["a", "b", "c"]


def make_inputs(seed: int, n: int) -> dict[str, torch.Tensor]:
    shared = anisotropic_inputs(n, 10, seed)
    return {"l0.q": shared, "l0.v": shared, "l1.q": anisotropic_inputs(n, 6, seed + 9)}


def make_adapter(seed: int, rank: int) -> LoraAdapter:
    g = torch.Generator().manual_seed(100 + seed)
    modules = {m: LoraFactors(torch.randn(rank, d_in, generator=g), torch.randn(d_out, rank, generator=g),
                              scale=0.5 + seed) for m, (d_in, d_out) in SHAPES.items()}
    return LoraAdapter(modules=modules, config={}, name=f"t{seed}")


def brute_energy(factors: LoraFactors, x: torch.Tensor) -> float:
    """Mean of ‖ΔW x‖² over the explicit rows, with the dense update."""
    delta = factors.delta(torch.float64)
    return float((x.double() @ delta.T).square().sum(1).mean())


def test_matches_brute_force_over_the_sample_rows():
    inputs = {t: make_inputs(seed, n) for seed, (t, n) in enumerate(zip(TASKS, [30, 55, 41]))}
    stats = {t: stats_from_inputs(t, x) for t, x in inputs.items()}
    adapters = {t: make_adapter(seed, rank) for seed, (t, rank) in enumerate(zip(TASKS, [2, 4, 3]))}
    result = interference_matrix(adapters, stats)
    assert result.tasks == TASKS
    brute = {m: np.array([[brute_energy(adapters[j].modules[m], inputs[i][m]) for j in TASKS] for i in TASKS])
             for m in SHAPES}
    total = sum(brute.values())
    np.testing.assert_allclose(result.energy, total, rtol=1e-6)
    np.testing.assert_allclose(result.matrix, total / np.diag(total)[:, None], rtol=1e-6)
    np.testing.assert_array_equal(np.diag(result.matrix), np.ones(3))
    for m, e in brute.items():
        np.testing.assert_allclose(result.per_module[m], e / np.diag(e)[:, None], rtol=1e-6)
        energy = _output_energy(adapters["b"].modules[m], stats["a"].moment(m))
        assert energy == pytest.approx(e[0, 1], rel=1e-6)
    assert not np.allclose(result.matrix, 1.0)  # the check above compares genuinely different ratios


def test_missing_stats_mismatch_and_zero_adapter():
    inputs = {t: make_inputs(seed, 20) for seed, t in enumerate(TASKS)}
    stats = {t: stats_from_inputs(t, x) for t, x in inputs.items()}
    adapters = {t: make_adapter(seed, 2) for seed, t in enumerate(TASKS)}
    with pytest.raises(ValueError, match=r"no statistics for tasks \['c'\]"):
        interference_matrix(adapters, {t: stats[t] for t in "ab"})
    stats["b"].config_hash = "other"
    with pytest.raises(StatsMismatchError, match=r"task 'b'.*config_hash other"):
        interference_matrix(adapters, stats)
    stats["b"].config_hash = stats["a"].config_hash
    for f in adapters["c"].modules.values():
        f.B = torch.zeros_like(f.B)
    result = interference_matrix(adapters, stats)
    assert np.isnan(result.matrix[2]).all() and (result.matrix[:2, 2] == 0).all()


# --- the behaviour OSRM is for -----------------------------------------------------------------------

D_IN, D_OUT, K, RANK, N = 12, 16, 4, 4, 256


def train_lora(
    x: torch.Tensor, target_delta: torch.Tensor, subspace=None, steps: int = 100
) -> tuple[LoraAdapter, float]:
    """Fit W0 + ΔW to W0 + target_delta on the task's inputs; returns the adapter and final/initial loss.

    Plain SGD: Adam's per-coordinate normalisation amplifies the tiny gradients along the noise directions
    (which include the other tasks' inputs), a separate effect this test does not measure.
    """
    config = LoraConfig(r=RANK, lora_alpha=RANK, target_modules=["proj"])
    model = get_peft_model(OneLinear(D_IN, D_OUT, seed=0), config)
    if subspace is not None:
        osrm_init(model, subspace)
    with torch.no_grad():
        y = model.get_base_model().proj.base_layer(x) + x @ target_delta.T
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.2)
    losses = []
    for _ in range(steps):
        loss = torch.nn.functional.mse_loss(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    adapter = LoraAdapter.from_state_dict(get_peft_model_state_dict(model), config.to_dict())
    return adapter, losses[-1] / losses[0]


@pytest.fixture
def one_thread():
    """Tiny matrices: extra threads only add synchronisation overhead on a shared machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_osrm_init_keeps_trained_adapters_out_of_each_others_inputs(one_thread):
    """Each task's inputs fill its own 4 of the 12 input dims (plus noise): OSRM's A starts there."""
    torch.manual_seed(0)
    basis = torch.linalg.qr(torch.randn(D_IN, D_IN))[0]
    inputs = {
        t: subspace_inputs(N, basis[:, K * i: K * (i + 1)], noise=0.05, seed=i) for i, t in enumerate(TASKS)
    }
    g = torch.Generator().manual_seed(1)
    targets = {t: torch.randn(D_OUT, D_IN, generator=g) for t in TASKS}
    stats = {t: stats_from_inputs(t, {"proj": x}, config_hash="none") for t, x in inputs.items()}
    subspaces = compute_subspaces(list(stats.values()), RANK)

    results = {}
    for init in ("kaiming", "osrm"):
        adapters = {}
        for t in TASKS:
            subspace = subspaces[t] if init == "osrm" else None
            adapters[t], loss_ratio = train_lora(inputs[t], targets[t], subspace)
            assert loss_ratio < 0.05, (init, t, loss_ratio)  # both inits genuinely learn their own task
        matrix = interference_matrix(adapters, stats).matrix
        results[init] = matrix[~np.eye(len(TASKS), dtype=bool)]
    assert results["kaiming"].mean() > 0.01  # random A rows do see the other tasks' inputs
    assert results["osrm"].max() < results["kaiming"].mean() / 5, results
