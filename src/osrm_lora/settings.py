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
# Every option of a task entry: `tasks.get_task`'s keywords (`tasks.registry.task_options`; a test checks they
# agree), listed here so that an experiment is checked without importing the data libraries.
TASK_OPTIONS = (
    "source", "glue_dir", "include_extra_train", "files", "progress", "text_column", "text_pair_column",
    "label_column", "label_names", "regression", "metrics", "primary_metric", "format", "quoting",
)
STAGES = ("stats", "subspaces", "train", "eval", "fisher", "grams", "merge", "interference", "report")


class ConfigError(OsrmLoraError):
    """An experiment file that cannot be used; the message names the file and the key."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


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
    finetuned` once per adapter on its fine-tuned model (the same sample), cached."""

    samples_per_task: int = Field(
        64, gt=0, description="training examples per task fed through the base model"
    )
    batch_size: int = Field(16, gt=0)
    max_length: int = Field(128, gt=0, description="tokens per example after truncation")
    split: Literal["train", "dev"] = "train"


class SubspaceConfig(_Strict):
    """Options of `subspace.compute_subspaces` for the inits that start from a subspace; `variant` is for the
    inits accepting several (`osrm`), the others use their own (`osrm-mean`: mean)."""

    variant: Literal[get_init("osrm").variants] = "cov"  # type: ignore[valid-type]
    weighting: Literal["equal", "tokens", "trace"] = "equal"
    scale: Literal["orthonormal", "kaiming"] = "orthonormal"


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
    """Where and how every model is scored."""

    split: Literal["dev", "test"] = "dev"
    max_examples: int | None = Field(None, gt=0, description="first N examples of the split (seeded sample)")
    batch_size: int = Field(64, gt=0)
    max_length: int = Field(128, gt=0)


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
    inits: list[str] = Field(default_factory=lambda: ["gaussian", "osrm"], min_length=1)
    subspace: SubspaceConfig = Field(default_factory=SubspaceConfig)
    training: TrainingSettings = Field(default_factory=TrainingSettings)
    statistics: StatisticsConfig = Field(default_factory=StatisticsConfig)
    fisher: FisherConfig = Field(default_factory=FisherConfig)
    evaluation: EvaluationConfig = Field(default_factory=EvaluationConfig)
    merge: list[MergeConfig] = Field(min_length=1)
    interference: bool = Field(True, description="compute interference matrices (needs the statistics)")
    seeds: list[int] = Field(default_factory=lambda: [0], min_length=1)
    output_dir: Path = Field(Path("runs/experiment"), description="relative to the experiment file")
    _base_dir: Path | None = PrivateAttr(None)

    @field_validator("model", mode="before")
    @classmethod
    def _model_shorthand(cls, value: Any) -> Any:
        return {"name": value} if isinstance(value, str) else value

    @field_validator("tasks", mode="before")
    @classmethod
    def _task_shorthand(cls, value: Any) -> Any:
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
    def _known_inits(cls, inits: list[str]) -> list[str]:
        for init in inits:
            get_init(init)
        if _repeated(inits):
            raise ValueError(f"inits must be unique, got {inits}")
        return inits

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

    @property
    def task_names(self) -> list[str]:
        return [t.name for t in self.tasks]


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
