"""The training modes beyond the paper (docs/modes.md) and the forecast, each against an independent reference:
`osrm-contrast` rows against a brute-force generalized eigenproblem, `osrm-project` against the subspace its A
must stay in and against plain training, the forecast against its definition; and all three modes through
`osrm-lora run` with every merge method."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch
from helpers_core import stats_from_inputs
from peft import PeftModel
from pipeline_helpers import write_experiment, write_tiny_model
from safetensors.torch import load_file
from test_distributed import _save_bert
from test_penalty import random_stats
from test_train import FAST, SPEC, _sentences
from transformers import AutoModelForSequenceClassification, TrainerCallback

from osrm_lora.errors import RegistryError
from osrm_lora.forecast import _starves, contrast_rows, module_forecast, null_dimension, summarise
from osrm_lora.inits import get_init, list_inits
from osrm_lora.moments import task_moments
from osrm_lora.pipeline import run_experiment
from osrm_lora.settings import load_experiment
from osrm_lora.subspace import Subspace, compute_subspaces
from osrm_lora.tasks import Task
from osrm_lora.train import finetune

TASKS = ["sentiment", "topic"]  # pipeline_helpers' tasks


def _spd(d: int, seed: int, rank: int | None = None) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rank or 3 * d, d, generator=g, dtype=torch.float64) * torch.linspace(0.3, 2.0, d, dtype=torch.float64)
    return x.T @ x / x.shape[0]


def _trace_ratio(rows: np.ndarray, M: np.ndarray, S: np.ndarray) -> float:
    """The generalized Rayleigh quotient of a subspace: tr((R S Rᵀ)⁻¹ R M Rᵀ)."""
    return float(np.trace(np.linalg.solve(rows @ S @ rows.T, rows @ M @ rows.T)))


# ------------------------------------------------------------------------------------------ osrm-contrast


@pytest.mark.parametrize("eps", [1e-2, 0.5])
def test_contrast_rows_attain_the_top_rayleigh_quotients(eps):
    d, r = 7, 3
    M, Sigma = _spd(d, 1).numpy(), _spd(d, 2).numpy()
    S = Sigma + eps * np.trace(Sigma) / d * np.eye(d)
    rows, values = contrast_rows(torch.from_numpy(M), torch.from_numpy(Sigma), r, eps)
    rows = rows.numpy()
    np.testing.assert_allclose(rows @ rows.T, np.eye(r), atol=1e-12)  # orthonormal
    reference = np.sort(np.linalg.eigvals(np.linalg.solve(S, M)).real)[::-1]  # S⁻¹M, independently
    np.testing.assert_allclose(values.numpy(), reference[:r], rtol=1e-9)
    x = rows[0]
    assert x @ M @ x / (x @ S @ x) == pytest.approx(reference[0], rel=1e-9)  # row 1: the top eigenvector
    for j in range(1, r + 1):  # the first j rows span the top-j eigenvectors: the largest trace ratio
        assert _trace_ratio(rows[:j], M, S) == pytest.approx(reference[:j].sum(), rel=1e-9)
    g = np.random.default_rng(0)
    random = [_trace_ratio(np.linalg.qr(g.standard_normal((d, r)))[0].T, M, S) for _ in range(2000)]
    assert max(random) <= reference[:r].sum() * (1 + 1e-9)  # brute force: no subspace does better


def test_contrast_rows_are_reproducible_and_sign_fixed():
    M, Sigma = _spd(6, 3), _spd(6, 4)
    first, _ = contrast_rows(M, Sigma, 2)
    again, _ = contrast_rows(M.clone(), Sigma.clone(), 2)
    assert torch.equal(first, again)
    flipped, _ = contrast_rows(M, Sigma, 3)
    torch.testing.assert_close(flipped[:2], first, rtol=0, atol=1e-12)  # a lower rank takes the leading rows


@pytest.mark.parametrize("eps", [0.0, -1.0, float("nan"), float("inf")])
def test_contrast_eps_must_be_positive_and_finite(eps):
    with pytest.raises(RegistryError, match="init 'osrm-contrast': eps"):
        get_init("osrm-contrast").parse({"eps": eps})
    with pytest.raises(ValueError, match="must be finite and > 0"):
        contrast_rows(_spd(4, 1), _spd(4, 2), 2, eps)


def test_contrast_rows_find_the_task_where_osrm_starves_it():
    """Own and others share their dominant and their weak directions; the task alone puts energy on one
    middling direction of the others. OSRM's rows (the others' weakest) see as little of the task as of the
    others; the contrast rows find the task's own direction."""
    d = 8
    g = torch.Generator().manual_seed(0)
    scales = torch.tensor([3.0, 2.0, 1.5, 1.0, 0.1, 0.1, 0.1, 0.1], dtype=torch.float64)
    shared = torch.randn(2000, d, generator=g, dtype=torch.float64) * scales
    own_x = shared.clone()
    own_x[:, 3] += 2.0 * torch.randn(2000, generator=g, dtype=torch.float64)
    own, others = own_x.T @ own_x / 2000, shared.T @ shared / 2000
    osrm_rows = torch.linalg.eigh(others)[1][:, :1].T
    forecast = module_forecast(osrm_rows, others, own)
    assert _starves(**forecast["osrm"])
    contrast = forecast["contrast"]
    assert contrast["own"] > 10 * forecast["osrm"]["own"] and not _starves(contrast["own"], contrast["others"])
    rows, _ = contrast_rows(own, others, 1)
    assert abs(float(rows[0, 3])) > 0.95  # sampling noise mixes in a little of the rest


# ------------------------------------------------------------------------------------------ the forecast


def test_forecast_matches_its_definition_and_says_when_osrm_starves_the_task():
    d, r = 6, 2
    own, others = _spd(d, 5), _spd(d, 6)
    rows = torch.linalg.eigh(others)[1][:, :r].T
    f = module_forecast(rows, others, own)
    iso = r / d
    assert f["isotropic_share"] == iso
    assert f["osrm"]["own"] == pytest.approx(float(torch.trace(rows @ own @ rows.T) / torch.trace(own)) / iso)
    assert f["osrm"]["others"] == pytest.approx(float(torch.trace(rows @ others @ rows.T) / torch.trace(others)) / iso)
    same = module_forecast(rows, others, others)  # the task's inputs are the others': own = others
    assert same["osrm"]["own"] == pytest.approx(same["osrm"]["others"]) and _starves(**same["osrm"])
    assert not _starves(own=3.0, others=0.1)
    assert module_forecast(rows, others, None) == {"isotropic_share": iso, "osrm": {"others": f["osrm"]["others"]}}


def test_null_dimension_counts_the_directions_no_data_reach():
    values = torch.linalg.eigvalsh(_spd(10, 1, rank=4))
    assert int(null_dimension(values)) == 6
    assert int(null_dimension(torch.linalg.eigvalsh(_spd(10, 1)))) == 0


def test_subspace_file_records_the_forecast_and_warns_on_a_wide_null_space(tmp_path):
    d = 12
    g = torch.Generator().manual_seed(0)
    inputs = {t: torch.randn(n, d, generator=g) * torch.linspace(0.5, 2, d) for t, n in (("a", 200), ("b", 200))}
    inputs["c"] = torch.randn(8, d, generator=g)  # 8 tokens of 12 dims: b's others (a, c) are full rank...
    stats = [stats_from_inputs(t, {"m": x}) for t, x in inputs.items()]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        subspaces = compute_subspaces(stats, 2)
    subspaces["a"].save(tmp_path / "a.safetensors")
    spectrum = Subspace.load(tmp_path / "a.safetensors").spectrum["m"]
    own = stats[0].moment("m")
    sigma = (stats[1].moment("m") + stats[2].moment("m")) / 2
    expected = module_forecast(subspaces["a"].rows("m", 2), sigma, own)
    assert spectrum["forecast"].keys() == expected.keys()
    for key in ("osrm", "contrast"):
        assert spectrum["forecast"][key] == pytest.approx(expected[key], rel=1e-5)
    assert spectrum["others_null_dim"] == 0
    summary = summarise(subspaces["a"].spectrum)
    assert summary["osrm"] == pytest.approx(spectrum["forecast"]["osrm"])
    narrow = [stats_from_inputs(t, {"m": torch.randn(4, d, generator=g)}) for t in "xy"]  # 4 tokens each
    with pytest.warns(UserWarning, match=r"numerical null space larger than the rank .* m: 8 null directions"):
        wide = compute_subspaces(narrow, 2)
    assert wide["x"].spectrum["m"]["others_null_dim"] == 8


# ------------------------------------------------------------------------------------------ osrm-project


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory) -> str:
    return _save_bert(tmp_path_factory.mktemp("bert"), hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)


@pytest.fixture(scope="module")
def task() -> Task:
    return Task.from_records(SPEC, {"train": _sentences(64, 0), "dev": _sentences(16, 1)})


@pytest.fixture(scope="module")
def pool(bert_dir):
    return random_stats(bert_dir, "other", 1), random_stats(bert_dir, "sentiment", 2)


class Factors(TrainerCallback):
    """C and U of every parametrised lora_A when training ends (before the adapter is exported)."""

    def __init__(self):
        self.products: dict[str, torch.Tensor] = {}

    def on_train_end(self, args, state, control, model=None, **kwargs):
        for name, module in model.named_modules():
            if hasattr(module, "parametrizations") and name.endswith("lora_A.default"):
                C = module.parametrizations.weight.original.detach()
                U = module.parametrizations.weight[0].basis
                self.products[name.removeprefix("base_model.model.").removesuffix(".default")] = C @ U


def _train(task, bert_dir, other, out, init, options=None, callbacks=(), **training):
    return finetune(task, bert_dir, out, init=init, init_options=options or {}, other_stats=[other], seed=1,
                    lora={"r": 2, "dropout": 0.0}, callbacks=callbacks,
                    training={**FAST, "lr": 2e-2, "max_steps": 8, **training})


@pytest.mark.parametrize("k", [2, 5])
def test_project_keeps_A_in_the_span_and_exports_the_trained_adapter(task, bert_dir, pool, tmp_path, k):
    other = pool[0]
    factors = Factors()
    result = _train(task, bert_dir, other, tmp_path / "a", "osrm-project", {"k": k}, [factors])
    saved = load_file(str(tmp_path / "a" / "adapter_model.safetensors"))
    A_keys = sorted(key for key in saved if "lora_A" in key)
    assert len(A_keys) == 4 and not any("parametrizations" in key for key in saved)
    for key in A_keys:
        module = key.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
        A = saved[key].double()
        assert A.shape == (2, 32)
        _, vectors = np.linalg.eigh(other.moment(module).numpy())  # the k lowest-energy directions
        U = torch.from_numpy(vectors[:, :k].T)
        assert float((A - A @ U.T @ U).norm() / A.norm()) < 1e-6  # ‖A (I − UᵀU)‖ = 0 to float precision
        torch.testing.assert_close(saved[key], factors.products[f"{module}.lora_A"], rtol=0, atol=1e-7)
    assert result.metadata["mode"]["k"] == dict.fromkeys(result.metadata["mode"]["k"], k)
    base = AutoModelForSequenceClassification.from_pretrained(bert_dir, num_labels=2)
    loaded = PeftModel.from_pretrained(base, str(tmp_path / "a")).eval()
    batch = {"input_ids": torch.tensor([[2, 4, 5, 6, 3]]), "attention_mask": torch.ones(1, 5, dtype=torch.long)}
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch).logits, result.model(**batch).logits, rtol=0, atol=1e-6)


def test_project_with_k_equal_d_trains_like_plain_osrm(task, bert_dir, pool, tmp_path):
    """Same start, same data: the loss curves agree to Adam's dependence on the basis C is written in."""
    other = pool[0]
    plain = _train(task, bert_dir, other, tmp_path / "plain", "osrm")
    full = _train(task, bert_dir, other, tmp_path / "full", "osrm-project", {"k": 32})
    losses = [[h["loss"] for h in r.history if "loss" in h] for r in (plain, full)]
    np.testing.assert_allclose(losses[1], losses[0], rtol=2e-2)
    assert abs(full.metrics["loss"] - plain.metrics["loss"]) < 0.02


def test_interrupted_project_run_resumes_to_the_uninterrupted_adapter(task, bert_dir, pool, tmp_path):
    """Checkpoints hold C (the parametrisation's trained tensor); resuming re-applies U_k and continues."""
    from test_train import Interrupt

    kw = {"options": {"k": 5}, "save_steps": 4}
    _train(task, bert_dir, pool[0], tmp_path / "full", "osrm-project", **kw)
    with pytest.raises(KeyboardInterrupt):
        _train(task, bert_dir, pool[0], tmp_path / "cut", "osrm-project", callbacks=[Interrupt()], **kw)
    resumed = finetune(task, bert_dir, tmp_path / "cut", init="osrm-project", init_options={"k": 5},
                       other_stats=[pool[0]], seed=1, lora={"r": 2, "dropout": 0.0}, resume=True,
                       training={**FAST, "lr": 2e-2, "max_steps": 8, "save_steps": 4})
    assert resumed.metadata["resumed_from"] == "checkpoint-4"
    want, got = (load_file(str(tmp_path / name / "adapter_model.safetensors")) for name in ("full", "cut"))
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=0, atol=1e-7, msg=key)


def test_project_k_is_checked_against_each_module(task, bert_dir, pool, tmp_path):
    with pytest.raises(Exception, match=r"osrm-project', module bert.encoder.layer.0.attention.self.query: k=1"):
        _train(task, bert_dir, pool[0], tmp_path / "low", "osrm-project", {"k": 1})
    with pytest.raises(Exception, match="k=33 must lie between the rank 2 and the input dim 32"):
        _train(task, bert_dir, pool[0], tmp_path / "high", "osrm-project", {"k": 33})
    assert not (tmp_path / "low").exists() and not (tmp_path / "high").exists()


# ------------------------------------------------------------------------------------------ the registry


def test_modes_are_registered_with_their_needs_and_options():
    modes = {i["name"]: i for i in list_inits() if i["needs_moments"]}
    assert sorted(modes) == ["osrm-contrast", "osrm-project", "osrm-reg"]
    assert modes["osrm-reg"]["variants"] == ["cov", "centered"] and not modes["osrm-project"]["variants"]
    options = {name: {o["name"] for o in info["options"]} for name, info in modes.items()}
    assert options == {"osrm-reg": {"scale", "mu", "start"}, "osrm-contrast": {"scale", "eps"},
                       "osrm-project": {"scale", "k"}}
    with pytest.raises(RegistryError, match="osrm-reg cannot start from 'pissa'"):
        get_init("osrm-reg").parse({"start": "pissa"})
    with pytest.raises(RegistryError, match="mu"):
        get_init("osrm-reg").parse({"mu": -1.0})
    with pytest.raises(RegistryError, match="k"):
        get_init("osrm-project").parse({"k": 0})


def test_modes_need_the_other_tasks_statistics(task, bert_dir, pool, tmp_path):
    with pytest.raises(Exception, match="needs the other tasks' statistics"):
        finetune(task, bert_dir, tmp_path / "x", init="osrm-project")
    with pytest.raises(Exception, match="needs task 'sentiment'.s own statistics"):
        _train(task, bert_dir, pool[0], tmp_path / "y", "osrm-contrast")
    with pytest.raises(Exception, match="own_stats is for"):
        finetune(task, bert_dir, tmp_path / "z", init="osrm", other_stats=[pool[0]], own_stats=pool[1])


def test_contrast_and_reg_from_contrast_train(task, bert_dir, pool, tmp_path):
    other, own = pool
    contrast = finetune(task, bert_dir, tmp_path / "c", init="osrm-contrast", other_stats=[other], own_stats=own,
                        seed=1, lora={"r": 2, "dropout": 0.0}, training={**FAST, "max_steps": 2})
    initial = load_file(str(tmp_path / "c" / "initial_lora_A.safetensors"))
    moments = task_moments("sentiment", [other], own)
    for module, A in initial.items():
        expected, _ = contrast_rows(moments.own[module], moments.others[module], 2)
        torch.testing.assert_close(A, expected.float(), rtol=0, atol=1e-6)
    reg = finetune(task, bert_dir, tmp_path / "r", init="osrm-reg", init_options={"start": "osrm-contrast"},
                   other_stats=[other], own_stats=own, seed=1, lora={"r": 2, "dropout": 0.0},
                   training={**FAST, "max_steps": 2})
    assert reg.metadata["mode"]["start"] == "osrm-contrast" and contrast.metadata["mode"] is None
    assert load_file(str(tmp_path / "r" / "initial_lora_A.safetensors")).keys() == initial.keys()


# ------------------------------------------------------------------------------------------ the pipeline


def test_modes_train_merge_and_evaluate_through_the_pipeline(tmp_path):
    model_dir = write_tiny_model(tmp_path / "model")
    merges = [{"method": m, "lambdas": [1.0]} for m in ("average", "task_arithmetic", "ties", "dare", "knots")]
    merges += [{"method": "emr"}, {"method": "regmean", "grams": "base", "lambdas": [1.0]},
               {"method": "fisher", "lambdas": [1.0]}]
    path = write_experiment(
        tmp_path, model_dir, merge=merges, interference=True,
        inits=["osrm-reg", "osrm-contrast", {"name": "osrm-project", "k": 8}],
        fisher={"samples": 16, "batch_size": 8, "max_length": 16},
        training={"max_steps": 6, "batch_size": 16, "lr": 0.05, "warmup_ratio": 0.0, "logging_steps": 3,
                  "eval_each_epoch": False, "progress": False},
    )
    config = load_experiment(path)
    summary = run_experiment(config, progress=False)
    results = json.loads((config.output_dir / "results.json").read_text())
    inits = ["osrm-reg", "osrm-contrast", "osrm-project"]
    assert sorted({r["init"] for r in results["individual"]}) == sorted(inits)
    methods = {m["method"] for m in merges}
    for init in inits:
        assert {r["method"] for r in results["merged"] if r["init"] == init} == methods
        meta = json.loads((config.output_dir / "adapters" / init / "seed0" / "topic" / "osrm_lora.json").read_text())
        assert (meta["mode"] or {}).get("mode") in (None, init)
    assert len(summary.stages["train"].ran) == 6
    subspace = Subspace.load(config.output_dir / "subspaces" / "cov" / "topic.safetensors")
    assert all("contrast" in s["forecast"] for s in subspace.spectrum.values())
    assert results["forecast"]["osrm-reg"]["topic"] == summarise(subspace.spectrum)
    report = (config.output_dir / "report.md").read_text()
    assert "## Forecast from the statistics, and the outcome" in report
    modes = results["modes"]
    assert [(r["init"], r["task"]) for r in modes] == [(i, t) for i in ("osrm-reg", "osrm-project") for t in TASKS]
    assert all(r["last_log"]["step"] == 6 and r["last_log"]["task_loss"] > 0 for r in modes)
    assert all(r["mu"] == 0.6 and r["last_log"]["penalty"] >= 0 for r in modes if r["init"] == "osrm-reg")
    assert "## Training modes: the task loss and the penalty, as last logged" in report


def test_report_puts_the_forecast_beside_the_outcome():
    from osrm_lora.report import forecast_markdown

    f = {"osrm": {"own": 0.2, "others": 0.15}, "contrast": {"own": 3.0, "others": 0.9, "eps": 0.01},
         "others_null_dim": 0, "starves": True}
    results = {
        "reference_init": "kaiming", "forecast": {"osrm": {"a": f}},
        "individual": [{"init": "osrm", "seed": s, "task": "a", "score": 0.5 + s / 10} for s in (0, 1)]
        + [{"init": "kaiming", "seed": s, "task": "a", "score": score} for s, score in ((0, 0.9), (2, 0.1))],
        "interference": [{"init": "osrm", "seed": 0, "tasks": ["a", "b"], "matrix": [[1.0, 0.2], [0.04, 1.0]]}],
    }
    # kaiming's seed 2, which osrm lacks, is left out of the reference's score: the two are paired by seed
    assert "| osrm | a | 0.2 | 0.15 | 3 | 0.9 | 0 | yes | 55.00 | 90.00 | 0.04 |" in forecast_markdown(results)
    assert forecast_markdown({"forecast": {}}) == ""


# ------------------------------------------------------------------------------------------ the CLI


def test_init_command_prints_and_records_the_forecast(tmp_path):
    from test_cli import invoke

    d = 6
    g = torch.Generator().manual_seed(0)
    shared = torch.randn(300, d, generator=g) * torch.linspace(0.2, 2.0, d)
    for t in ("a", "b"):  # two tasks with the same inputs: the OSRM rows starve each as much as they protect
        stats_from_inputs(t, {"layer.0.proj": shared + 0.01 * torch.randn(300, d, generator=g)}).save(
            tmp_path / f"{t}.safetensors")
    files = [str(tmp_path / f"{t}.safetensors") for t in "ab"]
    shown = invoke("init", *files, "--rank", "2", "--out", str(tmp_path / "sub"))
    assert shown.exit_code == 0, shown.output
    assert "Forecast" in shown.plain and "null dim of Σ₋ᵢ" in shown.plain
    assert "task 'a': OSRM rows: own" in shown.plain
    assert "starves the task as much as it protects the others; try osrm-contrast or osrm-reg" in shown.plain
    result = invoke("init", *files, "--rank", "2", "--out", str(tmp_path / "sub2"), "--json")
    forecast = json.loads(result.stdout)["a"]["forecast"]
    assert forecast["starves"] and forecast["osrm"]["own"] == pytest.approx(forecast["osrm"]["others"], rel=0.1)
    spectrum = Subspace.load(tmp_path / "sub2" / "a.safetensors").spectrum["layer.0.proj"]
    assert spectrum["forecast"]["osrm"]["own"] == pytest.approx(forecast["osrm"]["own"])


def test_train_command_runs_a_mode_from_statistics_files(task, bert_dir, pool, tmp_path):
    from test_cli import invoke

    for s in pool:
        s.save(tmp_path / f"{s.task}.safetensors")
    data = tmp_path / "data"
    data.mkdir()
    for split, n, seed in (("train", 32, 0), ("dev", 8, 1)):
        (data / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in _sentences(n, seed)))
    result = invoke("train", "--model", bert_dir, "--task", "sentiment", "--files", f"train={data / 'train.jsonl'}",
                    "--files", f"dev={data / 'dev.jsonl'}", "--task-option", "label_names=[negative, positive]",
                    "--init", "osrm-reg", "--init-option", "mu=3", "--init-option", "start=osrm-contrast",
                    "--stats", str(tmp_path / "other.safetensors"), "--stats", str(tmp_path / "sentiment.safetensors"),
                    "--r", "2", "--max-steps", "2", "--out", str(tmp_path / "adapter"), "--quiet")
    assert result.exit_code == 0, result.output
    meta = json.loads((tmp_path / "adapter" / "osrm_lora.json").read_text())
    assert meta["init"] == "osrm-reg" and meta["mode"]["mu"] == 3.0 and meta["mode"]["start"] == "osrm-contrast"
    missing = invoke("train", "--model", bert_dir, "--task", "sentiment", "--files", f"train={data / 'train.jsonl'}",
                     "--task-option", "label_names=[negative, positive]", "--init", "osrm-project",
                     "--out", str(tmp_path / "none"), "--quiet")
    assert missing.exit_code == 2 and "needs the other tasks' statistics" in missing.output
