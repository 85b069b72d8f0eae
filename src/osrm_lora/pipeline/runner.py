"""Runs an experiment's stages in dependency order over one shared context and cache."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..io import claim_output_dir, write_json
from ..settings import ConfigError, ExperimentConfig, base_dir_of, parse_experiment
from .cache import Cache, StageStatus
from .context import Context
from .layout import Layout
from .results import collect_results
from .stages import STAGES, ReportStage, Stage


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


def _dependency_order(stages: Sequence[Stage]) -> list[Stage]:
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


EXPERIMENT_FORMAT = "osrm-lora/experiment/1"
EXPERIMENT_KIND = "experiment"  # the io marker kind of an experiment's output folder


def _data_files(config: ExperimentConfig) -> list[str]:
    """The local data files and folders the study's tasks read (`files`, `glue_dir`)."""
    found: list[str] = []
    for entry in [*config.tasks, *config.pool_tasks]:
        options = entry.source_options(base_dir_of(config))
        for key in ("files", "glue_dir"):
            value = options.get(key)
            values = value.values() if isinstance(value, dict) else [value]
            found += [str(v) for v in values if isinstance(v, str) and os.path.exists(v)]
    return found


def _claim_experiment_dir(config: ExperimentConfig, layout: Layout, *, overwrite: bool = False,
                         inputs: Iterable[str | os.PathLike] = ()) -> None:
    """Claim the output folder (`io.claim_output_dir`): another kind of folder needs `overwrite`, and one that
    is, holds or lies in the study's data files or `inputs` is refused. A folder that an osrm-lora before the
    output markers wrote (experiment.json beside manifests/) is ours and reused."""
    earlier = layout.config.is_file() and (layout.root / "manifests").is_dir()
    claim_output_dir(layout.root, EXPERIMENT_KIND, overwrite=overwrite or earlier,
                     inputs=[*inputs, *_data_files(config)])


def _write_config(config: ExperimentConfig, layout: Layout) -> None:
    """experiment.json: the whole study's config and the folder its relative paths start from, rewritten
    only when they changed (so a cached run touches no file)."""
    base = base_dir_of(config)
    record = {"format": EXPERIMENT_FORMAT, "base_dir": None if base is None else str(base),
              "config": config.model_dump(mode="json")}
    if not layout.config.is_file() or json.loads(layout.config.read_text()) != record:
        write_json(layout.config, record)


def _read_config(layout: Layout) -> ExperimentConfig:
    """The study an output folder holds (its experiment.json), with its outputs where the folder is now."""
    path = layout.config
    if not path.is_file():
        raise ConfigError(f"{layout.root}: not an experiment output folder ({path.name} is missing)")
    try:
        record = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(record, dict) or record.get("format") != EXPERIMENT_FORMAT:
        raise ConfigError(f"{path}: written by an older osrm-lora; run the experiment again (finished work "
                          "is reused) to rewrite it")
    base = record.get("base_dir")
    config = parse_experiment(record.get("config"), str(path), Path(base) if base else None)
    config.output_dir = layout.root
    return config


def chunk(config: ExperimentConfig, seeds: Sequence[int] | None, inits: Sequence[str] | None) -> ExperimentConfig:
    """The part of the study with only these seeds and inits (None: all); its units are the study's own."""
    entries = [i.entry_label for i in config.inits]
    for option, chosen, known in (("--seeds", seeds, config.seeds), ("--inits", inits, entries)):
        unknown = [v for v in chosen or () if v not in known]
        if unknown:
            raise ConfigError(f"{option} {', '.join(map(str, unknown))}: not in the experiment, which has "
                              f"{', '.join(map(str, known))}")
    if seeds is None and inits is None:
        return config
    return config.model_copy(update={
        "seeds": [s for s in config.seeds if seeds is None or s in seeds],
        "inits": [i for i in config.inits if inits is None or i.entry_label in inits],
    })


def _finished_units(ctx: Context, stages: Sequence[Stage], cache: Cache) -> dict[str, dict]:
    """Per stage, the digests of the units of `ctx.config` finished for their current inputs (by any run
    or chunk), found in dependency order without producing anything."""
    digests: dict[str, dict] = {}
    for stage in stages:
        digests[stage.name] = stage.finished(ctx, {name: digests[name] for name in stage.needs}, cache)
    return digests


def run_experiment(
    config: ExperimentConfig,
    *,
    seeds: Sequence[int] | None = None,
    inits: Sequence[str] | None = None,
    force: Iterable[str] = (),
    progress: bool = True,
    log: Callable[[str], None] = _log_nothing,
    overwrite: bool = False,
    inputs: Iterable[str | os.PathLike] = (),
) -> RunSummary:
    """Run (or resume, or skip) every stage of `config`; returns what ran, what was reused and the results.

    `seeds` and `inits` run a chunk of the study (subsets of its seeds and inits), sharing its cache and
    output folder with the other chunks; the report then covers every finished unit of the whole study.
    The output folder is claimed first (`_claim_experiment_dir`, with `overwrite` and `inputs`, e.g. the
    experiment file), before any stage runs.
    """
    layout = Layout(Path(config.output_dir))
    _claim_experiment_dir(config, layout, overwrite=overwrite, inputs=inputs)
    stages = _dependency_order(STAGES)
    versions = {s.name: s.version for s in stages}
    cache = Cache(layout, versions, force)
    part = chunk(config, seeds, inits)
    ctx = Context(part, layout, cache, progress=progress, log=log)
    for task in part.task_names:  # too few evaluation rows is an error before any training
        ctx.evaluation_rows(task)
    _write_config(config, layout)
    work = [s for s in stages if s.name != ReportStage.name]
    digests: dict[str, dict] = {}
    for stage in work:
        digests[stage.name] = stage.run(ctx, {name: digests[name] for name in stage.needs})
    study = Context(config, layout, cache, progress=progress, log=log)
    if part is not config:
        digests = _finished_units(study, work, Cache(layout, versions))
    report = next(s for s in stages if s.name == ReportStage.name)
    report.run(study, {name: digests[name] for name in report.needs})
    files = study.files or {p.name: p for p in layout.report_files()}
    results = json.loads(layout.results.read_text())
    return RunSummary(layout.root, cache.status, results, files)


def rebuild_report(output_dir: Path) -> tuple[dict[str, Any], dict[str, Path]]:
    """results.json and the report of every unit finished in `output_dir` (by any run or chunk), rewritten;
    returns the results and the files written."""
    from ..report import write_report, write_results

    layout = Layout(Path(output_dir))
    config = _read_config(layout)
    _claim_experiment_dir(config, layout)
    stages = _dependency_order(STAGES)
    cache = Cache(layout, {s.name: s.version for s in stages})
    ctx = Context(config, layout, cache, progress=False, log=_log_nothing)
    work = [s for s in stages if s.name != ReportStage.name]
    finished = _finished_units(ctx, work, cache)
    results = collect_results(config, layout, {name: {k.name for k in d} for name, d in finished.items()})
    written = write_report(results, layout.root)
    write_results(results, layout.results)
    return results, written
