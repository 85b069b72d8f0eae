"""Runs an experiment's stages in dependency order over one shared context and cache."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..io import write_json
from ..settings import ExperimentConfig
from .cache import Cache, StageStatus
from .context import Context
from .layout import Layout
from .stages import STAGES, Stage


def _log_nothing(message: str) -> None:
    """Default logger of `run_experiment`: quiet."""


@dataclass
class RunSummary:
    output_dir: Path
    stages: dict[str, StageStatus]
    results: dict[str, Any]
    files: dict[str, Path]

    @property
    def ran_anything(self) -> bool:
        return any(s.ran for s in self.stages.values())


def dependency_order(stages: Sequence[Stage]) -> list[Stage]:
    """Each stage after the stages it needs, otherwise in the given order."""
    names = {s.name for s in stages}
    for stage in stages:
        unknown = set(stage.needs) - names
        if unknown:
            raise ValueError(f"stage {stage.name} needs unknown stage(s) {sorted(unknown)}")
    ordered: list[Stage] = []
    done: set[str] = set()
    while len(ordered) < len(stages):
        ready = next((s for s in stages if s.name not in done and done.issuperset(s.needs)), None)
        if ready is None:
            raise ValueError(f"stages {sorted(names - done)} need each other")
        ordered.append(ready)
        done.add(ready.name)
    return ordered


def _write_config(config: ExperimentConfig, layout: Layout) -> None:
    """experiment.json, rewritten only when the config changed (so a cached run touches no file)."""
    snapshot = config.model_dump(mode="json")
    if not layout.config.is_file() or json.loads(layout.config.read_text()) != snapshot:
        write_json(layout.config, snapshot)


def run_experiment(
    config: ExperimentConfig,
    *,
    force: Iterable[str] = (),
    progress: bool = True,
    log: Callable[[str], None] = _log_nothing,
) -> RunSummary:
    """Run (or resume, or skip) every stage of `config`; returns what ran, what was reused and the results."""
    layout = Layout(Path(config.output_dir))
    stages = dependency_order(STAGES)
    cache = Cache(layout, {s.name: s.version for s in stages}, force)
    ctx = Context(config, layout, cache, progress=progress, log=log)
    _write_config(config, layout)
    digests: dict[str, dict] = {}
    for stage in stages:
        digests[stage.name] = stage.run(ctx, {name: digests[name] for name in stage.needs})
    files = ctx.files or {p.name: p for p in layout.report_files()}
    results = json.loads(layout.results.read_text())
    return RunSummary(layout.root, cache.status, results, files)
