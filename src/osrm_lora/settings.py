"""Every settings schema, checked by pydantic: the experiment file and `finetune`'s LoRA and training settings.

Only pydantic, yaml and torch-free parts of the package (the init and merge-method registries) are imported, so
validating an experiment or printing help never loads torch.

The experiment file (`osrm-lora run experiment.yaml`) names the base model, the tasks and where their data comes from, the LoRA and training settings,
the inits to compare, the statistics and subspace options, the merge methods with their hyper-parameters and λ
grids, the seeds and the output folder. Every key is checked by pydantic before anything runs, and an error
names the file and the exact key (``merge[1].params.density``), so a typo never costs a training run.

Merge methods that need per-task statistics of the fine-tuned models get them from cached stages:

- ``method: regmean`` takes each task's input Gram matrices. ``grams: finetuned`` (the default, as in the
  RegMean paper) collects them on each task's fine-tuned model; ``grams: base`` reuses the base model's
  statistics (faster: no pass per adapter). The sample is the one of the ``statistics:`` section.
- ``method: fisher`` takes each fine-tuned adapter's diagonal Fisher, estimated as the top-level ``fisher:``
  section says (``samples``, ``batch_size``, ``max_length``, ``split``, ``labels: sampled|empirical``),
  once per adapter and shared by every Fisher merge entry.

Relative paths (output folder, task data files) are relative to the experiment file's folder.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from .errors import OsrmLoraError, did_you_mean
from .inits import get_init

# Default λ grid: the paper sweeps the merging coefficient; 1.0 is plain addition of LoRA updates.
DEFAULT_LAMBDAS = [0.2, 0.4, 0.6, 0.8, 1.0, 1.2]
# Fixed-λ view: LoRA updates are small and were each trained to be added at scale 1, so summing them at λ=1 is
# the natural "no tuning" merge for every method here (TIES' paper also uses λ=1 with its disjoint mean).
DEFAULT_FIXED_LAMBDA = 1.0
# Options of a task entry that are file paths, resolved against the experiment file's folder.
PATH_OPTIONS = ("glue_dir", "files")
# Every option of a task entry: `tasks.get_task`'s keywords (`tasks.registry._task_options`; a test checks they
# agree), listed here so that an experiment is checked without importing the data libraries.
TASK_OPTIONS = (
    "source", "glue_dir", "include_extra_train", "files", "progress", "text_column", "text_pair_column",
    "label_column", "label_names", "regression", "metrics", "primary_metric", "format", "quoting",
)
STAGES = (
    "stats", "subspaces", "train", "eval", "fisher", "grams", "merge", "interference", "diagnostics", "report",
)


class ConfigError(OsrmLoraError):
    """An experiment file that cannot be used; the message names the file and the key."""


class _Strict(BaseModel):
    """Base of the file schemas: a misspelt key is an error, and so is a NaN or infinite number (`.nan`)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class LoraSettings(_Strict):
    """The adapter's shape and which factors train."""

    r: int = Field(8, gt=0, description="LoRA rank")
    alpha: float = Field(16.0, gt=0, description="LoRA alpha; scale alpha/r (alpha/sqrt(r) with rsLoRA)")
    dropout: float = Field(0.1, ge=0, lt=1, description="dropout on the adapter's input")
    target_modules: list[str] | str | None = Field(
        None, description="module names or a full-match regex; None: the model type's query/value projections"
    )
    use_rslora: bool = Field(False, description="rank-stabilised scale alpha/sqrt(r)")
    freeze: Literal["none", "A", "B"] = Field("none", description="keep lora_A or lora_B at its initial value")


class TrainingSettings(_Strict):
    """Optimisation knobs, mapped one to one onto `transformers.TrainingArguments`."""

    lr: float = Field(5e-4, gt=0, description="peak learning rate (linear decay after warmup)")
    epochs: float = Field(3.0, gt=0, description="training epochs (ignored when max_steps is set)")
    max_steps: int | None = Field(None, gt=0, description="optimizer steps; overrides epochs")
    batch_size: int = Field(32, gt=0, description="examples per device per micro-batch")
    grad_accum: int = Field(1, gt=0, description="micro-batches per optimizer step")
    warmup_ratio: float = Field(0.06, ge=0, lt=1, description="fraction of the steps with a linear warmup")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay")
    max_length: int = Field(128, gt=0, description="tokens per example after truncation")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto", description="auto: bf16 (fp16 if unsupported) on a CUDA GPU, fp32 otherwise; bf16/fp16 need a GPU"
    )
    gradient_checkpointing: bool = Field(False, description="recompute activations to save memory")
    eval_each_epoch: bool = Field(True, description="evaluate on the dev split after each epoch")
    keep_best: bool = Field(False, description="end with the epoch of best dev primary metric")
    save_steps: int | None = Field(None, gt=0, description="checkpoint every N steps; None: after each epoch")
    logging_steps: int = Field(50, gt=0, description="log the training loss every N steps")
    max_train_examples: int | None = Field(None, gt=0, description="subsample the train split")
    max_eval_examples: int | None = Field(None, gt=0, description="subsample the dev split")
    progress: bool = Field(True, description="show progress bars")

    @model_validator(mode="after")
    def _best_needs_epoch_evaluation(self) -> TrainingSettings:
        if self.keep_best and not self.eval_each_epoch:
            raise ValueError("keep_best needs eval_each_epoch=true (the best epoch is chosen on dev)")
        if self.keep_best and self.save_steps is not None:
            raise ValueError("keep_best needs save_steps unset (checkpoints must coincide with the evaluations)")
        return self


class ModelConfig(_Strict):
    """The base model: a hub id, a local folder, or `builtin:minilm` (the offline default).

    A name starting with ./ or ../ is a folder relative to the experiment file; anything else is passed to
    `from_pretrained` as it is (hub id or absolute path)."""

    name: str = Field(min_length=1, description="hub id, local folder or builtin:minilm")
    trust_remote_code: bool = Field(False, description="run the model repository's own code (off by default)")


class TaskConfig(BaseModel):
    """A task by name plus the options of its source (passed to `osrm_lora.tasks.get_task`)."""

    model_config = ConfigDict(extra="allow")

    name: str = Field(min_length=1)

    @model_validator(mode="after")
    def _known_options(self) -> TaskConfig:
        """A misspelt option is refused here, before any stage runs, instead of reaching a loader."""
        for key in self.model_extra or {}:
            if key not in TASK_OPTIONS:
                hint = did_you_mean(key, TASK_OPTIONS)
                raise ValueError(f"unknown option {key!r}{hint}; a task takes name, {', '.join(TASK_OPTIONS)}")
        return self

    def source_options(self, base_dir: Path | None = None) -> dict[str, Any]:
        """The options for `get_task`, with relative file paths resolved against `base_dir`."""
        options = dict(self.model_extra or {})
        if base_dir is not None:
            for key in PATH_OPTIONS:
                if key in options:
                    options[key] = _resolve(options[key], base_dir)
        return options


def _repeated(values: list) -> list:
    """The values that occur more than once, sorted, for error messages."""
    return sorted({v for v in values if values.count(v) > 1})


def _resolve(value: Any, base_dir: Path) -> Any:
    if isinstance(value, str) and value and "://" not in value:
        path = Path(value).expanduser()
        return str(path if path.is_absolute() else (base_dir / path).resolve())
    if isinstance(value, dict):
        return {k: _resolve(v, base_dir) for k, v in value.items()}
    if isinstance(value, list):
        return [_resolve(v, base_dir) for v in value]
    return value


class StatisticsConfig(_Strict):
    """How each task's input statistics are collected: once per task on the base model, and with `grams:
    finetuned` once per adapter on its fine-tuned model (the same sample), cached.

    `pool` names the tasks whose statistics make the subspaces (a merged task leaves its own out); by default
    the merged tasks and every `pool_tasks` entry. `official_pool` is the pool of `osrm-official` alone (default:
    `pool`), since the official code takes every GLUE task's data whichever tasks are merged. A list of `samples_per_task` makes the sample size a study
    axis: the subspaces, and the adapters of every init that starts from them, are made per value; the largest
    (`reference`) is the sample that interference, RegMean's base Grams and the diagnostics read."""

    samples_per_task: int | list[int] = Field(
        64, description="training examples per task fed through the base model (a list: one study per value)"
    )
    batch_size: int = Field(16, gt=0)
    max_length: int = Field(128, gt=0, description="tokens per example after truncation")
    split: Literal["train", "dev"] = "train"
    pool: list[str] | None = Field(
        None, min_length=1, description="tasks whose statistics make the subspaces; default: tasks + pool_tasks"
    )
    official_pool: list[str] | None = Field(
        None, min_length=1, description="the pool of osrm-official's subspaces; default: pool"
    )

    @field_validator("samples_per_task")
    @classmethod
    def _positive_unique_sizes(cls, value: int | list[int]) -> int | list[int]:
        sizes = value if isinstance(value, list) else [value]
        if not sizes or any(n <= 0 for n in sizes) or _repeated(sizes):
            raise ValueError(f"give one positive int or a list of distinct positive ints, got {value!r}")
        return value

    @field_validator("pool", "official_pool")
    @classmethod
    def _unique_pool(cls, pool: list[str] | None) -> list[str] | None:
        if pool is not None and _repeated(pool):
            raise ValueError(f"pool tasks must be unique; repeated: {_repeated(pool)}")
        return pool

    @property
    def sizes(self) -> list[int]:
        """The sample sizes, ascending."""
        return sorted(self.samples_per_task if isinstance(self.samples_per_task, list) else [self.samples_per_task])

    @property
    def reference(self) -> int:
        """The largest sample size: the statistics every stage without a sample-size axis reads."""
        return self.sizes[-1]

    def sample_inputs(self, samples: int | None = None) -> dict[str, Any]:
        """What a statistics sample of `samples` examples (default `reference`) is fingerprinted by."""
        return {"samples_per_task": samples or self.reference, "batch_size": self.batch_size,
                "max_length": self.max_length, "split": self.split}


class SubspaceConfig(_Strict):
    """Options of `subspace.compute_subspaces` for the inits that start from a subspace; `variant` is for the
    inits accepting several (`osrm`), the others use their own (`osrm-mean`: mean, `osrm-official`: official).
    How large A's rows are is each init's `scale` option."""

    variant: Literal[get_init("osrm").variants] = "cov"  # type: ignore[valid-type]
    weighting: Literal["equal", "tokens", "trace"] = "equal"


class InitEntry(BaseModel):
    """One init to compare: a registered init by `name`, its options (the other keys) and the `label` that
    names its adapters folder and report rows (default: the name), so one init can be compared with itself
    under other options."""

    model_config = ConfigDict(extra="allow")

    name: str = Field(min_length=1, description="a registered init (`osrm-lora train --list-inits`)")
    label: str | None = Field(None, pattern=r"^[A-Za-z0-9_.-]+$", description="row label; default: the name")

    @property
    def options(self) -> dict[str, Any]:
        return dict(self.model_extra or {})

    @property
    def entry_label(self) -> str:
        return self.label or self.name

    @model_validator(mode="after")
    def _known_init_and_options(self) -> InitEntry:
        get_init(self.name).parse(self.options)
        return self


@dataclass(frozen=True)
class InitRun:
    """One init entry at one statistics sample size: what a set of adapters is trained with.

    `label` keys its adapters and results (the entry's label, with ``-n<samples>`` when the study has several
    sample sizes); `samples` is None for the inits that use no statistics."""

    label: str
    entry: str
    name: str
    options: dict[str, Any]
    samples: int | None


class FisherConfig(_Strict):
    """How each fine-tuned adapter's diagonal Fisher is estimated for `method: fisher` merges (cached per adapter).

    The sample is drawn with the adapter's training seed, which also seeds the sampled labels."""

    samples: int = Field(64, gt=0, description="examples of the split fed through each fine-tuned model")
    batch_size: int = Field(16, gt=0)
    max_length: int = Field(128, gt=0, description="tokens per example after truncation")
    split: Literal["train", "dev"] = "train"
    labels: Literal["sampled", "empirical"] = Field(
        "sampled",
        description="y drawn from the model (true Fisher, as in Matena & Raffel) or the gold labels",
    )


class EvaluationConfig(_Strict):
    """Where and how every model is scored.

    Each task's evaluation split is cut into two disjoint seeded parts: `select_examples` rows on which each
    merge's λ is chosen, and the `report` rows (the rest, at most `max_examples`) whose scores are reported
    at that λ. Individual adapters are scored on `report`."""

    split: Literal["dev", "test"] = "dev"
    select_examples: int = Field(200, gt=0, description="examples per task held out to choose λ on")
    max_examples: int | None = Field(
        None, gt=0, description="at most N report examples per task (seeded sample of the rest)"
    )
    batch_size: int = Field(64, gt=0)
    max_length: int = Field(128, gt=0)


class ReportConfig(_Strict):
    """How the report compares inits: each against `reference_init`, with seeds as paired replicates."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    reference_init: str | None = Field(
        None, description="the init every other is compared with; default kaiming if listed, else the first"
    )
    level: float = Field(0.95, gt=0, lt=1, description="coverage of the t- and bootstrap intervals")
    resamples: int = Field(2000, gt=0, description="bootstrap replicates")
    threshold: float = Field(
        0.0, ge=0, description="smallest difference (score units) that matters, for the verdicts"
    )


class MergeConfig(_Strict):
    """One merge method, its hyper-parameters and the λ grid it is evaluated on.

    Methods with a global λ (`scaling`) are merged once and evaluated at every λ of the grid; methods without
    one (EMR) are evaluated once and take no `lambdas`.
    """

    method: str = Field(min_length=1, description="a registered merge method (`osrm-lora merge --list`)")
    name: str | None = Field(
        None, pattern=r"^[A-Za-z0-9_.-]+$", description="row label; defaults to the method"
    )
    params: dict[str, Any] = Field(
        default_factory=dict, description="the method's hyper-parameters, except λ"
    )
    lambdas: list[float] | None = Field(None, min_length=1, description=f"λ grid (default {DEFAULT_LAMBDAS})")
    fixed_lambda: float | None = Field(
        None, gt=0, description=f"λ of the fixed-λ view ({DEFAULT_FIXED_LAMBDA})"
    )
    grams: Literal["finetuned", "base"] | None = Field(
        None,
        description="RegMean only: Gram matrices of each fine-tuned model's inputs (default) or the base model's",
    )

    @property
    def label(self) -> str:
        return self.name or self.method

    @property
    def grid(self) -> list[float | None]:
        """The λ values to evaluate; [None] for a method without λ."""
        return list(self.lambdas) if self.lambdas is not None else [None]

    @field_validator("method")
    @classmethod
    def _known_method(cls, method: str) -> str:
        from .merge.registry import get_method

        get_method(method)
        return method

    @field_validator("lambdas")
    @classmethod
    def _positive_unique(cls, values: list[float] | None) -> list[float] | None:
        if values is None:
            return None
        if any(v <= 0 for v in values):
            raise ValueError(f"every λ must be > 0, got {values}")
        if len(set(values)) != len(values):
            raise ValueError(f"λ values must be unique, got {values}")
        return sorted(values)

    @field_validator("params")
    @classmethod
    def _valid_params(cls, params: dict[str, Any], info: ValidationInfo) -> dict[str, Any]:
        from .merge.registry import get_method

        if "scaling" in params:
            raise ValueError("set λ through 'lambdas' and 'fixed_lambda', not params.scaling")
        if "method" in info.data:  # an unknown method is reported on its own key
            spec = get_method(info.data["method"])
            spec.parse({**params, "scaling": 1.0} if spec.post_scale else params)
        return params

    @model_validator(mode="after")
    def _gram_source(self) -> MergeConfig:
        from .merge.registry import get_method

        if "stats" not in get_method(self.method).requires:
            if self.grams is not None:
                raise ValueError(f"merge method {self.method!r} uses no Gram matrices; remove 'grams'")
        elif self.grams is None:
            self.grams = "finetuned"
        return self

    @model_validator(mode="after")
    def _lambda_grid(self) -> MergeConfig:
        from .merge.registry import get_method

        if not get_method(self.method).post_scale:
            if self.lambdas is not None or self.fixed_lambda is not None:
                raise ValueError(
                    f"merge method {self.method!r} has no global λ; remove 'lambdas'/'fixed_lambda'"
                )
            return self
        if self.lambdas is None:
            self.lambdas = list(DEFAULT_LAMBDAS)
        if self.fixed_lambda is None:
            self.fixed_lambda = DEFAULT_FIXED_LAMBDA
        if self.fixed_lambda not in self.lambdas:
            self.lambdas = sorted([*self.lambdas, self.fixed_lambda])
        return self


class ExperimentConfig(_Strict):
    """A whole study: statistics → subspaces → training → evaluation → merging → interference → report."""

    name: str = Field("experiment", min_length=1, pattern=r"^[A-Za-z0-9_.-]+$")
    model: ModelConfig
    tasks: list[TaskConfig] = Field(min_length=2, description="at least two tasks to merge")
    lora: LoraSettings = Field(default_factory=LoraSettings)
    pool_tasks: list[TaskConfig] = Field(
        default_factory=list, description="tasks only in the statistics pool: neither trained nor merged"
    )
    inits: list[InitEntry] = Field(
        default_factory=lambda: [InitEntry(name="kaiming"), InitEntry(name="osrm")], min_length=1,
        description="init names, or mappings {name, label, <options>}",
    )
    subspace: SubspaceConfig = Field(default_factory=SubspaceConfig)
    training: TrainingSettings = Field(default_factory=TrainingSettings)
    statistics: StatisticsConfig = Field(default_factory=StatisticsConfig)
    fisher: FisherConfig = Field(default_factory=FisherConfig)
    evaluation: EvaluationConfig = Field(default_factory=EvaluationConfig)
    merge: list[MergeConfig] = Field(min_length=1)
    interference: bool = Field(True, description="compute interference matrices (needs the statistics)")
    diagnostics: bool = Field(True, description="per-adapter diagnostics from the statistics (needs them)")
    report: ReportConfig = Field(default_factory=ReportConfig)
    seeds: list[int] = Field(default_factory=lambda: [0], min_length=1)
    output_dir: Path = Field(Path("runs/experiment"), description="relative to the experiment file")
    _base_dir: Path | None = PrivateAttr(None)

    @field_validator("model", mode="before")
    @classmethod
    def _model_shorthand(cls, value: Any) -> Any:
        return {"name": value} if isinstance(value, str) else value

    @field_validator("tasks", "pool_tasks", "inits", mode="before")
    @classmethod
    def _name_shorthand(cls, value: Any) -> Any:
        if isinstance(value, list):
            return [{"name": v} if isinstance(v, str) else v for v in value]
        return value

    @field_validator("tasks")
    @classmethod
    def _unique_tasks(cls, tasks: list[TaskConfig]) -> list[TaskConfig]:
        dupes = _repeated([t.name for t in tasks])
        if dupes:
            raise ValueError(f"task names must be unique; repeated: {dupes}")
        return tasks

    @field_validator("inits")
    @classmethod
    def _unique_init_labels(cls, inits: list[InitEntry]) -> list[InitEntry]:
        labels = [i.entry_label for i in inits]
        if _repeated(labels):
            raise ValueError(f"inits need distinct labels; repeated: {_repeated(labels)} (set 'label' on each)")
        return inits

    @model_validator(mode="after")
    def _pool_tasks_are_known(self) -> ExperimentConfig:
        pool_names = [t.name for t in self.pool_tasks]
        if _repeated(self.task_names + pool_names):
            raise ValueError(f"pool_tasks repeat task names: {_repeated(self.task_names + pool_names)}")
        pools = {key: getattr(self.statistics, key) for key in ("pool", "official_pool")}
        for key, pool in pools.items():
            unknown = [t for t in pool or [] if t not in self.task_names + pool_names]
            if unknown:
                raise ValueError(f"statistics.{key} names {unknown}, which are neither in tasks nor in pool_tasks")
        if self.statistics.pool is not None:
            used = self.statistics.pool + (self.statistics.official_pool or [])
            unused = [t for t in pool_names if t not in used]
            if unused:
                raise ValueError(f"pool_tasks {unused} are not in statistics.pool {self.statistics.pool}")
        labels = [run.label for run in self.init_runs]
        if _repeated(labels):
            raise ValueError(f"init labels repeat once the sample sizes are added: {_repeated(labels)}")
        return self

    @field_validator("seeds")
    @classmethod
    def _unique_seeds(cls, seeds: list[int]) -> list[int]:
        if _repeated(seeds):
            raise ValueError(f"seeds must be unique, got {seeds}")
        return seeds

    @field_validator("merge")
    @classmethod
    def _unique_labels(cls, merges: list[MergeConfig]) -> list[MergeConfig]:
        dupes = _repeated([m.label for m in merges])
        if dupes:
            raise ValueError(f"merge entries need distinct names; repeated: {dupes} (set 'name' on each)")
        return merges

    @model_validator(mode="after")
    def _reference_is_compared(self) -> ExperimentConfig:
        ref = self.report.reference_init
        if ref is not None and ref not in self.init_labels:
            raise ValueError(f"report.reference_init {ref!r} is not one of the inits {self.init_labels}")
        return self

    @property
    def task_names(self) -> list[str]:
        return [t.name for t in self.tasks]

    @property
    def reference_init(self) -> str:
        """The init the others are compared with: as set, else kaiming (PEFT's default) if listed, else the first."""
        if self.report.reference_init is not None:
            return self.report.reference_init
        return "kaiming" if "kaiming" in self.init_labels else self.init_labels[0]

    @property
    def pool(self) -> list[str]:
        """The tasks whose statistics make the subspaces."""
        return self.statistics.pool or self.task_names + [t.name for t in self.pool_tasks]

    def pool_for(self, variant: str) -> list[str]:
        """The pool of one subspace variant: `statistics.official_pool` for the official code's, else `pool`."""
        return (self.statistics.official_pool or self.pool) if variant == "official" else self.pool

    def task_entry(self, name: str) -> TaskConfig:
        """The entry of a merged task or of a pool-only task."""
        return next(t for t in [*self.tasks, *self.pool_tasks] if t.name == name)

    @property
    def init_runs(self) -> list[InitRun]:
        """Every init entry at every sample size it depends on, in the order of `inits` then sizes."""
        sizes = self.statistics.sizes
        runs = []
        for entry in self.inits:
            if not get_init(entry.name).needs_stats:
                runs.append(InitRun(entry.entry_label, entry.entry_label, entry.name, entry.options, None))
                continue
            for n in sizes:
                label = entry.entry_label if len(sizes) == 1 else f"{entry.entry_label}-n{n}"
                runs.append(InitRun(label, entry.entry_label, entry.name, entry.options, n))
        return runs

    @property
    def init_labels(self) -> list[str]:
        """The labels adapters, merges and results are keyed by (one per `init_runs` entry)."""
        return [run.label for run in self.init_runs]

    def init_run(self, label: str) -> InitRun:
        return next(run for run in self.init_runs if run.label == label)


def format_validation_error(exc: ValidationError, source: str) -> str:
    """One line per problem: `source: key.path: message (got value)`."""
    lines = []
    for err in exc.errors():
        where = ""
        for part in err["loc"]:
            where += f"[{part}]" if isinstance(part, int) else (f".{part}" if where else str(part))
        message = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            message = "unknown key (check the spelling)"
        got = err.get("input")
        shown = (
            ""
            if err["type"] in ("missing", "extra_forbidden") or isinstance(got, dict)
            else f" (got {got!r})"
        )
        lines.append(f"{source}: {where or '(top level)'}: {message}{shown}")
    return "\n".join(lines)


def parse_experiment(
    data: Any, source: str = "<experiment>", base_dir: Path | None = None
) -> ExperimentConfig:
    """Validate an experiment mapping; relative `output_dir` is resolved against `base_dir`."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: an experiment must be a mapping of keys, got {type(data).__name__}")
    try:
        config = ExperimentConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, source)) from None
    if base_dir is not None:
        if not config.output_dir.is_absolute():
            config.output_dir = (base_dir / config.output_dir).resolve()
        if config.model.name.startswith(("./", "../", "~")):
            config.model.name = _resolve(config.model.name, base_dir)
    config._base_dir = base_dir
    return config


def read_yaml(path: Path, what: str) -> Any:
    """A YAML file's data; a missing file or a syntax error is one line naming the file (and the line)."""
    if not path.is_file():
        raise ConfigError(f"{path}: {what} not found")
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        problem = getattr(exc, "problem", None) or " ".join(str(exc).split())
        raise ConfigError(f"{path}: not valid YAML{where}: {problem}") from None


def load_experiment(path: str | Path) -> ExperimentConfig:
    """Read and validate an experiment YAML file; errors name the file, the line (YAML) or the key."""
    path = Path(path)
    data = read_yaml(path, "experiment file")
    return parse_experiment(data, source=str(path), base_dir=path.parent.resolve())


def base_dir_of(config: ExperimentConfig) -> Path | None:
    """The folder relative task paths are resolved against (the experiment file's)."""
    return config._base_dir


DEMO_RESOURCE = "demo.yaml"


def demo_config_text() -> str:
    """The packaged demo experiment (identical to examples/demo.yaml)."""
    from importlib.resources import files

    return (files("osrm_lora") / "configs" / DEMO_RESOURCE).read_text(encoding="utf-8")


def parse_demo() -> ExperimentConfig:
    """The demo experiment, validated; its output folder is chosen by the caller (`osrm-lora demo -o`)."""
    return parse_experiment(
        yaml.safe_load(demo_config_text()), source=f"osrm_lora/configs/{DEMO_RESOURCE}", base_dir=Path.cwd()
    )


# ------------------------------------------------------------------ the merge file (`osrm-lora merge --config`)
# mergekit's YAML for LoRA adapters: `models:` (each `model:` and `parameters:`), `merge_method:`, `base_model:`,
# global `parameters:`. docs/merge_file.md is the reference; `_parse_merge_file` resolves a file to a registered
# method and its hyper-parameters, every error naming the key.

# mergekit's method names with their registered counterpart and the hyper-parameters that make it that method.
MERGEKIT_METHODS: dict[str, tuple[str, dict[str, Any]]] = {
    "linear": ("task_arithmetic", {}),
    "task_arithmetic": ("task_arithmetic", {}),
    "ties": ("ties", {}),
    "dare_linear": ("dare", {"combine": "linear"}),
    "dare_ties": ("dare", {"combine": "ties"}),
}
MERGEKIT_UNSUPPORTED = (
    "arcee_fusion", "breadcrumbs", "breadcrumbs_ties", "della", "della_linear", "karcher", "model_stock",
    "multislerp", "nearswap", "nuslerp", "passthrough", "sce", "slerp",
)
# mergekit's `normalize` default per method; linear, TIES and DARE-TIES here only work normalized.
_NORMALIZE_DEFAULT = {"linear": True, "task_arithmetic": False, "ties": True, "dare_linear": False, "dare_ties": True}
# With normalize, mergekit divides the weighted sum by the weights' sum; the TIES disjoint mean here already
# divides by the number of agreeing adapters, so its weights are divided by their mean instead (equal weights
# then give mergekit's result whatever their value).
_DIVIDES_BY_COUNT = ("ties", "dare_ties")
_ALWAYS_NORMALIZED = {
    "linear": "a weighted average of whole models is an adapter only when the weights sum to 1",
    "ties": "the disjoint mean divides by the number of agreeing adapters",
    "dare_ties": "the disjoint mean divides by the number of agreeing adapters",
}
# mergekit's top-level keys that do not apply to LoRA adapters, refused with the reason.
_MERGEKIT_ONLY_KEYS = ("chat_template", "dtype", "out_dtype", "slices", "tokenizer", "tokenizer_source")
_INPUT_KINDS = ("stats", "fisher")


class MergeModelEntry(_Strict):
    """One adapter of a merge file and its own parameters."""

    model: str = Field(min_length=1, description="adapter folder (relative to the file) or Hub id user/repo[@rev]")
    parameters: dict[str, Any] = Field(default_factory=dict, description="per-adapter: weight")
    stats: str | None = Field(None, description="its statistics file (RegMean): a path or a Hub file")
    fisher: str | None = Field(None, description="its Fisher diagonal file (Fisher merging): a path or a Hub file")


class MergeFile(_Strict):
    """A merge file as written: mergekit's four keys."""

    merge_method: str = Field(min_length=1, description="a mergekit name (linear, ties, ...) or a registered method")
    models: list[MergeModelEntry] = Field(min_length=1)
    base_model: str | None = Field(None, description="checked against the base the adapters record")
    parameters: dict[str, Any] = Field(default_factory=dict, description="global: lambda, density, weight, ...")


class MergeRecipe(BaseModel):
    """A merge file resolved: what `merge_adapters` takes, plus the base model to check."""

    model_config = ConfigDict(frozen=True)

    method: str  # the registered method
    params: dict[str, Any]  # its hyper-parameters as given (λ as `scaling`, per-adapter `weights`), validated
    adapters: list[str]  # local paths (resolved) or Hub ids, in file order
    inputs: dict[str, list[str]]  # per-adapter input files by kind (stats, fisher)
    base_model: str | None
    written_method: str  # merge_method as written


def _merge_error(source: str, key: str, message: str) -> ConfigError:
    return ConfigError(f"{source}: {key}: {message}")


def _value(source: str, key: str, value: Any, number: bool = False) -> Any:
    """One value: mergekit's per-layer gradients (lists) and filters (mappings) have no per-module meaning here."""
    if isinstance(value, (list, dict)):
        raise _merge_error(source, key, "one value, not a per-layer gradient or filter list (not supported)")
    if number and (isinstance(value, bool) or not isinstance(value, (int, float))):
        raise _merge_error(source, key, f"a number, got {value!r}")
    if isinstance(value, float) and not math.isfinite(value):
        raise _merge_error(source, key, f"a finite number, got {value!r}")
    return value


def _resolve_method(name: str, source: str) -> tuple[str, dict[str, Any]]:
    from .merge.registry import get_method

    if name in MERGEKIT_METHODS:
        return MERGEKIT_METHODS[name]
    if name in MERGEKIT_UNSUPPORTED:
        raise _merge_error(source, "merge_method", f"mergekit's {name!r} has no LoRA counterpart here; mergekit "
                           f"names: {', '.join(MERGEKIT_METHODS)}, or a method of `osrm-lora merge --list`")
    try:
        get_method(name)
    except OsrmLoraError as exc:
        raise _merge_error(source, "merge_method", f"{exc}; mergekit names: {', '.join(MERGEKIT_METHODS)}") from None
    return name, {}


def _global_params(file: MergeFile, method: str, fixed: dict[str, Any], source: str) -> tuple[dict, Any, bool]:
    """The global `parameters:` as the method's hyper-parameters; also the default weight and `normalize`."""
    from .merge.registry import get_method

    written = file.merge_method
    params = {k: _value(source, f"parameters.{k}", v) for k, v in file.parameters.items()}
    if "lambda" in params:
        if "scaling" in params:
            raise _merge_error(source, "parameters.lambda", "give λ once, as lambda or as scaling")
        params["scaling"] = params.pop("lambda")
    if "scaling" in params and not get_method(method).post_scale:
        raise _merge_error(source, "parameters.lambda", f"merge method {method!r} has no global λ")
    params.pop("int8_mask", None)  # mergekit's memory option; merges here are float32
    normalize = params.pop("normalize", _NORMALIZE_DEFAULT.get(written))
    if written not in _NORMALIZE_DEFAULT and normalize is not None:
        raise _merge_error(source, "parameters.normalize", f"mergekit's option; {written!r} takes none")
    if written in _ALWAYS_NORMALIZED and normalize is not True:
        raise _merge_error(source, "parameters.normalize", f"only true for {written}: {_ALWAYS_NORMALIZED[written]}")
    if written.startswith("dare_"):
        if params.pop("rescale", True) is not True:
            raise _merge_error(source, "parameters.rescale", "DARE here always rescales the kept entries by 1/(1-p)")
        if "density" in params:
            if "drop_rate" in params:
                raise _merge_error(source, "parameters.density", "give density (mergekit) or drop_rate, not both")
            density = _value(source, "parameters.density", params.pop("density"), number=True)
            if not 0 < density <= 1:
                raise _merge_error(source, "parameters.density", f"the fraction kept, in (0, 1], got {density!r}")
            params["drop_rate"] = 1.0 - float(density)
    for key, value in fixed.items():
        if params.setdefault(key, value) != value:
            raise _merge_error(source, f"parameters.{key}", f"{written} is {method} with {key}={value!r}")
    return params, params.pop("weight", None), bool(normalize)


def _weights(entries: list[tuple[int, MergeModelEntry]], method: str, default: Any, normalize: bool, source: str,
             written: str) -> list[float] | None:
    """Per-adapter weights: each entry's `parameters.weight`, else the global one, else 1; with normalize,
    divided by their sum (by their mean for TIES). Every other per-adapter parameter is refused, naming it:
    the methods here take them globally only."""
    from .merge.registry import get_method

    takes_weights = "weights" in get_method(method).params.model_fields
    if default is not None:
        _value(source, "parameters.weight", default, number=True)
        if not takes_weights:
            raise _merge_error(source, "parameters.weight", f"merge method {method!r} takes no per-adapter weights")
    given = default is not None
    for i, entry in entries:
        for key, value in entry.parameters.items():
            where = f"models[{i}].parameters.{key}"
            if key != "weight":
                known = key in get_method(method).params.model_fields or key in ("density", "lambda", "normalize")
                raise _merge_error(source, where, f"merge method {method!r} takes {key} only globally; set it once "
                                   "under the top-level `parameters:`" if known else
                                   "unknown per-adapter parameter (per-adapter: weight)")
            if not takes_weights:
                raise _merge_error(source, where, f"merge method {method!r} takes no per-adapter weights")
            _value(source, where, value, number=True)
            given = True
    if not (given or normalize):
        return None
    weights = [float(e.parameters.get("weight", 1.0 if default is None else default)) for _, e in entries]
    if normalize:
        if sum(weights) == 0:
            raise _merge_error(source, "models", "normalize divides the weights by their sum, which is 0")
        divisor = sum(weights) / (len(weights) if written in _DIVIDES_BY_COUNT else 1)
        weights = [w / divisor for w in weights]
    return weights


def _file_path(value: str, base_dir: Path | None) -> str:
    """A path relative to the merge file's folder when it exists there; else as written (a Hub id)."""
    path = Path(value).expanduser()
    if base_dir is not None and not path.is_absolute() and (base_dir / path).exists():
        return str((base_dir / path).resolve())
    return str(path) if value.startswith("~") else value


def _inputs(entries: list[tuple[int, MergeModelEntry]], base_dir: Path | None, source: str) -> dict[str, list[str]]:
    inputs = {}
    for kind in _INPUT_KINDS:
        files = [getattr(e, kind) for _, e in entries]
        if any(files):
            missing = next(i for (i, _), f in zip(entries, files) if not f) if not all(files) else None
            if missing is not None:
                raise _merge_error(source, f"models[{missing}].{kind}", f"missing: give {kind} for every adapter")
            inputs[kind] = [_file_path(f, base_dir) for f in files]
    return inputs


def _parse_merge_file(data: Any, source: str = "<merge file>", base_dir: Path | None = None) -> MergeRecipe:
    """Validate a merge file's data and resolve it to a registered method (docs/merge_file.md). An entry of
    `models:` naming the base model without parameters (mergekit lists it so) is skipped."""
    from .merge.registry import get_method

    if not isinstance(data, dict):
        raise ConfigError(f"{source}: a merge file is a mapping (models:, merge_method:, ...), "
                          f"not a {type(data).__name__}")
    for key in _MERGEKIT_ONLY_KEYS:
        if key in data:
            raise _merge_error(source, key, "mergekit's option does not apply to LoRA adapters (merged and saved in "
                               "float32, with the base model's tokenizer); remove it")
    try:
        file = MergeFile.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, source)) from None
    method, fixed = _resolve_method(file.merge_method, source)
    entries = [(i, e) for i, e in enumerate(file.models) if not (e.model == file.base_model and not e.parameters)]
    if not entries:
        raise _merge_error(source, "models", "no adapter besides the base model")
    params, default_weight, normalize = _global_params(file, method, fixed, source)
    weights = _weights(entries, method, default_weight, normalize, source, file.merge_method)
    if weights is not None:
        params["weights"] = weights
    try:
        get_method(method).parse(params)
    except OsrmLoraError as exc:
        raise _merge_error(source, "parameters", str(exc)) from None
    return MergeRecipe(
        method=method, params=params, adapters=[_file_path(e.model, base_dir) for _, e in entries],
        inputs=_inputs(entries, base_dir, source), written_method=file.merge_method,
        base_model=_file_path(file.base_model, base_dir) if file.base_model else None,
    )


def load_merge_file(path: str | Path) -> MergeRecipe:
    """Read and resolve a merge YAML file; relative adapter and input paths are relative to its folder."""
    path = Path(path)
    return _parse_merge_file(read_yaml(path, "merge file"), source=str(path), base_dir=path.parent.resolve())


def check_base_model(recipe: MergeRecipe, recorded: dict[str, list[str]], source: str) -> None:
    """The file's `base_model` must be the base of every adapter. `recorded` lists, per adapter, the names its
    base goes by (PEFT's base_model_name_or_path, the name osrm-lora trained it with); one matches when it is
    the same string or the same folder. An adapter that records no base is not checked."""
    given = recipe.base_model
    if given is None:
        return
    for adapter, names in recorded.items():
        if names and not any(name == given or _same_folder(name, given) for name in names):
            raise _merge_error(source, "base_model", f"{given!r}, but adapter {adapter!r} records base "
                               f"{' / '.join(repr(n) for n in names)}")


def _same_folder(a: str, b: str) -> bool:
    return Path(a).is_dir() and Path(b).is_dir() and Path(a).resolve() == Path(b).resolve()
