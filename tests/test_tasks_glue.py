"""GLUE: every task from the real TSV files in shared/data/glue, checked against SOURCES.md's counts."""

from __future__ import annotations

import csv
import os
from collections import Counter
from pathlib import Path

import datasets
import pytest

from osrm_lora.io import OsrmFileError
from osrm_lora.tasks import GLUE_SPECS, MalformedRowsWarning, get_task, glue, list_tasks, load_glue_hub


def _glue_dir() -> Path | None:
    for candidate in (os.environ.get(glue.GLUE_DIR_ENV), Path(__file__).parents[2] / "shared/data/glue"):
        if candidate and (Path(candidate) / "RTE").is_dir():
            return Path(candidate)
    return None


GLUE_DIR = _glue_dir()
needs_glue = pytest.mark.skipif(
    GLUE_DIR is None, reason=f"no GLUE TSV directory (../shared/data/glue beside the repo or ${glue.GLUE_DIR_ENV})"
)

# Rows and label distributions as listed in shared/data/glue/SOURCES.md (train.tsv only, without extras).
EXPECTED = {
    "cola": {"train": {"0": 2528, "1": 6023}, "dev": {"0": 322, "1": 721}},
    "sst2": {"train": {"0": 29780, "1": 37569}, "dev": {"0": 428, "1": 444}},
    "mrpc": {"train": {"0": 1194, "1": 2474}, "dev": {"0": 129, "1": 279}},
    "qqp": {"train+dev": {"0": 14749, "1": 8747}},
    "mnli": {"train": {"contradiction": 160, "entailment": 160, "neutral": 160},
             "dev": {"contradiction": 3213, "entailment": 3479, "neutral": 3123},
             "dev_mismatched": {"contradiction": 3240, "entailment": 3463, "neutral": 3129}},
    "qnli": {"train": {"entailment": 160, "not_entailment": 160},
             "dev": {"entailment": 2702, "not_entailment": 2761}},
    "rte": {"train": {"entailment": 1249, "not_entailment": 1241},
            "dev": {"entailment": 146, "not_entailment": 131}},
}
NUMERIC_IDS = {"cola", "sst2", "mrpc", "qqp"}  # files store class ids; the others store class names


def _label_counts(task, data) -> dict[str, int]:
    spec = task.spec
    counts = Counter(data[:]["label"])
    if task.name in NUMERIC_IDS:
        return {str(i): n for i, n in counts.items()}
    return {spec.label_names[i]: n for i, n in counts.items()}


@needs_glue
@pytest.mark.parametrize("name", [n for n in EXPECTED if n != "qqp"])
def test_glue_task_rows_and_labels_match_sources(name):
    task = get_task(name, glue_dir=GLUE_DIR, include_extra_train=False)
    assert task.spec == GLUE_SPECS[name]
    for split, expected in EXPECTED[name].items():
        data = task.split(split)
        assert _label_counts(task, data) == expected, split
        assert len(data) == sum(expected.values())
        rows = data[:]
        assert all(t and t == t.strip() for t in rows["text"])
        if task.spec.is_pair:
            assert all(t and t == t.strip() for t in rows["text_pair"])


@needs_glue
def test_stsb_is_regression_in_range():
    task = get_task("STS-B", glue_dir=GLUE_DIR)
    train, dev = task.split("train")[:]["label"], task.split("dev")[:]["label"]
    assert task.spec.is_regression and len(train) == 5749 and len(dev) == 1500
    assert min(train) == 0.0 and max(train) == 5.0
    assert sum(train) / len(train) == pytest.approx(2.701, abs=5e-4)
    assert sum(dev) / len(dev) == pytest.approx(2.364, abs=5e-4)


def _raw_rows(path: Path, header: bool) -> list[list[str]]:
    with open(path, encoding="utf-8", newline="") as f:
        rows = list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    return rows[1:] if header else rows


@needs_glue
def test_format_quirks_are_handled():
    cola = get_task("cola", glue_dir=GLUE_DIR).split("train")
    first = _raw_rows(GLUE_DIR / "CoLA/train.tsv", header=False)[0]
    assert cola[0]["text"] == first[3] and cola[0]["label"] == int(first[1])  # no header line swallowed
    mrpc = get_task("mrpc", glue_dir=GLUE_DIR).split("dev")
    raw = _raw_rows(GLUE_DIR / "MRPC/dev.tsv", header=True)[0]
    assert (mrpc[0]["text"], mrpc[0]["text_pair"], mrpc[0]["label"]) == (raw[3].strip(), raw[4].strip(), int(raw[0]))
    sst2 = get_task("sst2", glue_dir=GLUE_DIR).split("dev")
    assert sst2[0]["text"] == _raw_rows(GLUE_DIR / "SST-2/dev.tsv", header=True)[0][0].rstrip()
    quoted = [t for t in get_task("rte", glue_dir=GLUE_DIR).split("train")[:]["text"] if '"' in t]
    assert quoted  # quotes are text, not CSV quoting
    mnli = get_task("mnli", glue_dir=GLUE_DIR).split("dev")
    raw = _raw_rows(GLUE_DIR / "MNLI/dev_matched.tsv", header=True)[0]
    assert (mnli[0]["text"], mnli[0]["text_pair"]) == (raw[8].strip(), raw[9].strip())
    assert GLUE_SPECS["mnli"].label_names[mnli[0]["label"]] == raw[-1]


@needs_glue
@pytest.mark.parametrize("name, main, extra, overlap", [("mnli", 480, 9999, 8), ("qnli", 320, 9999, 26)])
def test_extra_train_rows_are_added_without_duplicates(name, main, extra, overlap):
    data = get_task(name, glue_dir=GLUE_DIR).split("train")[:]
    pairs = list(zip(data["text"], data["text_pair"]))
    assert len(pairs) == main + extra - overlap  # overlaps as stated in SOURCES.md
    assert len(set(pairs)) == len(pairs)
    assert len(get_task(name, glue_dir=GLUE_DIR, include_extra_train=False).split("train")) == main


@needs_glue
def test_qqp_dev_is_carved_from_train_deterministically():
    task = get_task("qqp", glue_dir=GLUE_DIR)
    train, dev = task.split("train")[:], task.split("dev")[:]
    rows = Counter(
        (r[3].strip(), r[4].strip(), int(r[5])) for r in _raw_rows(GLUE_DIR / "QQP/train.tsv", header=True)
    )
    got = Counter(zip(train["text"], train["text_pair"], train["label"])) + Counter(
        zip(dev["text"], dev["text_pair"], dev["label"])
    )
    assert got == rows and len(rows.keys()) == sum(rows.values())  # a partition of the file's rows
    both = Counter(train["label"]) + Counter(dev["label"])
    assert {str(k): v for k, v in both.items()} == EXPECTED["qqp"]["train+dev"]
    assert len(dev["label"]) == round(0.1 * 8747) + round(0.1 * 14749)
    again = get_task("qqp", glue_dir=GLUE_DIR).split("dev")[:]
    assert again["text"] == dev["text"]


@needs_glue
def test_list_tasks_reports_local_sizes():
    infos = {i.name: i for i in list_tasks(GLUE_DIR)}
    assert infos["rte"].sizes == {"train": 2490, "dev": 277} and "glue_dir" in infos["rte"].source
    assert infos["cola"].sizes == {"train": 8551, "dev": 1043}
    assert set(GLUE_SPECS) <= set(infos)


def test_missing_files_error_lists_layout_and_path(tmp_path):
    (tmp_path / "RTE").mkdir()
    (tmp_path / "RTE/train.tsv").write_text("index\tsentence1\tsentence2\tlabel\n0\ta\tb\tentailment\n")
    with pytest.raises(OsrmFileError) as err:
        get_task("rte", glue_dir=tmp_path)
    message = str(err.value)
    assert str(tmp_path / "RTE/dev.tsv") in message
    assert "SST-2/: dev.tsv, train.tsv" in message and "MNLI/" in message
    with pytest.raises(OsrmFileError, match=r"CoLA/train\.tsv"):
        get_task("cola", glue_dir=tmp_path / "nowhere")


def test_env_variable_selects_local_directory(tmp_path, monkeypatch):
    rows = "".join(f"{i}\tpremise {i}\thypothesis {i}\t{'entailment' if i % 2 else 'not_entailment'}\n"
                   for i in range(200))
    header = "index\tsentence1\tsentence2\tlabel\n"
    (tmp_path / "RTE").mkdir()
    (tmp_path / "RTE/train.tsv").write_text(header + rows)
    (tmp_path / "RTE/dev.tsv").write_text(header + rows + "200\tbroken row\n")
    monkeypatch.setenv(glue.GLUE_DIR_ENV, str(tmp_path))
    task = get_task("rte")
    assert len(task.split("train")) == 200
    with pytest.warns(MalformedRowsWarning, match=r"RTE/dev\.tsv .*1 of 201 rows malformed \(line 202: 2 columns"):
        assert len(task.split("dev")) == 200


def test_hub_source_maps_columns_and_splits(monkeypatch):
    calls = []

    def fake_load_dataset(path, config, split):
        calls.append((path, config, split))
        return datasets.Dataset.from_dict(
            {"premise": ["p0", "p1"], "hypothesis": ["h0", "h1"], "label": [2, 0], "idx": [0, 1]}
        )

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    monkeypatch.delenv(glue.GLUE_DIR_ENV, raising=False)
    task = get_task("mnli")
    assert task.split_names == ["train", "dev", "dev_mismatched"] and not calls  # loaded on first use
    dev = task.split("dev")
    assert calls == [("nyu-mll/glue", "mnli", "validation_matched")]
    assert list(dev["text"]) == ["p0", "p1"] and list(dev["text_pair"]) == ["h0", "h1"]
    assert list(dev["label"]) == [2, 0]
    assert load_glue_hub("mnli").spec.label_names[2] == "contradiction"
