"""Issue 14 §1 at the command line: `--out` (and `run --output`) never destroys what osrm-lora did not write.

An existing path is replaced only when it is this command's own kind of output, or with --overwrite; never an
input of the command, a plain file by a folder, a read-only path or the current directory. Refused before any
work, and nothing is deleted. The rules themselves are tested in test_io.py, the library writers in
test_reliability.py; here every command is shown to pass them its kind, --overwrite and its inputs.
"""

from __future__ import annotations

import json
import os

import pytest
import torch
from cli_helpers import invoke, refused, tiny_world, topic_args
from helpers_core import anisotropic_inputs, stats_from_inputs
from helpers_merge import random_adapter
from pipeline_helpers import write_experiment
from safetensors.torch import save_file

from osrm_lora.adapters import LoraAdapter
from osrm_lora.io import recorded_kind
from osrm_lora.pipeline.layout import Layout
from osrm_lora.pipeline.runner import _claim_experiment_dir
from osrm_lora.settings import load_experiment
from osrm_lora.stats import TaskStats

MODULES = {"layer.0.proj", "layer.1.proj"}


def precious(path):
    path.mkdir(parents=True)
    (path / "thesis.tex").write_text("years of work")
    return path


def untouched(path) -> bool:
    return sorted(os.listdir(path)) == ["thesis.tex"] and (path / "thesis.tex").read_text() == "years of work"


@pytest.fixture
def pair(tmp_path):
    """Two adapters in tmp_path/ins/{a,b} and their statistics in tmp_path/ins/{a,b}.safetensors."""
    ins = tmp_path / "ins"
    for i, t in enumerate("ab"):
        random_adapter(t, i, rank=2, shapes={m: (5, 6) for m in MODULES}, base="toy").save(ins / t)
        x = anisotropic_inputs(20, 6, seed=i)
        stats_from_inputs(t, {m: x for m in MODULES}).save(ins / f"{t}.safetensors")
    return ins


def merge(ins, out, *extra):
    return ("merge", ins / "a", ins / "b", "--method", "task_arithmetic", "--out", out, *extra)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return tiny_world(tmp_path_factory.mktemp("cli-outputs"))


def train(world, out, *extra):
    return ("train", "--model", world / "model", *topic_args(world / "data"), "--max-steps", "1", "--r", "2",
            "--out", out, *extra)


def stats(world, out, *extra):
    return ("stats", "--model", world / "model", *topic_args(world / "data"), "--samples", "4", "--out", out, *extra)


# ------------------------------------------------------------------------------------------ merge


def test_merge_never_replaces_an_unrelated_folder_without_overwrite(pair, tmp_path):
    target = precious(tmp_path / "ow" / "precious")
    line = refused(*merge(pair, target))
    assert f"{target}: exists and is no osrm-lora 'merged-adapter' output; use --overwrite" in line
    assert untouched(target)
    assert invoke(*merge(pair, target, "--overwrite")).exit_code == 0  # told to: replaced
    assert recorded_kind(target) == "merged-adapter" and not (target / "thesis.tex").exists()
    assert LoraAdapter.load(target).modules.keys() == MODULES


def test_merge_rewrites_its_own_output_without_overwrite(pair, tmp_path):
    assert invoke(*merge(pair, tmp_path / "m")).exit_code == 0
    first = LoraAdapter.load(tmp_path / "m").deltas()["layer.0.proj"]
    assert invoke(*merge(pair, tmp_path / "m", "--lambda", "0.5")).exit_code == 0
    assert torch.allclose(LoraAdapter.load(tmp_path / "m").deltas()["layer.0.proj"], 0.5 * first, atol=1e-6)
    line = refused(*merge(pair, tmp_path / "m", "--full-model", tmp_path / "nobase"))
    assert "'merged-adapter' output, not 'merged-model'" in line  # another kind of ours: --overwrite too


@pytest.mark.parametrize("overwrite", [(), ("--overwrite",)])
def test_merge_never_writes_over_its_inputs(pair, overwrite):
    before = sorted(os.listdir(pair))
    line = refused(*merge(pair, pair / "b", *overwrite))
    assert f"{pair / 'b'}: is {pair / 'b'}, an input of this command" in line
    line = refused(*merge(pair, pair, *overwrite))  # the folder holding the inputs
    assert f"{pair}: contains {pair / 'a'}, an input of this command" in line
    stats = ("--method", "regmean", "--stats", pair / "a.safetensors", "--stats", pair / "b.safetensors")
    line = refused("merge", pair / "a", pair / "b", *stats, "--out", pair / "b.safetensors", *overwrite)
    assert "an input of this command" in line
    assert sorted(os.listdir(pair)) == before
    assert LoraAdapter.load(pair / "b").modules.keys() == MODULES


def test_merge_never_replaces_a_file_a_read_only_folder_or_the_current_directory(pair, tmp_path, monkeypatch):
    (tmp_path / "notes.txt").write_text("mine")
    line = refused(*merge(pair, tmp_path / "notes.txt", "--overwrite"))
    assert "notes.txt: is a file; a folder output never replaces it, even with --overwrite" in line
    assert (tmp_path / "notes.txt").read_text() == "mine"
    assert invoke(*merge(pair, tmp_path / "frozen")).exit_code == 0
    (tmp_path / "frozen").chmod(0o555)
    try:
        line = refused(*merge(pair, tmp_path / "frozen", "--overwrite"))
        assert "frozen: is read-only (mode 0555); it is never replaced" in line
        assert recorded_kind(tmp_path / "frozen") == "merged-adapter"
    finally:
        (tmp_path / "frozen").chmod(0o755)
    work = precious(tmp_path / "work")
    monkeypatch.chdir(work)
    line = refused(*merge(pair, ".", "--overwrite"))
    assert ".: is or contains the current directory; choose a new folder for the output" in line
    assert untouched(work)


# ------------------------------------------------------------------------------------------ train


def test_train_never_replaces_an_unrelated_folder_nor_empties_a_foreign_partial(world, tmp_path):
    target = precious(tmp_path / "ow" / "precious2")
    line = refused(*train(world, target))
    assert f"{target}: exists and is no osrm-lora 'adapter' output; use --overwrite" in line
    assert untouched(target) and not (tmp_path / "ow" / "precious2.partial").exists()
    foreign = precious(tmp_path / "run.partial")
    line = refused(*train(world, tmp_path / "run"))
    assert f"{foreign}: exists and is no interrupted osrm-lora training run" in line
    assert untouched(foreign)
    data = world / "data"
    line = refused(*train(world, data, "--overwrite"))  # the folder holding the task's files
    assert "an input of this command" in line and (data / "topic_train.jsonl").is_file()


def test_train_with_overwrite_replaces_an_unrelated_folder_then_rewrites_its_own(world, tmp_path):
    target = precious(tmp_path / "precious")
    assert invoke(*train(world, target, "--overwrite")).exit_code == 0
    assert recorded_kind(target) == "adapter" and not (target / "thesis.tex").exists()
    result = invoke(*train(world, target, "--seed", "1"))  # its own output: no --overwrite needed
    assert result.exit_code == 0, result.output
    assert json.loads((target / "osrm_lora.json").read_text())["seed"] == 1


# ------------------------------------------------------------------------------------------ stats, init, interference


def test_stats_refuses_a_foreign_file_and_its_inputs(world, tmp_path):
    weights = tmp_path / "weights.safetensors"
    save_file({"w": torch.zeros(2)}, str(weights), metadata={"format": "pt"})
    line = refused(*stats(world, weights))
    assert "weights.safetensors: exists and is an osrm-lora 'pt' output, not 'osrm-lora/task-stats/1'" in line
    line = refused(*stats(world, world / "data" / "topic_train.jsonl", "--overwrite"))
    assert "topic_train.jsonl, an input of this command" in line
    line = refused(*stats(world, world / "model" / "s.safetensors"))
    assert "is inside" in line and "model, an input of this command" in line
    assert invoke(*stats(world, tmp_path / "s.safetensors")).exit_code == 0
    assert invoke(*stats(world, tmp_path / "s.safetensors")).exit_code == 0  # its own kind: rewritten
    assert invoke(*stats(world, weights, "--overwrite")).exit_code == 0
    assert TaskStats.load(weights).task == "topic"


def test_init_refuses_to_write_over_its_statistics_before_computing(pair, tmp_path):
    files = (pair / "a.safetensors", pair / "b.safetensors")
    line = refused("init", *files, "--rank", "2", "--out", pair, "--overwrite")
    assert f"{pair / 'a.safetensors'}: is {pair / 'a.safetensors'}, an input of this command" in line
    assert TaskStats.load(pair / "a.safetensors").task == "a"
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "a.safetensors").write_text("not a subspace")
    line = refused("init", *files, "--rank", "2", "--out", tmp_path / "sub")
    assert "a.safetensors: exists and is no osrm-lora 'osrm-lora/subspace/1' output; use --overwrite" in line
    assert not (tmp_path / "sub" / "b.safetensors").exists()  # refused before any subspace was written


def test_interference_out_records_its_kind_and_never_replaces_an_input(pair, tmp_path):
    args = ("interference", pair / "a", pair / "b", "--stats", pair / "a.safetensors", "--stats",
            pair / "b.safetensors", "--out")
    assert invoke(*args, tmp_path / "i.json").exit_code == 0
    assert recorded_kind(tmp_path / "i.json") == "osrm-lora/interference/1"
    assert invoke(*args, tmp_path / "i.json").exit_code == 0
    line = refused(*args, pair / "a.safetensors", "--overwrite")
    assert "an input of this command" in line
    (tmp_path / "mine.json").write_text('{"format": "someone else\'s"}')
    assert "--overwrite" in refused(*args, tmp_path / "mine.json")
    assert invoke(*args, tmp_path / "mine.json", "--overwrite").exit_code == 0


# ------------------------------------------------------------------------------------------ run, demo, report


def test_run_and_demo_refuse_an_unrelated_folder_and_the_experiment_s_own(world, tmp_path):
    path = write_experiment(tmp_path / "study", world / "model")
    target = precious(tmp_path / "precious")
    line = refused("run", path, "--output", target, "--quiet")
    assert f"{target}: exists and is no osrm-lora 'experiment' output; use --overwrite" in line
    line = refused("run", path, "--output", tmp_path / "study", "--quiet", "--overwrite")
    assert f"contains {path}, an input of this command" in line
    line = refused("run", path, "--output", tmp_path / "study" / "data", "--quiet", "--overwrite")
    assert "an input of this command" in line
    assert "exists and is no osrm-lora 'experiment' output" in refused("demo", "--output", target, "--quiet")
    assert untouched(target)


def test_an_experiment_folder_of_an_earlier_version_is_reused(world, tmp_path):
    config = load_experiment(write_experiment(tmp_path / "study", world / "model"))
    out = Layout(tmp_path / "old")
    (out.root / "manifests" / "train").mkdir(parents=True)  # what a version before the markers left
    out.config.write_text("{}")
    (out.root / "adapters").mkdir()
    _claim_experiment_dir(config, out)
    assert recorded_kind(out.root) == "experiment" and (out.root / "adapters").is_dir()

