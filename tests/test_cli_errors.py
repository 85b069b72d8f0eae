"""User mistakes at the command line: each prints one `error: …` line naming the file, option, module or task,
and exits with code 2 (never a traceback), before the work it would waste. Ctrl-C in `train` says how to resume.

On a tiny random BERT (hidden size 32) with the synthetic tasks of `pipeline_helpers`.
"""

from __future__ import annotations

import json
import os
import re
import stat

import pytest
import torch
from pipeline_helpers import write_tasks, write_tiny_model
from typer.testing import CliRunner

from osrm_lora.adapters import LoraAdapter, LoraFactors
from osrm_lora.cli import app
from osrm_lora.stats import TaskStats

runner = CliRunner()
ANSI = re.compile(r"\x1b\[[0-9;]*m")


def invoke(*args):
    result = runner.invoke(app, [str(a) for a in args], env={"COLUMNS": "100", "NO_COLOR": "1", "TERM": "dumb"})
    result.plain = ANSI.sub("", result.output)
    return result


def error_line(*args) -> str:
    """The one `error: …` line of a refused command (exit code 2, no traceback)."""
    result = invoke(*args)
    assert result.exit_code == 2, result.output
    assert isinstance(result.exception, SystemExit), result.exception  # not a traceback
    lines = [line for line in result.plain.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.plain
    return lines[0]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """The tiny model, the `topic` task's files, and a PEFT adapter of that model with a 2-class head."""
    from peft import LoraConfig, TaskType, get_peft_model
    from transformers import AutoModelForSequenceClassification

    root = tmp_path_factory.mktemp("cli-errors")
    model = write_tiny_model(root / "model")
    write_tasks(root / "data")
    torch.manual_seed(0)
    base = AutoModelForSequenceClassification.from_pretrained(model, num_labels=2)
    config = LoraConfig(task_type=TaskType.SEQ_CLS, r=2, target_modules=["query", "value"], init_lora_weights=False)
    get_peft_model(base, config).save_pretrained(root / "adapter")
    read_only = root / "read-only"
    read_only.mkdir()
    read_only.chmod(0o555)
    yield root
    read_only.chmod(0o755)


def task_args(root, name="topic"):
    data = root / "data"
    return ["--task", name, "--files", f"train={data / 'topic_train.jsonl'}", "--files",
            f"dev={data / 'topic_dev.jsonl'}", "--task-option", "text_column=sentence", "--quiet"]


def stats_args(root, out=None):
    return ["stats", "--model", root / "model", *task_args(root), "--samples", "4", "--out",
            out or root / "s.safetensors"]


def train_args(root, out=None):
    return ["train", "--model", root / "model", *task_args(root), "--max-steps", "1", "--r", "2", "--out",
            out or root / "trained"]


def _adapter(name: str, seed: int) -> LoraAdapter:
    g = torch.Generator().manual_seed(seed)
    modules = {m: LoraFactors(torch.randn(2, 6, generator=g), torch.randn(5, 2, generator=g), 0.5)
               for m in ("layer.0.proj", "layer.1.proj")}
    return LoraAdapter(modules, {"peft_type": "LORA", "r": 2, "lora_alpha": 1, "base_model_name_or_path": "toy"},
                       name=name)


def _stats(task: str, seed: int) -> TaskStats:
    x = torch.randn(20, 6, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    second, first = (x.T @ x).float(), x.sum(0).float()
    return TaskStats(task, "toy", "toy-hash", {"layer.0.proj": second, "layer.1.proj": second},
                     {"layer.0.proj": first, "layer.1.proj": first}, 20)


# ---------------------------------------------------------------- §4: options and settings files


def test_a_misspelt_task_option_names_the_key(world):
    line = error_line(*stats_args(world), "--task-option", "labl_column=label")
    assert "unknown option 'labl_column' (did you mean 'label_column'?)" in line


def test_a_misspelt_settings_section_is_refused_before_training(world, tmp_path):
    settings = tmp_path / "s.yaml"
    settings.write_text("trainig:\n  max_steps: 2\n")
    line = error_line(*train_args(world, tmp_path / "out"), "--settings", settings)
    assert f"{settings}: unknown section 'trainig' (did you mean 'training'?)" in line
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()


def test_a_missing_broken_or_non_mapping_settings_file_is_named(world, tmp_path):
    missing = tmp_path / "nope.yaml"
    assert f"{missing}: settings file not found" in error_line(*train_args(world), "--settings", missing)
    listed = tmp_path / "list.yaml"
    listed.write_text("- lora\n- training\n")
    assert f"{listed}: a settings file is a mapping" in error_line(*train_args(world), "--settings", listed)
    broken = tmp_path / "broken.yaml"
    broken.write_text("training: [1,\n")
    assert f"{broken}: not valid YAML (line 2" in error_line(*train_args(world), "--settings", broken)
    section = tmp_path / "section.yaml"
    section.write_text("lora: 8\n")
    assert f"{section}: lora: a mapping of settings" in error_line(*train_args(world), "--settings", section)


def test_a_misspelt_key_of_an_experiment_task_is_refused_before_any_stage(world, tmp_path):
    from pipeline_helpers import experiment_dict

    tasks = write_tasks(tmp_path / "data")
    tasks[1]["text_colum"] = tasks[1].pop("text_column")
    path = tmp_path / "exp.yaml"
    path.write_text(json.dumps({**experiment_dict(world / "model", tasks), "output_dir": str(tmp_path / "run")}))
    result = invoke("run", path)
    assert result.exit_code == 2 and "tasks[1]: unknown option 'text_colum'" in result.plain
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------- §5: a rank the modules cannot hold


def test_train_refuses_a_rank_above_the_hidden_size(world, tmp_path):
    line = error_line(*train_args(world, tmp_path / "out"), "--r", "64")
    assert "lora.r=64 exceeds module bert.encoder.layer.0.attention.self.query's size 32×32" in line
    assert not (tmp_path / "out.partial").exists()  # refused before the run starts


# ---------------------------------------------------------------- §6: models, modules, splits


def test_a_missing_model_folder_is_named(world):
    assert "model '/nonexistent': no such folder" in error_line(*stats_args(world)[:2], "/nonexistent",
                                                                *stats_args(world)[3:])
    line = error_line("eval", "-m", "/nonexistent", *task_args(world), "--adapter", world / "adapter")
    assert "model '/nonexistent': no such folder" in line


def test_an_unknown_target_module_a_missing_split_and_a_model_without_default_targets(world, tmp_path):
    assert "target_modules=['qury']" in error_line(*stats_args(world), "--target-modules", "qury")
    assert "task 'topic' has no split 'test'" in error_line(*stats_args(world), "--split", "test")
    from transformers import AutoTokenizer, T5Config, T5Model

    t5 = tmp_path / "tiny-t5"
    T5Model(T5Config(vocab_size=40, d_model=16, d_ff=32, num_layers=1, num_heads=2, d_kv=8)).save_pretrained(t5)
    AutoTokenizer.from_pretrained(world / "model").save_pretrained(t5)
    line = error_line(*stats_args(world)[:2], t5, *stats_args(world)[3:])
    assert "no default target modules for model type 't5'; pass target_modules" in line


def test_a_pickle_in_a_model_folder_is_refused_unrun(world, tmp_path):
    import shutil

    from safetensors.torch import load_file

    folder = tmp_path / "pickled"
    shutil.copytree(world / "model", folder)
    weights = load_file(folder / "model.safetensors")
    (folder / "model.safetensors").unlink()
    marker = tmp_path / "ran"
    torch.save({**weights, "payload": _Payload(str(marker))}, folder / "pytorch_model.bin")
    line = error_line(*stats_args(world)[:2], folder, *stats_args(world)[3:])
    assert "pytorch_model.bin is not a safe format" in line and "weights_only" not in line
    assert not marker.exists()


class _Payload:
    """Unpickling it would create a file: the proof that no code ran."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


# ---------------------------------------------------------------- §6: adapters


def test_malformed_adapter_config_and_a_nan_adapter_are_named(world, tmp_path):
    _adapter("a", 0).save(tmp_path / "a")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "adapter_config.json").write_text("{not json")
    line = error_line("merge", tmp_path / "a", tmp_path / "bad", "--method", "ties", "--out", tmp_path / "m")
    assert f"{tmp_path / 'bad' / 'adapter_config.json'}: not valid JSON" in line
    nan = _adapter("nan", 1)
    nan.modules["layer.1.proj"].A[0, 0] = float("nan")
    nan.save(tmp_path / "nan")
    line = error_line("merge", tmp_path / "a", tmp_path / "nan", "--method", "ties", "--rank", "2", "--out",
                      tmp_path / "m")
    assert f"{tmp_path / 'nan'}" in line and "layer.1.proj" in line and "non-finite" in line
    assert not (tmp_path / "m").exists()


def test_eval_refuses_a_head_of_another_class_count_before_scoring(world, tmp_path):
    rows = [{"sentence": f"w{i % 5} cat", "label": i % 3} for i in range(30)]
    (tmp_path / "three.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    three = ["--task", "three", "--files", f"train={tmp_path / 'three.jsonl'}", "--task-option",
             "text_column=sentence", "--quiet"]
    line = error_line("eval", "-m", world / "model", *three, "--adapter", world / "adapter")
    assert f"{world / 'adapter'}: head tensor classifier." in line and "task 'three' (3 outputs)" in line


# ---------------------------------------------------------------- §6: outputs that cannot be written


def test_outputs_in_a_read_only_folder_are_refused(world, tmp_path):
    read_only = world / "read-only"
    assert stat.S_IMODE(os.stat(read_only).st_mode) == 0o555
    assert f"{read_only} is read-only" in error_line(*stats_args(world, read_only / "s.safetensors"))
    line = error_line(*train_args(world, read_only / "trained"))
    assert f"{read_only} is read-only" in line and not (read_only / "trained.partial").exists()
    for t in ("a", "b"):
        _stats(t, ord(t)).save(tmp_path / f"{t}.safetensors")
        _adapter(t, ord(t)).save(tmp_path / t)
    stats = [tmp_path / "a.safetensors", tmp_path / "b.safetensors"]
    assert f"{read_only} is read-only" in error_line("init", *stats, "--rank", "2", "--out", read_only / "sub")
    line = error_line("interference", tmp_path / "a", tmp_path / "b", "--stats", stats[0], "--stats", stats[1],
                      "--out", read_only / "i.json")
    assert f"{read_only} is read-only" in line
    assert os.listdir(read_only) == []


def test_stats_onto_a_folder_and_init_onto_a_file_are_refused(world, tmp_path):
    (tmp_path / "folder").mkdir()
    line = error_line(*stats_args(world, tmp_path / "folder"))
    assert f"{tmp_path / 'folder'}: is a folder" in line
    for t in ("a", "b"):
        _stats(t, ord(t)).save(tmp_path / f"{t}.safetensors")
    (tmp_path / "file").write_text("mine")
    line = error_line("init", tmp_path / "a.safetensors", tmp_path / "b.safetensors", "--rank", "2", "--out",
                      tmp_path / "file")
    assert f"{tmp_path / 'file'}" in line and "not a folder" in line
    assert (tmp_path / "file").read_text() == "mine"


# ---------------------------------------------------------------- §7: Ctrl-C


def test_train_interrupted_says_how_to_resume(world, tmp_path, monkeypatch):
    import osrm_lora.train

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(osrm_lora.train, "finetune", interrupted)
    result = invoke(*train_args(world, tmp_path / "out"))
    assert result.exit_code == 130, result.output
    assert f"interrupted: checkpoints are kept in {tmp_path / 'out.partial'}" in result.plain
    assert "the same command with --resume" in result.plain


def test_a_warning_is_one_line_and_the_previous_format_comes_back():
    """Warnings print as `warning: …` (no source line); outside a command Python's format is untouched. Run in a
    fresh interpreter, since pytest records warnings instead of printing them."""
    import subprocess
    import sys
    import textwrap

    code = textwrap.dedent("""
        import warnings
        import osrm_lora.tasks
        from typer.testing import CliRunner
        from osrm_lora.cli import app

        def warn_then_list(glue_dir):
            warnings.warn("statistics of 1 example: the subspace is not determined by the data", UserWarning)
            return []

        osrm_lora.tasks.list_tasks = warn_then_list
        before = warnings.formatwarning
        result = CliRunner().invoke(app, ["data", "list", "--json"])
        assert result.exit_code == 0, result.output
        assert warnings.formatwarning is before
        print(result.output)
    """)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    lines = [line for line in done.stdout.splitlines() if "warning" in line]
    assert lines == ["warning: statistics of 1 example: the subspace is not determined by the data"], done.stdout
    assert "warnings.warn" not in done.stdout


@pytest.mark.parametrize(("args", "expected"), [
    (["merge", "a", "b", "--lambda", "nan"], "osrm-lora merge: Invalid value for '--lambda': nan is not a finite number"),
    (["merge", "a", "b", "--bogus"], "osrm-lora merge: No such option: --bogus"),
    (["nosuch"], "osrm-lora: No such command 'nosuch'"),
    (["--bogus"], "osrm-lora: No such option: --bogus"),
])
def test_usage_errors_are_one_line_too(args, expected):
    line = error_line(*args)
    assert expected in line and line.endswith("--help')"), line


def test_a_command_without_arguments_still_shows_its_help():
    result = invoke("data")
    assert result.exit_code == 2 and "Usage: osrm-lora data" in result.plain and "error:" not in result.plain
