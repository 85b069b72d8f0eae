"""Base models are identified by content: a digest of the config, the safetensors headers and sampled values.

The same model under an absolute and a relative path (or re-sharded) is one model; other weights under the
same path text are another, and statistics, subspaces, adapters and `eval` refuse to mix them unless
--allow-model-mismatch says otherwise. Files from before digests are compared by config hash, with a warning.
On a tiny random BERT (hidden size 32) saved to a temporary folder, with the synthetic tasks of
`pipeline_helpers`.
"""

from __future__ import annotations

import json
import shutil

import pytest
from helpers_merge import SHAPES, random_adapter
from pipeline_helpers import experiment_dict, write_tasks, write_tiny_model
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from test_cli_errors import error_line, invoke, task_args
from test_matching import _stats

from osrm_lora.adapters import METADATA_NAME, LoraAdapter
from osrm_lora.errors import MergeError
from osrm_lora.identity import ModelIdentity, allow_model_mismatch, check_same_model, model_digest
from osrm_lora.merge import merge_adapters
from osrm_lora.stats import StatsMismatchError, TaskStats


def change_one_weight(folder) -> None:
    """Other weights under the same folder: one tensor of the model file moved (everything else identical)."""
    path = folder / "model.safetensors"
    tensors = load_file(str(path))
    key = "encoder.layer.0.attention.self.query.weight"
    tensors[key] = tensors[key] + 0.05
    save_file(tensors, str(path), metadata={"format": "pt"})


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """`model`, `other` (a copy of it with one weight tensor changed) and the tasks' files."""
    root = tmp_path_factory.mktemp("identity")
    write_tiny_model(root / "model")
    shutil.copytree(root / "model", root / "other")
    change_one_weight(root / "other")
    write_tasks(root / "data")
    return root


def stats_args(root, model, task, out):
    return ["stats", "--model", model, *task_args(root, task), "--samples", "4", "--max-length", "16", "--out", out]


def test_the_digest_is_the_content_not_the_path(world, monkeypatch, tmp_path):
    digest = model_digest(str(world / "model"))
    assert len(digest) == 16
    monkeypatch.chdir(world)
    assert model_digest("model") == model_digest("./model") == digest
    assert model_digest("other") != digest
    copy = tmp_path / "copy"
    shutil.copytree(world / "model", copy)
    config = json.loads((copy / "config.json").read_text())
    (copy / "config.json").write_text(json.dumps({**config, "_name_or_path": "elsewhere", "transformers_version": "0"}))
    assert model_digest(str(copy)) == digest
    from transformers import BertModel

    BertModel.from_pretrained(world / "model").save_pretrained(tmp_path / "sharded", max_shard_size="40KB")
    assert len(list((tmp_path / "sharded").glob("*.safetensors"))) > 1
    shutil.copy(world / "model" / "config.json", tmp_path / "sharded" / "config.json")
    assert model_digest(str(tmp_path / "sharded")) == digest
    assert model_digest(str(tmp_path / "nowhere")) == ""


def test_statistics_of_one_model_under_absolute_and_relative_paths_are_used_together(world, monkeypatch, tmp_path):
    monkeypatch.chdir(world)
    assert invoke(*stats_args(world, world / "model", "a", tmp_path / "a.safetensors")).exit_code == 0
    assert invoke(*stats_args(world, "model", "b", tmp_path / "b.safetensors")).exit_code == 0
    a, b = (TaskStats.load(tmp_path / f"{t}.safetensors") for t in "ab")
    assert a.model != b.model and a.model_digest == b.model_digest == model_digest("model")
    result = invoke("init", tmp_path / "a.safetensors", tmp_path / "b.safetensors", "--rank", "2", "--out",
                    tmp_path / "sub")
    assert result.exit_code == 0, result.output
    assert (tmp_path / "sub" / "a.safetensors").is_file()


def test_other_weights_under_the_same_path_text_are_refused(world, tmp_path):
    model = tmp_path / "m"
    shutil.copytree(world / "model", model)
    assert invoke(*stats_args(world, model, "a", tmp_path / "a.safetensors")).exit_code == 0
    change_one_weight(model)  # same path text, other weights
    assert invoke(*stats_args(world, model, "b", tmp_path / "b.safetensors")).exit_code == 0
    files = [tmp_path / "a.safetensors", tmp_path / "b.safetensors"]
    line = error_line("init", *files, "--rank", "2", "--out", tmp_path / "sub")
    assert f"statistics {files[1]} (task 'b') is on model '{model}' (digest" in line
    assert f"but statistics {files[0]} (task 'a') is on model '{model}'" in line
    assert "not the same base model" in line and "--allow-model-mismatch" in line
    assert not (tmp_path / "sub").exists()
    with pytest.warns(UserWarning, match="not the same base model.*used together anyway"):
        result = invoke("init", *files, "--rank", "2", "--out", tmp_path / "sub", "--allow-model-mismatch")
    assert result.exit_code == 0, result.output


@pytest.fixture(scope="module")
def trained(world):
    """An adapter trained for one step on `model`."""
    out = world / "trained"
    result = invoke("train", "--model", world / "model", *task_args(world), "--max-steps", "1", "--r", "2", "--out",
                    out)
    assert result.exit_code == 0, result.output
    return out


def test_the_adapter_records_its_base_models_digest(world, trained):
    record = json.loads((trained / METADATA_NAME).read_text())
    assert record["model_digest"] == model_digest(str(world / "model"))
    assert LoraAdapter.load(trained).identity().digest == record["model_digest"]


def test_eval_refuses_an_adapter_trained_on_another_base_model(world, trained, monkeypatch):
    evaluate = ["eval", "--adapter", trained, *task_args(world), "--max-examples", "4", "--json"]
    line = error_line(*evaluate[:1], "--model", world / "other", *evaluate[1:])
    assert f"adapter {trained} is on model '{world / 'model'}' (digest" in line
    assert f"but --model is on model '{world / 'other'}' (digest" in line
    with pytest.warns(UserWarning, match="not the same base model"):
        allowed = invoke(*evaluate[:1], "--model", world / "other", *evaluate[1:], "--allow-model-mismatch")
    assert allowed.exit_code == 0, allowed.output
    monkeypatch.chdir(world)
    same = invoke(*evaluate[:1], "--model", "model", *evaluate[1:])  # the same model by a relative path
    assert same.exit_code == 0, same.output


def _without_digest(path) -> None:
    """Rewrite a file as an older osrm-lora wrote it: no model_digest in its metadata."""
    with safe_open(str(path), "pt") as f:
        metadata = {k: v for k, v in f.metadata().items() if k != "model_digest"}
    save_file(load_file(str(path)), str(path), metadata=metadata)


def test_files_without_a_digest_fall_back_to_the_config_hash_with_a_warning(tmp_path):
    old = _stats("old", 1)
    old.save(tmp_path / "old.safetensors")
    _without_digest(tmp_path / "old.safetensors")
    with pytest.warns(UserWarning, match=r"old\.safetensors: statistics written without a model digest"):
        loaded = TaskStats.load(tmp_path / "old.safetensors")
    assert loaded.model_digest == ""
    new = _stats("new", 2)
    new.model_digest = "0123456789abcdef"
    new.check_matches(model=loaded.identity())  # same config hash: accepted
    new.config_hash = "another-hash"
    with pytest.raises(StatsMismatchError, match=r"config_hash another-hash\), but statistics .*old\.safetensors"):
        new.check_matches(model=loaded.identity())


def test_check_same_model_prefers_the_digest_and_can_be_overridden():
    a = ModelIdentity("/abs/model", "h", "d1", "statistics a")
    check_same_model(a, ModelIdentity("rel/model", "h", "d1", "statistics b"))
    other = ModelIdentity("/abs/model", "h", "d2", "statistics b")
    with pytest.raises(ValueError, match="statistics a is on model '/abs/model' .*not the same base model"):
        check_same_model(a, other)
    with allow_model_mismatch(), pytest.warns(UserWarning, match="used together anyway"):
        check_same_model(a, other)
    with pytest.raises(ValueError, match="not the same base model"):  # the override ends with its block
        check_same_model(a, other)


def test_merge_refuses_statistics_of_another_base_model(tmp_path):
    adapters = [random_adapter(t, seed=i) for i, t in enumerate("ab")]
    for adapter in adapters:
        adapter.record = {"task": adapter.name, "config_hash": "toy-hash", "model_digest": "aaaa"}
    stats = [_stats(t, i) for i, t in enumerate("ab")]
    stats[0].model_digest = "aaaa"
    stats[1].model_digest = "bbbb"
    with pytest.raises(MergeError, match=r"statistics of task 'b' is on model 'toy' \(digest bbbb\)"):
        merge_adapters(adapters, "regmean", stats=stats)
    stats[1].model_digest = "aaaa"
    assert {m.name for m in merge_adapters(adapters, "regmean", stats=stats)} == set(SHAPES)


def test_pipeline_fingerprints_carry_the_digest(world):
    from osrm_lora.pipeline.context import Context
    from osrm_lora.settings import ExperimentConfig

    config = ExperimentConfig.model_validate(experiment_dict(world / "model", write_tasks(world / "data")))
    context = Context(config, None, None, progress=False, log=print)
    assert context.model_inputs["digest"] == model_digest(str(world / "model"))
    assert context.model_inputs["name"] == str(world / "model")
