"""Adapter diagnostics from second moments against brute force over explicit activation rows."""

from __future__ import annotations

import json

import numpy as np
import pytest
import scipy.linalg
import torch
from helpers_core import anisotropic_inputs, stats_from_inputs

from osrm_lora.adapters import LoraAdapter, LoraFactors
from osrm_lora.diagnostics import _coordinate_mass, _row_basis, diagnose
from osrm_lora.errors import AdapterError
from osrm_lora.interference import interference_matrix
from osrm_lora.subspace import compute_subspaces

SHAPES = {"l0.q": (10, 7), "l0.v": (10, 5), "l1.q": (6, 4)}  # in, out
TASKS = ["a", "b", "c"]
RANKS = {"a": 2, "b": 3, "c": 2}


def make_inputs(seed: int, n: int) -> dict[str, torch.Tensor]:
    shared = anisotropic_inputs(n, 10, seed)  # q and v of layer 0 read one tensor, as in a model
    return {"l0.q": shared, "l0.v": shared, "l1.q": anisotropic_inputs(n, 6, seed + 9)}


def make_world(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    inputs = {t: make_inputs(i, n) for i, (t, n) in enumerate(zip(TASKS, [30, 55, 41]))}
    stats = {t: stats_from_inputs(t, x) for t, x in inputs.items()}
    initial = {t: {m: torch.randn(RANKS[t], d_in, generator=g) for m, (d_in, _) in SHAPES.items()} for t in TASKS}
    adapters = {}
    for k, t in enumerate(TASKS):  # trained A: the initial A moved partly out of its row space
        modules = {m: LoraFactors(A0 + 0.5 * torch.randn(A0.shape, generator=g),
                                  torch.randn(SHAPES[m][1], RANKS[t], generator=g), scale=0.5 + k)
                   for m, A0 in initial[t].items()}
        adapters[t] = LoraAdapter(modules=modules, config={}, name=t)
    base = {m: torch.randn(d_out, d_in, generator=g) for m, (d_in, d_out) in SHAPES.items()}
    return inputs, stats, initial, adapters, base


def np64(t: torch.Tensor) -> np.ndarray:
    return t.double().numpy()


def brute_captured(A: np.ndarray, xs: list[np.ndarray], pooled: bool) -> float:
    """E‖P x‖² / E‖x‖² over the other tasks' rows: each task equally (equal) or every row equally (tokens)."""
    P = scipy.linalg.orth(A.T).T
    if pooled:
        x = np.concatenate(xs)
        return float(np.square(x @ P.T).sum(1).mean() / np.square(x).sum(1).mean())
    return float(np.mean([np.square(x @ P.T).sum(1).mean() for x in xs]) / np.mean([np.square(x).sum(1).mean()
                                                                                     for x in xs]))


@pytest.mark.parametrize("weighting", ["equal", "tokens"])
def test_matches_brute_force_over_the_rows(weighting):
    inputs, stats, initial, adapters, base = make_world()
    result = diagnose(adapters, stats, base, initial, weighting=weighting)
    assert result.tasks == TASKS
    for t in TASKS:
        d = result.adapters[t]
        norms, kept, at_init, trained = [], [], [], []
        for m in SHAPES:
            f, A0 = adapters[t].modules[m], np64(initial[t][m])
            A = np64(f.A)
            norms.append(np.linalg.norm(f.scale * np64(f.B) @ A))
            projector = np.linalg.pinv(A0) @ A0  # onto the initial row space
            kept.append(np.square(A @ projector).sum() / np.square(A).sum())
            others = [np64(inputs[o][m]) for o in TASKS if o != t]
            at_init.append(brute_captured(A0, others, weighting == "tokens"))
            trained.append(brute_captured(A, others, weighting == "tokens"))
            row = d.per_module[m]
            assert row["delta_norm"] == pytest.approx(norms[-1], rel=1e-9)
            assert row["retention"] == pytest.approx(kept[-1], rel=1e-9)
            assert row["captured_init"] == pytest.approx(at_init[-1], rel=1e-6)
            assert row["captured_trained"] == pytest.approx(trained[-1], rel=1e-6)
        assert d.delta_norm == pytest.approx(np.sqrt(np.sum(np.square(norms))), rel=1e-9)
        assert d.retention == pytest.approx(np.mean(kept)) and 0.3 < d.retention < 1 - 1e-3
        assert d.captured_init == pytest.approx(np.mean(at_init), rel=1e-6)
        assert d.captured_trained == pytest.approx(np.mean(trained), rel=1e-6)
    # absolute interference: mean over task i's rows of Σ_m ‖ΔW_j x‖², over the same for W0
    absolute = np.array([[
        sum(np.square(np64(inputs[i][m]) @ np64(adapters[j].modules[m].delta(torch.float64)).T).sum(1).mean()
            for m in SHAPES)
        / sum(np.square(np64(inputs[i][m]) @ np64(base[m]).T).sum(1).mean() for m in SHAPES)
        for j in TASKS] for i in TASKS])
    np.testing.assert_allclose(result.absolute_interference, absolute, rtol=1e-6)
    np.testing.assert_array_equal(result.interference_ratio, interference_matrix(adapters, stats).matrix)
    overlap = np.array([[np.mean([np.square(np64(adapters[i].modules[m].A) @ np64(adapters[j].modules[m].A).T).sum()
                                  / (np.square(np64(adapters[i].modules[m].A)).sum()
                                     * np.square(np64(adapters[j].modules[m].A)).sum()) for m in SHAPES])
                         for j in TASKS] for i in TASKS])
    np.testing.assert_allclose(result.overlap, overlap, rtol=1e-9)
    assert result.mean_overlap == pytest.approx(overlap[~np.eye(3, dtype=bool)].mean())
    json.dumps(result.to_dict(), allow_nan=False)


def test_osrm_init_captures_what_the_subspace_says_and_known_cases():
    _, stats, _, adapters, base = make_world(1)
    subspaces = {r: compute_subspaces([stats[t] for t in TASKS], r) for r in set(RANKS.values())}
    initial = {t: {m: subspaces[RANKS[t]][t].A[m] for m in SHAPES} for t in TASKS}
    for t in TASKS:  # a trained A still equal to its init
        for m in SHAPES:
            adapters[t].modules[m].A = initial[t][m].clone()
    result = diagnose(adapters, stats, base, initial)
    for t in TASKS:
        for m in SHAPES:
            row = result.adapters[t].per_module[m]
            assert row["captured_init"] == pytest.approx(subspaces[RANKS[t]][t].energy[m], rel=1e-5, abs=1e-9)
            assert row["retention"] == pytest.approx(1.0) and row["captured_trained"] == row["captured_init"]
    without = diagnose(adapters, stats, base)
    assert without.adapters["a"].retention is None and without.adapters["a"].captured_init is None
    assert without.to_dict()["adapters"]["a"]["per_module"]["l0.q"]["retention"] is None
    # exact cases: a coordinate selection has mass 1, rows orthogonal to each other overlap 0
    selection = torch.zeros(3, 8)
    selection[[0, 1, 2], [5, 1, 7]] = torch.tensor([1.0, -2.0, 0.5])
    assert _coordinate_mass(selection) == pytest.approx(1.0)
    assert _coordinate_mass(torch.ones(2, 8)) == pytest.approx(0.25)
    assert _row_basis(torch.tensor([[1.0, 0.0, 0.0], [2.0, 0.0, 0.0]])).shape == (1, 3)


def test_refuses_mismatched_base_weights_and_initial_factors():
    _, stats, initial, adapters, base = make_world()
    with pytest.raises(AdapterError, match=r"base weight of module l0.v: \(7, 10\), expected out×in \(5, 10\)"):
        diagnose(adapters, stats, {**base, "l0.v": base["l0.q"]}, initial)
    with pytest.raises(AdapterError, match=r"initial A of task 'b', module l1.q: missing"):
        diagnose(adapters, stats, base, {**initial, "b": {m: initial["b"][m] for m in ("l0.q", "l0.v")}})
