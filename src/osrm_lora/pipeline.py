"""Running an experiment: statistics → subspaces → training → evaluation → merging → interference → report.

This module only orchestrates and caches; the maths lives in `stats`, `subspace`, `train`, `merge`,
`interference` and `evaluate`. Every unit of work (one task's statistics, one adapter, one merged model at one
λ, ...) writes its outputs atomically and then a manifest ``manifests/<stage>/<unit>.json`` holding the
fingerprint of its inputs (the relevant config parts plus the digests of the upstream outputs it read) and the
digest of what it wrote. A unit whose manifest matches is skipped, so a second run does nothing, an
interrupted run resumes after the last finished unit (the unfinished one left no manifest, at most a
temporary file), and ``force`` redoes a stage; what depends on it is redone only if its outputs actually
changed. The base model is identified by its name (hub id or path): after changing the weights in a local
folder, force `stats`.

Output folder layout::

    experiment.json                       the validated config
    stats/<task>.safetensors              TaskStats of the base model's inputs
    subspaces/<variant>/<task>.safetensors  OSRM subspaces (leave-one-out)
    adapters/<init>/seed<s>/<task>/        PEFT adapters (with their task heads)
    eval/individual/<init>/seed<s>/<task>.json
    fisher/<init>/seed<s>/<task>.safetensors  diagonal Fisher of each fine-tuned model (Fisher merging)
    grams/<init>/seed<s>/<task>.safetensors   TaskStats of each fine-tuned model's inputs (RegMean)
    eval/merged/<method>/<init>/seed<s>/lambda<λ>.json
    interference/<init>/seed<s>.json
    results.json, report.md, table_*.csv, plots/*.png
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .config import STAGES, ExperimentConfig, base_dir_of
from .io import fingerprint, sha256_file, write_json

MANIFEST_FORMAT = "osrm-lora/manifest/1"
# Bumped when a stage's outputs change meaning, so old caches are recomputed rather than misread.
STAGE_VERSIONS = {stage: 1 for stage in STAGES}


def content_digest(path: Path) -> str:
    """sha256 of a file's content; for safetensors, of its header with sorted keys and its data.

    safetensors writes its metadata map in an arbitrary order, so equal tensors and metadata can give different
    bytes; hashing the canonical header keeps a recomputed but identical output from invalidating the stages
    downstream of it.
    """
    if path.suffix != ".safetensors":
        return sha256_file(path)
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        size = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(size))
        digest.update(json.dumps(header, sort_keys=True).encode())
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def _log_nothing(message: str) -> None:
    """Default logger of `run_experiment`: quiet."""


@dataclass
class StageStatus:
    """Which units of a stage ran and which were reused from the cache."""

    ran: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)


@dataclass
class RunSummary:
    output_dir: Path
    stages: dict[str, StageStatus]
    results: dict[str, Any]
    files: dict[str, Path]

    @property
    def ran_anything(self) -> bool:
        return any(s.ran for s in self.stages.values())


class Cache:
    """Manifests of finished units, keyed by the fingerprint of their inputs."""

    def __init__(self, root: Path, force: Iterable[str] = ()):
        self.root = root
        self.force = set(force)
        unknown = self.force - set(STAGES)
        if unknown:
            raise ValueError(f"cannot force unknown stage(s) {sorted(unknown)}; stages: {', '.join(STAGES)}")
        self.status: dict[str, StageStatus] = {stage: StageStatus() for stage in STAGES}

    def manifest_path(self, stage: str, unit: str) -> Path:
        return self.root / "manifests" / stage / f"{unit}.json"

    def lookup(self, stage: str, unit: str, inputs: dict, outputs: Sequence[Path]) -> str | None:
        """The digest of a finished unit with these inputs whose outputs are all there, else None."""
        if stage in self.force:
            return None
        path = self.manifest_path(stage, unit)
        if not path.is_file():
            return None
        try:
            manifest = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            return None
        if manifest.get("key") != self.key(stage, inputs):
            return None
        recorded = manifest.get("outputs", {})
        for out in outputs:
            rel = str(out.relative_to(self.root))
            if not out.is_file() or rel not in recorded or recorded[rel]["size"] != out.stat().st_size:
                return None
        return manifest.get("digest")

    @staticmethod
    def key(stage: str, inputs: dict) -> str:
        return fingerprint({"stage": stage, "version": STAGE_VERSIONS[stage], "inputs": inputs})

    def record(self, stage: str, unit: str, inputs: dict, outputs: Sequence[Path], seconds: float) -> str:
        files = {
            str(o.relative_to(self.root)): {"content_sha256": content_digest(o), "size": o.stat().st_size}
            for o in outputs
        }
        digest = fingerprint({k: v["content_sha256"] for k, v in files.items()})
        write_json(
            self.manifest_path(stage, unit),
            {
                "format": MANIFEST_FORMAT,
                "stage": stage,
                "unit": unit,
                "key": self.key(stage, inputs),
                "inputs": inputs,
                "outputs": files,
                "digest": digest,
                "seconds": round(seconds, 3),
            },
        )
        return digest

    def run(
        self, stage: str, unit: str, inputs: dict, outputs: Sequence[Path], produce: Callable[[], None]
    ) -> str:
        """Reuse a unit whose manifest matches, else `produce` and record its outputs; returns the digest."""
        digest = self.lookup(stage, unit, inputs, outputs)
        if digest is not None:
            self.status[stage].skipped.append(unit)
            return digest
        start = time.perf_counter()
        produce()
        missing = [str(o) for o in outputs if not o.is_file()]
        if missing:
            raise RuntimeError(f"stage {stage}, unit {unit}: finished without writing {missing}")
        self.status[stage].ran.append(unit)
        return self.record(stage, unit, inputs, outputs, time.perf_counter() - start)


def _lambda_name(lam: float | None) -> str:
    return "none" if lam is None else f"lambda{lam:g}"


class Experiment:
    """One experiment's runner: the config, its output folder, the cache and the loaded tasks."""

    def __init__(
        self,
        config: ExperimentConfig,
        *,
        force: Iterable[str] = (),
        progress: bool = True,
        log: Callable[[str], None] = _log_nothing,
    ):
        self.config = config
        self.out = Path(config.output_dir)
        self.cache = Cache(self.out, force)
        self.progress = progress
        self.log = log
        self._tasks: dict[str, Any] = {}
        self._task_inputs: dict[str, dict] = {}
        self._evaluator = None

    # --- shared resources, loaded on first use only (a cached run loads no model at all) ---

    def task(self, name: str):
        if name not in self._tasks:
            from .tasks import get_task

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
        from .evaluate import EvaluationModel

        if self._evaluator is None:
            first = self.task(self.config.task_names[0])
            self._evaluator = EvaluationModel.load(
                self.config.model.name, first.spec, trust_remote_code=self.config.model.trust_remote_code
            )
        return self._evaluator

    # --- stages ---

    @property
    def needs_stats(self) -> bool:
        from .train import OSRM_VARIANTS

        return (
            self.config.interference
            or any(init in OSRM_VARIANTS for init in self.config.inits)
            or any(m.grams == "base" for m in self.config.merge)
        )

    @property
    def needs_fisher(self) -> bool:
        from .merge.registry import get_method

        return any("fisher" in get_method(m.method).requires for m in self.config.merge)

    @property
    def needs_finetuned_grams(self) -> bool:
        return any(m.grams == "finetuned" for m in self.config.merge)

    def stats_path(self, task: str) -> Path:
        return self.out / "stats" / f"{task}.safetensors"

    def run_stats(self) -> dict[str, str]:
        """Per task, Σxxᵀ/Σx of every target module's input over `samples_per_task` training examples."""
        if not self.needs_stats:
            return {}
        settings = self.config.statistics
        digests = {}
        for name in self.config.task_names:
            inputs = {
                "model": self.model_inputs,
                "task": self.task_inputs(name),
                "statistics": settings.model_dump(),
                "target_modules": self.config.lora.target_modules,
            }
            path = self.stats_path(name)
            digests[name] = self.cache.run(
                "stats", name, inputs, [path], lambda name=name, path=path: self._collect_stats(name, path)
            )
        return digests

    def _statistics_batches(self, name: str, tokenizer):
        """The seeded sample of the `statistics` section, batched (base and fine-tuned statistics share it)."""
        from .tasks import make_dataloader

        settings = self.config.statistics
        task = self.task(name)
        data = task.split(settings.split, max_examples=settings.samples_per_task, seed=0)
        return make_dataloader(
            data, tokenizer, task.spec, batch_size=settings.batch_size, max_length=settings.max_length
        )

    def _collect_stats(self, name: str, path: Path) -> None:
        from .modules import default_target_modules
        from .stats import collect_stats

        self.log(f"statistics of task {name}")
        evaluator = self.evaluator()
        evaluator.restore()
        model, tokenizer = evaluator.model, evaluator.tokenizer
        targets = self.config.lora.target_modules or default_target_modules(model.config.model_type)
        stats = collect_stats(
            model,
            self._statistics_batches(name, tokenizer),
            targets,
            task=name,
            model_id=self.config.model.name,
            progress=self.progress,
        )
        stats.save(path)

    def subspace_variant(self, init: str) -> str:
        return "mean" if init == "osrm-mean" else self.config.subspace.variant

    def subspace_path(self, variant: str, task: str) -> Path:
        return self.out / "subspaces" / variant / f"{task}.safetensors"

    def run_subspaces(self, stats_digests: dict[str, str]) -> dict[str, str]:
        """Per OSRM variant in use, each task's leave-one-out subspace of rank r; digests by variant."""
        from .train import OSRM_VARIANTS

        variants = sorted({self.subspace_variant(i) for i in self.config.inits if i in OSRM_VARIANTS})
        digests = {}
        for variant in variants:
            options = self.config.subspace.model_dump()
            options["variant"] = variant
            inputs = {"stats": stats_digests, "rank": self.config.lora.r, "options": options}
            outputs = [self.subspace_path(variant, t) for t in self.config.task_names]
            digests[variant] = self.cache.run(
                "subspaces",
                variant,
                inputs,
                outputs,
                lambda options=options: self._compute_subspaces(options),
            )
        return digests

    def _compute_subspaces(self, options: dict) -> None:
        from .stats import TaskStats
        from .subspace import compute_subspaces

        self.log(f"OSRM subspaces ({options['variant']})")
        stats = [TaskStats.load(self.stats_path(t)) for t in self.config.task_names]
        subspaces = compute_subspaces(stats, self.config.lora.r, **options)
        for name, subspace in subspaces.items():
            subspace.save(self.subspace_path(options["variant"], name))

    def adapter_dir(self, init: str, seed: int, task: str) -> Path:
        return self.out / "adapters" / init / f"seed{seed}" / task

    def run_training(self, subspace_digests: dict[str, str]) -> dict[tuple[str, int, str], str]:
        """Every task × init × seed adapter; returns its digest by (init, seed, task)."""
        from .adapters import WEIGHTS_NAME
        from .train import OSRM_VARIANTS

        digests = {}
        training = self.config.training.model_dump(exclude={"progress"})
        for seed in self.config.seeds:
            for init in self.config.inits:
                variant = self.subspace_variant(init) if init in OSRM_VARIANTS else None
                for name in self.config.task_names:
                    inputs = {
                        "model": self.model_inputs,
                        "task": self.task_inputs(name),
                        "init": init,
                        "seed": seed,
                        "lora": self.config.lora.model_dump(mode="json"),
                        "training": training,
                        "subspace": subspace_digests.get(variant) if variant else None,
                    }
                    if self.task(name).spec.is_regression:  # the regression head starts at the mean label
                        inputs["regression_head"] = "label_mean"
                    folder = self.adapter_dir(init, seed, name)
                    key = self.cache.key("train", inputs)
                    digests[(init, seed, name)] = self.cache.run(
                        "train",
                        f"{init}/seed{seed}/{name}",
                        inputs,
                        [folder / WEIGHTS_NAME],
                        lambda init=init, seed=seed, name=name, variant=variant, key=key: self._train(
                            init, seed, name, variant, key
                        ),
                    )
        return digests

    def _train(self, init: str, seed: int, name: str, variant: str | None, key: str) -> None:
        """Train one adapter; an interrupted attempt with the same inputs resumes from its last checkpoint."""
        from .io import write_text
        from .subspace import Subspace
        from .train import finetune

        self.log(f"training {name} ({init} init, seed {seed})")
        started = self.cache.manifest_path("train", f"{init}/seed{seed}/{name}").with_suffix(".started")
        resume = started.is_file() and started.read_text() == key
        write_text(started, key)
        subspace = Subspace.load(self.subspace_path(variant, name)) if variant else None
        training = self.config.training.model_copy(update={"progress": self.progress})
        finetune(
            self.task(name),
            self.config.model.name,
            self.adapter_dir(init, seed, name),
            init=init,
            subspace=subspace,
            lora=self.config.lora,
            training=training,
            seed=seed,
            resume=resume,
            trust_remote_code=self.config.model.trust_remote_code,
        )
        started.unlink()

    def load_adapter(self, init: str, seed: int, task: str):
        from .adapters import LoraAdapter

        return LoraAdapter.load(self.adapter_dir(init, seed, task), name=task)

    @contextlib.contextmanager
    def finetuned_model(self, init: str, seed: int, task: str) -> Iterator[tuple[Any, Any, Any]]:
        """(model, tokenizer, adapter): the base model dressed as the task's fine-tuned model, W0 + ΔW in its
        target weights and the task's head (the same function as the PEFT model, without LoRA layers)."""
        from .evaluate import task_head

        adapter = self.load_adapter(init, seed, task)
        evaluator = self.evaluator()
        model = evaluator.apply(
            adapter.deltas(), task_head(adapter), source=f"adapter {init}/seed{seed}/{task}"
        )
        try:
            yield model, evaluator.tokenizer, adapter
        finally:
            evaluator.restore()

    def _per_adapter(
        self,
        stage: str,
        adapters: dict[tuple[str, int, str], str],
        settings: dict,
        path_of: Callable[[str, int, str], Path],
        produce: Callable[[str, int, str, Path], None],
    ) -> dict[tuple[str, int, str], str]:
        """One cached unit per adapter, keyed by the adapter, its task, the base model and `settings`."""
        digests = {}
        for (init, seed, name), adapter_digest in adapters.items():
            inputs = {
                "adapter": adapter_digest,
                "task": self.task_inputs(name),
                "model": self.model_inputs,
                **settings,
            }
            path = path_of(init, seed, name)
            digests[(init, seed, name)] = self.cache.run(
                stage,
                f"{init}/seed{seed}/{name}",
                inputs,
                [path],
                lambda init=init, seed=seed, name=name, path=path: produce(init, seed, name, path),
            )
        return digests

    def _evaluate(self, task_name: str, deltas: dict, head: dict, source: str) -> dict[str, float]:
        from .evaluate import evaluate_task

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

    def _score_record(self, task_name: str, metrics: dict[str, float]) -> dict:
        primary = self.task(task_name).spec.primary_metric
        return {"task": task_name, "metrics": metrics, "primary_metric": primary, "score": metrics[primary]}

    def individual_path(self, init: str, seed: int, task: str) -> Path:
        return self.out / "eval" / "individual" / init / f"seed{seed}" / f"{task}.json"

    def run_individual_eval(
        self, adapters: dict[tuple[str, int, str], str]
    ) -> dict[tuple[str, int, str], str]:
        """Each adapter on its own task: the reference of the normalised scores."""
        return self._per_adapter(
            "eval",
            adapters,
            {"evaluation": self.config.evaluation.model_dump()},
            self.individual_path,
            self._eval_individual,
        )

    def _eval_individual(self, init: str, seed: int, name: str, path: Path) -> None:
        from .evaluate import task_head

        self.log(f"evaluating the {name} adapter ({init} init, seed {seed})")
        adapter = self.load_adapter(init, seed, name)
        metrics = self._evaluate(
            name, adapter.deltas(), task_head(adapter), f"adapter {init}/seed{seed}/{name}"
        )
        write_json(path, {"init": init, "seed": seed, **self._score_record(name, metrics)})

    def fisher_path(self, init: str, seed: int, task: str) -> Path:
        return self.out / "fisher" / init / f"seed{seed}" / f"{task}.safetensors"

    def run_fisher(self, adapters: dict[tuple[str, int, str], str]) -> dict[tuple[str, int, str], str]:
        """Each fine-tuned adapter's diagonal Fisher, when a merge entry uses Fisher merging."""
        if not self.needs_fisher:
            return {}
        settings = {"fisher": self.config.fisher.model_dump()}
        return self._per_adapter("fisher", adapters, settings, self.fisher_path, self._estimate_fisher)

    def _estimate_fisher(self, init: str, seed: int, name: str, path: Path) -> None:
        from .merge import estimate_fisher, save_fisher
        from .tasks import make_dataloader

        self.log(f"Fisher of the {name} adapter ({init} init, seed {seed})")
        settings = self.config.fisher
        task = self.task(name)
        with self.finetuned_model(init, seed, name) as (model, tokenizer, adapter):
            data = task.split(settings.split, max_examples=settings.samples, seed=seed)
            batches = make_dataloader(
                data, tokenizer, task.spec, batch_size=settings.batch_size, max_length=settings.max_length
            )
            fisher = estimate_fisher(
                model, batches, sorted(adapter.modules), labels=settings.labels, seed=seed
            )
        save_fisher(path, fisher, task=name)

    def grams_path(self, init: str, seed: int, task: str) -> Path:
        return self.out / "grams" / init / f"seed{seed}" / f"{task}.safetensors"

    def run_grams(self, adapters: dict[tuple[str, int, str], str]) -> dict[tuple[str, int, str], str]:
        """Statistics of each fine-tuned model's inputs at its adapter's modules, for `grams: finetuned`."""
        if not self.needs_finetuned_grams:
            return {}
        settings = {"statistics": self.config.statistics.model_dump()}
        return self._per_adapter("grams", adapters, settings, self.grams_path, self._collect_finetuned_stats)

    def _collect_finetuned_stats(self, init: str, seed: int, name: str, path: Path) -> None:
        from .stats import collect_stats

        self.log(f"statistics of the {name} fine-tuned model ({init} init, seed {seed})")
        with self.finetuned_model(init, seed, name) as (model, tokenizer, adapter):
            stats = collect_stats(
                model,
                self._statistics_batches(name, tokenizer),
                sorted(adapter.modules),
                task=name,
                model_id=self.config.model.name,
                progress=self.progress,
            )
        stats.extra["adapter"] = f"{init}/seed{seed}/{name}"
        stats.save(path)

    def merged_path(self, label: str, init: str, seed: int, lam: float | None) -> Path:
        return self.out / "eval" / "merged" / label / init / f"seed{seed}" / f"{_lambda_name(lam)}.json"

    def run_merges(
        self,
        adapters: dict[tuple[str, int, str], str],
        stats_digests: dict[str, str],
        grams: dict[tuple[str, int, str], str],
        fisher: dict[tuple[str, int, str], str],
    ) -> dict:
        """Every merge method × init × seed × λ, evaluated on every task with that task's head."""
        from .merge.registry import get_method

        digests = {}
        tasks = self.config.task_names
        for merge in self.config.merge:
            spec = get_method(merge.method)
            for seed in self.config.seeds:
                for init in self.config.inits:
                    pending: dict[float | None, tuple[str, dict, Path]] = {}
                    if merge.grams == "finetuned":
                        gram_digests: Any = [grams[(init, seed, t)] for t in tasks]
                    else:
                        gram_digests = stats_digests if merge.grams == "base" else None
                    base = {
                        "adapters": [adapters[(init, seed, t)] for t in tasks],
                        "tasks": [self.task_inputs(t) for t in tasks],
                        "method": merge.method,
                        "params": merge.params,
                        "model": self.model_inputs,
                        "evaluation": self.config.evaluation.model_dump(),
                        "stats": gram_digests,
                        "fisher": [fisher[(init, seed, t)] for t in tasks]
                        if "fisher" in spec.requires
                        else None,
                    }
                    for lam in merge.grid:
                        unit = f"{merge.label}/{init}/seed{seed}/{_lambda_name(lam)}"
                        inputs = {**base, "lambda": lam}
                        path = self.merged_path(merge.label, init, seed, lam)
                        digest = self.cache.lookup("merge", unit, inputs, [path])
                        if digest is None:
                            pending[lam] = (unit, inputs, path)
                        else:
                            self.cache.status["merge"].skipped.append(unit)
                            digests[unit] = digest
                    if pending:
                        digests.update(self._merge_and_evaluate(merge, init, seed, pending))
        return digests

    def _merge_and_evaluate(self, merge, init: str, seed: int, pending: dict) -> dict[str, str]:
        """Merge once (λ is a post-factor), then evaluate each pending λ on every task and record it."""
        from .evaluate import task_head
        from .merge import load_fisher
        from .merge.engine import merge_adapters, merge_sweep
        from .merge.registry import get_method
        from .stats import TaskStats

        tasks = self.config.task_names
        adapters = [self.load_adapter(init, seed, t) for t in tasks]
        heads = {t: task_head(a) for t, a in zip(tasks, adapters)}
        kwargs: dict[str, Any] = dict(merge.params)
        if merge.grams == "finetuned":
            kwargs["stats"] = [TaskStats.load(self.grams_path(init, seed, t)) for t in tasks]
        elif merge.grams == "base":
            kwargs["stats"] = [TaskStats.load(self.stats_path(t)) for t in tasks]
        if "fisher" in get_method(merge.method).requires:
            kwargs["fisher"] = [load_fisher(self.fisher_path(init, seed, t)) for t in tasks]
        if get_method(merge.method).post_scale:
            merges = merge_sweep(adapters, merge.method, [lam for lam in pending], **kwargs)
        else:
            merges = iter([(None, merge_adapters(adapters, merge.method, **kwargs))])
        digests = {}
        for lam, merged in merges:
            unit, inputs, path = pending[lam]
            self.log(f"merging with {merge.label} ({init} init, seed {seed}, λ={lam})")
            start = time.perf_counter()
            modules = list(merged)
            records = []
            for t in tasks:
                deltas = {m.name: m.for_task(t) for m in modules}
                metrics = self._evaluate(t, deltas, heads[t], f"merge {unit}, task {t}")
                records.append(self._score_record(t, metrics))
            write_json(
                path, {"init": init, "seed": seed, "method": merge.label, "lambda": lam, "tasks": records}
            )
            self.cache.status["merge"].ran.append(unit)
            digests[unit] = self.cache.record("merge", unit, inputs, [path], time.perf_counter() - start)
        return digests

    def interference_path(self, init: str, seed: int) -> Path:
        return self.out / "interference" / init / f"seed{seed}.json"

    def run_interference(self, adapters: dict, stats_digests: dict[str, str]) -> dict[str, str]:
        """Per init and seed, how much each adapter disturbs each task's activations."""
        if not self.config.interference:
            return {}
        digests = {}
        tasks = self.config.task_names
        for seed in self.config.seeds:
            for init in self.config.inits:
                inputs = {"adapters": [adapters[(init, seed, t)] for t in tasks], "stats": stats_digests}
                path = self.interference_path(init, seed)
                digests[f"{init}/seed{seed}"] = self.cache.run(
                    "interference",
                    f"{init}/seed{seed}",
                    inputs,
                    [path],
                    lambda init=init, seed=seed, path=path: self._interference(init, seed, path),
                )
        return digests

    def _interference(self, init: str, seed: int, path: Path) -> None:
        from .interference import interference_matrix
        from .stats import TaskStats

        tasks = self.config.task_names
        result = interference_matrix(
            {t: self.load_adapter(init, seed, t) for t in tasks},
            {t: TaskStats.load(self.stats_path(t)) for t in tasks},
        )
        write_json(
            path,
            {
                "init": init,
                "seed": seed,
                "tasks": result.tasks,
                "matrix": result.matrix.tolist(),
                "per_module": {m: v.tolist() for m, v in result.per_module.items()},
            },
        )

    def collect_results(self) -> dict[str, Any]:
        """results.json: every score of this experiment, flat, as `report` reads it."""
        from .report import RESULTS_FORMAT

        c = self.config
        individual = []
        for seed in c.seeds:
            for init in c.inits:
                for t in c.task_names:
                    individual.append(json.loads(self.individual_path(init, seed, t).read_text()))
        merged = []
        for merge in c.merge:
            for seed in c.seeds:
                for init in c.inits:
                    for lam in merge.grid:
                        data = json.loads(self.merged_path(merge.label, init, seed, lam).read_text())
                        for record in data["tasks"]:
                            merged.append(
                                {"init": init, "seed": seed, "method": merge.label, "lambda": lam, **record}
                            )
        interference = []
        if c.interference:
            for seed in c.seeds:
                for init in c.inits:
                    data = json.loads(self.interference_path(init, seed).read_text())
                    interference.append({k: data[k] for k in ("init", "seed", "tasks", "matrix")})
        primary = {r["task"]: r["primary_metric"] for r in individual}
        return {
            "format": RESULTS_FORMAT,
            "experiment": c.name,
            "model": c.model.name,
            "tasks": c.task_names,
            "inits": c.inits,
            "methods": [m.label for m in c.merge],
            "seeds": c.seeds,
            "primary_metrics": primary,
            "evaluation": c.evaluation.model_dump(),
            "fixed_lambda": {m.label: m.fixed_lambda for m in c.merge},
            "individual": individual,
            "merged": merged,
            "interference": interference,
        }

    def report_outputs(self) -> list[Path]:
        return [
            self.out / "results.json",
            self.out / "report.md",
            self.out / "table_best_lambda.csv",
            self.out / "table_fixed_lambda.csv",
        ]

    def run_report(self, upstream: dict) -> dict[str, Path]:
        from .report import write_report, write_results

        files: dict[str, Path] = {}

        def produce() -> None:
            results = self.collect_results()
            files.update(write_report(results, self.out))
            write_results(results, self.out / "results.json")

        self.cache.run("report", "report", upstream, self.report_outputs(), produce)
        return files

    def run(self) -> RunSummary:
        write_config = self.out / "experiment.json"
        snapshot = self.config.model_dump(mode="json")
        if not write_config.is_file() or json.loads(write_config.read_text()) != snapshot:
            write_json(write_config, snapshot)
        stats = self.run_stats()
        subspaces = self.run_subspaces(stats) if stats else {}
        adapters = self.run_training(subspaces)
        individual = self.run_individual_eval(adapters)
        fisher = self.run_fisher(adapters)
        grams = self.run_grams(adapters)
        merges = self.run_merges(adapters, stats, grams, fisher)
        interference = self.run_interference(adapters, stats)
        upstream = {
            "individual": {"/".join(map(str, k)): v for k, v in individual.items()},
            "merged": merges,
            "interference": interference,
            "config": {k: snapshot[k] for k in ("name", "tasks", "inits", "seeds", "merge", "model")},
        }
        files = self.run_report(upstream)
        if not files:
            files = {p.name: p for p in self.report_outputs()}
        results = json.loads((self.out / "results.json").read_text())
        return RunSummary(self.out, self.cache.status, results, files)


def run_experiment(
    config: ExperimentConfig,
    *,
    force: Iterable[str] = (),
    progress: bool = True,
    log: Callable[[str], None] = _log_nothing,
) -> RunSummary:
    """Run (or resume, or skip) every stage of `config`; returns what ran, what was reused and the results."""
    return Experiment(config, force=force, progress=progress, log=log).run()
