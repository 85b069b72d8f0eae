"""Task specs, metrics, seeded sampling, users' files, malformed rows, names, batching (all offline)."""

from __future__ import annotations

import csv
import json
import math
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.stats import rankdata

from osrm_lora.io import OsrmFileError
from osrm_lora.tasks import (
    MalformedRowsWarning,
    Task,
    TaskError,
    TaskSpec,
    UnknownTaskError,
    compute_metrics,
    get_task,
    load_file_task,
    make_dataloader,
    proportional_allocation,
    sampling,
    tokenize,
)

BINARY = TaskSpec("bin", ("text",), ("neg", "pos"), ("accuracy", "f1", "mean_f1_accuracy", "matthews"), "f1")
MULTI = TaskSpec("multi", ("a", "b"), ("x", "y", "z"), ("accuracy", "macro_f1"), "accuracy")
REGRESSION = TaskSpec("reg", ("text",), None, ("pearson", "spearman", "mean_pearson_spearman"),
                      "mean_pearson_spearman")


# ------------------------------------------------------------------------------------------------ spec


def test_spec_rejects_inconsistent_definitions():
    with pytest.raises(TaskError, match="primary metric"):
        TaskSpec("t", ("text",), ("a", "b"), ("accuracy",), "f1")
    with pytest.raises(TaskError, match="need 2 labels"):
        TaskSpec("t", ("text",), ("a", "b", "c"), ("f1",), "f1")
    with pytest.raises(TaskError, match="not regression metrics"):
        TaskSpec("t", ("text",), None, ("accuracy",), "accuracy")
    with pytest.raises(TaskError, match="one field or a pair"):
        TaskSpec("t", ("a", "b", "c"), ("x", "y"), ("accuracy",), "accuracy")


def test_label_values_names_ids_and_numbers():
    spec = TaskSpec("t", ("text",), ("1", "0"), ("accuracy",), "accuracy")
    assert spec.label_value("0") == 1  # a string is a name first
    assert spec.label_value(0) == 0  # a number is a class id
    assert MULTI.label_value("z") == 2 and MULTI.label_value("1") == 1 and MULTI.label_value(2.0) == 2
    for bad in ("w", 3, -1, "1.5", True):
        with pytest.raises(ValueError):
            MULTI.label_value(bad)
    assert REGRESSION.label_value("3.25") == 3.25
    with pytest.raises(ValueError):
        REGRESSION.label_value("nan")
    assert TaskSpec.from_dict(MULTI.to_dict()) == MULTI


# ------------------------------------------------------------------------------------------------ metrics


def test_binary_metrics_match_hand_counts():
    gold = np.array([1, 1, 1, 0, 0, 0, 0, 1, 0, 1])
    pred = np.array([1, 0, 1, 0, 1, 0, 0, 1, 1, 1])
    tp = int(((pred == 1) & (gold == 1)).sum())
    fp = int(((pred == 1) & (gold == 0)).sum())
    fn = int(((pred == 0) & (gold == 1)).sum())
    tn = int(((pred == 0) & (gold == 0)).sum())
    f1 = 2 * tp / (2 * tp + fp + fn)
    accuracy = (tp + tn) / len(gold)
    mcc = (tp * tn - fp * fn) / math.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    scores = compute_metrics(BINARY, pred, gold)
    assert scores == pytest.approx({"accuracy": accuracy, "f1": f1, "mean_f1_accuracy": (f1 + accuracy) / 2,
                                    "matthews": mcc})
    logits = np.stack([-pred.astype(float), pred.astype(float)], axis=1)  # argmax recovers pred
    assert compute_metrics(BINARY, logits, gold) == pytest.approx(scores)


def test_macro_f1_is_mean_of_per_class_f1():
    gold = np.array([0, 0, 1, 1, 2, 2, 2, 0])
    pred = np.array([0, 1, 1, 1, 2, 0, 2, 0])
    per_class = []
    for c in range(3):
        tp = ((pred == c) & (gold == c)).sum()
        per_class.append(2 * tp / ((pred == c).sum() + (gold == c).sum()))
    scores = compute_metrics(MULTI, pred, gold)
    assert scores["macro_f1"] == pytest.approx(np.mean(per_class))
    assert scores["accuracy"] == pytest.approx((pred == gold).mean())


def test_regression_metrics_match_closed_forms():
    rng = np.random.default_rng(0)
    gold = rng.normal(size=40)
    pred = gold + rng.normal(scale=0.7, size=40)

    def pearson(x, y):
        x, y = x - x.mean(), y - y.mean()
        return float((x @ y) / np.sqrt((x @ x) * (y @ y)))

    p, s = pearson(pred, gold), pearson(rankdata(pred), rankdata(gold))
    scores = compute_metrics(REGRESSION, pred[:, None], gold)
    assert scores == pytest.approx({"pearson": p, "spearman": s, "mean_pearson_spearman": (p + s) / 2})
    assert compute_metrics(REGRESSION, np.full(40, 2.0), gold)["pearson"] == 0.0  # undefined -> 0


def test_metrics_reject_mismatched_inputs():
    with pytest.raises(ValueError, match="predictions for"):
        compute_metrics(BINARY, [0, 1], [0, 1, 1])
    with pytest.raises(ValueError, match="columns"):
        compute_metrics(MULTI, np.zeros((3, 2)), [0, 1, 2])
    with pytest.raises(ValueError, match="outside"):
        compute_metrics(BINARY, [0, 2], [0, 1])


# ------------------------------------------------------------------------------------------------ sampling


def test_proportional_allocation_is_within_one_of_exact():
    rng = np.random.default_rng(3)
    for _ in range(200):
        counts = rng.integers(0, 50, size=rng.integers(1, 7))
        if counts.sum() == 0:
            continue
        total = int(rng.integers(0, counts.sum() + 1))
        shares = proportional_allocation(counts, total)
        assert sum(shares) == total
        exact = counts * total / counts.sum()
        assert np.all(np.abs(np.array(shares) - exact) < 1)
        assert np.all(np.array(shares) <= counts)


def _labelled_task(n=300, seed=0):
    rng = np.random.default_rng(seed)
    labels = rng.choice(3, size=n, p=[0.6, 0.3, 0.1])
    rows = [{"text": f"example {i}", "text_pair": f"pair {i}", "label": int(c)} for i, c in enumerate(labels)]
    return Task.from_records(MULTI, {"train": rows, "dev": rows[:50]})


def test_sampling_is_seeded_and_stratified():
    task = _labelled_task()
    full = task.split("train")
    a = task.split("train", max_examples=47, seed=5)
    b = task.split("train", max_examples=47, seed=5)
    c = task.split("train", max_examples=47, seed=6)
    assert list(a["text"]) == list(b["text"]) and len(a) == 47
    assert list(a["text"]) != list(c["text"])
    assert len(set(a["text"])) == 47 and set(a["text"]) <= set(full["text"])
    counts, sub = Counter(list(full["label"])), Counter(list(a["label"]))
    for label, count in counts.items():
        assert abs(sub[label] - 47 * count / len(full)) < 1
    assert task.split("train", max_examples=10_000) is full


def test_regression_sampling_is_seeded():
    rows = [{"text": f"t{i}", "label": i / 7} for i in range(100)]
    task = Task.from_records(REGRESSION, {"train": rows})
    assert list(task.split("train", 20, seed=1)["text"]) == list(task.split("train", 20, seed=1)["text"])
    assert list(task.split("train", 20, seed=1)["text"]) != list(task.split("train", 20, seed=2)["text"])


def test_sampling_does_not_depend_on_python_hash_seed():
    """Same seed, same rows in processes with different string-hash salts (PYTHONHASHSEED)."""
    code = (
        "import importlib.util, sys, json\n"
        f"spec = importlib.util.spec_from_file_location('s', {sampling.__file__!r})\n"
        "m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m)\n"
        "labels = [i % 3 for i in range(200)]\n"
        "rng = m.make_rng(11, 'train')\n"
        "print(json.dumps(m.sample_indices(labels, 200, 30, rng).tolist()))\n"
    )
    runs = [
        subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                       env={"PYTHONHASHSEED": str(h), "PATH": ""}).stdout
        for h in (1, 2)
    ]
    here = sampling.sample_indices([i % 3 for i in range(200)], 200, 30, sampling.make_rng(11, "train")).tolist()
    assert json.loads(runs[0]) == json.loads(runs[1]) == here


def test_partition_is_disjoint_covering_and_stratified():
    labels = np.repeat([0, 1, 2], [70, 20, 10])
    parts = sampling.partition_indices(labels, 100, [0.8, 0.1, 0.1], sampling.make_rng(0))
    joined = np.concatenate(parts)
    assert sorted(joined.tolist()) == list(range(100))
    assert [len(p) for p in parts] == [80, 10, 10]
    assert Counter(labels[parts[1]].tolist()) == {0: 7, 1: 2, 2: 1}


def test_split_errors_name_the_task_and_splits():
    task = _labelled_task(20)
    with pytest.raises(TaskError, match=r"no split 'test'.*\['train', 'dev'\]"):
        task.split("test")
    with pytest.raises(TaskError, match="missing field 'text_pair'"):
        Task.from_records(MULTI, {"train": [{"text": "a", "label": "x"}]})
    with pytest.raises(TaskError, match="row 1"):
        Task.from_records(BINARY, {"train": [{"text": "a", "label": "pos"}, {"text": "b", "label": "maybe"}]})


# ------------------------------------------------------------------------------------------------ users' files

ROWS = [
    {"sentence": 'He said "no, thanks", then left', "other": "tab\tinside? no, comma, here", "y": "yes"},
    {"sentence": "Plain text", "other": "second", "y": "no"},
    {"sentence": "ünïcödé ✓", "other": "third 'quoted'", "y": "yes"},
    {"sentence": "Fourth", "other": "fourth", "y": "maybe"},
]


def _write(path: Path, rows: list[dict], fmt: str) -> Path:
    if fmt == "jsonl":
        path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    else:
        with open(path, "w", encoding="utf-8", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]), delimiter="," if fmt == "csv" else "\t")
            writer.writeheader()
            writer.writerows(rows)
    return path


@pytest.mark.parametrize("fmt", ["csv", "tsv", "jsonl"])
def test_user_files_round_trip(tmp_path, fmt):
    train = _write(tmp_path / f"train.{fmt}", ROWS * 3, fmt)
    dev = _write(tmp_path / f"dev.{fmt}", ROWS, fmt)
    task = load_file_task("mine", {"train": train, "dev": dev}, text_column="sentence", text_pair_column="other",
                          label_column="y", label_names=["no", "yes", "maybe"])
    got = task.split("dev")
    assert list(got["text"]) == [r["sentence"] for r in ROWS]
    assert list(got["text_pair"]) == [r["other"] for r in ROWS]
    assert [task.spec.label_names[i] for i in list(got["label"])] == [r["y"] for r in ROWS]
    assert len(task.split("train")) == 12 and task.spec.primary_metric == "accuracy"


def test_user_files_inferred_labels_regression_and_carved_dev(tmp_path):
    rows = [{"text": f"row {i}", "label": i % 3} for i in range(60)]
    task = load_file_task("ids", _write(tmp_path / "t.jsonl", rows, "jsonl"))
    assert task.spec.label_names == ("0", "1", "2")
    train, dev = task.split("train"), task.split("dev")
    assert len(dev) == 6 and not set(train["text"]) & set(dev["text"])
    assert sorted(list(train["text"]) + list(dev["text"])) == sorted(r["text"] for r in rows)
    named = load_file_task("names", _write(tmp_path / "n.csv", [{"text": "a", "label": "pos"},
                                                                 {"text": "b", "label": "neg"}] * 10, "csv"))
    assert named.spec.label_names == ("neg", "pos")
    scores = [{"text": f"s{i}", "score": str(i / 4)} for i in range(20)]
    reg = load_file_task("reg", {"train": _write(tmp_path / "r.tsv", scores, "tsv"),
                                 "dev": _write(tmp_path / "d.tsv", scores[:5], "tsv")},
                         label_column="score", regression=True)
    assert reg.spec.is_regression and list(reg.split("dev")["label"]) == pytest.approx([i / 4 for i in range(5)])


def test_user_file_errors_name_the_file(tmp_path):
    path = _write(tmp_path / "x.csv", ROWS, "csv")
    with pytest.raises(OsrmFileError, match=r"x\.csv: no column\(s\) \['text'\]"):
        load_file_task("x", path, label_column="y")
    with pytest.raises(OsrmFileError, match="file not found"):
        load_file_task("x", tmp_path / "missing.csv")
    with pytest.raises(TaskError, match="suffix"):
        load_file_task("x", tmp_path / "data.parquet")


def test_malformed_rows_are_counted_then_fatal_above_one_percent(tmp_path):
    good = [f"text {i}\t{i % 2}" for i in range(300)]
    few = good[:40] + ["only-one-field"] + good[40:100] + ["bad label\tseven"] + good[100:]
    path = tmp_path / "few.tsv"
    path.write_text("text\tlabel\n" + "\n".join(few) + "\n", encoding="utf-8")
    with pytest.warns(MalformedRowsWarning, match=r"2 of 302 rows malformed \(line 42: .*; line 103: "):
        task = load_file_task("few", {"train": path, "dev": path}, label_names=["a", "b"])
    assert len(task.split("dev")) == 300
    many = good[:100] + ["x"] * 4
    path.write_text("text\tlabel\n" + "\n".join(many) + "\n", encoding="utf-8")
    with pytest.raises(OsrmFileError, match=r"few\.tsv: 4 of 104 rows malformed.*more than 1%"):
        load_file_task("few", path, label_names=["a", "b"])


def test_unknown_task_names_suggest_close_ones():
    with pytest.raises(UnknownTaskError, match="did you mean 'cola'"):
        get_task("colla")
    with pytest.raises(UnknownTaskError, match="did you mean 'tweet_sentiment'"):
        get_task("tweet_sentimnet")
    with pytest.raises(UnknownTaskError, match="Known tasks: cola, sst2"):
        get_task("zzzz")


def test_spelling_variants_and_source_checks(tmp_path):
    from osrm_lora.tasks import canonical_name

    assert canonical_name("SST-2") == "sst2" and canonical_name("STS_B") == "stsb"
    assert canonical_name("SMS-Spam") == "sms_spam"
    with pytest.raises(TaskError, match="only to users' files"):
        get_task("rte", text_column="x")
    with pytest.raises(TaskError, match="not a built-in"):
        get_task("rte", source="builtin")


# ------------------------------------------------------------------------------------------------ batching


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from transformers import BertTokenizerFast

    words = ["the", "a", "cat", "dog", "sat", "on", "mat", "is", "not", "good", "bad", "very", "movie", "was"]
    vocab = tmp_path_factory.mktemp("tok") / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]) + "\n")
    return BertTokenizerFast(vocab_file=str(vocab))


def test_batches_are_padded_to_their_longest_example(tokenizer):
    rows = [{"text": " ".join(["cat"] * (i % 7 + 1)), "text_pair": "the dog" * (i % 2), "label": i % 3}
            for i in range(23)]
    rows = [r if r["text_pair"] else {**r, "text_pair": "mat"} for r in rows]
    task = Task.from_records(MULTI, {"train": rows})
    loader = make_dataloader(task.split("train"), tokenizer, MULTI, batch_size=5, max_length=8)
    seen = 0
    for batch in loader:
        n = batch["input_ids"].shape[0]
        expected = [tokenizer(r["text"], r["text_pair"], truncation=True, max_length=8)["input_ids"]
                    for r in rows[seen:seen + n]]
        assert batch["input_ids"].shape[1] == max(len(e) for e in expected)
        assert batch["attention_mask"].sum(1).tolist() == [len(e) for e in expected]
        for i, e in enumerate(expected):
            assert batch["input_ids"][i, :len(e)].tolist() == e
            assert torch.all(batch["input_ids"][i, len(e):] == tokenizer.pad_token_id)
        assert "token_type_ids" in batch and batch["labels"].dtype == torch.long
        assert batch["labels"].tolist() == [r["label"] for r in rows[seen:seen + n]]
        seen += n
    assert seen == 23


def test_left_padding_regression_labels_and_seeded_shuffle(tokenizer):
    rows = [{"text": " ".join(["dog"] * (i % 4 + 1)), "label": i / 10} for i in range(12)]
    task = Task.from_records(REGRESSION, {"train": rows})
    tokenizer.padding_side = "left"
    try:
        batch = next(iter(make_dataloader(tokenizer=tokenizer, dataset=tokenize(task.split("train"), tokenizer,
                                          REGRESSION), spec=REGRESSION, batch_size=12)))
    finally:
        tokenizer.padding_side = "right"
    mask = batch["attention_mask"]
    assert torch.all(mask[:, -1] == 1) and batch["labels"].dtype == torch.float32
    assert batch["labels"].tolist() == pytest.approx([r["label"] for r in rows])

    def order(seed):
        loader = make_dataloader(task.split("train"), tokenizer, REGRESSION, 4, shuffle=True, seed=seed)
        return [round(v, 4) for b in loader for v in b["labels"].tolist()]

    first = order(3)
    assert first == order(3) and first != order(4)
    assert sorted(first) == pytest.approx(sorted(r["label"] for r in rows))
