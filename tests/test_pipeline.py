"""The experiment pipeline end to end on a tiny random BERT and two synthetic file tasks.

Scores are checked against independent references (PEFT's own adapter loading; a merged model built by hand
from the safetensors files), caching against file mtimes and manifests, and resumption against an
uninterrupted run.
"""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from pipeline_helpers import experiment_dict, write_experiment, write_tiny_model
from safetensors.torch import load_file
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from osrm_lora import train as train_module
from osrm_lora.pipeline import run_experiment
from osrm_lora.pipeline.context import Context
from osrm_lora.settings import ConfigError, load_experiment, parse_demo, parse_experiment

REPO = Path(__file__).resolve().parents[1]
TASKS = ["sentiment", "topic"]
UNITS = {
    "stats": 2,
    "subspaces": 1,
    "train": 4,
    "eval": 4,
    "fisher": 0,
    "grams": 0,
    "merge": 2 * (2 + 2 + 1),
    "interference": 2,
    "diagnostics": 2,
    "report": 1,
}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return write_tiny_model(tmp_path_factory.mktemp("tiny-bert"))


@pytest.fixture(scope="module")
def reference(model_dir, tmp_path_factory):
    """One uninterrupted run; later tests compare against it."""
    folder = tmp_path_factory.mktemp("reference")
    config = load_experiment(write_experiment(folder, model_dir))
    summary = run_experiment(config, progress=False)
    return config, summary


def _mtimes(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in folder.rglob("*") if p.is_file()}


def _scores(results: dict) -> dict:
    individual = {(r["init"], r["seed"], r["task"]): r["score"] for r in results["individual"]}
    merged = {
        (r["init"], r["seed"], r["method"], r["lambda"], r["task"]): r["score"] for r in results["merged"]
    }
    return {
        "individual": individual,
        "merged": merged,
        "interference": {(r["init"], r["seed"]): r["matrix"] for r in results["interference"]},
    }


def _dev_rows(config, task: str) -> tuple[list[str], list[int]]:
    """The dev split's report rows (the scores are taken on them), read straight from the user's file."""
    from osrm_lora.tasks.sampling import select_report_indices

    entry = next(t for t in config.tasks if t.name == task)
    path = Path(entry.source_options(config._base_dir)["files"]["dev"])
    if path.suffix == ".csv":
        with open(path) as f:
            rows = list(csv.DictReader(f))
        texts, labels = [r["sentence"] for r in rows], [["negative", "positive"].index(r["label"]) for r in rows]
    else:
        rows = [json.loads(line) for line in path.read_text().splitlines()]
        texts, labels = [r["sentence"] for r in rows], [int(r["label"]) for r in rows]
    settings = config.evaluation
    _, report = select_report_indices(labels, len(labels), 0, settings.select_examples, settings.max_examples, task)
    return [texts[i] for i in report], [labels[i] for i in report]


def _accuracy(model, tokenizer, texts, labels) -> float:
    batch = tokenizer(texts, padding=True, truncation=True, max_length=16, return_tensors="pt")
    with torch.no_grad():
        predictions = model(**batch).logits.argmax(-1).numpy()
    return float(np.mean(predictions == np.array(labels)))


# ---------------------------------------------------------------------------------------------- the run


def test_all_stages_run_and_the_report_holds_the_results(reference):
    config, summary = reference
    assert {k: len(v.ran) for k, v in summary.stages.items()} == UNITS
    assert all(not v.skipped for v in summary.stages.values())
    out = config.output_dir
    results = json.loads((out / "results.json").read_text())
    assert results == summary.results
    assert len(results["individual"]) == 4 and len(results["merged"]) == UNITS["merge"] * 2
    assert {r["lambda"] for r in results["merged"] if r["method"] == "ties"} == {0.5, 1.0}  # fixed λ added
    assert {r["lambda"] for r in results["merged"] if r["method"] == "emr"} == {None}
    for record in results["individual"] + results["merged"]:
        assert record["score"] == record["metrics"]["accuracy"]
        assert 0.0 <= record["score"] <= 1.0
    for r in results["interference"]:
        matrix = np.array(r["matrix"])
        assert matrix.shape == (2, 2) and np.allclose(np.diag(matrix), 1.0)
    for name in (
        "report.md",
        "table_best_lambda.csv",
        "table_fixed_lambda.csv",
        "plots/score_vs_lambda.png",
        "plots/interference.png",
        "plots/task_scores_best_lambda.png",
    ):
        assert (out / name).stat().st_size > 0, name

    # Fixed-λ table: every merged row recomputed from results.json records.
    with open(out / "table_fixed_lambda.csv") as f:
        rows = list(csv.DictReader(f))
    report = (out / "report.md").read_text()
    for row in rows:
        lam = None if row["lambda"] == "" else float(row["lambda"])
        if row["method"] == "individual":
            scores = [
                next(r["score"] for r in results["individual"] if (r["init"], r["task"]) == (row["init"], t))
                for t in TASKS
            ]
        else:
            scores = [
                next(
                    r["score"]
                    for r in results["merged"]
                    if (r["init"], r["method"], r["lambda"], r["task"])
                    == (row["init"], row["method"], lam, t)
                )
                for t in TASKS
            ]
        assert [float(row[t]) for t in TASKS] == pytest.approx(scores, abs=1e-6)
        assert float(row["average"]) == pytest.approx(np.mean(scores), abs=1e-6)
        assert f"| {row['init']} | {row['method']} |" in report
        assert f"{100 * np.mean(scores):.2f}" in report


def test_individual_scores_match_peft_loading(reference, model_dir):
    """The evaluator's W0 + BA and head swap gives PEFT's own predictions."""
    from peft import PeftModel

    config, summary = reference
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    for init in ("kaiming", "osrm"):
        for task in TASKS:
            base = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=2)
            model = PeftModel.from_pretrained(
                base, str(config.output_dir / "adapters" / init / "seed0" / task)
            ).eval()
            expected = _accuracy(model, tokenizer, *_dev_rows(config, task))
            got = next(
                r["score"] for r in summary.results["individual"] if (r["init"], r["task"]) == (init, task)
            )
            assert got == pytest.approx(expected)


def test_task_arithmetic_score_matches_a_hand_merged_model(reference, model_dir):
    """W0 + λ Σ_j s_j B_j A_j written by hand from the adapter files, with the evaluated task's own head."""
    config, summary = reference
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    lam = 1.0
    for init in ("kaiming", "osrm"):
        files = {t: config.output_dir / "adapters" / init / "seed0" / t for t in TASKS}
        for task in TASKS:
            model = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=2).eval()
            state = model.state_dict()
            for t, folder in files.items():
                tensors = load_file(folder / "adapter_model.safetensors")
                peft_config = json.loads((folder / "adapter_config.json").read_text())
                scale = peft_config["lora_alpha"] / peft_config["r"]
                for key, A in tensors.items():
                    if key.endswith(".lora_A.weight"):
                        module = key.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
                        B = tensors[key.replace("lora_A", "lora_B")]
                        state[f"{module}.weight"] += lam * scale * B @ A
                if t == task:
                    for name in ("weight", "bias"):
                        state[f"classifier.{name}"] = tensors[f"base_model.model.classifier.{name}"]
            model.load_state_dict(state)
            expected = _accuracy(model, tokenizer, *_dev_rows(config, task))
            got = next(
                r["score"]
                for r in summary.results["merged"]
                if (r["init"], r["method"], r["lambda"], r["task"]) == (init, "task_arithmetic", lam, task)
            )
            assert got == pytest.approx(expected)


def test_second_run_is_a_no_op(reference):
    config, _ = reference
    before = _mtimes(config.output_dir)
    summary = run_experiment(config, progress=False)
    assert {k: len(v.skipped) for k, v in summary.stages.items()} == UNITS
    assert not summary.ran_anything
    assert _mtimes(config.output_dir) == before


def test_cli_run_of_a_finished_experiment_prints_the_tables(reference):
    from typer.testing import CliRunner

    from osrm_lora.cli import app

    config, first = reference
    path = str(config._base_dir / "experiment.yaml")
    result = CliRunner().invoke(app, ["run", path, "--json", "--quiet"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert all(stage["ran"] == 0 for stage in data["stages"].values())
    assert data["results"] == first.results
    table = CliRunner().invoke(app, ["run", path, "--quiet"], env={"COLUMNS": "200"})
    assert table.exit_code == 0
    assert "Best λ" in table.stdout and "report.md" in table.stdout
    assert sum("task_arithmetic" in line for line in table.stdout.splitlines()) == 4  # 2 inits × 2 views


def test_force_redoes_one_stage_and_nothing_downstream_when_unchanged(reference):
    config, first = reference
    results_mtime = (config.output_dir / "results.json").stat().st_mtime_ns
    summary = run_experiment(config, force=["merge"], progress=False)
    assert {k: len(v.ran) for k, v in summary.stages.items()} == {
        **{k: 0 for k in UNITS},
        "merge": UNITS["merge"],
    }
    assert (
        config.output_dir / "results.json"
    ).stat().st_mtime_ns == results_mtime  # same merges, same digests
    assert _scores(summary.results) == _scores(first.results)
    with pytest.raises(ValueError, match="unknown stage"):
        run_experiment(config, force=["merging"], progress=False)


def _copy_experiment(config, tmp_path: Path) -> Path:
    """The reference experiment folder (YAML, data, outputs) copied elsewhere; returns the copied YAML."""
    shutil.copytree(config._base_dir, tmp_path / "copy")
    return tmp_path / "copy" / "experiment.yaml"


def test_changed_setting_redoes_only_what_depends_on_it(reference, tmp_path):
    changed = load_experiment(_copy_experiment(reference[0], tmp_path))
    changed.evaluation.max_examples = 16
    summary = run_experiment(changed, progress=False)
    ran = {k: len(v.ran) for k, v in summary.stages.items()}
    assert ran == {**{k: 0 for k in UNITS}, "eval": 4, "merge": UNITS["merge"], "report": 1}
    assert json.loads((changed.output_dir / "results.json").read_text())["evaluation"]["max_examples"] == 16


def test_edited_data_file_retrains_that_task_only(reference, tmp_path):
    copied = load_experiment(_copy_experiment(reference[0], tmp_path))
    dev = copied._base_dir / "data" / "topic_dev.jsonl"
    dev.write_text(dev.read_text() + json.dumps({"sentence": "w1 dog w2", "label": 1}) + "\n")
    summary = run_experiment(copied, progress=False)
    # Statistics come from the train split: recomputed (the task changed) but identical, so the subspaces
    # stay cached; both topic adapters retrain and everything downstream of them is redone.
    assert sorted(summary.stages["stats"].ran) == ["topic"]
    assert summary.stages["subspaces"].skipped == ["cov"]
    assert sorted(summary.stages["train"].ran) == ["kaiming/seed0/topic", "osrm/seed0/topic"]
    assert len(summary.stages["eval"].ran) == 2 and len(summary.stages["merge"].ran) == UNITS["merge"]


def test_the_official_init_has_its_own_statistics_pool(model_dir, tmp_path):
    """`statistics.official_pool`: osrm-official's subspaces come from every pool task (as the official code
    takes every GLUE task), the paper's OSRM subspaces from the merged tasks only."""
    from osrm_lora.subspace import Subspace

    path = write_experiment(tmp_path, model_dir)
    data = yaml.safe_load(path.read_text())
    data.update(
        pool_tasks=[{**data["tasks"][1], "name": "extra"}],
        inits=["osrm", "osrm-official"],
        statistics={**data["statistics"], "pool": list(TASKS), "official_pool": [*TASKS, "extra"]},
        merge=[{"method": "task_arithmetic", "lambdas": [1.0]}],
        interference=False,
        diagnostics=False,
    )
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    config = load_experiment(path)
    assert config.pool_for("cov") == list(TASKS) and config.pool_for("official") == [*TASKS, "extra"]
    summary = run_experiment(config, progress=False)
    assert summary.stages["stats"].ran == [*TASKS, *(f"padded/{t}" for t in (*TASKS, "extra"))]
    out = config.output_dir
    assert Subspace.load(out / "subspaces" / "cov" / "sentiment.safetensors").others == ["topic"]
    assert Subspace.load(out / "subspaces" / "official" / "sentiment.safetensors").others == ["topic", "extra"]
    data["statistics"]["official_pool"] = [*TASKS, "missing"]
    with pytest.raises(ConfigError, match=r"statistics.official_pool names \['missing'\]"):
        parse_experiment(data, "pools")


def test_a_chunk_needing_fewer_statistics_is_reported_whole(model_dir, tmp_path):
    """A chunk whose inits need no padded means (kaiming, after a chunk of osrm-official made them) leaves
    interference and diagnostics units that the whole study counts as finished: they read only the merged
    tasks' statistics, not every statistics file of the run."""
    path = write_experiment(tmp_path, model_dir)
    data = yaml.safe_load(path.read_text())
    data.update(inits=["kaiming", "osrm-official"], merge=[{"method": "task_arithmetic", "lambdas": [1.0]}],
                pool_tasks=[{**data["tasks"][1], "name": "extra"}],
                statistics={**data["statistics"], "official_pool": [*TASKS, "extra"]})
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    config = load_experiment(path)
    run_experiment(config, inits=["osrm-official"], progress=False)  # the padded means exist from now on
    results = run_experiment(config, inits=["kaiming"], progress=False).results
    for kind in ("interference", "diagnostics"):
        assert sorted((r["init"], r["seed"]) for r in results[kind]) == [("kaiming", 0), ("osrm-official", 0)]


def test_statistics_pool_sample_sizes_and_init_entries(model_dir, tmp_path):
    """A pool task that is not merged, two sample sizes, an init with options, the official code's init and a
    control: the units per size, the pool in each subspace, the init options in each adapter, `samples` in the
    results and the plot of score vs sample size."""
    from osrm_lora.stats import TaskStats
    from osrm_lora.subspace import Subspace

    path = write_experiment(tmp_path, model_dir)
    data = yaml.safe_load(path.read_text())
    extra = {**data["tasks"][1], "name": "extra"}  # topic's files under another name: statistics only
    data.update(
        pool_tasks=[extra],
        inits=["kaiming", {"name": "osrm", "scale": "kaiming", "label": "osrm-k"}, "osrm-official", "task-orthogonal"],
        statistics={**data["statistics"], "samples_per_task": [8, 16]},
        merge=[{"method": "task_arithmetic", "lambdas": [1.0]}],
        interference=False,
        diagnostics=False,
    )
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    config = load_experiment(path)
    assert config.pool == [*TASKS, "extra"]
    summary = run_experiment(config, progress=False)
    assert summary.stages["stats"].ran == [
        f"{kind}{n}{t}" for kind in ("", "padded/") for n in ("samples8/", "") for t in (*TASKS, "extra")
    ]
    assert summary.stages["subspaces"].ran == ["cov/samples8", "cov", "official/samples8", "official"]
    labels = ["kaiming", "osrm-k-n8", "osrm-k-n16", "osrm-official-n8", "osrm-official-n16", "task-orthogonal"]
    assert summary.stages["train"].ran == [f"{i}/seed0/{t}" for i in labels for t in TASKS]

    out = config.output_dir
    small = TaskStats.load(out / "stats" / "samples8" / "extra.safetensors")
    assert small.extra["examples"] == "8" and small.extra["mask_padding"] == "true"
    padded = TaskStats.load(out / "stats" / "padded" / "extra.safetensors")
    assert padded.extra["mask_padding"] == "false" and padded.tokens == 16 * 16  # every position of 16 examples
    cov = Subspace.load(out / "subspaces" / "cov" / "samples8" / "sentiment.safetensors")
    assert cov.others == ["topic", "extra"] and cov.variant == "cov"
    official = Subspace.load(out / "subspaces" / "official" / "topic.safetensors")
    assert official.others == ["sentiment", "extra"] and official.variant == "official"
    meta = json.loads((out / "adapters" / "osrm-k-n8" / "seed0" / "sentiment" / "osrm_lora.json").read_text())
    assert meta["init"] == "osrm" and meta["init_options"] == {"scale": "kaiming"}
    assert meta["subspace"]["fingerprint"] == train_module._subspace_fingerprint(cov)
    manifest = json.loads((out / "manifests" / "train" / "task-orthogonal" / "seed0" / "topic.json").read_text())
    assert manifest["inputs"]["merged_tasks"] == TASKS and "init_options" not in manifest["inputs"]

    results = json.loads((out / "results.json").read_text())
    assert results["inits"] == labels
    assert results["init_runs"]["osrm-k-n8"] == {"entry": "osrm-k", "init": "osrm", "options": {"scale": "kaiming"},
                                                 "samples": 8}
    samples = {(r["init"], r.get("samples")) for r in results["individual"] + results["merged"]}
    assert samples == {("kaiming", None), ("osrm-k-n8", 8), ("osrm-k-n16", 16), ("osrm-official-n8", 8),
                       ("osrm-official-n16", 16), ("task-orthogonal", None)}
    assert (out / "plots" / "score_vs_samples.png").is_file()
    assert "score_vs_samples.png" in (out / "report.md").read_text()


def _peft_model(model_dir: Path, adapter_dir: Path):
    from peft import PeftModel

    base = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=2)
    return PeftModel.from_pretrained(base, str(adapter_dir)).eval()


def test_fisher_and_regmean_merges_equal_the_library_on_fine_tuned_statistics(
    reference, model_dir, tmp_path, monkeypatch
):
    """Fisher diagonals and RegMean Grams are estimated on each fine-tuned model (a PEFT model here, the
    pipeline's dressed base model there), cached, and the merges equal `merge_adapters` on those files."""
    from osrm_lora.adapters import LoraAdapter
    from osrm_lora.merge import merge_adapters
    from osrm_lora.runtime.fisher import estimate_fisher, load_fisher
    from osrm_lora.stats import TaskStats, collect_stats
    from osrm_lora.tasks import get_task, make_dataloader

    path = _copy_experiment(reference[0], tmp_path)
    data = yaml.safe_load(path.read_text())
    data["fisher"] = {"samples": 16, "batch_size": 8, "max_length": 16}
    data["merge"] = [
        {"method": "fisher", "lambdas": [1.0]},
        {"method": "regmean", "lambdas": [1.0]},
        {"method": "regmean", "name": "regmean_base", "grams": "base", "lambdas": [1.0]},
    ]
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    config = load_experiment(path)
    assert [m.grams for m in config.merge] == [None, "finetuned", "base"]

    evaluated = {}  # (label, init, task) -> the merged deltas the pipeline evaluated
    real_evaluate = Context.evaluate

    def record(self, task_name, deltas, head, source, parts):
        if source.startswith("merge "):
            label, init = source.removeprefix("merge ").split("/")[:2]
            evaluated[(label, init, task_name)] = {m: d.clone() for m, d in deltas.items()}
        return real_evaluate(self, task_name, deltas, head, source, parts)

    monkeypatch.setattr(Context, "evaluate", record)
    summary = run_experiment(config, progress=False)
    ran = {k: len(v.ran) for k, v in summary.stages.items()}
    assert ran == {**{k: 0 for k in UNITS}, "fisher": 4, "grams": 4, "merge": 6, "report": 1}

    out = config.output_dir
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tasks = {t.name: get_task(t.name, **t.source_options(config._base_dir)) for t in config.tasks}
    for init in config.init_labels:
        adapters, fishers, grams = [], [], []
        for name, task in tasks.items():
            folder = out / "adapters" / init / "seed0" / name
            adapters.append(LoraAdapter.load(folder, name=name))
            peft_model = _peft_model(model_dir, folder)
            fisher_batches = make_dataloader(
                task.split("train", max_examples=16, seed=0),
                tokenizer,
                task.spec,
                batch_size=8,
                max_length=16,
            )
            expected_fisher = estimate_fisher(peft_model, fisher_batches, ["query", "value"], seed=0)
            fishers.append(load_fisher(out / "fisher" / init / "seed0" / f"{name}.safetensors"))
            assert set(fishers[-1]) == set(expected_fisher) and len(expected_fisher) == 4
            for m, f in expected_fisher.items():
                torch.testing.assert_close(fishers[-1][m], f, rtol=1e-4, atol=1e-7 * float(f.max()))
            stats_batches = make_dataloader(  # longest first, as the pipeline batches statistics
                task.split("train", max_examples=32, seed=0),
                tokenizer,
                task.spec,
                batch_size=16,
                max_length=16,
                by_length=True,
            )
            grams.append(collect_stats(peft_model, stats_batches, ["query", "value"], task=name))
            saved = TaskStats.load(out / "grams" / init / "seed0" / f"{name}.safetensors")
            assert saved.tokens == grams[-1].tokens
            for m in grams[-1].modules:
                torch.testing.assert_close(saved.second[m], grams[-1].second[m], rtol=1e-4, atol=1e-4)
            # Layer 1 sees the fine-tuned layer 0's output: these are not the base model's statistics.
            base_stats = TaskStats.load(out / "stats" / f"{name}.safetensors")
            layer1 = "bert.encoder.layer.1.attention.self.query"
            assert not torch.allclose(saved.second[layer1], base_stats.second[layer1], rtol=1e-3)

        base_stats = [TaskStats.load(out / "stats" / f"{t}.safetensors") for t in tasks]
        expected = {
            "fisher": merge_adapters(adapters, "fisher", fisher=fishers, scaling=1.0),
            "regmean": merge_adapters(adapters, "regmean", stats=grams, scaling=1.0),
            "regmean_base": merge_adapters(adapters, "regmean", stats=base_stats, scaling=1.0),
        }
        for label, merged in expected.items():
            deltas = {m.name: m.dense() for m in merged}
            for name in tasks:
                got = evaluated[(label, init, name)]
                assert got.keys() == deltas.keys()
                for m, delta in deltas.items():
                    torch.testing.assert_close(got[m], delta, rtol=1e-4, atol=1e-6 * float(delta.abs().max()))

    monkeypatch.setattr(Context, "evaluate", real_evaluate)
    again = run_experiment(config, progress=False)
    assert not again.ran_anything
    assert (len(again.stages["fisher"].skipped), len(again.stages["grams"].skipped)) == (4, 4)


def test_interrupted_run_resumes_to_the_same_results(reference, model_dir, tmp_path, monkeypatch):
    _, uninterrupted = reference
    config = load_experiment(write_experiment(tmp_path, model_dir))
    real_finetune = train_module.finetune
    calls = []

    def crash_on_third(*args, **kwargs):
        calls.append(kwargs["init"])
        if len(calls) == 3:
            raise KeyboardInterrupt("simulated kill in the training stage")
        return real_finetune(*args, **kwargs)

    monkeypatch.setattr(train_module, "finetune", crash_on_third)
    with pytest.raises(KeyboardInterrupt):
        run_experiment(config, progress=False)
    out = config.output_dir
    assert len(list((out / "manifests" / "train").rglob("*.json"))) == 2
    assert not (out / "adapters" / "osrm").exists()
    assert not [p for p in out.rglob("*") if p.name.endswith(".tmp")]

    monkeypatch.setattr(train_module, "finetune", real_finetune)
    resumed = run_experiment(config, progress=False)
    assert (len(resumed.stages["train"].ran), len(resumed.stages["train"].skipped)) == (2, 2)
    assert len(resumed.stages["stats"].skipped) == 2
    assert _scores(resumed.results) == _scores(uninterrupted.results)


def test_content_digest_ignores_safetensors_metadata_order(tmp_path):
    from safetensors.torch import save_file

    from osrm_lora.io import load_tensors, sha256_file
    from osrm_lora.pipeline.cache import _content_digest

    tensors = {"a": torch.arange(6.0).reshape(2, 3), "b": torch.ones(4)}
    save_file(tensors, str(tmp_path / "x.safetensors"), metadata={f"k{i}": str(i) for i in range(8)})
    raw = (tmp_path / "x.safetensors").read_bytes()
    size = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + size])
    header["__metadata__"] = dict(reversed(list(header["__metadata__"].items())))
    text = json.dumps(header, separators=(",", ":")).encode().ljust(size)
    (tmp_path / "y.safetensors").write_bytes(raw[:8] + text + raw[8 + size :])
    assert load_tensors(tmp_path / "y.safetensors")[1] == load_tensors(tmp_path / "x.safetensors")[1]
    assert sha256_file(tmp_path / "x.safetensors") != sha256_file(tmp_path / "y.safetensors")
    assert _content_digest(tmp_path / "x.safetensors") == _content_digest(tmp_path / "y.safetensors")
    save_file(
        {**tensors, "b": torch.zeros(4)}, str(tmp_path / "z.safetensors"), metadata=header["__metadata__"]
    )
    assert _content_digest(tmp_path / "z.safetensors") != _content_digest(tmp_path / "x.safetensors")


def test_cache_produces_only_the_pending_units_of_a_batch(tmp_path):
    """One produce call for several units (a merge's λ grid): cached units are left out, each yielded unit
    is recorded, and a unit the call never yields is an error."""
    from osrm_lora.pipeline.cache import Cache, Unit
    from osrm_lora.pipeline.keys import MergeKey
    from osrm_lora.pipeline.layout import Layout

    layout = Layout(tmp_path)
    keys = [MergeKey("ta", "kaiming", 0, lam) for lam in (0.5, 1.0, 2.0)]
    units = [Unit(k, {"lambda": k.lam}, [layout.merged(k)]) for k in keys]
    calls = []

    def produce(pending):
        calls.append([u.key.lam for u in pending])
        for unit in pending:
            unit.outputs[0].parent.mkdir(parents=True, exist_ok=True)
            unit.outputs[0].write_text(str(unit.key.lam))
            yield unit

    Cache(layout, {"merge": 1}).run("merge", units[1:2], produce)
    cache = Cache(layout, {"merge": 1})
    digests = cache.run("merge", units, produce)
    assert calls == [[1.0], [0.5, 2.0]] and set(digests) == set(keys)
    assert cache.status["merge"].skipped == ["ta/kaiming/seed0/lambda1"]
    assert cache.status["merge"].ran == ["ta/kaiming/seed0/lambda0.5", "ta/kaiming/seed0/lambda2"]
    assert (tmp_path / "manifests" / "merge" / "ta" / "kaiming" / "seed0" / "lambda2.json").is_file()
    with pytest.raises(RuntimeError, match="without producing"):
        Cache(layout, {"merge": 1}, force=["merge"]).run("merge", units, lambda pending: iter(pending[:1]))


def test_stages_run_in_dependency_order_under_the_settings_names():
    """The CLI validates --force against `settings.STAGES` (no torch); the pipeline's stage classes match it."""
    from osrm_lora.pipeline.runner import _dependency_order
    from osrm_lora.pipeline.stages import STAGES, Stage
    from osrm_lora.settings import STAGES as NAMES

    assert [s.name for s in _dependency_order(STAGES)] == list(NAMES)

    def stage(name, needs=()):
        return type(name, (Stage,), {"name": name, "needs": needs})()

    a, b, c = stage("a", ("c",)), stage("b"), stage("c", ("b",))
    assert [s.name for s in _dependency_order([a, b, c])] == ["b", "c", "a"]
    with pytest.raises(ValueError, match="need each other"):
        _dependency_order([stage("x", ("y",)), stage("y", ("x",))])
    with pytest.raises(ValueError, match="unknown stage"):
        _dependency_order([stage("x", ("z",))])


# ---------------------------------------------------------------------------------------------- configs


def _error(data: dict, tmp_path: Path) -> str:
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError) as info:
        load_experiment(path)
    assert str(path) in str(info.value)
    return str(info.value)


@pytest.mark.parametrize(
    "change, key, words",
    [
        (lambda d: d["lora"].update(rank=4), "lora.rank", "unknown key"),
        (lambda d: d["training"].update(lr="fast"), "training.lr", "valid number"),
        (lambda d: d["merge"][1]["params"].update(densty=0.3), "merge[1].params", "densty"),
        (lambda d: d["merge"][0].update(method="task_arithmetc"), "merge[0].method", "task_arithmetic"),
        (lambda d: d["merge"][2].update(lambdas=[1.0]), "merge[2]", "no global λ"),
        (lambda d: d["merge"][0].update(lambdas=[0.5, -1.0]), "merge[0].lambdas", "> 0"),
        (lambda d: d.update(inits=["kaiming", "orsm"]), "inits[1]", "orsm"),
        (lambda d: d.update(inits=["kaiming", {"name": "osrm", "scale": "big"}]), "inits[1]", "'gaussian'"),
        (lambda d: d.update(inits=["kaiming", {"name": "kaiming", "scale": "big"}]), "inits[1]", "unknown option"),
        (lambda d: d.update(inits=["osrm", {"name": "osrm", "scale": "kaiming"}]), "inits", "distinct labels"),
        (lambda d: d.update(inits=[{"name": "osrm", "label": "a/b"}]), "inits[0].label", "pattern"),
        (lambda d: d["statistics"].update(samples_per_task=[16, 16]), "statistics.samples_per_task", "distinct"),
        (lambda d: d["statistics"].update(samples_per_task=0), "statistics.samples_per_task", "positive"),
        (lambda d: d["statistics"].update(pool=["a", "zz"]), "(top level)", "neither in tasks nor in pool_tasks"),
        (lambda d: d.update(pool_tasks=["c"]) or d["statistics"].update(pool=["a", "b"]), "(top level)",
         "not in statistics.pool"),
        (lambda d: d.update(pool_tasks=["a"]), "(top level)", "repeat task names"),
        (lambda d: d.update(tasks=d["tasks"][:1]), "tasks", "at least 2"),
        (lambda d: d["evaluation"].update(split="validation"), "evaluation.split", "dev"),
        (lambda d: d.pop("model"), "model", "required"),
        (lambda d: d.update(seeds=[0, 0]), "seeds", "unique"),
        (lambda d: d["merge"][0].update(grams="base"), "merge[0]", "uses no Gram matrices"),
        (lambda d: d["merge"].append({"method": "regmean", "grams": "fine"}), "merge[3].grams", "finetuned"),
        (lambda d: d.update(fisher={"labels": "gold"}), "fisher.labels", "empirical"),
    ],
)
def test_bad_configs_name_the_key(change, key, words, tmp_path):
    data = experiment_dict(Path("/nonexistent/model"), [{"name": "a"}, {"name": "b"}])
    change(data)
    message = _error(data, tmp_path)
    assert f": {key}:" in message
    assert words in message


def test_init_entries_pool_and_sample_sizes():
    data = experiment_dict(Path("/m"), [{"name": "a"}, {"name": "b"}])
    data["inits"] = ["kaiming", "osrm", {"name": "osrm", "scale": "kaiming", "label": "osrm-k"}, "task-orthogonal"]
    config = parse_experiment(data, "one size")
    assert config.init_labels == ["kaiming", "osrm", "osrm-k", "task-orthogonal"]
    assert [(r.name, r.options, r.samples) for r in config.init_runs][1:3] == [
        ("osrm", {}, 32), ("osrm", {"scale": "kaiming"}, 32)]
    assert config.pool == ["a", "b"] and config.statistics.reference == 32
    # what the statistics caches were keyed by before the sample-size axis
    assert config.statistics.sample_inputs() == {"samples_per_task": 32, "batch_size": 16, "max_length": 16,
                                                 "split": "train"}

    data["statistics"] = {"samples_per_task": [32, 16], "pool": ["a", "b", "c"]}
    data["pool_tasks"] = ["c", {"name": "d", "source": "builtin"}]
    data["statistics"]["pool"].append("d")
    config = parse_experiment(data, "sizes")
    assert config.init_labels == ["kaiming", "osrm-n16", "osrm-n32", "osrm-k-n16", "osrm-k-n32", "task-orthogonal"]
    run = config.init_run("osrm-k-n16")
    assert (run.entry, run.name, run.options, run.samples) == ("osrm-k", "osrm", {"scale": "kaiming"}, 16)
    assert config.init_run("kaiming").samples is None and config.statistics.sizes == [16, 32]
    assert config.pool == ["a", "b", "c", "d"] and config.task_names == ["a", "b"]
    assert config.task_entry("d").source_options() == {"source": "builtin"}
    data["statistics"].pop("pool")
    assert parse_experiment(data, "default pool").pool == ["a", "b", "c", "d"]  # merged tasks and pool_tasks


def test_yaml_and_file_errors(tmp_path):
    broken = tmp_path / "broken.yaml"
    broken.write_text("model: x\ntasks: [a, b\n")
    with pytest.raises(ConfigError, match="broken.yaml: not valid YAML"):
        load_experiment(broken)
    with pytest.raises(ConfigError, match="not found"):
        load_experiment(tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match="mapping"):
        parse_experiment(["a"], "list.yaml")


def test_relative_paths_resolve_against_the_experiment_file(tmp_path):
    data = experiment_dict("./model", [{"name": "a", "files": {"train": "d/a.csv"}}, {"name": "b"}])
    (tmp_path / "sub").mkdir()
    path = tmp_path / "sub" / "exp.yaml"
    path.write_text(yaml.safe_dump(data))
    config = load_experiment(path)
    assert config.output_dir == (tmp_path / "sub" / "out").resolve()
    assert config.model.name == str((tmp_path / "sub" / "model").resolve())
    assert config.tasks[0].source_options(config._base_dir)["files"]["train"] == str(
        tmp_path / "sub" / "d" / "a.csv"
    )


def test_examples_validate_and_demo_is_packaged():
    for path in sorted((REPO / "examples").glob("*.yaml")):
        config = load_experiment(path)
        assert len(config.tasks) >= 2 and config.merge, path
    packaged = REPO / "src" / "osrm_lora" / "configs" / "demo.yaml"
    assert (REPO / "examples" / "demo.yaml").read_text() == packaged.read_text()
    demo = parse_demo()
    assert demo.model.name == "builtin:minilm"
    assert {"kaiming", "osrm"} <= set(demo.init_labels)
    assert {"task_arithmetic", "ties"} <= {m.method for m in demo.merge}
