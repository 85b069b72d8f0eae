"""The experiment's stages, one class each: the upstream stages it reads, its units and how one is produced.

A stage lists its units (key, the inputs its fingerprint covers, the files it writes) from the config and
its upstream stages' digests, and yields none when the config does not use it. `Cache` decides which units
to produce. A new stage is one class here plus its line in `STAGES`; a new per-adapter product is one
`_AdapterStage` subclass.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any, ClassVar

from ..io import write_json
from .cache import Cache, Unit
from .context import Context
from .keys import AdapterKey, MergeKey, ReportKey, RunKey, StatsKey, SubspaceKey, UnitKey
from .results import collect_results

Digests = Mapping[UnitKey, str]


def _by_name(digests: Digests) -> dict[str, str]:
    """Digests by unit name, as fingerprints hold them."""
    return {key.name: digest for key, digest in digests.items()}


def _reference_stats(ctx: Context, upstream) -> dict[str, str]:
    """The digests of the merged tasks' reference statistics: what interference, diagnostics and base Grams
    read. Only these, not every statistics unit of the config, so that a chunk whose inits need fewer
    statistics (no padded means, no other sample sizes) makes the same units as the whole study."""
    return {key.name: upstream["stats"][key] for key in map(StatsKey, ctx.config.task_names)}


def _subspace_variant(ctx: Context, init: str) -> str | None:
    """The subspace variant a registered init starts from (None: it uses none)."""
    from ..inits import get_init

    return get_init(init).subspace_variant(ctx.config.subspace.variant)


def _samples_tag(ctx: Context, samples: int) -> int | None:
    """How a sample size appears in unit keys and paths: None for the reference size (a single-size study's
    only one, so its names and caches are those of a study without a sample-size axis)."""
    return None if samples == ctx.config.statistics.reference else samples


def _subspace_sizes(ctx: Context) -> dict[str, list[int]]:
    """Per subspace variant in use, the statistics sample sizes its inits are trained at."""
    sizes: dict[str, set[int]] = {}
    for run in ctx.config.init_runs:
        variant = _subspace_variant(ctx, run.name)
        if variant is not None:
            sizes.setdefault(variant, set()).add(run.samples)
    return {variant: sorted(n) for variant, n in sorted(sizes.items())}


def _moment_keys(ctx: Context, samples: int) -> list[StatsKey]:
    """The statistics a training mode (`needs_moments`) reads at one sample size: the pool's (Σ₋ᵢ) and each
    merged task's own."""
    return [StatsKey(t, _samples_tag(ctx, samples)) for t in dict.fromkeys(ctx.config.pool + ctx.config.task_names)]


def _needs_moments(init: str) -> bool:
    from ..inits import get_init

    return get_init(init).needs_moments


class Stage:
    """One stage: `name` (as in manifests and `force`), the stages whose digests it reads, and a version
    bumped when its outputs change meaning (old caches are then recomputed rather than misread)."""

    name: ClassVar[str]
    needs: ClassVar[tuple[str, ...]] = ()
    version: ClassVar[int] = 1

    def units(self, ctx: Context, upstream: Mapping[str, Digests]) -> Iterable[Unit]:
        raise NotImplementedError

    def produce(self, ctx: Context, unit: Unit) -> None:
        """Write `unit.outputs`."""
        raise NotImplementedError

    def batches(self, ctx: Context, upstream: Mapping[str, Digests]) -> Iterable[list[Unit]]:
        """Units that one `produce_batch` makes together; each unit alone unless a stage shares work."""
        return ([unit] for unit in self.units(ctx, upstream))

    def produce_batch(self, ctx: Context, units: list[Unit]) -> Iterator[Unit]:
        """Produce the units of a batch that are not cached, yielding each once written."""
        for unit in units:
            self.produce(ctx, unit)
            yield unit

    def run(self, ctx: Context, upstream: Mapping[str, Digests]) -> dict[UnitKey, str]:
        digests: dict[UnitKey, str] = {}
        for batch in self.batches(ctx, upstream):
            digests.update(ctx.cache.run(self.name, batch, lambda pending: self.produce_batch(ctx, pending)))
        return digests

    def finished(self, ctx: Context, upstream: Mapping[str, Digests], cache: Cache) -> dict[UnitKey, str]:
        """The digests of this stage's units already finished for their current inputs; nothing is produced,
        and a unit that reads an unfinished upstream unit is unfinished too."""
        found: dict[UnitKey, str] = {}
        for batch in self.batches(ctx, {name: _Unfinished(d) for name, d in upstream.items()}):
            for unit in batch:
                digest = cache.lookup(self.name, unit)
                if digest is not None:
                    found[unit.key] = digest
        return found


class _Unfinished(dict):
    """Upstream digests where an unfinished unit reads as a digest no finished manifest holds."""

    def __missing__(self, key: UnitKey) -> str:
        return "unfinished"


class _StatsStage(Stage):
    """Per task, Σxxᵀ/Σx of every target module's input over a seeded sample of the base model: the reference
    sample of the merged tasks (interference, diagnostics, base Grams), and the samples of every size the
    subspaces read for the pool tasks (moments, or the official code's padded means for `osrm-official`)."""

    name = "stats"

    @staticmethod
    def reference_wanted(ctx: Context) -> bool:
        c = ctx.config
        return c.interference or c.diagnostics or any(m.grams == "base" for m in c.merge)

    @staticmethod
    def keys(ctx: Context) -> list[StatsKey]:
        from ..subspace import OFFICIAL

        c = ctx.config
        keys = [StatsKey(t) for t in c.task_names] if _StatsStage.reference_wanted(ctx) else []
        for variant, sizes in _subspace_sizes(ctx).items():
            keys += [StatsKey(t, _samples_tag(ctx, n), variant == OFFICIAL) for n in sizes for t in c.pool_for(variant)]
        for run in c.init_runs:
            if _needs_moments(run.name):
                keys += _moment_keys(ctx, run.samples)
        return list(dict.fromkeys(keys))

    def units(self, ctx, upstream):
        c = ctx.config
        for key in self.keys(ctx):
            settings = c.statistics.sample_inputs(key.samples)
            if key.padded:  # one example at a time, padded to max_length: batch_size plays no part
                settings = {**settings, "batch_size": None, "padding": "max_length"}
            inputs = {
                "model": ctx.model_inputs,
                "task": ctx.task_inputs(key.task),
                "statistics": settings,
                "target_modules": c.lora.target_modules,
            }
            yield Unit(key, inputs, [ctx.layout.stats(key.task, key.samples, key.padded)])

    def produce(self, ctx, unit):
        key: StatsKey = unit.key
        what = "padded means" if key.padded else "statistics"
        ctx.log(f"{what} of task {key.task}" + (f" ({key.samples} examples)" if key.samples else ""))
        evaluator = ctx.evaluator()
        evaluator.restore()
        if key.padded:
            ctx.official_statistics(key.task, evaluator.model, evaluator.tokenizer, unit.outputs[0], key.samples)
            return
        ctx.collect_statistics(key.task, evaluator.model, evaluator.tokenizer, ctx.config.lora.target_modules,
                               unit.outputs[0], samples=key.samples)


class _SubspacesStage(Stage):
    """Per variant in use and statistics sample size, each merged task's subspace of rank r from the other
    tasks of the statistics pool."""

    name = "subspaces"
    needs = ("stats",)

    @staticmethod
    def options(ctx: Context, variant: str) -> dict:
        from ..subspace import OFFICIAL

        return {"variant": variant} if variant == OFFICIAL else {**ctx.config.subspace.model_dump(),
                                                                  "variant": variant}

    def units(self, ctx, upstream):
        from ..subspace import OFFICIAL

        c = ctx.config
        for variant, sizes in _subspace_sizes(ctx).items():
            for n in sizes:
                tag = _samples_tag(ctx, n)
                stats = [StatsKey(t, tag, variant == OFFICIAL) for t in c.pool_for(variant)]
                inputs = {
                    "stats": {k.name: upstream["stats"][k] for k in stats},
                    "rank": c.lora.r,
                    "options": self.options(ctx, variant),
                }
                if c.pool_for(variant) != c.task_names:
                    inputs["tasks"] = c.task_names
                outputs = [ctx.layout.subspace(variant, t, tag) for t in c.task_names]
                yield Unit(SubspaceKey(variant, tag), inputs, outputs)

    def produce(self, ctx, unit):
        from ..stats import TaskStats
        from ..subspace import OFFICIAL, compute_subspaces, official_subspaces

        key: SubspaceKey = unit.key
        c = ctx.config
        ctx.log(f"OSRM subspaces ({key.variant}" + (f", {key.samples} examples)" if key.samples else ")"))
        padded = key.variant == OFFICIAL
        stats = [TaskStats.load(ctx.layout.stats(t, key.samples, padded)) for t in c.pool_for(key.variant)]
        if padded:
            subspaces = official_subspaces(stats, c.lora.r, tasks=c.task_names)
        else:
            subspaces = compute_subspaces(stats, c.lora.r, tasks=c.task_names, **self.options(ctx, key.variant))
        for task, subspace in subspaces.items():
            subspace.save(ctx.layout.subspace(key.variant, task, key.samples))


class _TrainStage(Stage):
    """Every seed × init run (entry × sample size) × task adapter."""

    name = "train"
    needs = ("subspaces", "stats")

    @staticmethod
    def subspace_key(ctx: Context, label: str) -> SubspaceKey | None:
        run = ctx.config.init_run(label)
        variant = _subspace_variant(ctx, run.name)
        return SubspaceKey(variant, _samples_tag(ctx, run.samples)) if variant else None

    def units(self, ctx, upstream):
        from ..adapters import WEIGHTS_NAME
        from ..inits import get_init

        c = ctx.config
        training = c.training.model_dump(exclude={"progress"})
        for seed in c.seeds:
            for run in c.init_runs:
                subspace = self.subspace_key(ctx, run.label)
                for task in c.task_names:
                    inputs = {
                        "model": ctx.model_inputs,
                        "task": ctx.task_inputs(task),
                        "init": run.name,
                        "seed": seed,
                        "lora": c.lora.model_dump(mode="json"),
                        "training": training,
                        "subspace": upstream["subspaces"][subspace] if subspace else None,
                    }
                    if run.options:
                        inputs["init_options"] = run.options
                    if get_init(run.name).needs_tasks:  # its rows depend on the merged tasks
                        inputs["merged_tasks"] = c.task_names
                    if get_init(run.name).needs_moments:  # a training mode reads the moments themselves
                        stats = {k.name: upstream["stats"][k] for k in _moment_keys(ctx, run.samples)}
                        inputs["moments"] = {"stats": stats, "weighting": c.subspace.weighting}
                    if ctx.task(task).spec.is_regression:  # the regression head starts at the mean label
                        inputs["regression_head"] = "label_mean"
                    key = AdapterKey(run.label, seed, task)
                    yield Unit(key, inputs, [ctx.layout.adapter(key) / WEIGHTS_NAME])

    def produce(self, ctx, unit):
        """Train one adapter; an interrupted attempt with the same inputs resumes from its last checkpoint."""
        from ..io import write_text
        from ..subspace import Subspace
        from ..train import finetune

        key: AdapterKey = unit.key
        run = ctx.config.init_run(key.init)
        ctx.log(f"training {key.task} ({key.init} init, seed {key.seed})")
        fingerprint = ctx.cache.key(self.name, unit.inputs)
        started = ctx.layout.manifest(self.name, key.name).with_suffix(".started")
        resume = started.is_file() and started.read_text() == fingerprint
        write_text(started, fingerprint)
        subspace_key = self.subspace_key(ctx, key.init)
        subspace = (Subspace.load(ctx.layout.subspace(subspace_key.variant, key.task, subspace_key.samples))
                    if subspace_key else None)
        finetune(
            ctx.task(key.task),
            ctx.config.model.name,
            ctx.layout.adapter(key),
            init=run.name,
            init_options=run.options,
            subspace=subspace,
            tasks=ctx.config.task_names,
            lora=ctx.config.lora,
            training=ctx.config.training.model_copy(update={"progress": ctx.progress}),
            seed=key.seed,
            resume=resume,
            trust_remote_code=ctx.config.model.trust_remote_code,
            overwrite=True,  # our own layout in a claimed experiment folder (adapters of older versions: unmarked)
            **self.moments(ctx, key.task, run),
        )
        started.unlink()

    @staticmethod
    def moments(ctx: Context, task: str, run) -> dict:
        """finetune's statistics arguments for a training mode: the pool's other tasks and the task's own."""
        from ..stats import TaskStats

        if not _needs_moments(run.name):
            return {}
        keys = _moment_keys(ctx, run.samples)
        stats = {k.task: TaskStats.load(ctx.layout.stats(k.task, k.samples)) for k in keys}
        return {"other_stats": [stats[t] for t in ctx.config.pool if t != task], "own_stats": stats[task],
                "weighting": ctx.config.subspace.weighting}


class _AdapterStage(Stage):
    """One unit per trained adapter, keyed by the adapter, its task, the base model and the config's
    `section` (the settings of what the stage computes)."""

    needs = ("train",)
    section: ClassVar[str]

    def wanted(self, ctx: Context) -> bool:
        return True

    def output(self, ctx: Context, key: AdapterKey) -> Path:
        """The unit's one file."""
        raise NotImplementedError

    def units(self, ctx, upstream):
        if not self.wanted(ctx):
            return
        for key, adapter_digest in upstream["train"].items():
            inputs = {
                "adapter": adapter_digest,
                "task": ctx.task_inputs(key.task),
                "model": ctx.model_inputs,
                self.section: self.settings(ctx),
            }
            yield Unit(key, inputs, [self.output(ctx, key)])

    def settings(self, ctx: Context) -> dict:
        """The settings of what the stage computes, as its fingerprint holds them."""
        return getattr(ctx.config, self.section).model_dump()


class _EvalStage(_AdapterStage):
    """Each adapter on its own task's `report` rows: the reference of the normalised scores."""

    name = "eval"
    section = "evaluation"
    version = 2  # scored on the report rows, with per-example predictions

    def output(self, ctx, key):
        return ctx.layout.individual(key)

    def produce(self, ctx, unit):
        from ..runtime.weights import task_head

        key: AdapterKey = unit.key
        ctx.log(f"evaluating the {key.task} adapter ({key.init} init, seed {key.seed})")
        adapter = ctx.adapter(key)
        parts = ctx.evaluate(key.task, adapter.deltas(), task_head(adapter), f"adapter {key.name}", ["report"])
        record = ctx.score_record(key.task, parts)
        write_json(unit.outputs[0], {"init": key.init, "seed": key.seed, **record})


def _uses_fisher(merge) -> bool:
    from ..merge.registry import get_method

    return "fisher" in get_method(merge.method).requires


class _FisherStage(_AdapterStage):
    """Each fine-tuned adapter's diagonal Fisher, when a merge entry uses Fisher merging."""

    name = "fisher"
    section = "fisher"

    def wanted(self, ctx):
        return any(_uses_fisher(m) for m in ctx.config.merge)

    def output(self, ctx, key):
        return ctx.layout.fisher(key)

    def produce(self, ctx, unit):
        from ..runtime.fisher import estimate_fisher, save_fisher
        from ..tasks import make_dataloader

        key: AdapterKey = unit.key
        ctx.log(f"Fisher of the {key.task} adapter ({key.init} init, seed {key.seed})")
        settings = ctx.config.fisher
        task = ctx.task(key.task)
        with ctx.finetuned_model(key) as (model, tokenizer, adapter):
            data = task.split(settings.split, max_examples=settings.samples, seed=key.seed)
            batches = make_dataloader(
                data, tokenizer, task.spec, batch_size=settings.batch_size, max_length=settings.max_length
            )
            fisher = estimate_fisher(
                model, batches, sorted(adapter.modules), labels=settings.labels, seed=key.seed
            )
        save_fisher(unit.outputs[0], fisher, task=key.task)


class _GramsStage(_AdapterStage):
    """Statistics of each fine-tuned model's inputs at its adapter's modules, for `grams: finetuned`."""

    name = "grams"
    section = "statistics"

    def wanted(self, ctx):
        return any(m.grams == "finetuned" for m in ctx.config.merge)

    def settings(self, ctx):
        return ctx.config.statistics.sample_inputs()  # the reference sample

    def output(self, ctx, key):
        return ctx.layout.grams(key)

    def produce(self, ctx, unit):
        key: AdapterKey = unit.key
        ctx.log(f"statistics of the {key.task} fine-tuned model ({key.init} init, seed {key.seed})")
        with ctx.finetuned_model(key) as (model, tokenizer, adapter):
            targets = sorted(adapter.modules)
            ctx.collect_statistics(
                key.task, model, tokenizer, targets, unit.outputs[0], extra={"adapter": key.name}
            )


class _MergeStage(Stage):
    """Every merge entry × seed × init × λ, evaluated on every task with that task's head.

    A batch is one entry's λ grid for one init × seed: merged once (λ is a post-factor), then each pending
    λ is evaluated on every task's `select` and `report` rows in one pass and recorded.
    """

    name = "merge"
    needs = ("train", "stats", "grams", "fisher")
    version = 2  # scored on select and report rows, with per-example predictions

    @staticmethod
    def shared_inputs(ctx: Context, merge, run: RunKey, upstream) -> dict:
        tasks = ctx.config.task_names
        if merge.grams == "finetuned":
            grams: Any = [upstream["grams"][run.adapter(t)] for t in tasks]
        else:
            grams = _reference_stats(ctx, upstream) if merge.grams == "base" else None
        return {
            "adapters": [upstream["train"][run.adapter(t)] for t in tasks],
            "tasks": [ctx.task_inputs(t) for t in tasks],
            "method": merge.method,
            "params": merge.params,
            "model": ctx.model_inputs,
            "evaluation": ctx.config.evaluation.model_dump(),
            "stats": grams,
            "fisher": [upstream["fisher"][run.adapter(t)] for t in tasks] if _uses_fisher(merge) else None,
        }

    def batches(self, ctx, upstream):
        c = ctx.config
        for merge in c.merge:
            for seed in c.seeds:
                for init in c.init_labels:
                    run = RunKey(init, seed)
                    inputs = self.shared_inputs(ctx, merge, run, upstream)
                    keys = [MergeKey(merge.label, init, seed, lam) for lam in merge.grid]
                    yield [Unit(k, {**inputs, "lambda": k.lam}, [ctx.layout.merged(k)]) for k in keys]

    @staticmethod
    def merge_inputs(ctx: Context, merge, run: RunKey) -> dict[str, Any]:
        """The per-task inputs the method needs besides the adapters (Grams, Fisher diagonals)."""
        from ..runtime.fisher import load_fisher
        from ..stats import TaskStats

        tasks = ctx.config.task_names
        inputs: dict[str, Any] = {}
        if merge.grams == "finetuned":
            inputs["stats"] = [TaskStats.load(ctx.layout.grams(run.adapter(t))) for t in tasks]
        elif merge.grams == "base":
            inputs["stats"] = [TaskStats.load(ctx.layout.stats(t)) for t in tasks]
        if _uses_fisher(merge):
            inputs["fisher"] = [load_fisher(ctx.layout.fisher(run.adapter(t))) for t in tasks]
        return inputs

    def produce_batch(self, ctx, units):
        from ..merge.engine import merge_adapters, merge_sweep
        from ..merge.registry import get_method
        from ..runtime.weights import task_head

        first: MergeKey = units[0].key
        merge = next(m for m in ctx.config.merge if m.label == first.label)
        run, tasks = first.run, ctx.config.task_names
        adapters = [ctx.adapter(run.adapter(t)) for t in tasks]
        heads = {t: task_head(a) for t, a in zip(tasks, adapters)}
        kwargs = {**merge.params, **self.merge_inputs(ctx, merge, run)}
        pending = {unit.key.lam: unit for unit in units}
        if get_method(merge.method).post_scale:
            merges = merge_sweep(adapters, merge.method, list(pending), **kwargs)
        else:
            merges = iter([(None, merge_adapters(adapters, merge.method, **kwargs))])
        for lam, merged in merges:
            unit = pending[lam]
            ctx.log(f"merging with {merge.label} ({run.init} init, seed {run.seed}, λ={lam})")
            modules = list(merged)
            records = []
            for t in tasks:
                deltas = {m.name: m.for_task(t) for m in modules}
                parts = ctx.evaluate(t, deltas, heads[t], f"merge {unit.key.name}, task {t}", ["select", "report"])
                records.append(ctx.score_record(t, parts))
            write_json(
                unit.outputs[0],
                {"init": run.init, "seed": run.seed, "method": merge.label, "lambda": lam, "tasks": records},
            )
            yield unit


def _run_units(ctx: Context, upstream, output: Callable[[RunKey], Path], **extra) -> Iterator[Unit]:
    """One unit per seed × init that reads the run's adapters and the base model's statistics."""
    c = ctx.config
    for seed in c.seeds:
        for init in c.init_labels:
            run = RunKey(init, seed)
            inputs = {
                "adapters": [upstream["train"][run.adapter(t)] for t in c.task_names],
                "stats": _reference_stats(ctx, upstream),
                **extra,
            }
            yield Unit(run, inputs, [output(run)])


class _InterferenceStage(Stage):
    """Per init and seed, how much each adapter disturbs each task's activations."""

    name = "interference"
    needs = ("train", "stats")

    def units(self, ctx, upstream):
        if ctx.config.interference:
            yield from _run_units(ctx, upstream, ctx.layout.interference)

    def produce(self, ctx, unit):
        from ..interference import interference_matrix
        from ..stats import TaskStats

        run: RunKey = unit.key
        tasks = ctx.config.task_names
        result = interference_matrix(
            {t: ctx.adapter(run.adapter(t)) for t in tasks},
            {t: TaskStats.load(ctx.layout.stats(t)) for t in tasks},
        )
        write_json(
            unit.outputs[0],
            {
                "init": run.init,
                "seed": run.seed,
                "tasks": result.tasks,
                "matrix": result.matrix.tolist(),
                "per_module": {m: v.tolist() for m, v in result.per_module.items()},
            },
        )


class _DiagnosticsStage(Stage):
    """Per init and seed, each adapter's diagnostics (`diagnostics.diagnose`), exact from the cached
    statistics, the base weights and the initial A saved with each adapter: no pass over data."""

    name = "diagnostics"
    needs = ("train", "stats")

    def units(self, ctx, upstream):
        if ctx.config.diagnostics:
            extra = {"model": ctx.model_inputs, "weighting": ctx.config.subspace.weighting}
            yield from _run_units(ctx, upstream, ctx.layout.diagnostics, **extra)

    def produce(self, ctx, unit):
        from ..diagnostics import diagnose
        from ..io import load_tensors
        from ..modules import weight_out_in
        from ..runtime.weights import linear_layers
        from ..stats import TaskStats
        from ..train import INITIAL_A_NAME

        run: RunKey = unit.key
        tasks = ctx.config.task_names
        ctx.log(f"diagnostics of the adapters ({run.init} init, seed {run.seed})")
        adapters = {t: ctx.adapter(run.adapter(t)) for t in tasks}
        files = {t: ctx.layout.adapter(run.adapter(t)) / INITIAL_A_NAME for t in tasks}
        # Adapters trained before the initial A was saved get no retention or captured-at-init numbers.
        initial = {t: load_tensors(f)[0] for t, f in files.items()} if all(f.is_file() for f in files.values()) else None
        evaluator = ctx.evaluator()
        evaluator.restore()
        layers = linear_layers(evaluator.model, sorted(adapters[tasks[0]].modules))
        result = diagnose(
            adapters,
            {t: TaskStats.load(ctx.layout.stats(t)) for t in tasks},
            {m: weight_out_in(layer).detach() for m, layer in layers.items()},
            initial,
            weighting=ctx.config.subspace.weighting,
        )
        write_json(unit.outputs[0], {"init": run.init, "seed": run.seed, "initial_A": initial is not None,
                                     **result.to_dict()})


class ReportStage(Stage):
    """results.json, report.md, the tables and the plots of every finished unit of the study, redone when
    any of them changed; the runner gives it the finished units (of all chunks) as its upstream."""

    name = "report"
    needs = ("eval", "merge", "interference", "diagnostics")
    version = 2  # held-out λ, paired differences, diagnostics

    def units(self, ctx, upstream):
        snapshot = ctx.config.model_dump(mode="json")
        inputs = {stage: _by_name(upstream[stage]) for stage in self.needs}
        inputs["config"] = {
            k: snapshot[k] for k in ("name", "tasks", "inits", "seeds", "merge", "model", "evaluation", "report")
        }
        yield Unit(ReportKey(), inputs, ctx.layout.report_files())

    def produce(self, ctx, unit):
        from ..report import write_report, write_results

        results = collect_results(ctx.config, ctx.layout, {stage: set(unit.inputs[stage]) for stage in self.needs})
        ctx.files.update(write_report(results, ctx.layout.root))
        write_results(results, ctx.layout.results)


# The runner orders them by `needs`, keeping this order where `needs` leave a choice.
STAGES: tuple[Stage, ...] = (
    _StatsStage(),
    _SubspacesStage(),
    _TrainStage(),
    _EvalStage(),
    _FisherStage(),
    _GramsStage(),
    _MergeStage(),
    _InterferenceStage(),
    _DiagnosticsStage(),
    ReportStage(),
)
