"""Paired seed comparisons against scipy, closed forms and exactly enumerable bootstrap distributions."""

from __future__ import annotations

import itertools
import json
import math

import numpy as np
import pytest
from scipy import stats

from osrm_lora.paired import _bootstrap_interval, paired_difference, t_interval, verdict_text


def test_t_interval_matches_scipy_and_the_closed_form():
    rng = np.random.default_rng(0)
    a, b = rng.normal(0.8, 0.05, 5), rng.normal(0.78, 0.05, 5)
    result = paired_difference("osrm", "kaiming", "ta", dict(enumerate(a)), dict(enumerate(b)))
    ci = stats.ttest_rel(a, b).confidence_interval(0.95)
    assert (result.t_low, result.t_high) == pytest.approx((ci.low, ci.high), rel=1e-12)
    d = a - b
    scipy_t = stats.t.interval(0.95, len(d) - 1, loc=d.mean(), scale=stats.sem(d))
    assert (result.t_low, result.t_high) == pytest.approx(scipy_t, rel=1e-12)
    assert result.mean == pytest.approx(d.mean()) and result.sd == pytest.approx(d.std(ddof=1)) and result.n == 5
    # d = 1, 2, 3: mean 2, sd 1; with 2 degrees of freedom the t quantile is (2p − 1) / √(2p(1 − p))
    low, high = t_interval([1.0, 2.0, 3.0])
    half = 0.95 / math.sqrt(2 * 0.975 * 0.025) / math.sqrt(3)
    assert (low, high) == pytest.approx((2 - half, 2 + half), rel=1e-12)
    assert t_interval([1.0, 2.0, 3.0], 0.9) == pytest.approx(
        stats.t.interval(0.9, 2, loc=2.0, scale=1 / math.sqrt(3)), rel=1e-12)


def test_one_seed_has_no_t_interval_and_says_so():
    result = paired_difference("osrm", "kaiming", "ta", {3: 0.81}, {3: 0.80})
    assert result.n == 1 and result.mean == pytest.approx(0.01)
    assert math.isnan(result.sd) and math.isnan(result.t_low) and math.isnan(result.t_high)
    assert not result.excludes_zero and "undefined" in result.note
    data = result.to_dict()
    assert data["sd"] is None and data["t_low"] is None and data["bootstrap_low"] is None
    json.dumps(data, allow_nan=False)
    assert "from one seed; no t-interval" in verdict_text(result)


def test_refuses_non_finite_and_unpaired_input_naming_init_and_method():
    with pytest.raises(ValueError, match=r"init 'osrm' vs 'kaiming', method 'ties'.*NaN/Inf"):
        paired_difference("osrm", "kaiming", "ties", {0: 0.5, 1: math.nan}, {0: 0.5, 1: 0.4})
    with pytest.raises(ValueError, match=r"method 'ties' \(reference\): NaN/Inf"):
        paired_difference("osrm", "kaiming", "ties", {0: 0.5}, {0: math.inf})
    with pytest.raises(ValueError, match="do not pair"):
        paired_difference("osrm", "kaiming", "ties", {0: 0.5, 1: 0.4}, {0: 0.5, 2: 0.4})
    examples = {0: {"a": [1, 0]}}
    with pytest.raises(ValueError, match=r"seed 0, task 'a'.*NaN/Inf"):
        paired_difference("osrm", "kaiming", "ta", {0: 0.5}, {0: 0.5}, {0: {"a": [1, math.nan]}}, examples)
    with pytest.raises(ValueError, match=r"seed 0, task 'a'.*do not pair"):
        paired_difference("osrm", "kaiming", "ta", {0: 0.5}, {0: 0.5}, {0: {"a": [1, 0, 1]}}, examples)
    with pytest.raises(ValueError, match="only one of the two inits"):
        paired_difference("osrm", "kaiming", "ta", {0: 0.5}, {0: 0.5}, examples)


def test_bootstrap_of_constant_differences_is_exact():
    # every example differs by the same amount within a seed and all seeds agree: no spread to resample
    diffs = [[np.full(20, 0.25), np.full(3, -0.05)] for _ in range(4)]  # both ways of resampling
    assert _bootstrap_interval(diffs, resamples=500) == pytest.approx((0.1, 0.1), abs=1e-12)
    # seeds differ, examples do not: the replicate is the mean of n seeds drawn with replacement
    diffs = [[np.full(5, 0.0)], [np.full(5, 1.0)]]
    low, high = _bootstrap_interval(diffs, resamples=4000, seed=1)
    assert (low, high) == (0.0, 1.0)  # P(both draws = seed 0) = 1/4 > 2.5 %


def _exact_quantiles(diffs, levels):
    """Enumerate every (seed draws, example draws) outcome of the hierarchical bootstrap with its probability."""
    per_seed = []  # distribution of one draw of seed s: {value: probability}
    for tasks in diffs:
        dist: dict[float, float] = {}
        choices = [list(itertools.product(d, repeat=len(d))) for d in tasks]
        for combo in itertools.product(*choices):
            value = round(float(np.mean([np.mean(c) for c in combo])), 12)
            p = math.prod(len(d) ** -len(d) for d in tasks)
            dist[value] = dist.get(value, 0.0) + p
        per_seed.append(dist)
    n = len(diffs)
    outcome: dict[float, float] = {}
    for picks in itertools.product(range(n), repeat=n):
        for values in itertools.product(*(per_seed[s].items() for s in picks)):
            v = round(sum(x for x, _ in values) / n, 12)
            outcome[v] = outcome.get(v, 0.0) + math.prod(p for _, p in values) / n ** n
    support = sorted(outcome)
    cdf = np.cumsum([outcome[v] for v in support])
    return [support[int(np.searchsorted(cdf, q))] for q in levels], support, cdf


def test_bootstrap_matches_the_enumerated_distribution():
    diffs = [[np.array([0.0, 1.0]), np.array([1.0, -1.0])], [np.array([0.5, 1.5]), np.array([0.0, 1.0, 1.0])]]
    (q_low, q_high), support, cdf = _exact_quantiles(diffs, [0.025, 0.975])
    # the quantiles fall well inside atoms of the distribution, so a large bootstrap hits them exactly
    for q, v in ((0.025, q_low), (0.975, q_high)):
        i = support.index(v)
        assert (cdf[i - 1] if i else 0.0) + 0.005 < q < cdf[i] - 0.005
    assert _bootstrap_interval(diffs, resamples=40000, seed=3) == pytest.approx((q_low, q_high), abs=1e-9)


def test_bootstrap_spread_matches_its_closed_form_variance():
    """Var = (population variance of the seed means + mean within-seed variance of the mean) / n."""
    rng = np.random.default_rng(5)
    diffs = [[rng.choice([-1.0, 0.0, 1.0], size=n, p=[0.2, 0.6, 0.2]) + 0.1 * s for n in (200, 25)]
             for s in range(4)]
    seed_means = np.array([np.mean([d.mean() for d in tasks]) for tasks in diffs])
    within = np.mean([sum(d.var() / d.size for d in tasks) / len(tasks) ** 2 for tasks in diffs])
    sd = math.sqrt((seed_means.var() + within) / len(diffs))
    low, high = _bootstrap_interval(diffs, resamples=20000, seed=0)
    # near-normal replicates: the 95 % percentile interval is about mean ± 1.96 sd
    assert (high - low) / (2 * 1.96 * sd) == pytest.approx(1.0, abs=0.05)
    low, high = _bootstrap_interval(diffs, level=0.5, resamples=20000, seed=0)  # the tails are skewed, the middle not
    assert (low + high) / 2 == pytest.approx(seed_means.mean(), abs=0.1 * sd)
    assert _bootstrap_interval(diffs, resamples=300, seed=2) == _bootstrap_interval(diffs, resamples=300, seed=2)


def test_paired_difference_with_examples_and_the_verdict():
    examples = {s: {"a": np.ones(10), "b": np.r_[np.ones(5), np.zeros(5)]} for s in (0, 1, 2)}
    reference = {s: {"a": np.r_[np.ones(8 - s), np.zeros(2 + s)], "b": np.zeros(10)} for s in (0, 1, 2)}
    score = {s: float(np.mean([v.mean() for v in examples[s].values()])) for s in examples}
    ref_score = {s: float(np.mean([v.mean() for v in reference[s].values()])) for s in reference}
    result = paired_difference("osrm", "kaiming", "ties", score, ref_score, examples, reference, resamples=1000)
    assert result.mean == pytest.approx(0.40) and result.resamples == 1000
    assert result.bootstrap_low > 0 and result.bootstrap_excludes_zero and result.excludes_zero
    text = verdict_text(result)
    assert text.startswith("osrm − kaiming (ties): +40.00 points (s.d. 5.00, n = 3 seeds)")
    assert "t-interval" in text and "excludes 0: osrm is better" in text
    assert "bootstrap interval over seeds and examples" in text
    assert "lies above +40" not in verdict_text(result, 0.40)
    assert "excludes 0 but not differences within ±40" in verdict_text(result, 0.40)
    worse = paired_difference("kaiming", "osrm", "ties", ref_score, score)
    assert "excludes 0 and lies below −1: kaiming is worse" in verdict_text(worse, 0.01)
    noisy = paired_difference("osrm", "kaiming", "ties", {0: 0.5, 1: 0.6}, {0: 0.55, 1: 0.52})
    assert not noisy.excludes_zero and "includes 0: no evidence of a difference" in verdict_text(noisy)
    json.dumps(result.to_dict(), allow_nan=False)
