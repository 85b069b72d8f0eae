"""bench/summarise_study.py: the study's decision rule on constructed per-seed scores, checked against t-intervals
computed here with scipy, and the summary rebuilt from chunk files alone."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
from scipy import stats

BENCH = Path(__file__).resolve().parents[1] / "bench"


@pytest.fixture(scope="module")
def study():
    sys.path.insert(0, str(BENCH))
    try:
        spec = importlib.util.spec_from_file_location("summarise_study", BENCH / "summarise_study.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.path.remove(str(BENCH))


TASKS = ["sst2", "qnli"]
SEEDS = [0, 1, 2, 3, 4]
NOISE = np.random.default_rng(0).normal(size=(10, len(SEEDS)))
# Merged report averages per init and seed (fractions): random-orthonormal sits 3 points above kaiming,
# osrm 5 above random-orthonormal, osrm-official on it (±0.3), osrm-reg 1 above it with a 5-point spread.
KAIMING = 0.70 + 0.01 * NOISE[0]
CONTROL = KAIMING + 0.03 + 0.002 * NOISE[1]
MERGED = {
    "kaiming": KAIMING, "random-orthonormal": CONTROL, "osrm": CONTROL + 0.05 + 0.003 * NOISE[2],
    "osrm-official": CONTROL + 0.003 * NOISE[3], "osrm-reg": CONTROL + 0.01 + 0.05 * NOISE[4],
    "gaussian": KAIMING, "task-orthogonal": KAIMING, "osrm-contrast": KAIMING, "osrm-project": KAIMING,
}


def t_interval(values):
    values = np.asarray(values)
    half = stats.t.ppf(0.975, len(values) - 1) * values.std(ddof=1) / math.sqrt(len(values))
    return values.mean() - half, values.mean() + half


def chunk(study, seed: int, group: str, inits: list[str] | None = None) -> dict:
    inits = inits or study.GROUPS[group]
    individual = [{"init": i, "seed": seed, "task": t, "score": 0.8, "metrics": {"accuracy": 0.8},
                   "primary_metric": "accuracy", "examples": 1000} for i in inits for t in TASKS]
    selection = []
    for i in inits:
        average = float(MERGED[i][seed])
        curve = [{"lambda": lam, "select_average": average, "report_average": average - 0.01 * lam,
                  "select": {}, "report": {}} for lam in (0.5, 1.0)]
        selection.append({"init": i, "method": "task_arithmetic", "seed": seed, "curve": curve,
                          "selected": {"lambda": 0.5, "average": average, "scores": dict.fromkeys(TASKS, average)}})
    return {"format": study.CHUNK_FORMAT, "seed": seed, "group": group, "inits": inits, "device": "cpu",
            "precision": "fp32", "machine": {"cpu": "test", "cores": 2, "torch": "x"},
            "compute": {"wall_minutes": 1.0, "cpu_minutes": 2.0, "max_rss_gb": 1.0},
            "experiment": {"config": {"name": "study", "model": {"name": "builtin:minilm"}}}, "tasks": TASKS,
            "methods": ["task_arithmetic"], "fixed_lambda": {"task_arithmetic": 1.0}, "evaluation": {},
            "primary_metrics": dict.fromkeys(TASKS, "accuracy"), "forecast": {}, "individual": individual,
            "merged": [], "selection": selection, "interference": [], "diagnostics": [], "modes": []}


@pytest.fixture()
def folder(study, tmp_path):
    for seed in SEEDS:
        for group in study.GROUPS:
            (tmp_path / f"seed{seed}_{group}.json").write_text(json.dumps(chunk(study, seed, group)))
    return tmp_path


def test_the_rule_gives_each_constructed_case_its_verdict(study, folder):
    _, results = study.load_chunks(folder)
    scores = study.per_seed_scores(results)
    verdicts = {c: study.decide(scores, c, "task_arithmetic") for c in ("osrm", "osrm-official", "osrm-reg")}
    assert verdicts["osrm"]["verdict"] == "real"
    assert verdicts["osrm-official"]["verdict"] == "scale artefact"
    assert verdicts["osrm-reg"]["verdict"] == "undecided at n = 5"
    low, high = t_interval(MERGED["osrm-reg"] - CONTROL)
    assert verdicts["osrm-reg"]["vs_control"]["low"] == pytest.approx(low)
    assert verdicts["osrm-reg"]["vs_control"]["high"] == pytest.approx(high)
    assert verdicts["osrm"]["vs_reference"]["mean"] == pytest.approx(np.mean(MERGED["osrm"] - KAIMING))


def test_a_single_task_loss_over_one_point_blocks_a_real_gain(study, folder):
    _, results = study.load_chunks(folder)
    scores = study.per_seed_scores(results)
    scores[("osrm", "individual")] = {s: v - 0.015 for s, v in scores[("osrm", "individual")].items()}
    assert study.decide(scores, "osrm", "task_arithmetic")["verdict"].startswith("undecided")


def test_a_reading_on_fewer_seeds_than_the_rule_is_interim(study, folder):
    for seed in (3, 4):
        for group in study.GROUPS:
            (folder / f"seed{seed}_{group}.json").unlink()
    _, results = study.load_chunks(folder)
    scores = study.per_seed_scores(results)
    real = study.decide(scores, "osrm", "task_arithmetic")
    scale = study.decide(scores, "osrm-official", "task_arithmetic")
    assert real["verdict"] == "real so far (interim, n = 3 of 5)"
    assert scale["verdict"] == "scale artefact so far (interim, n = 3 of 5)"
    assert study.verdict_words(real).startswith("osrm, task_arithmetic: interim, n = 3 of the rule's 5 seeds")
    assert "the gain is real" in study.verdict_words(real)
    assert "an artefact of scale" in study.verdict_words(scale)
    assert study.decide(scores, "osrm-reg", "task_arithmetic")["verdict"] == "undecided at n = 3"


def test_seeds_to_decide_is_the_first_n_whose_interval_decides(study):
    def decides(n, mean, sd):
        half = stats.t.ppf(0.975, n - 1) * sd / math.sqrt(n)
        return (mean >= 0.02 and mean - half > 0) or abs(mean) + half <= 0.02

    for mean, sd in ((0.03, 0.04), (0.005, 0.02), (-0.01, 0.01)):
        n = study.seeds_to_decide(mean, sd)
        assert decides(n, mean, sd) and not any(decides(k, mean, sd) for k in range(2, n))
    assert study.seeds_to_decide(0.0199, 0.01) is None  # within ±2 points only past 10,000 seeds
    assert study.seeds_to_decide(0.021, math.nan) is None


def test_a_loss_against_the_control_is_worded_as_no_verdict_not_a_threshold(study, folder):
    _, results = study.load_chunks(folder)
    scores = study.per_seed_scores(results)
    scores[("osrm-reg", "task_arithmetic")] = {s: v - 0.1 for s, v in scores[("random-orthonormal", "task_arithmetic")].items()}
    loss = study.decide(scores, "osrm-reg", "task_arithmetic")
    assert loss["verdict"] == "undecided at n = 5" and loss["n_to_decide"] is None
    assert "trails random-orthonormal by more than 2 points" in study.verdict_words(loss)
    centred = NOISE[5] - NOISE[5].mean()  # a mean of exactly 1.99 points: inside ±2, decided only past 10,000
    scores[("osrm-reg", "task_arithmetic")] = {s: v + 0.0199 + 0.03 * centred[s] for s, v in
                                               scores[("random-orthonormal", "task_arithmetic")].items()}
    near = study.decide(scores, "osrm-reg", "task_arithmetic")
    assert near["n_to_decide"] is None and "sits near a threshold" in study.verdict_words(near)


def test_summary_is_rebuilt_from_the_chunk_files_alone(study, folder):
    text = study.summarise(folder, folder / "study.md")
    assert (folder / "study.md").read_text() == text
    assert "osrm, task_arithmetic: the gain is real" in text
    assert (folder / "plots" / "lambda_group_a.png").stat().st_size > 0
    decisions = json.loads((folder / "decisions.json").read_text())["decisions"]
    assert {d["candidate"] for d in decisions} == set(study.CANDIDATES)


def test_time_log_minutes(study, tmp_path):
    log = tmp_path / "time.log"
    log.write_text("\tUser time (seconds): 90.0\n\tSystem time (seconds): 30.0\n"
                   "\tElapsed (wall clock) time (h:mm:ss or m:ss): 1:02:30\n"
                   "\tMaximum resident set size (kbytes): 2097152\n")
    assert study.parse_time_log(log) == {"wall_minutes": 62.5, "cpu_minutes": 2.0, "max_rss_gb": 2.0}


def _adapter_records(run_dir: Path, records: dict[tuple[str, str], dict]) -> None:
    for (init, task), record in records.items():
        folder = run_dir / "adapters" / init / "seed2" / task
        folder.mkdir(parents=True)
        (folder / "osrm_lora.json").write_text(json.dumps(record))


def test_chunk_device_and_precision_come_from_its_adapter_records(study, tmp_path):
    gpu = {"device": "NVIDIA H200", "precision": "fp32"}
    _adapter_records(tmp_path / "gpu", {(i, t): gpu for i in ("osrm", "kaiming") for t in TASKS})
    assert study.training_device(tmp_path / "gpu", 2, ["osrm", "kaiming"], TASKS) == ("NVIDIA H200", "fp32")
    _adapter_records(tmp_path / "old", {("osrm", t): {"precision": "fp32"} for t in TASKS})  # before "device"
    assert study.training_device(tmp_path / "old", 2, ["osrm"], TASKS) == ("cpu", "fp32")
    mixed = {("osrm", "sst2"): gpu, ("osrm", "qnli"): {**gpu, "precision": "bf16"}}
    _adapter_records(tmp_path / "mixed", mixed)
    with pytest.raises(SystemExit, match="mixed devices/precisions"):
        study.training_device(tmp_path / "mixed", 2, ["osrm"], TASKS)


def test_official_comparison_is_osrm_official_minus_gaussian_over_paired_seeds(study, folder):
    _, results = study.load_chunks(folder)
    table = study.official_markdown(study.per_seed_scores(results), ["task_arithmetic"])
    values = MERGED["osrm-official"] - MERGED["gaussian"]
    low, high = t_interval(values)
    expected = f"| task_arithmetic | 5 | {100 * values.mean():+.2f} [{100 * low:+.2f}, {100 * high:+.2f}] |"
    assert expected in table.splitlines()
    assert "| individual | 5 | +0.00 [+0.00, +0.00] |" in table.splitlines()


def test_single_task_grid_flags_only_adapters_far_below_their_tasks_median(study, folder):
    _, results = study.load_chunks(folder)
    for r in results["individual"]:
        if (r["init"], r["task"], r["seed"]) == ("osrm", "qnli", 3):
            r["score"] = 0.8 - study.LAGGING  # exactly the flagging distance below the median (0.8)
        elif (r["init"], r["task"], r["seed"]) == ("osrm", "sst2", 1):
            r["score"] = 0.8 - study.LAGGING / 2
    rows = {tuple(c.strip() for c in line.split("|")[1:3]): line.split("|")[3:-1]
            for line in study.single_task_grid_markdown(results).splitlines()[2:]}
    assert rows[("osrm", "qnli")][3].strip() == f"{100 * (0.8 - study.LAGGING):.1f} *"
    assert rows[("osrm", "sst2")][1].strip() == f"{100 * (0.8 - study.LAGGING / 2):.1f}"
    flagged = [c for cells in rows.values() for c in cells if "*" in c]
    assert len(flagged) == 1 and len(rows) == len(results["inits"]) * len(TASKS)


def test_a_group_split_into_part_chunks_counts_as_finished_only_when_every_init_is_in(study, tmp_path):
    whole = study.GROUPS["B"]
    assert study.chunk_inits("B", None) == whole
    assert study.chunk_inits("B", [whole[2], whole[0]]) == [whole[0], whole[2]]  # the group's order
    with pytest.raises(SystemExit, match=r"\['osrm'\] are not in group B"):
        study.chunk_inits("B", ["osrm"])
    assert study.chunk_path(tmp_path, 3, "B", whole).name == "seed3_B.json"
    first = study.chunk_path(tmp_path, 3, "B", whole[:1])
    assert first.name == f"seed3_B_{whole[0]}.json"
    for group in ("A1", "A2"):
        (tmp_path / f"seed3_{group}.json").write_text(json.dumps(chunk(study, 3, group)))
    first.write_text(json.dumps(chunk(study, 3, "B", whole[:1])))
    assert "B none (begun: seed 3: " + whole[0] + ")" in study.summarise(tmp_path, tmp_path / "study.md")
    rest = study.chunk_path(tmp_path, 3, "B", whole[1:])
    assert rest.name == f"seed3_B_{whole[1]}+{whole[2]}.json"
    rest.write_text(json.dumps(chunk(study, 3, "B", whole[1:])))
    text = study.summarise(tmp_path, tmp_path / "study.md")
    assert "; B [3]. Rebuilt by" in text
    _, results = study.load_chunks(tmp_path)
    assert {r["init"] for r in results["individual"]} == set(study.GROUPS["A1"] + study.GROUPS["A2"] + whole)


def test_an_init_in_two_chunk_files_of_one_seed_is_refused(study, tmp_path):
    whole = study.GROUPS["B"]
    (tmp_path / "seed1_B.json").write_text(json.dumps(chunk(study, 1, "B")))
    (tmp_path / f"seed1_B_{whole[1]}.json").write_text(json.dumps(chunk(study, 1, "B", whole[1:2])))
    with pytest.raises(SystemExit, match=rf"seed1_B_{whole[1]}.json: seed 1's \['{whole[1]}'\] are also in seed1_B.json"):
        study.load_chunks(tmp_path)
