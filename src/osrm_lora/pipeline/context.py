"""What the stages share: the config, the output layout, the cache, the loaded tasks and the evaluator model.

Tasks and the model load on first use only, so a run whose units are all cached loads no model at all.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from ..io import sha256_file
from ..settings import ExperimentConfig, base_dir_of
from .cache import Cache
from .keys import AdapterKey
from .layout import Layout

# The statistics sample is drawn with this seed whatever the training seed, so the base model's statistics
# and every fine-tuned model's Grams see the same examples.
STATISTICS_SEED = 0


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
        self._evaluator = None

    def task(self, name: str):
        if name not in self._tasks:
            from ..tasks import get_task

            entry = next(t for t in self.config.tasks if t.name == name)
            self._tasks[name] = get_task(name, **entry.source_options(base_dir_of(self.config)))
        return self._tasks[name]

    def task_inputs(self, name: str) -> dict:
        """What identifies a task's data in fingerprints: its name, source options (paths as written) and the
        content hash of users' files, so editing a data file redoes what depends on it. GLUE and built-in
        tasks are identified by name (their sources are fixed)."""
        if name not in self._task_inputs:
            entry = next(t for t in self.config.tasks if t.name == name)
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

    @property
    def model_inputs(self) -> dict:
        return self.config.model.model_dump(mode="json")

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

    def evaluate(self, task_name: str, deltas: dict, head: dict, source: str) -> dict[str, float]:
        """The metrics of the base model + `deltas` with `head` on the task's evaluation split."""
        from ..evaluate import evaluate_task

        settings = self.config.evaluation
        evaluator = self.evaluator()
        model = evaluator.apply(deltas, head, source=source)
        try:
            return evaluate_task(
                model,
                evaluator.tokenizer,
                self.task(task_name),
                split=settings.split,
                max_examples=settings.max_examples,
                batch_size=settings.batch_size,
                max_length=settings.max_length,
                progress=self.progress,
            )
        finally:
            evaluator.restore()

    def score_record(self, task_name: str, metrics: dict[str, float]) -> dict:
        primary = self.task(task_name).spec.primary_metric
        return {"task": task_name, "metrics": metrics, "primary_metric": primary, "score": metrics[primary]}

    def collect_statistics(
        self,
        task_name: str,
        model,
        tokenizer,
        target_modules: str | Sequence[str] | None,
        path: Path,
        extra: dict[str, str] | None = None,
    ) -> None:
        """`model`'s statistics over the `statistics` section's seeded sample of the task, written to `path`
        (sharded over the ranks under torchrun)."""
        from ..distributed import collect_task_stats

        settings = self.config.statistics
        collect_task_stats(
            self.task(task_name),
            model,
            tokenizer,
            split=settings.split,
            samples=settings.samples_per_task,
            seed=STATISTICS_SEED,
            batch_size=settings.batch_size,
            max_length=settings.max_length,
            target_modules=target_modules,
            out_path=path,
            model_id=self.config.model.name,
            extra=extra,
            progress=self.progress,
        )
