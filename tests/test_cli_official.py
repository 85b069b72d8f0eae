"""`osrm-official` by the step commands: `stats --padded`, `init --variant official`, `train --init osrm-official`
give what the library functions of the experiment pipeline give (`official_stats` for its stats/padded/ files,
`official_subspaces` for its subspaces/official/ ones), on the tiny random BERT and the two synthetic file tasks.
"""

from __future__ import annotations

import pytest
import torch
from cli_helpers import invoke, tiny_world
from safetensors.torch import load_file

from osrm_lora.distributed import load_on_device
from osrm_lora.inits.official_tensors import official_stats
from osrm_lora.stats import TaskStats
from osrm_lora.subspace import Subspace, official_subspaces
from osrm_lora.tasks import get_task
from osrm_lora.train import INITIAL_A_NAME

SAMPLES, SEED, MAX_LENGTH, R = 8, 3, 16, 2
TASK_OPTIONS = {
    "topic": {"files": "topic_train.jsonl", "options": {"text_column": "sentence"}},
    "sentiment": {"files": "sentiment_train.csv",
                  "options": {"text_column": "sentence", "label_names": "negative,positive"}},
}


def error_line(*args) -> str:
    """The one `error: …` line of a refused command: exit code 2, no traceback."""
    result = invoke(*args)
    assert result.exit_code == 2 and isinstance(result.exception, SystemExit), result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    return lines[0]


def task_args(data, name: str) -> list:
    entry = TASK_OPTIONS[name]
    options = [arg for key, value in entry["options"].items() for arg in ("--task-option", f"{key}={value}")]
    return ["--task", name, "--files", f"train={data / entry['files']}", *options, "--quiet"]


def the_task(data, name: str):
    entry = TASK_OPTIONS[name]
    return get_task(name, files={"train": str(data / entry["files"])}, **entry["options"])


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """The tiny world with each task's padded means and plain statistics written by `osrm-lora stats`."""
    root = tiny_world(tmp_path_factory.mktemp("cli-official"))
    for name in TASK_OPTIONS:
        common = ["stats", "--model", root / "model", *task_args(root / "data", name), "--samples", SAMPLES,
                  "--seed", SEED, "--max-length", MAX_LENGTH]
        padded = invoke(*common, "--padded", "--out", root / "padded" / f"{name}.safetensors")
        assert padded.exit_code == 0, padded.output
        assert f"task {name}, padded means, 4 modules, {SAMPLES * MAX_LENGTH} tokens" in padded.plain
        plain = invoke(*common, "--out", root / "plain" / f"{name}.safetensors")
        assert plain.exit_code == 0, plain.output
    return root


def test_padded_stats_are_the_pipelines_padded_means(world):
    """The file equals, tensor for tensor, what `official_stats` (the pipeline's stats/padded/ writer) gives."""
    for name in TASK_OPTIONS:
        task = the_task(world / "data", name)
        model, tokenizer = load_on_device(str(world / "model"), task)
        direct = official_stats(task, model, tokenizer, samples=SAMPLES, seed=SEED, max_length=MAX_LENGTH,
                                model_id=str(world / "model"))
        got = TaskStats.load(world / "padded" / f"{name}.safetensors")
        assert got.extra["mask_padding"] == "false" and got.extra["padding"] == "max_length"
        assert (got.task, got.model, got.config_hash, got.model_digest, got.tokens, got.extra) == (
            direct.task, direct.model, direct.config_hash, direct.model_digest, direct.tokens, direct.extra)
        assert got.modules == direct.modules
        for m in direct.modules:
            assert torch.equal(got.second[m], direct.second[m]) and torch.equal(got.first[m], direct.first[m]), m


def test_official_subspaces_are_the_pipelines(world, tmp_path):
    files = [world / "padded" / f"{name}.safetensors" for name in TASK_OPTIONS]
    result = invoke("init", *files, "--variant", "official", "--rank", R, "--out", tmp_path / "sub", "--json")
    assert result.exit_code == 0, result.output
    expected = official_subspaces([TaskStats.load(f) for f in files], R)
    for name, subspace in expected.items():
        got = Subspace.load(tmp_path / "sub" / f"{name}.safetensors")
        assert (got.variant, got.others, got.energy) == ("official", subspace.others, subspace.energy)
        assert got.A.keys() == subspace.A.keys()
        for m, rows in subspace.A.items():
            assert torch.equal(got.A[m], rows), (name, m)


def test_padded_and_plain_files_refused_by_the_other_variants(world, tmp_path):
    padded = world / "padded" / "topic.safetensors"
    plain = world / "plain" / "sentiment.safetensors"
    for variant in ("cov", "mean"):
        line = error_line("init", padded, world / "padded" / "sentiment.safetensors", "--variant", variant, "--out",
                       tmp_path / "x")
        assert line.startswith(f"error: {padded}: padded means") and f"--variant {variant} reads" in line
    line = error_line("init", world / "padded" / "sentiment.safetensors", world / "plain" / "topic.safetensors", plain,
                   "--variant", "official", "--out", tmp_path / "x")
    assert line.startswith(f"error: {world / 'plain' / 'topic.safetensors'}: statistics over real tokens")
    assert "choose one of cov, centered, mean, official" in error_line("init", plain, "--variant", "offical", "--out",
                                                                    tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_train_with_the_cli_subspace_starts_on_its_rows(world, tmp_path):
    files = [world / "padded" / f"{name}.safetensors" for name in TASK_OPTIONS]
    assert invoke("init", *files, "--variant", "official", "--rank", R, "--out", tmp_path / "sub").exit_code == 0
    subspace = Subspace.load(tmp_path / "sub" / "topic.safetensors")
    result = invoke("train", "--model", world / "model", *task_args(world / "data", "topic"), "--init",
                    "osrm-official", "--subspace", tmp_path / "sub" / "topic.safetensors", "--r", R,
                    "--max-steps", 1, "--out", tmp_path / "adapter")
    assert result.exit_code == 0, result.output
    initial = load_file(tmp_path / "adapter" / INITIAL_A_NAME)
    assert initial.keys() == subspace.A.keys()
    for m, a in initial.items():
        assert torch.equal(a, subspace.rows(m, R)), m
