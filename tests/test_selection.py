"""Held-out λ selection: disjoint, seeded select/report parts, and a choice that reads only `select`."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from osrm_lora.selection import _best_lambda, choose_lambda
from osrm_lora.tasks.sampling import select_report_indices

LABELS = np.array([0] * 700 + [1] * 250 + [2] * 50)


def test_parts_are_disjoint_stratified_and_seeded():
    chosen, report = select_report_indices(LABELS, len(LABELS), seed=3, salt="mnli")
    assert len(chosen) == 200 and len(report) == 800
    assert not set(chosen) & set(report) and set(chosen) | set(report) == set(range(1000))
    assert np.all(np.diff(chosen) > 0) and np.all(np.diff(report) > 0)
    assert Counter(LABELS[chosen].tolist()) == {0: 140, 1: 50, 2: 10}  # proportional to the classes
    again = select_report_indices(LABELS, len(LABELS), seed=3, salt="mnli")
    assert all(np.array_equal(a, b) for a, b in zip((chosen, report), again))
    assert not np.array_equal(chosen, select_report_indices(LABELS, len(LABELS), seed=4, salt="mnli")[0])
    assert not np.array_equal(chosen, select_report_indices(LABELS, len(LABELS), seed=3, salt="qnli")[0])


def test_report_is_capped_and_regression_rows_need_no_labels():
    chosen, report = select_report_indices(LABELS, len(LABELS), seed=0, select=50, report_max=300)
    assert len(chosen) == 50 and len(report) == 300 and not set(chosen) & set(report)
    assert Counter(LABELS[report].tolist()) == {0: 210, 1: 75, 2: 15}
    chosen, report = select_report_indices(None, 30, seed=1, select=10)
    assert len(chosen) == 10 and sorted([*chosen, *report]) == list(range(30))
    with pytest.raises(ValueError, match="cannot hold out 30 of 30"):
        select_report_indices(None, 30, seed=1, select=30)
    with pytest.raises(ValueError, match="report_max must be positive"):
        select_report_indices(None, 30, seed=1, select=10, report_max=0)


def curve(rng, lams, tasks=("a", "b")) -> dict:
    return {lam: {t: float(rng.uniform()) for t in tasks} for lam in lams}


def test_lambda_is_chosen_on_select_alone():
    lams = [0.25, 0.5, 1.0]
    select = {0.25: {"a": 0.6, "b": 0.7}, 0.5: {"a": 0.8, "b": 0.7}, 1.0: {"a": 0.9, "b": 0.4}}
    rng = np.random.default_rng(0)
    seen_oracles = set()
    for _ in range(20):  # whatever the report scores are, the selected λ is the select optimum
        report = curve(rng, lams)
        choice = choose_lambda(select, report)
        assert choice.lam == 0.5 and choice.report == report[0.5]
        assert choice.report_average == pytest.approx(np.mean(list(report[0.5].values())))
        best = max(lams, key=lambda x: np.mean(list(report[x].values())))
        assert choice.oracle_lam == best and choice.oracle_average >= choice.report_average
        seen_oracles.add(best)
    assert len(seen_oracles) > 1  # the report curves above did disagree with select
    assert [row["lambda"] for row in choice.curve] == lams and choice.curve[2]["select_average"] == pytest.approx(0.65)
    data = choice.to_dict()
    assert data["selected"]["chosen_on"] == "select" and data["oracle"]["chosen_on"] == "report"


def test_ties_methods_without_lambda_and_malformed_curves():
    assert _best_lambda({1.0: {"a": 0.5}, 0.5: {"a": 0.5}}) == 0.5
    choice = choose_lambda({None: {"a": 0.5}}, {None: {"a": 0.4}})
    assert choice.lam is None and choice.oracle_lam is None and choice.report_average == 0.4
    with pytest.raises(ValueError, match="different λ"):
        choose_lambda({0.5: {"a": 0.5}}, {1.0: {"a": 0.5}})
    with pytest.raises(ValueError, match=r"select curve, λ=1.0: tasks \['a'\] differ"):
        _best_lambda({0.5: {"a": 0.5, "b": 0.1}, 1.0: {"a": 0.5}})
    with pytest.raises(ValueError, match=r"report curve, λ=0.5: non-finite scores for tasks \['a'\]"):
        choose_lambda({0.5: {"a": 0.5}}, {0.5: {"a": float("nan")}})
