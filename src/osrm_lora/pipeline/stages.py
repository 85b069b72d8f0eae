"""The experiment's stages, one class each: the upstream stages it reads, its units and how one is produced.

A stage lists its units (key, the inputs its fingerprint covers, the files it writes) from the config and
its upstream stages' digests, and yields none when the config does not use it. `Cache` decides which units
to produce. A new stage is one class here plus its line in `STAGES`; a new per-adapter product is one
`AdapterStage` subclass.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any, ClassVar

from ..io import write_json
from .cache import Unit
from .context import Context
from .keys import AdapterKey, MergeKey, ReportKey, RunKey, TaskKey, UnitKey, VariantKey
from .results import collect_results

Digests = Mapping[UnitKey, str]


def _by_name(digests: Digests) -> dict[str, str]:
    """Digests by unit name, as fingerprints hold them."""
    return {key.name: digest for key, digest in digests.items()}


def _subspace_variant(ctx: Context, init: str) -> str | None:
    from ..inits import get_init

    return get_init(init).subspace_variant(ctx.config.subspace.variant)


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


class StatsStage(Stage):
    """Per task, Σxxᵀ/Σx of every target module's input over `samples_per_task` examples of the base model."""

    name = "stats"

    @staticmethod
    def wanted(ctx: Context) -> bool:
        from ..inits import get_init

        c = ctx.config
        return (
            c.interference
            or any(get_init(init).needs_stats for init in c.inits)
            or any(m.grams == "base" for m in c.merge)
        )

    def units(self, ctx, upstream):
        if not self.wanted(ctx):
            return
        for task in ctx.config.task_names:
            inputs = {
                "model": ctx.model_inputs,
                "task": ctx.task_inputs(task),
                "statistics": ctx.config.statistics.model_dump(),
                "target_modules": ctx.config.lora.target_modules,
            }
            yield Unit(TaskKey(task), inputs, [ctx.layout.stats(task)])

    def produce(self, ctx, unit):
        task = unit.key.task
        ctx.log(f"statistics of task {task}")
        evaluator = ctx.evaluator()
        evaluator.restore()
        ctx.collect_statistics(
            task, evaluator.model, evaluator.tokenizer, ctx.config.lora.target_modules, unit.outputs[0]
        )


class SubspacesStage(Stage):
    """Per OSRM variant in use, each task's leave-one-out subspace of rank r."""

    name = "subspaces"
    needs = ("stats",)

    @staticmethod
    def options(ctx: Context, variant: str) -> dict:
        return {**ctx.config.subspace.model_dump(), "variant": variant}

    def units(self, ctx, upstream):
        variants = {_subspace_variant(ctx, init) for init in ctx.config.inits} - {None}
        for variant in sorted(variants):
            inputs = {
                "stats": _by_name(upstream["stats"]),
                "rank": ctx.config.lora.r,
                "options": self.options(ctx, variant),
            }
            outputs = [ctx.layout.subspace(variant, t) for t in ctx.config.task_names]
            yield Unit(VariantKey(variant), inputs, outputs)

    def produce(self, ctx, unit):
        from ..stats import TaskStats
        from ..subspace import compute_subspaces

        variant = unit.key.variant
        ctx.log(f"OSRM subspaces ({variant})")
        stats = [TaskStats.load(ctx.layout.stats(t)) for t in ctx.config.task_names]
        subspaces = compute_subspaces(stats, ctx.config.lora.r, **self.options(ctx, variant))
        for task, subspace in subspaces.items():
            subspace.save(ctx.layout.subspace(variant, task))


class TrainStage(Stage):
    """Every seed × init × task adapter."""

    name = "train"
    needs = ("subspaces",)

    def units(self, ctx, upstream):
        from ..adapters import WEIGHTS_NAME

        c = ctx.config
        training = c.training.model_dump(exclude={"progress"})
        for seed in c.seeds:
            for init in c.inits:
                variant = _subspace_variant(ctx, init)
                for task in c.task_names:
                    inputs = {
                        "model": ctx.model_inputs,
                        "task": ctx.task_inputs(task),
                        "init": init,
                        "seed": seed,
                        "lora": c.lora.model_dump(mode="json"),
                        "training": training,
                        "subspace": upstream["subspaces"].get(VariantKey(variant)) if variant else None,
                    }
                    if ctx.task(task).spec.is_regression:  # the regression head starts at the mean label
                        inputs["regression_head"] = "label_mean"
                    key = AdapterKey(init, seed, task)
                    yield Unit(key, inputs, [ctx.layout.adapter(key) / WEIGHTS_NAME])

    def produce(self, ctx, unit):
        """Train one adapter; an interrupted attempt with the same inputs resumes from its last checkpoint."""
        from ..io import write_text
        from ..subspace import Subspace
        from ..train import finetune

        key: AdapterKey = unit.key
        ctx.log(f"training {key.task} ({key.init} init, seed {key.seed})")
        fingerprint = ctx.cache.key(self.name, unit.inputs)
        started = ctx.layout.manifest(self.name, key.name).with_suffix(".started")
        resume = started.is_file() and started.read_text() == fingerprint
        write_text(started, fingerprint)
        variant = _subspace_variant(ctx, key.init)
        subspace = Subspace.load(ctx.layout.subspace(variant, key.task)) if variant else None
        finetune(
            ctx.task(key.task),
            ctx.config.model.name,
            ctx.layout.adapter(key),
            init=key.init,
            subspace=subspace,
            lora=ctx.config.lora,
            training=ctx.config.training.model_copy(update={"progress": ctx.progress}),
            seed=key.seed,
            resume=resume,
            trust_remote_code=ctx.config.model.trust_remote_code,
        )
        started.unlink()


class AdapterStage(Stage):
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
                self.section: getattr(ctx.config, self.section).model_dump(),
            }
            yield Unit(key, inputs, [self.output(ctx, key)])


class EvalStage(AdapterStage):
    """Each adapter on its own task: the reference of the normalised scores."""

    name = "eval"
    section = "evaluation"

    def output(self, ctx, key):
        return ctx.layout.individual(key)

    def produce(self, ctx, unit):
        from ..runtime.weights import task_head

        key: AdapterKey = unit.key
        ctx.log(f"evaluating the {key.task} adapter ({key.init} init, seed {key.seed})")
        adapter = ctx.adapter(key)
        metrics = ctx.evaluate(key.task, adapter.deltas(), task_head(adapter), f"adapter {key.name}")
        record = ctx.score_record(key.task, metrics)
        write_json(unit.outputs[0], {"init": key.init, "seed": key.seed, **record})


def _uses_fisher(merge) -> bool:
    from ..merge.registry import get_method

    return "fisher" in get_method(merge.method).requires


class FisherStage(AdapterStage):
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


class GramsStage(AdapterStage):
    """Statistics of each fine-tuned model's inputs at its adapter's modules, for `grams: finetuned`."""

    name = "grams"
    section = "statistics"

    def wanted(self, ctx):
        return any(m.grams == "finetuned" for m in ctx.config.merge)

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


class MergeStage(Stage):
    """Every merge entry × seed × init × λ, evaluated on every task with that task's head.

    A batch is one entry's λ grid for one init × seed: merged once (λ is a post-factor), then each pending
    λ is evaluated and recorded.
    """

    name = "merge"
    needs = ("train", "stats", "grams", "fisher")

    @staticmethod
    def shared_inputs(ctx: Context, merge, run: RunKey, upstream) -> dict:
        tasks = ctx.config.task_names
        if merge.grams == "finetuned":
            grams: Any = [upstream["grams"][run.adapter(t)] for t in tasks]
        else:
            grams = _by_name(upstream["stats"]) if merge.grams == "base" else None
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
                for init in c.inits:
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
                metrics = ctx.evaluate(t, deltas, heads[t], f"merge {unit.key.name}, task {t}")
                records.append(ctx.score_record(t, metrics))
            write_json(
                unit.outputs[0],
                {"init": run.init, "seed": run.seed, "method": merge.label, "lambda": lam, "tasks": records},
            )
            yield unit


class InterferenceStage(Stage):
    """Per init and seed, how much each adapter disturbs each task's activations."""

    name = "interference"
    needs = ("train", "stats")

    def units(self, ctx, upstream):
        c = ctx.config
        if not c.interference:
            return
        for seed in c.seeds:
            for init in c.inits:
                run = RunKey(init, seed)
                inputs = {
                    "adapters": [upstream["train"][run.adapter(t)] for t in c.task_names],
                    "stats": _by_name(upstream["stats"]),
                }
                yield Unit(run, inputs, [ctx.layout.interference(run)])

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


class ReportStage(Stage):
    """results.json, report.md, the tables and the plots, redone when any score changed."""

    name = "report"
    needs = ("eval", "merge", "interference")

    def units(self, ctx, upstream):
        snapshot = ctx.config.model_dump(mode="json")
        inputs = {
            # "init/seed/task", not the unit name: as the reports already cached were fingerprinted.
            "individual": {f"{k.init}/{k.seed}/{k.task}": v for k, v in upstream["eval"].items()},
            "merged": _by_name(upstream["merge"]),
            "interference": _by_name(upstream["interference"]),
            "config": {k: snapshot[k] for k in ("name", "tasks", "inits", "seeds", "merge", "model")},
        }
        yield Unit(ReportKey(), inputs, ctx.layout.report_files())

    def produce(self, ctx, unit):
        from ..report import write_report, write_results

        results = collect_results(ctx.config, ctx.layout)
        ctx.files.update(write_report(results, ctx.layout.root))
        write_results(results, ctx.layout.results)


# The runner orders them by `needs`, keeping this order where `needs` leave a choice.
STAGES: tuple[Stage, ...] = (
    StatsStage(),
    SubspacesStage(),
    TrainStage(),
    EvalStage(),
    FisherStage(),
    GramsStage(),
    MergeStage(),
    InterferenceStage(),
    ReportStage(),
)
