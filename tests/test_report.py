"""The report's tables and plots against numbers recomputed here with numpy from a synthetic results dict."""

from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest
from scipy import stats

from osrm_lora.report import (
    RESULTS_FORMAT,
    ResultsError,
    _diagnostics_rows,
    best_lambda_table,
    fixed_lambda_table,
    selected_lambda_table,
    table_markdown,
    write_report,
)
from osrm_lora.scores import (
    average,
    decode_labels,
    encode_labels,
    example_values,
    normalised_average,
    normalised_scores,
)
from osrm_lora.study import paired_differences, select_lambdas
from osrm_lora.tasks.metrics import compute_metrics
from osrm_lora.tasks.spec import TaskSpec

TASKS = ["alpha", "beta", "gamma"]
INITS = ["kaiming", "osrm"]
METHODS = ["task_arithmetic", "ties"]
LAMBDAS = [0.5, 1.0, 1.5]
SEEDS = [0, 1, 2]
DIAGNOSTIC_KEYS = ("delta_norm", "retention", "captured_init", "captured_trained", "coordinate_mass")


def _score(rng, lo=0.3, hi=0.95):
    return float(rng.uniform(lo, hi))


@pytest.fixture
def results():
    rng = np.random.default_rng(7)
    individual = [
        {"init": i, "seed": s, "task": t, "score": _score(rng, 0.8, 0.95), "metrics": {}}
        for i in INITS
        for s in SEEDS
        for t in TASKS
    ]
    merged = [
        {"init": i, "method": m, "lambda": lam, "seed": s, "task": t, "score": _score(rng), "metrics": {},
         "select_score": _score(rng)}
        for i in INITS
        for m in METHODS
        for lam in LAMBDAS
        for s in SEEDS
        for t in TASKS
    ]
    interference = [
        {"init": i, "seed": s, "tasks": TASKS, "matrix": rng.uniform(0, 1, (3, 3)).tolist()}
        for i in INITS
        for s in SEEDS
    ]
    diagnostics = [
        {"init": i, "seed": s, "tasks": TASKS, "mean_overlap": float(rng.uniform()),
         "adapters": {t: {k: float(rng.uniform()) for k in DIAGNOSTIC_KEYS} for t in TASKS},
         "absolute_interference": rng.uniform(0, 1, (3, 3)).tolist(),
         "interference_ratio": rng.uniform(0, 1, (3, 3)).tolist()}
        for i in INITS
        for s in SEEDS
    ]
    results = {
        "format": RESULTS_FORMAT,
        "experiment": "synthetic",
        "model": "tiny",
        "tasks": TASKS,
        "inits": INITS,
        "methods": METHODS,
        "seeds": SEEDS,
        "primary_metrics": {t: "accuracy" for t in TASKS},
        "fixed_lambda": {"task_arithmetic": 1.0, "ties": 1.5},
        "individual": individual,
        "merged": merged,
        "interference": interference,
        "diagnostics": diagnostics,
        "reference_init": INITS[0],
    }
    results["selection"] = select_lambdas(merged, TASKS)
    results["paired"] = paired_differences(results, INITS[0], None)
    return results


def _scores_array(results, init, method, lam):
    """seeds × tasks array of merged scores."""
    return np.array(
        [
            [
                next(
                    r["score"]
                    for r in results["merged"]
                    if (r["init"], r["method"], r["lambda"], r["seed"], r["task"])
                    == (init, method, lam, s, t)
                )
                for t in TASKS
            ]
            for s in SEEDS
        ]
    )


def _individual_array(results, init):
    return np.array(
        [
            [
                next(
                    r["score"]
                    for r in results["individual"]
                    if (r["init"], r["seed"], r["task"]) == (init, s, t)
                )
                for t in TASKS
            ]
            for s in SEEDS
        ]
    )


def test_aggregates_match_definition():
    assert average({"a": 0.5, "b": 1.0}) == pytest.approx(0.75)
    norm = normalised_scores({"a": 0.5, "b": 0.3}, {"a": 1.0, "b": 0.6})
    assert norm == pytest.approx({"a": 0.5, "b": 0.5})
    assert math.isnan(normalised_scores({"a": 0.5}, {"a": 0.0})["a"])
    assert math.isnan(normalised_scores({"a": 0.5}, {"a": -0.1})["a"])
    # tasks with no meaningful individual score are left out of the normalised average, not propagated as NaN
    mixed = normalised_scores({"a": 0.5, "b": 0.3, "c": 0.2}, {"a": 1.0, "b": 0.6, "c": 0.0})
    assert normalised_average(mixed) == pytest.approx(0.5)
    assert math.isnan(normalised_average({"c": math.nan}))
    with pytest.raises(ValueError, match="b"):
        normalised_scores({"a": 0.5, "b": 0.2}, {"a": 1.0})


def test_best_lambda_picks_highest_average(results):
    table = best_lambda_table(results)
    assert [(r.init, r.method) for r in table.rows[:2]] == [
        ("kaiming", "individual"),
        ("osrm", "individual"),
    ]
    merged_rows = table.rows[2:]
    assert [(r.method, r.init) for r in merged_rows] == [(m, i) for m in METHODS for i in INITS]
    for row in merged_rows:
        ind = _individual_array(results, row.init)
        averages = {lam: _scores_array(results, row.init, row.method, lam).mean() for lam in LAMBDAS}
        best = max(averages, key=averages.get)
        assert row.lam == best
        scores = _scores_array(results, row.init, row.method, best)
        assert row.average == pytest.approx(scores.mean())
        assert row.normalised_average == pytest.approx((scores / ind).mean())
        assert row.scores == pytest.approx(dict(zip(TASKS, scores.mean(axis=0))))
        assert row.average_std == pytest.approx(scores.mean(axis=1).std(ddof=1))
    for row in table.rows[:2]:
        assert row.normalised_average == pytest.approx(1.0)


def test_fixed_lambda_uses_method_default(results):
    table = fixed_lambda_table(results)
    for row in table.rows[2:]:
        assert row.lam == results["fixed_lambda"][row.method]
        assert row.average == pytest.approx(_scores_array(results, row.init, row.method, row.lam).mean())


def test_write_report_files_hold_the_numbers(results, tmp_path):
    written = write_report(results, tmp_path)
    for key in (
        "report",
        "best_lambda.csv",
        "fixed_lambda.csv",
        "lambda_plot",
        "interference_plot",
        "bars_plot",
    ):
        assert written[key].is_file() and written[key].stat().st_size > 0, key
    for key in ("lambda_plot", "interference_plot", "bars_plot"):
        assert written[key].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with open(written["best_lambda.csv"]) as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(INITS) * (1 + len(METHODS))
    for row in rows:
        if row["method"] == "individual":
            continue
        scores = _scores_array(results, row["init"], row["method"], float(row["lambda"]))
        assert float(row["average"]) == pytest.approx(scores.mean(), abs=1e-6)
        for k, t in enumerate(TASKS):
            assert float(row[t]) == pytest.approx(scores[:, k].mean(), abs=1e-6)
    text = written["report"].read_text()
    best_osrm_ta = next(r for r in rows if (r["init"], r["method"]) == ("osrm", "task_arithmetic"))
    assert f"{100 * float(best_osrm_ta['average']):.2f}" in text
    # No temporary files left behind by the atomic writes.
    assert not [p for p in tmp_path.rglob("*") if p.name.endswith(".tmp")]


def test_missing_runs_are_left_out_not_invented(results):
    results["merged"] = [
        r
        for r in results["merged"]
        if not (r["init"] == "osrm" and r["method"] == "ties" and r["task"] == "beta" and r["lambda"] == 1.5)
    ]
    table = fixed_lambda_table(results)
    assert ("osrm", "ties") not in [(r.init, r.method) for r in table.rows]
    best = best_lambda_table(results)
    assert next(r for r in best.rows if (r.init, r.method) == ("osrm", "ties")).lam in (0.5, 1.0)


def test_bad_results_are_refused(results, tmp_path):
    results["merged"][0]["task"] = "nope"
    with pytest.raises(ResultsError, match="merged\\[0\\].task"):
        write_report(results, tmp_path)
    with pytest.raises(ResultsError, match="format"):
        write_report({**results, "format": "other"}, tmp_path)
    json.dumps(results)  # the fixture itself is JSON-serialisable, like results.json


def test_method_without_lambda_has_one_row_in_both_views(results, tmp_path):
    rng = np.random.default_rng(3)
    emr = [
        {
            "init": i,
            "method": "emr",
            "lambda": None,
            "seed": s,
            "task": t,
            "score": _score(rng),
            "metrics": {},
        }
        for i in INITS
        for s in SEEDS
        for t in TASKS
    ]
    results["merged"] += emr
    results["methods"] = [*METHODS, "emr"]
    results["fixed_lambda"]["emr"] = None
    for table in (best_lambda_table(results), fixed_lambda_table(results)):
        rows = [r for r in table.rows if r.method == "emr"]
        assert [r.init for r in rows] == INITS
        for row in rows:
            assert row.lam is None
            expected = np.mean(
                [
                    [
                        next(r["score"] for r in emr if (r["init"], r["seed"], r["task"]) == (row.init, s, t))
                        for t in TASKS
                    ]
                    for s in SEEDS
                ]
            )
            assert row.average == pytest.approx(expected)
    written = write_report(results, tmp_path)
    assert "| osrm | emr |  |" in written["report"].read_text()


def test_task_at_chance_is_left_out_of_normalised_average(results):
    """An individual score of 0 (MCC at chance) cannot normalise: the row averages the other tasks, and says so."""
    for r in results["individual"]:
        if r["task"] == "gamma" and r["init"] == "osrm":
            r["score"] = 0.0
    table = fixed_lambda_table(results)
    row = next(r for r in table.rows if (r.init, r.method) == ("osrm", "ties"))
    ind = _individual_array(results, "osrm")[:, :2]
    scores = _scores_array(results, "osrm", "ties", row.lam)[:, :2]
    assert row.normalised_average == pytest.approx((scores / ind).mean())
    assert "leaves out gamma" in table_markdown(table)


def _select_array(results, init, method, lam):
    return np.array([[next(r["select_score"] for r in results["merged"]
                           if (r["init"], r["method"], r["lambda"], r["seed"], r["task"]) == (init, method, lam, s, t))
                      for t in TASKS] for s in SEEDS])


def test_selected_lambda_is_each_seeds_select_argmax_scored_on_report(results):
    table = selected_lambda_table(results)
    assert [(r.init, r.method) for r in table.rows[:2]] == [(i, "individual") for i in INITS]
    for row in table.rows[2:]:
        ind = _individual_array(results, row.init)
        select = np.array([_select_array(results, row.init, row.method, lam).mean(1) for lam in LAMBDAS])  # λ × seed
        chosen = [LAMBDAS[k] for k in select.argmax(0)]
        assert row.seed_lambdas == chosen
        report = np.array([_scores_array(results, row.init, row.method, lam)[k] for k, lam in enumerate(chosen)])
        assert row.scores == pytest.approx(dict(zip(TASKS, report.mean(0))))
        assert row.average == pytest.approx(report.mean())
        assert row.normalised_average == pytest.approx((report / ind).mean())
        assert row.average_std == pytest.approx(report.mean(1).std(ddof=1))
    mixed = next(r for r in table.rows[2:] if len(set(r.seed_lambdas)) > 1)
    cell = "/".join(f"{lam:g}" for lam in mixed.seed_lambdas)
    assert f"| {mixed.init} | {mixed.method} | {cell} |" in table_markdown(table)


def test_paired_differences_are_per_seed_differences_with_t_intervals(results, tmp_path):
    entries = {(e["init"], e["method"]): e for e in results["paired"]}
    assert set(entries) == {("osrm", m) for m in (*METHODS, "individual")}
    chosen = {(e["init"], e["method"], e["seed"]): e["selected"]["average"] for e in results["selection"]}
    for (init, method), e in entries.items():
        if method == "individual":
            d = _individual_array(results, init).mean(1) - _individual_array(results, INITS[0]).mean(1)
        else:
            d = np.array([chosen[(init, method, s)] - chosen[(INITS[0], method, s)] for s in SEEDS])
        half = stats.t.ppf(0.975, len(d) - 1) * d.std(ddof=1) / np.sqrt(len(d))
        assert (e["n"], e["mean"], e["sd"]) == (3, pytest.approx(d.mean()), pytest.approx(d.std(ddof=1)))
        assert (e["t_low"], e["t_high"]) == (pytest.approx(d.mean() - half), pytest.approx(d.mean() + half))
        assert e["bootstrap_low"] is None and e["excludes_zero"] == (d.mean() - half > 0 or d.mean() + half < 0)
    text = write_report(results, tmp_path)["report"].read_text()
    assert f"## Paired differences from {INITS[0]} over seeds" in text
    for e in entries.values():
        assert e["verdict"] in text and ("includes 0" in e["verdict"] or "excludes 0" in e["verdict"])


def test_diagnostics_summary_averages_adapters_and_seeds(results, tmp_path):
    rows = {row["init"]: row for row in _diagnostics_rows(results)}
    assert list(rows) == INITS
    for init, row in rows.items():
        records = [d for d in results["diagnostics"] if d["init"] == init]
        for key in DIAGNOSTIC_KEYS:
            assert row[key] == pytest.approx(np.mean([d["adapters"][t][key] for d in records for t in TASKS]))
        off = ~np.eye(3, dtype=bool)
        assert row["absolute_interference"] == pytest.approx(
            np.mean([np.array(d["absolute_interference"])[off].mean() for d in records]))
        assert row["mean_overlap"] == pytest.approx(np.mean([d["mean_overlap"] for d in records]))
    text = write_report(results, tmp_path)["report"].read_text()
    assert "## Adapter diagnostics" in text and f"{rows['osrm']['delta_norm']:.4g}" in text


@pytest.mark.parametrize("labels, metrics", [
    (("a", "b"), ("accuracy", "f1", "matthews", "mean_f1_accuracy", "macro_f1")),
    (("a", "b", "c", "d"), ("accuracy", "macro_f1", "matthews")),
    (None, ("pearson", "spearman", "mean_pearson_spearman")),
])
def test_example_values_are_the_brute_force_jackknife(labels, metrics):
    """vᵢ = M + (n − 1)(mean_j M₋ⱼ − M₋ᵢ) with every M₋ᵢ from `compute_metrics` on the other examples; they
    average to M; for accuracy they are the correctness. The compact encoding round-trips."""
    rng = np.random.default_rng(1)
    spec = TaskSpec("t", ("text",), labels, metrics, metrics[0])
    n = 40
    if labels is None:
        gold = np.round(rng.uniform(0, 5, n) * 2) / 2
        pred = gold + rng.normal(0, 1, n)
        pred[:4] = pred[4]  # ties
    else:
        gold = rng.integers(len(labels), size=n)
        pred = np.where(rng.random(n) < 0.6, gold, rng.integers(len(labels), size=n))
    regression = labels is None
    pred = decode_labels(encode_labels(pred, regression))
    assert np.array_equal(decode_labels(encode_labels(gold, regression)), gold)
    for metric in metrics:
        full = compute_metrics(spec, pred, gold)[metric]
        without = np.array([compute_metrics(spec, np.delete(pred, i), np.delete(gold, i))[metric] for i in range(n)])
        got = example_values(metric, pred, gold, None if regression else len(labels))
        np.testing.assert_allclose(got, full + (n - 1) * (without.mean() - without), atol=1e-12)
        assert got.mean() == pytest.approx(full, abs=1e-12)
        if metric == "accuracy":
            assert np.array_equal(got, (pred == gold).astype(float))
