"""The `osrm-lora` command line through typer's CliRunner: help, listings, errors, and the step commands on
small synthetic inputs checked against brute-force numpy."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from pipeline_helpers import experiment_dict
from typer.testing import CliRunner

from osrm_lora.adapters import LoraAdapter, LoraFactors
from osrm_lora.cli import app
from osrm_lora.merge import list_methods
from osrm_lora.stats import TaskStats
from osrm_lora.subspace import Subspace
from osrm_lora.tasks import known_task_names

REPO = Path(__file__).resolve().parents[1]
COMMANDS = ["run", "demo", "report", "stats", "init", "train", "merge", "eval", "interference", "data"]
runner = CliRunner()
ANSI = re.compile(r"\x1b\[[0-9;]*m")


def invoke(*args: str):
    result = runner.invoke(app, list(args), env={"COLUMNS": "200", "NO_COLOR": "1", "TERM": "dumb"})
    result.plain = ANSI.sub("", result.output)
    return result


def test_help_lists_every_command_and_each_has_an_example():
    result = invoke("--help")
    assert result.exit_code == 0
    for command in COMMANDS:
        assert command in result.plain
    for command in COMMANDS[:-1]:
        sub = invoke(command, "--help")
        assert sub.exit_code == 0, command
        assert "Example" in sub.plain, command
    assert "--force" in invoke("run", "--help").plain
    assert "--quiet" in invoke("demo", "--help").plain


def test_merge_list_shows_registry_methods_and_typed_params():
    result = invoke("merge", "--list", "--json")
    assert result.exit_code == 0
    listed = json.loads(result.stdout)
    assert listed == json.loads(json.dumps(list_methods(), default=str))
    names = {m["name"] for m in listed}
    assert {"task_arithmetic", "ties", "emr"} <= names
    ties = next(m for m in listed if m["name"] == "ties")
    assert {"name": "density", "type": "float"}.items() <= next(
        p for p in ties["parameters"] if p["name"] == "density"
    ).items()
    table = invoke("merge", "--list").plain
    assert "density: float" in table and "ties" in table


def test_data_list_names_every_known_task():
    result = invoke("data", "list", "--json")
    assert result.exit_code == 0
    assert [t["name"] for t in json.loads(result.stdout)] == known_task_names()
    assert "sms_spam" in invoke("data", "list").plain


def test_bad_config_exits_with_the_key(tmp_path):
    data = experiment_dict("/nonexistent/model", [{"name": "a"}, {"name": "b"}])
    data["merge"][1]["params"]["density"] = "high"
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(data))
    result = invoke("run", str(path))
    assert result.exit_code == 2
    assert "merge[1].params" in result.plain and "density" in result.plain
    missing = invoke("run", str(tmp_path / "nope.yaml"))
    assert missing.exit_code == 2 and "not found" in missing.plain


def test_demo_show_config_is_the_example():
    result = invoke("demo", "--show-config")
    assert result.exit_code == 0
    assert yaml.safe_load(result.stdout) == yaml.safe_load((REPO / "examples" / "demo.yaml").read_text())


def test_report_rebuilds_from_results_json(tmp_path):
    results = {
        "format": "osrm-lora/results/1",
        "tasks": ["a", "b"],
        "inits": ["kaiming", "osrm"],
        "seeds": [0],
        "methods": ["task_arithmetic"],
        "fixed_lambda": {"task_arithmetic": 1.0},
        "individual": [
            {"init": i, "seed": 0, "task": t, "score": s}
            for i, t, s in [
                ("kaiming", "a", 0.9),
                ("kaiming", "b", 0.8),
                ("osrm", "a", 0.85),
                ("osrm", "b", 0.8),
            ]
        ],
        "merged": [
            {"init": i, "seed": 0, "method": "task_arithmetic", "lambda": 1.0, "task": t, "score": s}
            for i, t, s in [
                ("kaiming", "a", 0.45),
                ("kaiming", "b", 0.4),
                ("osrm", "a", 0.85),
                ("osrm", "b", 0.6),
            ]
        ],
    }
    (tmp_path / "results.json").write_text(json.dumps(results))
    result = invoke("report", str(tmp_path))
    assert result.exit_code == 0, result.output
    assert (tmp_path / "report.md").is_file() and (tmp_path / "plots" / "score_vs_lambda.png").is_file()
    # osrm / task_arithmetic: average (0.85 + 0.6) / 2, normalised (0.85/0.85 + 0.6/0.8) / 2
    row = next(line for line in result.plain.splitlines() if "osrm" in line and "task_arithmetic" in line)
    assert "72.50" in row and "87.50" in row
    assert invoke("report", str(tmp_path / "missing")).exit_code == 2


def _adapter(name: str, seed: int, d_in: int = 6, d_out: int = 5, r: int = 2) -> LoraAdapter:
    g = torch.Generator().manual_seed(seed)
    modules = {
        m: LoraFactors(torch.randn(r, d_in, generator=g), torch.randn(d_out, r, generator=g), 0.5)
        for m in ("layer.0.proj", "layer.1.proj")
    }
    return LoraAdapter(
        modules, {"peft_type": "LORA", "r": r, "lora_alpha": 1, "base_model_name_or_path": "toy"}, name=name
    )


def _stats(task: str, x: torch.Tensor) -> TaskStats:
    x = x.double()
    second, first = (x.T @ x).float(), x.sum(0).float()
    return TaskStats(
        task,
        "toy",
        "toy-hash",
        {"layer.0.proj": second, "layer.1.proj": second},
        {"layer.0.proj": first, "layer.1.proj": first},
        int(x.shape[0]),
    )


def test_merge_writes_the_exact_task_arithmetic_adapter(tmp_path):
    a, b = _adapter("a", 0), _adapter("b", 1)
    a.save(tmp_path / "a")
    b.save(tmp_path / "b")
    result = invoke(
        "merge",
        str(tmp_path / "a"),
        str(tmp_path / "b"),
        "--method",
        "task_arithmetic",
        "--lambda",
        "0.7",
        "--out",
        str(tmp_path / "merged"),
        "--json",
    )
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["exact"] is True
    merged = LoraAdapter.load(tmp_path / "merged")
    for m in a.modules:
        expected = 0.7 * (0.5 * a.modules[m].B @ a.modules[m].A + 0.5 * b.modules[m].B @ b.modules[m].A)
        torch.testing.assert_close(merged.modules[m].delta(), expected, atol=1e-5, rtol=1e-5)
    bad = invoke(
        "merge",
        str(tmp_path / "a"),
        str(tmp_path / "b"),
        "--method",
        "ties",
        "--param",
        "densty=0.2",
        "--out",
        str(tmp_path / "x"),
    )
    assert bad.exit_code == 2 and "densty" in bad.plain


def test_init_and_interference_commands_against_numpy(tmp_path):
    rng = np.random.default_rng(0)
    xs = {
        t: torch.tensor(rng.normal(size=(40, 6)) * np.linspace(0.2, 2.0, 6) + k, dtype=torch.float32)
        for k, t in enumerate(["a", "b", "c"])
    }
    for t, x in xs.items():
        _stats(t, x).save(tmp_path / f"{t}.safetensors")
    stats_files = [str(tmp_path / f"{t}.safetensors") for t in xs]

    result = invoke("init", *stats_files, "--rank", "2", "--out", str(tmp_path / "sub"), "--json")
    assert result.exit_code == 0, result.output
    for t in xs:
        # equal weighting: mean of the other tasks' second moments
        sigma = sum((xs[u].double().T @ xs[u].double()) / len(xs[u]) for u in xs if u != t) / 2
        _, eigvecs = np.linalg.eigh(sigma.numpy())
        rows = Subspace.load(tmp_path / "sub" / f"{t}.safetensors").A["layer.0.proj"][:2].double().numpy()
        # same span as the two smallest eigenvectors
        projector = eigvecs[:, :2] @ eigvecs[:, :2].T
        assert np.allclose(rows @ projector, rows, atol=1e-4), t

    adapters = {t: _adapter(t, k) for k, t in enumerate(xs)}
    for t, adapter in adapters.items():
        adapter.save(tmp_path / "adapters" / t)
    result = invoke(
        "interference", *(str(tmp_path / "adapters" / t) for t in xs), "--stats", str(tmp_path), "--json"
    )
    assert result.exit_code == 0, result.output
    got = json.loads(result.stdout)
    assert got["tasks"] == list(xs)
    # Brute force: E_x∈task i Σ_m ||ΔW_j x||² over task i's own rows, divided by the diagonal.
    energy = np.zeros((3, 3))
    for i, ti in enumerate(xs):
        for j, tj in enumerate(xs):
            for f in adapters[tj].modules.values():
                y = xs[ti].double() @ f.delta(torch.float64).T
                energy[i, j] += float((y**2).sum(1).mean())
    np.testing.assert_allclose(np.array(got["matrix"]), energy / np.diag(energy)[:, None], rtol=1e-6)


def test_stats_and_eval_commands_on_a_tiny_model(tmp_path):
    from pipeline_helpers import write_tasks, write_tiny_model

    model_dir = write_tiny_model(tmp_path / "model")
    write_tasks(tmp_path / "data")
    files = [
        "--files",
        f"train={tmp_path / 'data' / 'topic_train.jsonl'}",
        "--files",
        f"dev={tmp_path / 'data' / 'topic_dev.jsonl'}",
        "--task-option",
        "text_column=sentence",
    ]
    result = invoke(
        "stats",
        "--model",
        str(model_dir),
        "--task",
        "topic",
        *files,
        "--samples",
        "8",
        "--seed",
        "3",
        "--batch-size",
        "3",
        "--out",
        str(tmp_path / "topic.safetensors"),
        "--quiet",
    )
    assert result.exit_code == 0, result.output
    stats = TaskStats.load(tmp_path / "topic.safetensors")
    assert stats.task == "topic" and len(stats.modules) == 4 and stats.tokens > 8
    assert f"{tmp_path / 'topic.safetensors'}: task topic, 4 modules, {stats.tokens} tokens" in result.plain

    from osrm_lora.distributed import collect_task_stats
    from osrm_lora.tasks import get_task

    task = get_task(
        "topic",
        files={split: str(tmp_path / "data" / f"topic_{split}.jsonl") for split in ("train", "dev")},
        text_column="sentence",
    )
    direct = collect_task_stats(task, str(model_dir), samples=8, seed=3, batch_size=3)
    assert (stats.tokens, stats.modules, stats.model) == (direct.tokens, direct.modules, direct.model)
    assert stats.extra == direct.extra
    for m in direct.modules:
        torch.testing.assert_close(stats.second[m], direct.second[m], rtol=1e-6, atol=1e-5)
        torch.testing.assert_close(stats.first[m], direct.first[m], rtol=1e-6, atol=1e-5)

    from peft import LoraConfig, TaskType, get_peft_model
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(3)
    base = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=2)
    peft_model = get_peft_model(
        base,
        LoraConfig(
            task_type=TaskType.SEQ_CLS, r=2, target_modules=["query", "value"], init_lora_weights=False
        ),
    )
    peft_model.save_pretrained(tmp_path / "adapter")
    result = invoke(
        "eval",
        "--model",
        str(model_dir),
        "--task",
        "topic",
        *files,
        "--adapter",
        str(tmp_path / "adapter"),
        "--json",
        "--quiet",
    )
    assert result.exit_code == 0, result.output
    got = json.loads(result.stdout)

    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    rows = [json.loads(line) for line in (tmp_path / "data" / "topic_dev.jsonl").read_text().splitlines()]
    batch = tokenizer([r["sentence"] for r in rows], padding=True, return_tensors="pt")
    with torch.no_grad():
        predictions = peft_model.eval()(**batch).logits.argmax(-1).numpy()
    expected = float(np.mean(predictions == np.array([r["label"] for r in rows])))
    assert got["metrics"]["accuracy"] == pytest.approx(expected)


def test_merge_full_model_writes_the_in_memory_merge_as_shards(tmp_path):
    """`--full-model` writes base + merge shard by shard; it loads with from_pretrained and equals
    `apply_to_model` (plus the chosen task head) on the base model in memory."""
    from peft import LoraConfig, TaskType, get_peft_model
    from pipeline_helpers import write_tiny_model
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from osrm_lora.merge import apply_to_model, load_head, merge_adapters

    tiny = write_tiny_model(tmp_path / "tiny")
    torch.manual_seed(0)
    AutoModelForSequenceClassification.from_pretrained(tiny, num_labels=2).save_pretrained(tmp_path / "base")
    AutoTokenizer.from_pretrained(tiny).save_pretrained(tmp_path / "base")
    for seed, name in enumerate(["a", "b"]):
        torch.manual_seed(10 + seed)
        model = AutoModelForSequenceClassification.from_pretrained(tmp_path / "base")
        config = LoraConfig(
            task_type=TaskType.SEQ_CLS, r=2, target_modules=["query", "value"], init_lora_weights=False
        )
        peft_model = get_peft_model(model, config)
        for param_name, param in peft_model.named_parameters():
            if "modules_to_save" in param_name:  # a task head of its own
                param.data.normal_()
        peft_model.save_pretrained(tmp_path / name)

    folders = [str(tmp_path / "a"), str(tmp_path / "b")]
    result = invoke(
        "merge",
        *folders,
        "--method",
        "ties",
        "--param",
        "density=0.5",
        "--lambda",
        "0.8",
        "--full-model",
        str(tmp_path / "base"),
        "--heads-from",
        "b",
        "--max-shard-size",
        "40KB",
        "--out",
        str(tmp_path / "merged"),
        "--json",
    )
    assert result.exit_code == 0, result.output
    info = json.loads(result.stdout)
    assert len(info["files"]) > 1 and (tmp_path / "merged" / "model.safetensors.index.json").is_file()

    loaded = AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged")
    base = AutoModelForSequenceClassification.from_pretrained(tmp_path / "base")
    expected = AutoModelForSequenceClassification.from_pretrained(tmp_path / "base")
    merged = merge_adapters(folders, "ties", density=0.5, scaling=0.8)
    assert apply_to_model(expected, merged) and load_head(expected, merged.adapters["b"])
    got, want, original = loaded.state_dict(), expected.state_dict(), base.state_dict()
    assert got.keys() == want.keys()
    for key, value in want.items():
        torch.testing.assert_close(got[key], value, rtol=0, atol=0, msg=key)
    query = "bert.encoder.layer.1.attention.self.query.weight"
    assert not torch.equal(got[query], original[query]) and not torch.equal(
        got["classifier.weight"], original["classifier.weight"]
    )

    refused = invoke(
        "merge",
        *folders,
        "--method",
        "ties",
        "--full-model",
        str(tmp_path / "base"),
        "--rank",
        "2",
        "--out",
        str(tmp_path / "x"),
    )
    assert refused.exit_code == 2 and "--rank" in refused.plain


def _error_line(result) -> str:
    """The one `error: …` line a user error prints, with exit code 2 and no traceback."""
    assert result.exit_code == 2, result.output
    assert isinstance(result.exception, SystemExit)  # not a traceback
    lines = [line for line in result.plain.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.plain
    return lines[0]


def test_user_errors_are_one_line_and_exit_2(tmp_path):
    """Paths that once gave a traceback or exit 1: a missing model, an unknown target module, a malformed
    adapter_config.json, an unknown init."""
    from pipeline_helpers import write_tasks, write_tiny_model

    model_dir = write_tiny_model(tmp_path / "model")
    write_tasks(tmp_path / "data")
    stats = ["--task", "topic", "--files", f"train={tmp_path / 'data' / 'topic_train.jsonl'}", "--task-option",
             "text_column=sentence", "--out", str(tmp_path / "s.safetensors"), "--quiet"]
    assert "no-such-model" in _error_line(invoke("stats", "--model", str(tmp_path / "no-such-model"), *stats))
    line = _error_line(invoke("stats", "--model", str(model_dir), *stats, "--target-modules", "nope"))
    assert "target_modules=['nope']" in line
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "adapter_config.json").write_text("{not json")
    _adapter("a", 0).save(tmp_path / "a")
    line = _error_line(
        invoke("merge", str(tmp_path / "a"), str(tmp_path / "bad"), "--method", "ties", "--out", str(tmp_path / "m"))
    )
    assert f"{tmp_path / 'bad' / 'adapter_config.json'}: not valid JSON" in line
    line = _error_line(invoke("train", "--model", str(model_dir), "--task", "topic", "--init", "osrn", "--out", "x"))
    assert "init 'osrn' is unknown; did you mean osrm" in line
    assert not (tmp_path / "s.safetensors").exists() and not (tmp_path / "m").exists()


def test_programming_errors_keep_their_traceback(monkeypatch):
    import osrm_lora.tasks

    def broken(glue_dir=None):
        raise RuntimeError("boom")

    monkeypatch.setattr(osrm_lora.tasks, "list_tasks", broken)
    result = invoke("data", "list")
    assert result.exit_code == 1 and isinstance(result.exception, RuntimeError)


def test_run_validate_only_checks_the_file_and_runs_nothing(tmp_path):
    good = invoke("run", "--validate-only", str(REPO / "examples" / "demo.yaml"))
    assert good.exit_code == 0 and good.stdout.strip() == f"{REPO / 'examples' / 'demo.yaml'}: OK"
    data = experiment_dict("/nonexistent/model", [{"name": "a"}, {"name": "b"}])
    data["merge"][1]["params"]["densty"] = 0.2
    data["output_dir"] = str(tmp_path / "out")
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(data))
    bad = invoke("run", "--validate-only", str(path))
    assert bad.exit_code == 2 and "merge[1].params" in bad.plain and "densty" in bad.plain
    assert not (tmp_path / "out").exists()
    assert invoke("run", str(path), "--force", "merg").exit_code == 2  # a stage name is checked before running


def test_train_lists_the_init_registry():
    from osrm_lora.inits import list_inits

    result = invoke("train", "--list-inits", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout) == json.loads(json.dumps(list_inits(), default=str))
    table = invoke("train", "--list-inits").plain
    help_text = invoke("train", "--help").plain
    for init in list_inits():
        assert init["name"] in table and init["name"] in help_text
    assert "needs statistics" in table and "mutates base" in table
    assert "--list-inits" in _error_line(invoke("train", "--task", "trec"))
    osrm = next(i for i in json.loads(result.stdout) if i["name"] == "osrm")
    assert [(o["name"], o["default"]) for o in osrm["options"]] == [("scale", "orthonormal")]


def test_train_init_options_are_checked_before_anything_loads(tmp_path):
    train = ("train", "--model", str(tmp_path / "no-model"), "--task", "trec", "--out", str(tmp_path / "out"))
    bad = invoke(*train, "--init", "osrm", "--init-option", "scale=big")
    assert bad.exit_code == 2 and "init 'osrm': scale:" in _error_line(bad) and "'gaussian'" in bad.plain
    unknown = invoke(*train, "--init", "kaiming", "--init-option", "scale=kaiming")
    assert unknown.exit_code == 2 and "init 'kaiming': unknown option 'scale'" in _error_line(unknown)
    malformed = invoke(*train, "--init", "osrm", "--init-option", "scale")
    assert malformed.exit_code == 2 and "must look like key=value" in _error_line(malformed)
    assert not (tmp_path / "out").exists()
