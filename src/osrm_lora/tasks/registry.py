"""Finding a task by name across its sources: GLUE (local files or hub), the built-in suite, users' files."""

from __future__ import annotations

import difflib
import inspect
import os
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ..errors import did_you_mean
from . import builtin, glue
from .files import load_file_task
from .spec import TaskError, TaskSpec, UnknownTaskError
from .task import Task

SOURCES = ("glue_dir", "hub", "builtin", "files")


def _key(name: str) -> str:
    """Spelling-insensitive key: 'SST-2', 'sst_2' and 'sst2' are the same task."""
    return re.sub(r"[\s_\-.]", "", name.lower())


_KNOWN: dict[str, str] = {_key(n): n for n in [*glue.GLUE_SPECS, *builtin.BUILTIN_TASKS]}


def known_task_names() -> list[str]:
    return [*glue.GLUE_SPECS, *builtin.BUILTIN_TASKS]


def canonical_name(name: str) -> str:
    """The registered name for `name`, or UnknownTaskError listing the closest names."""
    found = _KNOWN.get(_key(name))
    if found is not None:
        return found
    names = known_task_names()
    close = difflib.get_close_matches(name.lower(), names, n=3, cutoff=0.5)
    hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    raise UnknownTaskError(
        f"unknown task {name!r}{hint} Known tasks: {', '.join(names)}. "
        f"For your own data give `files` (CSV, TSV or JSONL) with a column mapping."
    )


def get_task(
    name: str,
    *,
    source: str | None = None,
    glue_dir: str | os.PathLike | None = None,
    include_extra_train: bool = True,
    files: str | os.PathLike | Mapping[str, str | os.PathLike] | None = None,
    progress: bool = True,
    **file_options: Any,
) -> Task:
    """A task by name. Source, unless given: `files` if passed; GLUE names from `glue_dir` or
    $OSRM_LORA_GLUE_DIR when set, else the hub; built-in names from the built-in suite (fetched once).

    `file_options` (users' files only): text_column, text_pair_column, label_column, label_names, regression,
    metrics, primary_metric, format, quoting.
    """
    _check_options(name, file_options)
    if source is not None and source not in SOURCES:
        raise TaskError(f"task {name!r}: unknown source {source!r} (choose from {SOURCES})")
    if files is not None or source == "files":
        if files is None:
            raise TaskError(f"task {name!r}: source 'files' needs `files` (a path or {{split: path}})")
        return load_file_task(name, files, **file_options)
    if file_options:
        raise TaskError(f"task {name!r}: options {sorted(file_options)} apply only to users' files (pass `files`)")
    canonical = canonical_name(name)
    if canonical in glue.GLUE_SPECS:
        local = glue.glue_dir_from(glue_dir)
        if source == "builtin":
            raise TaskError(f"task {canonical!r} is a GLUE task, not a built-in one")
        if source == "hub" or (source is None and local is None):
            return glue.load_glue_hub(canonical)
        if local is None:
            raise TaskError(f"GLUE task {canonical!r}: source 'glue_dir' needs glue_dir or ${glue.GLUE_DIR_ENV}")
        return glue.load_glue_local(canonical, local, include_extra_train=include_extra_train)
    if source not in (None, "builtin"):
        raise TaskError(f"task {canonical!r} is a built-in task; source {source!r} does not provide it")
    return builtin.load_builtin(canonical, progress=progress)


def _keywords(function) -> tuple[str, ...]:
    return tuple(p.name for p in inspect.signature(function).parameters.values() if p.kind is p.KEYWORD_ONLY)


def _task_options() -> tuple[str, ...]:
    """Every option `get_task` takes besides the name: its sources' own, then those of users' files."""
    return (*_keywords(get_task), *_keywords(load_file_task))


def _check_options(name: str, file_options: Mapping[str, Any]) -> None:
    """A misspelt option is an error naming it, never a keyword a loader would choke on or ignore."""
    allowed = _task_options()
    for key in file_options:
        if key not in _keywords(load_file_task):
            hint = did_you_mean(key, allowed)
            raise TaskError(f"task {name!r}: unknown option {key!r}{hint}; the options are {', '.join(allowed)}")


@dataclass(frozen=True)
class TaskInfo:
    """One line of `osrm-lora data list`: sizes are None when they cannot be known without a download."""

    name: str
    source: str
    kind: str
    primary_metric: str
    sizes: dict[str, int] | None
    licence: str
    description: str

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _kind(spec: TaskSpec) -> str:
    if spec.is_regression:
        return "regression"
    return f"{len(spec.label_names)}-class" + (" pair" if spec.is_pair else "")


def list_tasks(glue_dir: str | os.PathLike | None = None) -> list[TaskInfo]:
    """Every known task with its source and, where cheap (local files, cached built-ins), split sizes."""
    local = glue.glue_dir_from(glue_dir)
    infos = []
    for name, spec in glue.GLUE_SPECS.items():
        if local is not None and (Path(local) / glue.GLUE_LAYOUTS[name].folder).is_dir():
            source, sizes = f"glue_dir: {Path(local) / glue.GLUE_LAYOUTS[name].folder}", glue.local_sizes(name, local)
        else:
            source, sizes = f"hub: {glue.HUB_DATASET}/{glue.GLUE_LAYOUTS[name].hub_config}", None
        infos.append(TaskInfo(name, source, _kind(spec), spec.primary_metric, sizes, spec.licence, spec.description))
    for name, task in builtin.BUILTIN_TASKS.items():
        meta = builtin.cached_meta(name) if builtin.task_dir(name).exists() else None
        sizes = None if meta is None else {s: meta["sizes"][s] for s in builtin.SPLITS}
        source = f"builtin: {task.dist.requirement}" + ("" if meta else " (not fetched yet)")
        spec = task.spec
        infos.append(TaskInfo(name, source, _kind(spec), spec.primary_metric, sizes, spec.licence, spec.description))
    return infos
