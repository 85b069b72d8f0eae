"""What the stages share: the config, the output layout, the cache, the loaded tasks and the evaluator model.

Tasks and the model load on first use only, so a run whose units are all cached loads no model at all.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..io import sha256_file
from ..settings import ExperimentConfig, base_dir_of
from .cache import Cache
from .keys import AdapterKey
from .layout import Layout

# The statistics sample is drawn with this seed whatever the training seed, so the base model's statistics
# and every fine-tuned model's Grams see the same examples.
STATISTICS_SEED = 0
# Likewise the evaluation rows: every init and seed is scored on the same examples, so seeds pair.
EVALUATION_SEED = 0


class Context:
    """One run's shared resources; `files` collects what the report wrote, for the run summary."""

    def __init__(
        self,
        config: ExperimentConfig,
        layout: Layout,
        cache: Cache,
        *,
        progress: bool,
        log: Callable[[str], None],
    ):
        self.config = config
        self.layout = layout
        self.cache = cache
        self.progress = progress
        self.log = log
        self.files: dict[str, Path] = {}
        self._tasks: dict[str, Any] = {}
        self._task_inputs: dict[str, dict] = {}
        self._rows: dict[str, dict[str, np.ndarray]] = {}
        self._evaluator = None

    def task(self, name: str):
        if name not in self._tasks:
            from ..tasks import get_task

            entry = self.config.task_entry(name)
            self._tasks[name] = get_task(name, **entry.source_options(base_dir_of(self.config)))
        return self._tasks[name]

    def task_inputs(self, name: str) -> dict:
        """What identifies a task's data in fingerprints: its name, source options (paths as written) and the
        content hash of users' files, so editing a data file redoes what depends on it. GLUE and built-in
        tasks are identified by name (their sources are fixed)."""
        if name not in self._task_inputs:
            entry = self.config.task_entry(name)
            identity = entry.model_dump(mode="json")
            files = entry.source_options(base_dir_of(self.config)).get("files")
            if files is not None:
                paths = {"train": files} if isinstance(files, str) else files
                identity["files_sha256"] = {
                    split: sha256_file(path) if Path(path).is_file() else None
                    for split, path in paths.items()
                }
            self._task_inputs[name] = identity
        return self._task_inputs[name]

    @functools.cached_property
    def model_inputs(self) -> dict:
        """What identifies the base model in fingerprints: its settings and its content digest
        (`identity.model_digest`), so other weights under the same path redo what depends on them."""
        from ..identity import model_digest

        return {**self.config.model.model_dump(mode="json"), "digest": model_digest(self.config.model.name)}

    def evaluator(self):
        """The base model, loaded once, that every stage dresses with ΔW and a task head and then restores."""
        from ..evaluate import EvaluationModel

        if self._evaluator is None:
            first = self.task(self.config.task_names[0])
            self._evaluator = EvaluationModel.load(
                self.config.model.name, first.spec, trust_remote_code=self.config.model.trust_remote_code
            )
        return self._evaluator

    def adapter(self, key: AdapterKey):
        from ..adapters import LoraAdapter

        return LoraAdapter.load(self.layout.adapter(key), name=key.task)

    @contextlib.contextmanager
    def finetuned_model(self, key: AdapterKey) -> Iterator[tuple[Any, Any, Any]]:
        """(model, tokenizer, adapter): the base model dressed as the task's fine-tuned model, W0 + ΔW in its
        target weights and the task's head (the same function as the PEFT model, without LoRA layers)."""
        from ..runtime.weights import task_head

        adapter = self.adapter(key)
        evaluator = self.evaluator()
        model = evaluator.apply(adapter.deltas(), task_head(adapter), source=f"adapter {key.name}")
        try:
            yield model, evaluator.tokenizer, adapter
        finally:
            evaluator.restore()

    def evaluation_rows(self, task_name: str) -> dict[str, np.ndarray]:
        """The task's disjoint `select` and `report` rows of the evaluation split, seeded by
        EVALUATION_SEED and the task name, so every model of every seed is scored on the same rows."""
        from ..errors import EvaluationError
        from ..tasks.sampling import select_report_indices
        from ..tasks.task import column

        if task_name not in self._rows:
            settings = self.config.evaluation
            task = self.task(task_name)
            data = task.full_split(settings.split)
            if len(data) <= settings.select_examples:
                raise EvaluationError(
                    f"task {task_name!r}: its {settings.split} split has {len(data)} examples, and "
                    f"evaluation.select_examples={settings.select_examples} leaves none to report on; lower it"
                )
            labels = None if task.spec.is_regression else column(data, "label")
            select, report = select_report_indices(
                labels, len(data), EVALUATION_SEED, settings.select_examples, settings.max_examples, task_name
            )
            self._rows[task_name] = {"select": select, "report": report}
        return self._rows[task_name]

    def evaluate(self, task_name: str, deltas: dict, head: dict, source: str, parts: Sequence[str]) -> dict:
        """The base model + `deltas` with `head` scored on the named parts of the task's evaluation rows
        (one pass): part -> `evaluate.PartScores`."""
        from ..evaluate import evaluate_rows

        settings = self.config.evaluation
        rows = self.evaluation_rows(task_name)
        evaluator = self.evaluator()
        model = evaluator.apply(deltas, head, source=source)
        try:
            return evaluate_rows(
                model,
                evaluator.tokenizer,
                self.task(task_name),
                {part: rows[part] for part in parts},
                split=settings.split,
                batch_size=settings.batch_size,
                max_length=settings.max_length,
                progress=self.progress,
            )
        finally:
            evaluator.restore()

    def score_record(self, task_name: str, parts: dict) -> dict:
        """A task's scores for the eval JSONs: `report` metrics and score, its rows' predictions and labels
        (compact, for the bootstraps over examples) and, when evaluated, the `select` metrics and score."""
        from ..scores import encode_labels

        spec = self.task(task_name).spec
        primary = spec.primary_metric
        report = parts["report"]
        record = {
            "task": task_name,
            "metrics": report.metrics,
            "primary_metric": primary,
            "score": report.metrics[primary],
            "examples": {
                "n": len(report.labels),
                "num_labels": None if spec.is_regression else spec.num_labels,
                "labels": encode_labels(report.labels, spec.is_regression),
                "predictions": encode_labels(report.predictions, spec.is_regression),
            },
        }
        if "select" in parts:
            record["select"] = {"metrics": parts["select"].metrics, "score": parts["select"].metrics[primary]}
        return record

    def official_statistics(self, task_name: str, model, tokenizer, path: Path, samples: int | None) -> None:
        """The official OSRM code's padded means of the task (`inits.official_tensors`), written to `path`: the
        `statistics` section's split, max_length and seeded sample of `samples` examples (default the reference)."""
        from ..inits.official_tensors import official_stats

        settings = self.config.statistics
        official_stats(
            self.task(task_name), model, tokenizer, self.config.lora.target_modules,
            samples=samples or settings.reference, seed=STATISTICS_SEED, max_length=settings.max_length,
            split=settings.split, model_id=self.config.model.name, out_path=path, progress=self.progress,
        )

    def collect_statistics(
        self,
        task_name: str,
        model,
        tokenizer,
        target_modules: str | Sequence[str] | None,
        path: Path,
        extra: dict[str, str] | None = None,
        samples: int | None = None,
    ) -> None:
        """`model`'s statistics over the `statistics` section's seeded sample of the task (`samples` examples,
        default the reference size), written to `path` (sharded over the ranks under torchrun)."""
        from ..distributed import collect_task_stats

        settings = self.config.statistics
        collect_task_stats(
            self.task(task_name),
            model,
            tokenizer,
            split=settings.split,
            samples=samples or settings.reference,
            seed=STATISTICS_SEED,
            batch_size=settings.batch_size,
            max_length=settings.max_length,
            target_modules=target_modules,
            out_path=path,
            model_id=self.config.model.name,
            extra=extra,
            progress=self.progress,
        )
