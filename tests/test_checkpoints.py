"""Interrupted training: resuming skips a last checkpoint that a kill left empty or half-written, at most two
checkpoints are kept, and a checkpoint file that is not a safe format is refused without running it."""

from __future__ import annotations

import logging
import random
import shutil

import pytest
import torch
from pipeline_helpers import write_tiny_model
from safetensors.torch import load_file
from transformers import TrainerCallback

from osrm_lora.checkpoints import KEEP, _checkpoint_problem, resumable_checkpoint
from osrm_lora.errors import TrainingError
from osrm_lora.tasks import Task, TaskSpec
from osrm_lora.train import finetune

SPEC = TaskSpec("topic", ("text",), ("cat", "dog"), ("accuracy",), "accuracy")
SETTINGS = {"batch_size": 8, "logging_steps": 1, "progress": False, "warmup_ratio": 0.0, "max_steps": 6,
            "save_steps": 2, "eval_each_epoch": False, "lr": 1e-2}


def _rows(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    return [{"text": " ".join(rng.choices([f"w{i}" for i in range(12)], k=4) + [("cat", "dog")[i % 2]]),
             "label": i % 2} for i in range(n)]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return str(write_tiny_model(tmp_path_factory.mktemp("tiny") / "model"))


@pytest.fixture(scope="module")
def task():
    return Task.from_records(SPEC, {"train": _rows(48, 0), "dev": _rows(16, 1)})


class StopAt(TrainerCallback):
    """Ctrl-C right after the checkpoint of `step` is saved; records how many checkpoints each save left."""

    def __init__(self, step: int | None = None):
        self.step, self.kept = step, []

    def on_save(self, args, state, control, **kwargs):
        self.kept.append(len(list(__import__("pathlib").Path(args.output_dir).glob("checkpoint-*"))))
        if state.global_step == self.step:
            raise KeyboardInterrupt


class CountSteps(TrainerCallback):
    def __init__(self):
        self.steps = 0

    def on_step_end(self, args, state, control, **kwargs):
        self.steps += 1


def _interrupted_run(task, model_dir, out, step: int) -> StopAt:
    stop = StopAt(step)
    with pytest.raises(KeyboardInterrupt):
        finetune(task, model_dir, out, lora={"r": 2}, training=SETTINGS, callbacks=[stop])
    return stop


def test_resume_falls_back_to_the_last_complete_checkpoint(task, model_dir, tmp_path, caplog):
    out, partial = tmp_path / "out", tmp_path / "out.partial"
    stop = _interrupted_run(task, model_dir, out, step=4)
    assert sorted(p.name for p in partial.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    assert stop.kept == [1, 2]
    weights = partial / "checkpoint-4" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])  # half-written
    (partial / "checkpoint-6").mkdir()  # killed as the next save began
    counter = CountSteps()
    with caplog.at_level(logging.WARNING):
        resumed = finetune(task, model_dir, out, lora={"r": 2}, training=SETTINGS, resume=True, callbacks=[counter])
    assert resumed.metadata["resumed_from"] == "checkpoint-2" and resumed.steps == 6 and counter.steps == 4
    assert "checkpoint-6 is incomplete (missing trainer_state.json" in caplog.text
    assert "checkpoint-4 is incomplete (adapter_model.safetensors unreadable" in caplog.text
    straight = finetune(task, model_dir, tmp_path / "straight", lora={"r": 2}, training=SETTINGS)
    a, b = load_file(out / "adapter_model.safetensors"), load_file(straight.path / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


def test_at_most_two_checkpoints_are_kept(task, model_dir, tmp_path):
    stop = StopAt()
    finetune(task, model_dir, tmp_path / "out", lora={"r": 2}, training=dict(SETTINGS, save_steps=1),
             callbacks=[stop])
    assert KEEP == 2 and stop.kept == [1, 2, 2, 2, 2, 2]


def test_incomplete_checkpoints_are_skipped_and_removed_by_the_main_process(task, model_dir, tmp_path):
    _interrupted_run(task, model_dir, tmp_path / "out", step=4)
    partial = tmp_path / "out.partial"
    assert _checkpoint_problem(partial / "checkpoint-4") is None
    (partial / "checkpoint-4" / "scheduler.pt").unlink()
    assert _checkpoint_problem(partial / "checkpoint-4") == "missing scheduler.pt"
    optimizer = partial / "checkpoint-2" / "optimizer.pt"
    optimizer.write_bytes(optimizer.read_bytes()[:100])
    assert "optimizer.pt unreadable" in _checkpoint_problem(partial / "checkpoint-2")
    assert resumable_checkpoint(partial) is None and (partial / "checkpoint-4").is_dir()  # only skipped
    assert resumable_checkpoint(partial, remove_incomplete=True) is None
    assert not list(partial.glob("checkpoint-*"))
    assert resumable_checkpoint(tmp_path / "nothing") is None


class _Payload:
    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_a_checkpoint_pickle_holding_code_is_refused_unrun(task, model_dir, tmp_path):
    _interrupted_run(task, model_dir, tmp_path / "out", step=2)
    checkpoint = tmp_path / "out.partial" / "checkpoint-2"
    marker = tmp_path / "ran"
    state = torch.load(checkpoint / "optimizer.pt", weights_only=True)
    torch.save({**state, "payload": _Payload(str(marker))}, checkpoint / "optimizer.pt")
    with pytest.raises(TrainingError, match=r"optimizer\.pt: not a safe format .*refused") as caught:
        finetune(task, model_dir, tmp_path / "out", lora={"r": 2}, training=SETTINGS, resume=True)
    assert "weights_only" not in str(caught.value) and not marker.exists()
    shutil.rmtree(tmp_path / "out.partial")
