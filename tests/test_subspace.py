"""OSRM subspaces against numpy eigendecompositions of the others' moments built naively from the samples."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers_core import anisotropic_inputs, naive_second_moment, stats_from_inputs

from osrm_lora.io import OsrmFileError
from osrm_lora.stats import StatsMismatchError
from osrm_lora.subspace import (
    Subspace,
    _mean_null_space,
    compute_subspaces,
    others_moments,
    smallest_eigvecs,
    subspace_from_others,
)

TOKENS = {"a": 40, "b": 90, "c": 25}
D_SHARED, D_OTHER = 10, 6


def make_task(task: str, seed: int, n: int | None = None):
    """Task with a shared-input pair (l0.q, l0.v), a second input of the same dim and one of another dim."""
    n = n or TOKENS[task]
    x0 = anisotropic_inputs(n, D_SHARED, seed)
    x1 = anisotropic_inputs(n, D_SHARED, seed + 10)
    x2 = anisotropic_inputs(n, D_OTHER, seed + 20)
    inputs = {"l0.q": x0, "l0.v": x0, "l1.q": x1, "l2.q": x2}
    return stats_from_inputs(task, inputs), inputs


@pytest.fixture(scope="module")
def tasks():
    made = [make_task(t, seed) for seed, t in enumerate(TOKENS)]
    return [s for s, _ in made], {s.task: x for s, x in made}


def others_inputs(inputs, task, module):
    return [inputs[t][module].numpy() for t in inputs if t != task]


@pytest.mark.parametrize("weighting", ["equal", "tokens", "trace"])
def test_cov_rows_capture_the_smallest_eigenvalues_of_the_naive_others_moment(tasks, weighting):
    stats, inputs = tasks
    r = 3
    subs = compute_subspaces(stats, r, weighting=weighting)
    for task, sub in subs.items():
        assert sub.others == [t for t in TOKENS if t != task]
        for m in ["l0.q", "l0.v", "l1.q", "l2.q"]:
            A = sub.A[m].double().numpy()
            assert A.shape == (r, inputs[task][m].shape[1])
            np.testing.assert_allclose(A @ A.T, np.eye(r), atol=1e-6)
            sigma = naive_second_moment(others_inputs(inputs, task, m), weighting)
            ev = np.linalg.eigvalsh(sigma)
            np.testing.assert_allclose(np.trace(A @ sigma @ A.T), ev[:r].sum(), rtol=1e-5, atol=1e-6 * ev[-1])
            assert sub.energy[m] == pytest.approx(ev[:r].sum() / ev.sum(), rel=1e-5, abs=1e-7)
            np.testing.assert_allclose(sub.spectrum[m]["smallest"], ev[:5], rtol=1e-6)
            np.testing.assert_allclose(sub.spectrum[m]["largest"], ev[-5:], rtol=1e-6)


def test_weightings_are_different_mixtures(tasks):
    """The weighting test above can only fail if the three naive mixtures differ on this data."""
    _, inputs = tasks
    xs = others_inputs(inputs, "a", "l1.q")
    equal, tokens, trace = (naive_second_moment(xs, w) for w in ("equal", "tokens", "trace"))
    assert not np.allclose(equal, tokens, rtol=1e-3) and not np.allclose(equal, trace, rtol=1e-3)


def test_leave_one_out_running_total_matches_naive_sums():
    """Six tasks, one with a thousand-fold larger moment: subtraction from the total stays exact enough."""
    g = torch.Generator().manual_seed(0)
    mats = []
    for j in range(6):
        x = torch.randn(30, 8, generator=g, dtype=torch.float64) * (1000.0 if j == 2 else 1.0)
        mats.append(x.T @ x / 30)
    weights = [torch.tensor(float(j + 1), dtype=torch.float64) for j in range(6)]
    terms = [w * m for w, m in zip(weights, mats)]
    got = list(others_moments(terms, weights))
    assert len(got) == 6
    for i, sigma in enumerate(got):
        naive = sum(weights[j].item() * mats[j].numpy() for j in range(6) if j != i) / sum(
            weights[j].item() for j in range(6) if j != i
        )
        np.testing.assert_allclose(sigma.numpy(), naive, rtol=1e-9, atol=1e-9 * np.abs(naive).max())


@pytest.mark.parametrize("variant", ["cov", "centered", "mean"])
def test_leave_one_out_equals_per_task_recomputation(tasks, variant):
    stats, _ = tasks
    subs = compute_subspaces(stats, 3, variant=variant, weighting="tokens")
    for i, s in enumerate(stats):
        others = stats[:i] + stats[i + 1:]
        alone = subspace_from_others(s.task, others, 3, variant=variant, weighting="tokens")
        for m in s.modules:
            torch.testing.assert_close(subs[s.task].A[m], alone.A[m], rtol=0, atol=1e-5)
            assert subs[s.task].energy[m] == pytest.approx(alone.energy[m], rel=1e-6, abs=1e-9)


@pytest.mark.parametrize("variant", ["cov", "mean"])
def test_a_pool_apart_from_the_tasks_given_subspaces(tasks, variant):
    stats, inputs = tasks
    extra, _ = make_task("d", 3, n=50)
    subs = compute_subspaces(stats, 3, variant=variant, tasks=["b", "d"])
    assert list(subs) == ["b", "d"]
    assert subs["b"].others == ["a", "c"] and subs["d"].others == ["a", "b", "c"]
    loo = compute_subspaces(stats, 3, variant=variant)["b"]
    outside = subspace_from_others("d", stats, 3, variant=variant)
    for m in stats[0].modules:
        torch.testing.assert_close(subs["b"].A[m], loo.A[m], rtol=0, atol=0)  # the pool task leaves itself out
        torch.testing.assert_close(subs["d"].A[m], outside.A[m], rtol=0, atol=1e-6)  # the other uses all of it
    if variant == "cov":  # d's rows: the r least-energy directions of the whole pool's mixture
        sigma = naive_second_moment([inputs[t]["l2.q"].numpy() for t in "abc"], "equal")
        A = subs["d"].A["l2.q"].double().numpy()
        np.testing.assert_allclose(np.trace(A @ sigma @ A.T), np.linalg.eigvalsh(sigma)[:3].sum(), rtol=1e-5)
    with pytest.raises(ValueError, match=r"task 'a': the statistics pool \['a'\] holds no task besides it"):
        compute_subspaces(stats[:1], 2, tasks=["a", "d"])
    assert compute_subspaces(stats[:1], 2, tasks=["d"])["d"].others == ["a"]
    with pytest.raises(ValueError, match="must be unique"):
        compute_subspaces([*stats, extra, extra], 2)


def test_centered_variant_against_numpy_cov(tasks):
    stats, inputs = tasks
    r = 4
    subs = compute_subspaces(stats, r, variant="centered")
    for task, sub in subs.items():
        for m in ["l0.q", "l2.q"]:
            cov = naive_second_moment(others_inputs(inputs, task, m), "equal", centered=True)
            ev = np.linalg.eigvalsh(cov)
            A = sub.A[m].double().numpy()
            np.testing.assert_allclose(A @ A.T, np.eye(r), atol=1e-6)
            np.testing.assert_allclose(np.trace(A @ cov @ A.T), ev[:r].sum(), rtol=1e-5, atol=1e-6 * ev[-1])
            np.testing.assert_allclose(sub.spectrum[m]["smallest"], ev[:5], rtol=1e-6)
            # energy is always measured on the others' uncentred moment
            sigma = naive_second_moment(others_inputs(inputs, task, m), "equal")
            assert sub.energy[m] == pytest.approx(np.trace(A @ sigma @ A.T) / np.trace(sigma), rel=1e-5)


def test_mean_variant_is_orthogonal_to_the_other_tasks_means():
    made = [make_task(t, seed, n=30) for seed, t in enumerate("abcd")]
    stats = [s for s, _ in made]
    subs = compute_subspaces(stats, 3, variant="mean")
    for s, inputs in made:
        for m in ["l0.q", "l2.q"]:
            A = subs[s.task].A[m].double()
            torch.testing.assert_close(A @ A.T, torch.eye(3, dtype=torch.float64), rtol=0, atol=1e-6)
            assert subs[s.task].spectrum[m]["null_dim"] == inputs[m].shape[1] - 3
            assert subs[s.task].spectrum[m]["filled"] == 0
            for other, other_inputs in made:
                mean = other_inputs[m].mean(0)  # numpy-style mean of the explicit rows
                proj = (A @ mean).abs().max()
                if other.task != s.task:
                    assert proj < 1e-6 * mean.norm()
                else:
                    assert proj > 1e-3 * mean.norm()  # the task's own mean is not excluded


def test_mean_variant_fills_with_smallest_singular_directions_and_warns():
    made = [make_task(t, seed, n=20) for seed, t in enumerate("abc")]
    stats = [s for s, _ in made]
    # l2.q has d=6; with rank 5 and 2 other means only 4 null directions exist
    with pytest.warns(UserWarning, match="filled with the smallest singular"):
        subs = compute_subspaces(stats, {"l2.q": 5}, variant="mean")
    for s, _ in made:
        A = subs[s.task].A["l2.q"].double()
        assert subs[s.task].spectrum["l2.q"]["filled"] == 1
        torch.testing.assert_close(A @ A.T, torch.eye(5, dtype=torch.float64), rtol=0, atol=1e-6)
        for other, inputs in made:
            if other.task != s.task:
                assert (A[:4] @ inputs["l2.q"].mean(0)).abs().max() < 1e-6
    means = torch.stack([inputs["l2.q"].mean(0) for _, inputs in made[1:]])
    rows, values, null_dim = _mean_null_space(means, 5)
    assert int(null_dim) == 4
    np.testing.assert_allclose(values[-2:].numpy(), np.sort(np.linalg.svd(means.numpy())[1] ** 2), rtol=1e-9)
    assert (rows[4] @ means.T).abs().max() > 1e-3  # the filled row is not in the null space


def test_smallest_eigvecs_sign_convention_and_determinism(tasks):
    stats, _ = tasks
    first = compute_subspaces(stats, 4)
    second = compute_subspaces(stats, 4)
    for task in first:
        for m, A in first[task].A.items():
            assert torch.equal(A, second[task].A[m])
            pivot = A.gather(1, A.abs().argmax(1, keepdim=True))
            assert (pivot > 0).all()
    sigma = torch.diag(torch.tensor([3.0, 1.0, 2.0], dtype=torch.float64))
    rows, values = smallest_eigvecs(-sigma, 1)  # eigenvector -e0 or e0 for the smallest eigenvalue -3
    assert torch.equal(rows, torch.tensor([[1.0, 0.0, 0.0]], dtype=torch.float64))
    assert values.tolist() == [-3.0, -2.0, -1.0]


def test_shared_inputs_give_identical_rows_and_rank_mapping_is_respected(tasks):
    stats, _ = tasks
    subs = compute_subspaces(stats, {"l0.q": 2, "l0.v": 5, "l1.q": 3})
    for sub in subs.values():
        assert sub.modules == ["l0.q", "l0.v", "l1.q"]
        assert [sub.rank(m) for m in sub.modules] == [2, 5, 3]
        assert torch.equal(sub.A["l0.q"], sub.A["l0.v"][:2])
    # batching several same-size groups into one eigh gives the same rows as one group alone
    alone = compute_subspaces(stats, {"l1.q": 3})
    for task in subs:
        torch.testing.assert_close(subs[task].A["l1.q"], alone[task].A["l1.q"], rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match=r"modules without statistics .*'nope'"):
        compute_subspaces(stats, {"nope": 2})


def test_save_load_round_trip(tasks, tmp_path):
    stats, _ = tasks
    sub = compute_subspaces(stats, 3, variant="mean", weighting="trace")["b"]
    path = tmp_path / "b.subspace.safetensors"
    sub.save(path)
    back = Subspace.load(path)
    fields = ("task", "variant", "weighting", "model", "config_hash", "others", "energy", "spectrum")
    for name in fields:
        assert getattr(back, name) == getattr(sub, name), name
    assert back.modules == sub.modules
    for m in sub.modules:
        assert torch.equal(back.A[m], sub.A[m])


def test_load_rejects_foreign_and_broken_files(tasks, tmp_path):
    stats, _ = tasks
    stats_file = tmp_path / "a.stats.safetensors"
    stats[0].save(stats_file)
    with pytest.raises(OsrmFileError, match=r"a\.stats\.safetensors: not an osrm-lora subspace file"):
        Subspace.load(stats_file)
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{garbage")
    with pytest.raises(OsrmFileError, match="broken.safetensors"):
        Subspace.load(broken)
    with pytest.raises(OsrmFileError, match="missing.safetensors: file not found"):
        Subspace.load(tmp_path / "missing.safetensors")


def test_errors_name_module_and_task(tasks):
    stats, _ = tasks
    with pytest.raises(ValueError, match=r"module l2\.q: rank 7 exceeds its input dim 6 .*'a'"):
        compute_subspaces(stats, 7)
    with pytest.raises(ValueError, match=r"at least 2 tasks"):
        compute_subspaces(stats[:1], 2)
    with pytest.raises(ValueError, match=r"unknown variant 'pca'"):
        compute_subspaces(stats, 2, variant="pca")

    bad, _ = make_task("b", 1)
    bad.second["l1.q"] = bad.second["l1.q"].clone()
    bad.second["l1.q"][0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"task 'b', module l1\.q: NaN/Inf"):
        compute_subspaces([stats[0], bad, stats[2]], 2)

    other_model, _ = make_task("b", 1)
    other_model.config_hash = "another-hash"
    with pytest.raises(StatsMismatchError, match=r"task 'b'.*config_hash another-hash"):
        compute_subspaces([stats[0], other_model], 2)

    fewer, _ = make_task("b", 1)
    del fewer.second["l2.q"], fewer.first["l2.q"]
    with pytest.raises(StatsMismatchError, match=r"task 'b'.*no statistics for modules \['l2\.q'\]"):
        compute_subspaces([stats[0], fewer], 2)

    with pytest.raises(ValueError, match=r"task 'a': its own statistics"):
        subspace_from_others("a", stats, 2)


def test_warns_when_the_others_have_fewer_tokens_than_the_rank():
    few = [make_task(t, seed, n=2)[0] for seed, t in enumerate("ab")]
    with pytest.warns(UserWarning, match=r"the other tasks. statistics cover only 2 tokens") as caught:
        compute_subspaces(few, 3)
    assert sorted(str(w.message).split(":")[0] for w in caught) == ["task 'a'", "task 'b'"]
    assert all(w.filename == __file__ for w in caught)  # points at the caller
