"""What the commands print: merge progress bars, the export's exactness label, the README's merge example,
init's captured energy, and the demo's time in --help and the README."""

from __future__ import annotations

import io
import json
import re
import shlex

import pytest
import torch
from rich.console import Console
from safetensors.torch import save_file
from test_cli import REPO, _adapter, _stats, app, invoke, runner

import osrm_lora.cli.merge
import osrm_lora.subspace
from osrm_lora.merge import merge_adapters

README = (REPO / "README.md").read_text()


def _adapters(folder) -> list[str]:
    for seed, name in enumerate("ab"):
        _adapter(name, seed).save(folder / name)
    return [str(folder / name) for name in "ab"]


def test_the_readme_merge_example_works_as_written(tmp_path, monkeypatch):
    """A dense merge without --rank is exported at the adapters' ranks summed, and says so."""
    line = next(line for line in README.splitlines() if "--method ties --param density=0.2 --lambda 1.0" in line)
    words = shlex.split(line.split("#")[0])
    assert words[:2] == ["osrm-lora", "merge"] and "--rank" not in words
    monkeypatch.chdir(tmp_path)
    for seed, path in enumerate(w for w in words if w.startswith("adapters/")):
        _adapter(path.split("/")[1], seed).save(tmp_path / path)
    result = invoke(*words[1:])
    assert result.exit_code == 0, result.output
    assert "truncated to rank 4, the adapters' ranks summed (the default)" in result.stdout
    help_text = re.sub(r"[\s│]+", " ", invoke("merge", "--help").plain)
    assert "by default to the sum of the adapters' ranks" in help_text


@pytest.mark.parametrize("method", [["ties"], ["dare", "--param", "drop_rate=0.5"], ["emr", "--task", "a"]])
def test_a_full_rank_export_is_labelled_exact_not_truncated(tmp_path, method):
    """Toy modules are 5×6: an SVD at rank 5 keeps every singular value."""
    result = invoke("merge", *_adapters(tmp_path), "--method", *method, "--rank", "5", "--out", str(tmp_path / "m"))
    assert result.exit_code == 0, result.output
    assert "exact: the SVD at rank 5 keeps every singular value" in result.stdout
    assert "truncated" not in result.stdout and "0.00%" not in result.stdout
    info = json.loads(invoke("merge", *_adapters(tmp_path), "--method", *method, "--rank", "5", "--out",
                             str(tmp_path / "m2"), "--json").stdout)
    assert info["discarded_fraction"] == 0.0 and info["rank"] == 5 and not info["default_rank"]


def _captured_progress(monkeypatch, *args: str) -> str:
    """What the merge prints to stderr on a terminal (rich draws no live bar where TERM=dumb)."""
    buffer = io.StringIO()
    monkeypatch.setattr(osrm_lora.cli.merge, "err", Console(file=buffer, force_terminal=True, width=120))
    result = runner.invoke(app, list(args), env={"TERM": "xterm"})
    assert result.exit_code == 0, result.output
    return buffer.getvalue()


def test_merge_and_full_model_merge_show_a_bar_per_module_unless_quiet(tmp_path, monkeypatch):
    adapters = _adapters(tmp_path)
    shown = _captured_progress(monkeypatch, "merge", *adapters, "--method", "ties", "--out", str(tmp_path / "m"))
    assert "merge: ties of 2 adapters" in shown
    (tmp_path / "base").mkdir()
    save_file({f"layer.{i}.proj.weight": torch.randn(5, 6) for i in range(2)},
              str(tmp_path / "base" / "model.safetensors"))
    shown = _captured_progress(monkeypatch, "merge", *adapters, "--method", "ties", "--full-model",
                               str(tmp_path / "base"), "--out", str(tmp_path / "full"))
    assert "full model: ties of 2 adapters" in shown
    quiet = _captured_progress(monkeypatch, "merge", *adapters, "--method", "ties", "--out", str(tmp_path / "q"),
                               "--quiet")
    assert quiet == ""


def test_each_module_is_reported_once_whoever_asks_for_it(tmp_path):
    merged = merge_adapters(_adapters(tmp_path), "ties", density=0.5)
    seen: list[str] = []
    merged.on_module = seen.append
    assert [m.name for m in merged] == seen == merged.modules
    merged.module(merged.modules[1])  # the sharded writer's order
    assert seen[-1] == merged.modules[1] and len(seen) == len(merged.modules) + 1


class _Subspace:
    """What `init` reads of a subspace: a captured energy that float noise made slightly negative."""

    def __init__(self) -> None:
        self.others = ["b"]
        self.energy = {"layer.0.proj": -5.9e-09, "layer.1.proj": -1.0e-10}
        self.spectrum: dict = {}  # no forecast recorded

    def save(self, path, **options) -> None:
        pass


def test_init_never_prints_a_negative_energy(tmp_path, monkeypatch):
    for seed, task in enumerate("ab"):
        _stats(task, torch.randn(20, 6, generator=torch.Generator().manual_seed(seed))).save(tmp_path / f"{task}.st")
    monkeypatch.setattr(osrm_lora.subspace, "compute_subspaces", lambda pool, rank, **options: {"a": _Subspace()})
    files = [str(tmp_path / f"{t}.st") for t in "ab"]
    info = json.loads(invoke("init", *files, "--out", str(tmp_path / "sub"), "--json").stdout)
    assert info["a"]["mean_captured_energy"] == 0.0
    row = next(line for line in invoke("init", *files, "--out", str(tmp_path / "sub")).stdout.splitlines()
               if "a.safetensors" in line)
    assert row.split("│")[-2].strip() == "0", row


def test_demo_help_and_readme_give_the_same_time():
    assert "It takes 6-9 minutes on a 2-core CPU" in README
    assert "6-9 minutes" in invoke("demo", "--help").plain
    assert "6-9 min" in invoke("--help").plain
    assert not re.search(r"~?15 min", invoke("demo", "--help").plain + invoke("--help").plain)
