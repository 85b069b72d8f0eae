"""Users' labels and task options: a class never trained, ids with gaps, comma lists, misspelt options.

Each case once passed silently (an extra class with dev accuracy 0, a 6-class head with empty classes, label
names split into characters, a typo ignored or a TypeError); each is now refused naming the file or key.
"""

from __future__ import annotations

import csv
import json

import pytest
import yaml

from osrm_lora.settings import TASK_OPTIONS, ConfigError, parse_experiment
from osrm_lora.tasks import TaskError, get_task
from osrm_lora.tasks.registry import _task_options


def _jsonl(path, labels):
    path.write_text("".join(json.dumps({"text": f"row {i}", "label": y}) + "\n" for i, y in enumerate(labels)))
    return str(path)


def _csv(path, labels):
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["text", "label"])
        writer.writerows([f"row {i}", y] for i, y in enumerate(labels))
    return str(path)


def test_a_label_only_the_dev_file_has_is_refused(tmp_path):
    train = _csv(tmp_path / "train.csv", ["neg", "pos"] * 10)
    dev = _csv(tmp_path / "dev.csv", ["neg", "pos", "neutral"] * 3)
    with pytest.raises(TaskError, match=r"dev\.csv has label\(s\) \['neutral'\] that the train file .*train\.csv"):
        get_task("t", files={"train": train, "dev": dev})
    ids_dev = _jsonl(tmp_path / "dev.jsonl", [0, 1, 2])
    with pytest.raises(TaskError, match=r"dev\.jsonl has label\(s\) \['2'\]"):
        get_task("t", files={"train": _jsonl(tmp_path / "train.jsonl", [0, 1] * 10), "dev": ids_dev})
    stated = get_task("t", files={"train": train, "dev": dev}, label_names=["neg", "pos", "neutral"])
    assert stated.spec.label_names == ("neg", "pos", "neutral")  # stated classes are the user's choice
    same = get_task("t", files={"train": train, "dev": _csv(tmp_path / "dev2.csv", ["pos", "neg"])})
    assert same.spec.label_names == ("neg", "pos")


def test_label_ids_with_gaps_are_refused_suggesting_label_names(tmp_path):
    train = _jsonl(tmp_path / "train.jsonl", [0, 1, 5] * 8)
    with pytest.raises(TaskError, match=r"train\.jsonl: label ids \[0, 1, 5\] skip \[2, 3, 4\].*label_names"):
        get_task("t", files=train)
    six = get_task("t", files=train, label_names=list("abcdef"))
    assert six.spec.num_labels == 6
    assert get_task("t", files=_jsonl(tmp_path / "ok.jsonl", [2, 0, 1] * 8)).spec.label_names == ("0", "1", "2")


def test_list_options_may_be_one_comma_separated_string(tmp_path):
    from osrm_lora.cli.common import load_task

    train = _jsonl(tmp_path / "train.jsonl", [0, 1] * 10)
    task = load_task("t", None, [f"train={train}"], ["label_names=negative, positive", "metrics=accuracy,f1"])
    assert task.spec.label_names == ("negative", "positive")
    assert task.spec.metrics == ("accuracy", "f1")
    yaml_list = load_task("t", None, [f"train={train}"], ["label_names=[negative, positive]"])
    assert yaml_list.spec.label_names == ("negative", "positive")


def test_a_misspelt_task_option_is_refused_naming_it(tmp_path):
    train = _jsonl(tmp_path / "train.jsonl", [0, 1] * 10)
    with pytest.raises(TaskError, match=r"unknown option 'labl_column' \(did you mean 'label_column'\?\)"):
        get_task("t", files=train, labl_column="label")
    with pytest.raises(TaskError, match=r"unknown option 'glue_dri' \(did you mean 'glue_dir'\?\)"):
        get_task("sst2", glue_dri="x")


def test_a_misspelt_key_of_a_task_entry_is_refused_when_the_experiment_is_read():
    data = {"model": "m", "tasks": [{"name": "a", "files": "a.csv", "text_colum": "s"}, "b"],
            "merge": [{"method": "task_arithmetic"}]}
    with pytest.raises(ConfigError, match=r"exp\.yaml: tasks\[0\]: unknown option 'text_colum' \(did you mean "
                                          r"'text_column'\?\)"):
        parse_experiment(yaml.safe_load(yaml.safe_dump(data)), "exp.yaml")
    data["tasks"][0]["text_column"] = data["tasks"][0].pop("text_colum")
    assert parse_experiment(data).tasks[0].source_options()["text_column"] == "s"


def test_the_experiment_schema_lists_exactly_the_options_get_task_takes():
    assert TASK_OPTIONS == _task_options()
