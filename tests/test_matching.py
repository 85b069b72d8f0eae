"""Per-task inputs are matched to adapters by the task they record, never by the order they are given in.

RegMean statistics, Fisher files and Grams record their task; adapters record theirs in osrm_lora.json (else
their folder name). Any order gives the same merge; a missing, extra or repeated task is refused naming it,
in the library and as one `error:` line (exit 2) at the command line. `interference` refuses two adapters or
two statistics files of one task instead of keeping the last.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from helpers_core import stats_from_inputs
from helpers_merge import SHAPES, random_adapter
from test_cli_errors import error_line, invoke

from osrm_lora.adapters import METADATA_NAME, LoraAdapter
from osrm_lora.errors import MergeError
from osrm_lora.merge import merge_adapters
from osrm_lora.runtime.fisher import load_fisher, save_fisher

TASKS = ("alpha", "beta", "gamma")


def _adapters():
    return [random_adapter(t, seed=20 + i) for i, t in enumerate(TASKS)]


def _stats(task: str, seed: int):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(40, 10, generator=g) * torch.linspace(0.3, 3.0, 10) * (1 + seed)
    return stats_from_inputs(task, {m: x for m in SHAPES})


def _dense(merged) -> dict[str, torch.Tensor]:
    return {m.name: m.dense() for m in merged}


def _same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for name, value in a.items():
        torch.testing.assert_close(value, b[name], rtol=0, atol=0)


def test_statistics_in_any_order_give_the_same_regmean_merge():
    adapters = _adapters()
    stats = [_stats(t, i) for i, t in enumerate(TASKS)]
    right = _dense(merge_adapters(adapters, "regmean", stats=stats))
    swapped = _dense(merge_adapters(adapters, "regmean", stats=[stats[2], stats[0], stats[1]]))
    _same(right, swapped)
    # Positional matching would have mattered: these statistics differ enough to change the merge.
    positional = _dense(merge_adapters(adapters, "regmean", stats={t: s for t, s in zip(TASKS, [stats[2], stats[0],
                                                                                                  stats[1]])}))
    assert not np.allclose(right["layer.0.q"].numpy(), positional["layer.0.q"].numpy(), rtol=1e-3)


def test_missing_extra_and_repeated_statistics_are_refused_naming_them():
    adapters = _adapters()
    stats = [_stats(t, i) for i, t in enumerate(TASKS)]
    with pytest.raises(MergeError, match=r"no statistics for adapter 'beta' \(task 'beta'\)"):
        merge_adapters(adapters, "regmean", stats=[stats[0], stats[2]])
    with pytest.raises(MergeError, match=r"statistics of task 'delta' matches none of the adapters' tasks"):
        merge_adapters(adapters, "regmean", stats=[*stats, _stats("delta", 7)])
    with pytest.raises(MergeError, match=r"statistics of task 'alpha' given 2 times"):
        merge_adapters(adapters, "regmean", stats=[stats[0], stats[0], stats[1], stats[2]])


def test_adapters_are_matched_by_their_recorded_task(tmp_path):
    """A folder named otherwise still matches the statistics of the task osrm_lora.json records."""
    adapters = _adapters()
    stats = [_stats(t, i) for i, t in enumerate(TASKS)]
    folders = []
    for adapter in adapters:
        folder = tmp_path / f"{adapter.name}-lora"
        adapter.save(folder)
        (folder / METADATA_NAME).write_text(json.dumps({"task": adapter.name}))
        folders.append(folder)
    loaded = LoraAdapter.load(folders[0])
    assert (loaded.name, loaded.task) == ("alpha-lora", "alpha")
    merged = merge_adapters(folders, "regmean", stats=stats[::-1])
    _same(_dense(merged), _dense(merge_adapters(adapters, "regmean", stats=stats)))


def test_fisher_files_are_matched_by_the_task_they_record(tmp_path):
    adapters = _adapters()
    paths = []
    for i, t in enumerate(TASKS):
        g = torch.Generator().manual_seed(i)
        path = tmp_path / f"{t}.fisher.safetensors"
        save_fisher(path, {m: torch.rand(s, generator=g) + 0.1 for m, s in SHAPES.items()}, task=t)
        paths.append(path)
    fishers = [load_fisher(p) for p in paths]
    assert fishers[1].task == "beta"
    right = _dense(merge_adapters(adapters, "fisher", fisher=fishers))
    _same(right, _dense(merge_adapters(adapters, "fisher", fisher=fishers[::-1])))
    with pytest.raises(MergeError, match=r"no Fisher diagonals for adapter 'gamma' \(task 'gamma'\); given: "
                                         r"Fisher diagonals .*alpha\.fisher\.safetensors \(task 'alpha'\)"):
        merge_adapters(adapters, "fisher", fisher=fishers[:2])


@pytest.fixture
def merge_inputs(tmp_path):
    """Three adapter folders and their statistics files."""
    folders, files = [], []
    for i, adapter in enumerate(_adapters()):
        adapter.save(tmp_path / adapter.name)
        _stats(adapter.name, i).save(tmp_path / f"{adapter.name}.safetensors")
        folders.append(tmp_path / adapter.name)
        files.append(tmp_path / f"{adapter.name}.safetensors")
    return tmp_path, folders, files


def _merge_args(folders, files, out):
    return ["merge", *folders, "--method", "regmean", *[a for f in files for a in ("--stats", f)], "--out", out,
            "--quiet"]


def test_cli_merge_with_swapped_stats_is_the_right_merge(merge_inputs):
    root, folders, files = merge_inputs
    assert invoke(*_merge_args(folders, files, root / "right")).exit_code == 0
    result = invoke(*_merge_args(folders, [files[1], files[2], files[0]], root / "swapped"))
    assert result.exit_code == 0, result.output
    right, swapped = (LoraAdapter.load(root / n) for n in ("right", "swapped"))
    for m in right.modules:
        torch.testing.assert_close(right.modules[m].delta(), swapped.modules[m].delta(), rtol=0, atol=0)


def test_cli_merge_refuses_a_missing_or_extra_stats_file(merge_inputs):
    root, folders, files = merge_inputs
    line = error_line(*_merge_args(folders, files[:2], root / "out"))
    assert "no statistics for adapter 'gamma' (task 'gamma')" in line and str(files[0]) in line
    _stats("delta", 9).save(root / "delta.safetensors")
    line = error_line(*_merge_args(folders, [*files, root / "delta.safetensors"], root / "out"))
    assert f"statistics {root / 'delta.safetensors'} (task 'delta') matches none of the adapters' tasks" in line
    assert not (root / "out").exists()


def test_interference_refuses_two_inputs_of_one_task(merge_inputs):
    root, folders, files = merge_inputs
    copy = root / "alpha-copy.safetensors"
    copy.write_bytes(files[0].read_bytes())
    line = error_line("interference", *folders, *[a for f in [*files, copy] for a in ("--stats", f)])
    assert f"statistics {files[0]} and {copy} both record task 'alpha'" in line
    second = root / "alpha-again"
    _adapters()[1].save(second)
    (second / METADATA_NAME).write_text(json.dumps({"task": "alpha"}))
    line = error_line("interference", *folders, second, *[a for f in files for a in ("--stats", f)])
    assert f"adapters {folders[0]} and {second} both record task 'alpha'" in line
