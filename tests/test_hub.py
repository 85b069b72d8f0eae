"""The Hugging Face Hub, offline: `--push-to-hub` for merge and train through a test double of `HfApi` that
records what would be uploaded, the model card's content, and Hub files for statistics."""

from __future__ import annotations

import json
from pathlib import Path
from typing import ClassVar

import pytest
import yaml
from test_cli import _adapter, _error_line, _stats, invoke

from osrm_lora import hub
from osrm_lora.adapters import LoraAdapter


class FakeApi:
    """Stands in for `huggingface_hub.HfApi`: records each call and the folder's files at upload time."""

    calls: ClassVar[list[tuple]] = []
    fail_with: ClassVar[Exception | None] = None

    def create_repo(self, repo_id, **options):
        self.calls.append(("create_repo", repo_id, options))
        return f"https://huggingface.co/{repo_id}"

    def upload_folder(self, *, repo_id, folder_path, commit_message, ignore_patterns):
        if self.fail_with is not None:
            raise self.fail_with
        folder = Path(folder_path)
        files = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())
        self.calls.append(("upload_folder", repo_id, files, (folder / hub.CARD_NAME).read_text(), ignore_patterns,
                           commit_message))


@pytest.fixture
def api(monkeypatch):
    monkeypatch.setattr(hub, "HfApi", FakeApi)
    monkeypatch.setattr(FakeApi, "calls", [])
    monkeypatch.setattr(FakeApi, "fail_with", None)
    return FakeApi


def _front_matter(card: str) -> dict:
    assert card.startswith("---\n")
    return yaml.safe_load(card.split("---\n")[1])


def _trained_adapters(folder: Path) -> list[Path]:
    """Two toy adapters with the osrm_lora.json that `osrm-lora train` writes beside them."""
    paths = []
    for name, seed, accuracy in (("a", 0, 0.91), ("b", 1, 0.84)):
        _adapter(name, seed).save(folder / name)
        (folder / name / "osrm_lora.json").write_text(json.dumps(
            {"init": "osrm", "base_model": "toy", "dev_metrics": {"accuracy": accuracy}}))
        paths.append(folder / name)
    return paths


def test_merge_pushes_the_adapter_with_its_model_card(tmp_path, api):
    a, b = _trained_adapters(tmp_path)
    result = invoke("merge", str(a), str(b), "--method", "ties", "--param", "density=0.2", "--lambda", "1.0",
                    "--out", str(tmp_path / "merged"), "--push-to-hub", "me/ab-ties", "--json", "--quiet")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["url"] == "https://huggingface.co/me/ab-ties"
    (create, repo, options), upload = api.calls
    assert (create, repo, options) == ("create_repo", "me/ab-ties", {"repo_type": "model", "exist_ok": True})
    _, repo, files, card, ignored, message = upload
    assert repo == "me/ab-ties" and ignored == [".*"] and "ties of a, b" in message
    assert {"README.md", "adapter_config.json", "adapter_model.safetensors"} <= set(files)
    assert (tmp_path / "merged" / "README.md").read_text() == card  # the card stays in the output
    meta = _front_matter(card)
    assert meta["library_name"] == "peft" and meta["base_model"] == "toy" and "merge" in meta["tags"]
    for words in ("merged LoRA adapter", "| base model | `toy` |", "| tasks | a, b |", "a: osrm, b: osrm",
                  "| method | ties |", "density=0.2", "scaling=1.0", "export.rank=4", "| a adapter alone | 0.91 |",
                  "| b adapter alone | 0.84 |", "not measured by `osrm-lora merge`",
                  'PeftModel.from_pretrained(base, "me/ab-ties")'):
        assert words in card, words


def test_a_merge_file_card_names_the_mergekit_method(tmp_path, api):
    _trained_adapters(tmp_path)
    (tmp_path / "merge.yaml").write_text(yaml.safe_dump({
        "merge_method": "dare_linear", "base_model": "toy", "parameters": {"density": 0.5},
        "models": [{"model": "a", "parameters": {"weight": 0.5}}, {"model": "b", "parameters": {"weight": 0.5}}]}))
    result = invoke("merge", "--config", str(tmp_path / "merge.yaml"), "--out", str(tmp_path / "m"),
                    "--push-to-hub", "me/dare", "--quiet")
    assert result.exit_code == 0, result.output
    card = api.calls[-1][3]
    assert "| method | dare (mergekit merge_method: dare_linear) |" in card
    assert "drop_rate=0.5" in card and 'combine="linear"' in card and "weights=[0.5, 0.5]" in card


def test_a_bad_repository_id_is_refused_before_merging(tmp_path, api):
    a, b = _trained_adapters(tmp_path)
    line = _error_line(invoke("merge", str(a), str(b), "--method", "task_arithmetic", "--out", str(tmp_path / "m"),
                              "--push-to-hub", "not a repo"))
    assert "--push-to-hub 'not a repo': not a Hub repository id" in line
    assert not (tmp_path / "m").exists() and api.calls == []


def test_a_failed_upload_is_one_error_line_naming_the_repository(tmp_path, api):
    a, b = _trained_adapters(tmp_path)
    api.fail_with = OSError("401 Client Error: Unauthorized")
    line = _error_line(invoke("merge", str(a), str(b), "--method", "task_arithmetic", "--out", str(tmp_path / "m"),
                              "--push-to-hub", "me/x", "--quiet"))
    assert "me/x: cannot push" in line and "Unauthorized" in line
    assert (tmp_path / "m" / "adapter_config.json").is_file()  # the local output is kept


def test_train_pushes_the_adapter_with_dev_scores_and_settings(tmp_path, api):
    from pipeline_helpers import write_tasks, write_tiny_model

    model = write_tiny_model(tmp_path / "model")
    write_tasks(tmp_path / "data")
    out = tmp_path / "adapters" / "topic"
    result = invoke("train", "--model", str(model), "--task", "topic",
                    "--files", f"train={tmp_path / 'data' / 'topic_train.jsonl'}",
                    "--files", f"dev={tmp_path / 'data' / 'topic_dev.jsonl'}", "--task-option", "text_column=sentence",
                    "--init", "gaussian", "--r", "2", "--max-steps", "2", "--batch-size", "8", "--out", str(out),
                    "--push-to-hub", "me/topic-lora", "--quiet", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["url"] == "https://huggingface.co/me/topic-lora"
    _, repo, files, card, _, message = api.calls[-1]
    assert repo == "me/topic-lora" and message == "osrm-lora train: topic, init gaussian"
    assert {"README.md", "adapter_config.json", "adapter_model.safetensors", "osrm_lora.json"} <= set(files)
    metadata = json.loads((out / "osrm_lora.json").read_text())
    meta = _front_matter(card)
    assert meta["library_name"] == "peft" and "base_model" not in meta  # a local folder is no Hub id
    for words in (f"| base model | `{model}` |", "| tasks | topic |", "| init | topic: gaussian |",
                  "fine-tuned with transformers.Trainer: 2 steps", "lora.r=2", "training.max_steps=2", "seed=0",
                  f"| topic (dev) | {metadata['dev_metrics']['accuracy']:.4g} |"):
        assert words in card, words


def test_card_without_scores_says_so():
    card = hub.Card(kind="LoRA adapter", base_model="bert-base-uncased", tasks=["rte"], inits={"rte": None},
                    method="fine-tuned", hyperparameters={}).render("me/rte")
    assert _front_matter(card)["base_model"] == "bert-base-uncased"
    assert "rte: not recorded" in card and "## Scores\n\nNot measured." in card


def test_statistics_files_may_be_hub_files(tmp_path, monkeypatch):
    """`--stats` takes `user/repo/path@revision`, read through hf_hub_download (here a double serving local
    files): RegMean from Hub statistics equals RegMean from the same local files."""
    import torch

    for k, t in enumerate("ab"):
        _adapter(t, k).save(tmp_path / t)
        _stats(t, torch.randn(30, 6, generator=torch.Generator().manual_seed(k)) + k).save(tmp_path / f"{t}.st")
    asked = []

    def download(repo_id, filename, revision=None):
        asked.append((repo_id, filename, revision))
        return str(tmp_path / Path(filename).name)

    monkeypatch.setattr(hub, "hf_hub_download", download)
    adapters = [str(tmp_path / t) for t in "ab"]
    for out, stats in (("hub", ["me/stats/run1/a.st@v1", "me/stats/run1/b.st"]),
                       ("local", [str(tmp_path / f"{t}.st") for t in "ab"])):
        flags = [flag for path in stats for flag in ("--stats", path)]
        result = invoke("merge", *adapters, "--method", "regmean", *flags, "--out", str(tmp_path / out), "--quiet")
        assert result.exit_code == 0, result.output
    assert asked == [("me/stats", "run1/a.st", "v1"), ("me/stats", "run1/b.st", None)]
    hub_merge, local_merge = (LoraAdapter.load(tmp_path / out) for out in ("hub", "local"))
    for m, factors in local_merge.modules.items():
        torch.testing.assert_close(hub_merge.modules[m].delta(), factors.delta(), rtol=0, atol=0)
    with pytest.raises(hub.HubError, match="no such file, and not a Hub file"):
        hub.hub_file(tmp_path / "missing.safetensors")
