"""A sound study end to end on a tiny random BERT: λ chosen on held-out rows, seeds as paired replicates,
per-adapter diagnostics, chunks that add up to one run, and evaluation batched by length.

One two-seed experiment runs once (`study`); its evaluations are spied on to check which rows each part
scored. Its numbers are checked against the library functions applied to the files it wrote.
"""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest
import torch
from pipeline_helpers import write_experiment, write_tiny_model
from typer.testing import CliRunner

from osrm_lora import evaluate as evaluate_module
from osrm_lora.cli import app
from osrm_lora.paired import paired_difference
from osrm_lora.pipeline import run_experiment
from osrm_lora.settings import ConfigError, load_experiment, parse_experiment
from osrm_lora.study import INDIVIDUAL, record_values, select_lambdas

OVERRIDES = {
    "seeds": [0, 1],
    "merge": [{"method": "task_arithmetic", "lambdas": [0.5, 1.0]}],
    "interference": False,
}
TASKS = ["sentiment", "topic"]


def _overrides(**training):
    from pipeline_helpers import experiment_dict

    base = experiment_dict("unused", [])["training"]
    return {**OVERRIDES, "training": {**base, "max_steps": 6, **training}}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return write_tiny_model(tmp_path_factory.mktemp("tiny-bert"))


@pytest.fixture(scope="module")
def study(model_dir, tmp_path_factory):
    """The full run, with every `evaluate_rows` call recorded as (task, source kind, {part: rows})."""
    path = write_experiment(tmp_path_factory.mktemp("study"), model_dir, **_overrides())
    config = load_experiment(path)
    calls = []
    real = evaluate_module.evaluate_rows

    def spy(model, tokenizer, task, parts, **kwargs):
        calls.append((task.name, sorted(parts), {k: np.asarray(v).copy() for k, v in parts.items()}))
        return real(model, tokenizer, task, parts, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(evaluate_module, "evaluate_rows", spy)
        summary = run_experiment(config, progress=False)
    return config, summary, calls


def _read(path) -> dict:
    return json.loads(path.read_text())


# ------------------------------------------------------------------------------------------ held-out λ


def test_select_and_report_rows_are_disjoint_and_shared_by_every_model(study):
    config, _, calls = study
    merged = [c for c in calls if c[1] == ["report", "select"]]
    individual = [c for c in calls if c[1] == ["report"]]
    assert len(merged) == 2 * 2 * 2 * 2 and len(individual) == 2 * 2 * 2  # merges × λ × tasks; adapters × tasks
    for task in TASKS:
        parts = [c[2] for c in merged if c[0] == task]
        select, report = parts[0]["select"], parts[0]["report"]
        assert len(select) == config.evaluation.select_examples == 6
        assert len(report) == 24 - 6 and not set(select) & set(report)  # the example ids never overlap
        for p in parts:
            assert np.array_equal(p["select"], select) and np.array_equal(p["report"], report)
        for c in individual:
            if c[0] == task:
                assert np.array_equal(c[2]["report"], report)  # the adapters are scored on report only


def test_lambda_is_chosen_on_select_scores_alone():
    """Brute force: the selected λ maximises the select average; report scores, however changed, never move
    it, and the oracle is the report argmax."""
    rng = np.random.default_rng(0)
    lambdas = [0.25, 0.5, 1.0]
    records = [
        {"init": i, "method": "ta", "seed": s, "lambda": lam, "task": t,
         "select_score": float(rng.uniform()), "score": float(rng.uniform())}
        for i in ("a", "b") for s in (0, 1) for lam in lambdas for t in TASKS
    ]
    chosen = select_lambdas(records, TASKS)
    assert len(chosen) == 4
    for entry in chosen:
        rows = [r for r in records if (r["init"], r["seed"]) == (entry["init"], entry["seed"])]
        select = {lam: np.mean([r["select_score"] for r in rows if r["lambda"] == lam]) for lam in lambdas}
        report = {lam: np.mean([r["score"] for r in rows if r["lambda"] == lam]) for lam in lambdas}
        best = max(select, key=select.get)
        assert entry["selected"]["lambda"] == best and entry["selected"]["chosen_on"] == "select"
        assert entry["selected"]["average"] == pytest.approx(report[best])
        assert entry["oracle"]["lambda"] == max(report, key=report.get)
        assert [p["lambda"] for p in entry["curve"]] == lambdas
    shuffled = [{**r, "score": float(rng.uniform())} for r in records]
    assert [e["selected"]["lambda"] for e in select_lambdas(shuffled, TASKS)] == [
        e["selected"]["lambda"] for e in chosen
    ]
    incomplete = [r for r in records if not (r["init"] == "a" and r["seed"] == 0 and r["task"] == "topic")]
    assert len(select_lambdas(incomplete, TASKS)) == 3  # a (init, seed) missing a task is left out


def test_results_hold_the_selection_and_the_report_tables_use_it(study):
    config, summary, _ = study
    results = summary.results
    assert {(e["init"], e["seed"]) for e in results["selection"]} == {(i, s) for i in config.init_labels for s in (0, 1)}
    for e in results["selection"]:
        rows = [r for r in results["merged"] if (r["init"], r["seed"]) == (e["init"], e["seed"])]
        select = {lam: np.mean([r["select_score"] for r in rows if r["lambda"] == lam]) for lam in (0.5, 1.0)}
        assert e["selected"]["lambda"] == max(select, key=lambda lam: (select[lam], -lam))
    report = (config.output_dir / "report.md").read_text()
    assert "Best λ on held-out examples" in report and "Oracle λ" in report
    assert (config.output_dir / "table_selected_lambda.csv").is_file()


def test_too_few_evaluation_rows_for_the_select_part_is_one_error(model_dir, tmp_path):
    config = load_experiment(write_experiment(tmp_path, model_dir, **_overrides()))
    config.evaluation.select_examples = 24
    with pytest.raises(Exception, match="select_examples=24 leaves none to report on") as info:
        run_experiment(config, progress=False)
    from osrm_lora.errors import OsrmLoraError

    assert isinstance(info.value, OsrmLoraError)


# ------------------------------------------------------------------------------------------ paired seeds


def test_paired_differences_match_the_library_on_the_eval_files(study):
    config, summary, _ = study
    results, out = summary.results, config.output_dir
    reference = results["reference_init"]
    assert reference == ("kaiming" if "kaiming" in config.init_labels else config.init_labels[0])  # else the first
    entries = {(e["init"], e["method"]): e for e in results["paired"]}
    assert set(entries) == {("osrm", "task_arithmetic"), ("osrm", INDIVIDUAL)} and reference != "osrm"
    selected = {(e["init"], e["seed"]): e["selected"] for e in results["selection"]}

    def values(init, method, seed):
        if method == INDIVIDUAL:
            records = [_read(out / "eval" / "individual" / init / f"seed{seed}" / f"{t}.json") for t in TASKS]
        else:
            lam = selected[(init, seed)]["lambda"]
            records = _read(out / "eval" / "merged" / method / init / f"seed{seed}" / f"lambda{lam:g}.json")["tasks"]
        return {r["task"]: record_values(r) for r in records}

    def score(init, method, seed):
        if method == INDIVIDUAL:
            return np.mean([r["score"] for r in results["individual"] if (r["init"], r["seed"]) == (init, seed)])
        return selected[(init, seed)]["average"]

    for (init, method), entry in entries.items():
        expected = paired_difference(
            init, reference, method, {s: score(init, method, s) for s in (0, 1)},
            {s: score(reference, method, s) for s in (0, 1)},
            {s: values(init, method, s) for s in (0, 1)}, {s: values(reference, method, s) for s in (0, 1)},
        )
        for key in ("n", "mean", "sd", "t_low", "t_high", "bootstrap_low", "bootstrap_high"):
            assert entry[key] == pytest.approx(getattr(expected, key)), key
        assert entry["n"] == 2 and entry["verdict"] in (config.output_dir / "report.md").read_text()
    # The per-example values average to each recorded score (accuracy: the correctness).
    for r in [_read(out / "eval" / "individual" / "osrm" / "seed0" / f"{t}.json") for t in TASKS]:
        v = record_values(r)
        assert set(np.unique(v)) <= {0.0, 1.0} and v.mean() == pytest.approx(r["score"])


def test_reference_init_must_be_compared():
    from pipeline_helpers import experiment_dict

    data = experiment_dict("m", [{"name": "a"}, {"name": "b"}])
    assert parse_experiment({**data, "report": {"reference_init": "osrm"}}).reference_init == "osrm"
    assert parse_experiment({**data, "inits": ["osrm", "kaiming"]}).reference_init == "kaiming"
    with pytest.raises(ConfigError, match="report.reference_init 'pissa' is not one of the inits"):
        parse_experiment({**data, "report": {"reference_init": "pissa"}})
    with pytest.raises(ConfigError, match="report.level"):
        parse_experiment({**data, "report": {"level": float("nan")}})


# ------------------------------------------------------------------------------------------ diagnostics


def test_diagnostics_are_the_library_on_the_saved_adapters_and_initial_A(study, model_dir):
    from transformers import AutoModelForSequenceClassification

    from osrm_lora.adapters import LoraAdapter
    from osrm_lora.diagnostics import _retention, diagnose
    from osrm_lora.io import load_tensors
    from osrm_lora.stats import TaskStats
    from osrm_lora.subspace import Subspace
    from osrm_lora.train import INITIAL_A_NAME

    config, summary, _ = study
    out = config.output_dir
    base = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=2)
    weights = dict(base.named_parameters())
    stats = {t: TaskStats.load(out / "stats" / f"{t}.safetensors") for t in TASKS}
    recorded = {(d["init"], d["seed"]): d for d in summary.results["diagnostics"]}
    assert set(recorded) == {(i, s) for i in config.init_labels for s in (0, 1)}
    for (init, seed), record in recorded.items():
        folders = {t: out / "adapters" / init / f"seed{seed}" / t for t in TASKS}
        adapters = {t: LoraAdapter.load(f, name=t) for t, f in folders.items()}
        initial = {t: load_tensors(f / INITIAL_A_NAME)[0] for t, f in folders.items()}
        W0 = {m: weights[f"{m}.weight"].detach() for m in adapters["topic"].modules}
        expected = diagnose(adapters, stats, W0, initial).to_dict()
        assert record["initial_A"] is True
        for t in TASKS:
            for key in ("delta_norm", "retention", "captured_init", "captured_trained", "coordinate_mass"):
                assert record["adapters"][t][key] == pytest.approx(expected["adapters"][t][key], rel=1e-6), key
        np.testing.assert_allclose(record["absolute_interference"], expected["absolute_interference"], rtol=1e-6)
        assert record["mean_overlap"] == pytest.approx(expected["mean_overlap"], rel=1e-6)
        if init == "osrm":  # the saved initial A is the subspace the adapter started in
            for t in TASKS:
                subspace = Subspace.load(out / "subspaces" / "cov" / f"{t}.safetensors")
                for m, A0 in initial[t].items():
                    assert _retention(A0, subspace.A[m]) == pytest.approx(1.0)
    report = (out / "report.md").read_text()
    assert "## Adapter diagnostics" in report and "A retention" in report


# ------------------------------------------------------------------------------------------ chunks


def test_two_chunks_give_the_full_runs_results(study, tmp_path):
    """The full run's folder with seed 1 removed is what chunk `--seeds 0` leaves; `report` then covers seed
    0, and chunk `--seeds 1` (both inits) completes it to the full run's results."""
    config, full, _ = study
    shutil.copytree(config._base_dir, tmp_path / "copy")
    path = tmp_path / "copy" / "experiment.yaml"
    out = load_experiment(path).output_dir
    for p in sorted(out.rglob("*seed1*"), key=lambda p: len(p.parts), reverse=True):
        shutil.rmtree(p) if p.is_dir() else p.unlink()
    runner = CliRunner()
    first = runner.invoke(app, ["report", str(out), "--json"])
    assert first.exit_code == 0, first.output
    partial = _read(out / "results.json")
    assert {r["seed"] for r in partial["individual"]} == {0} and {e["n"] for e in partial["paired"]} == {1}
    assert partial["individual"] == [r for r in full.results["individual"] if r["seed"] == 0]
    inits = ",".join(reversed(config.init_labels))  # any order: the file's order is kept
    second = runner.invoke(app, ["run", str(path), "--seeds", "1", "--inits", inits, "--quiet", "--json"])
    assert second.exit_code == 0, second.output
    stages = json.loads(second.stdout)["stages"]
    assert stages["train"] == {"ran": 4, "skipped": 0} and stages["stats"] == {"ran": 0, "skipped": 2}
    assert _read(out / "results.json") == full.results
    (out / "results.json").unlink()
    rebuilt = runner.invoke(app, ["report", str(out), "--json"])
    assert rebuilt.exit_code == 0, rebuilt.output
    assert _read(out / "results.json") == full.results and (out / "report.md").is_file()
    again = runner.invoke(app, ["run", str(path), "--quiet", "--json"])
    assert all(s["ran"] == 0 for s in json.loads(again.stdout)["stages"].values())


def test_a_chunk_names_only_the_files_seeds_and_inits(model_dir, tmp_path):
    path = write_experiment(tmp_path, model_dir, **_overrides())
    runner = CliRunner()
    for args, words in ((["--seeds", "7"], "--seeds 7: not in the experiment"),
                        (["--inits", "osrm,pissa"], "--inits pissa: not in the experiment"),
                        (["--seeds", "one"], "integers")):
        result = runner.invoke(app, ["run", str(path), *args, "--validate-only"])
        assert result.exit_code == 2 and words in result.output, result.output
    assert runner.invoke(app, ["run", str(path), "--seeds", "1", "--validate-only"]).exit_code == 0
    missing = runner.invoke(app, ["report", str(tmp_path / "nothing")])
    assert missing.exit_code == 2


# ------------------------------------------------------------------------------------------ evaluation


def test_length_sorted_evaluation_gives_the_unsorted_predictions(study, model_dir):
    """`evaluate_rows` (one inference-mode pass over both parts, sorted by length) against a plain pass over
    each part's rows in their order."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from osrm_lora.tasks import get_task, make_dataloader

    config, _, calls = study
    torch.manual_seed(1)
    model = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=2).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    entry = next(t for t in config.tasks if t.name == "topic")
    task = get_task("topic", **entry.source_options(config._base_dir))
    parts = next(c[2] for c in calls if c[0] == "topic" and c[1] == ["report", "select"])
    got = evaluate_module.evaluate_rows(model, tokenizer, task, parts, batch_size=5, max_length=16)
    for name, rows in parts.items():
        batches = make_dataloader(task.full_split("dev").select(rows), tokenizer, task.spec, batch_size=5,
                                  max_length=16)
        with torch.no_grad():
            logits = torch.cat([model(**{k: v for k, v in b.items() if k != "labels"}).logits for b in batches])
        assert got[name].predictions == logits.argmax(-1).tolist()
        assert list(got[name].rows) == list(rows) and not math.isnan(got[name].metrics["accuracy"])
