"""Measuring adapters: `eval` scores one on a task, `interference` measures how much each disturbs the others."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from .. import identity
from .common import fail, input_paths, load_task, out, print_json, quiet_libraries, to_stderr
from .options import (
    AllowMismatchOpt,
    FilesOpt,
    GlueDirOpt,
    JsonOpt,
    MaxLengthOpt,
    ModelOpt,
    OverwriteOpt,
    QuietOpt,
    TaskOpt,
    TaskOptionOpt,
    TrustRemoteCodeOpt,
)

app = typer.Typer()
INTERFERENCE_FORMAT = "osrm-lora/interference/1"  # the `format` an `interference --out` file records


@app.command(
    "eval",
    epilog="Example: osrm-lora eval --model builtin:minilm --task trec --adapter merged --head adapters/trec",
)
def evaluate_cmd(
    model: ModelOpt,
    task: TaskOpt,
    adapter: Annotated[
        Path, typer.Option("--adapter", "-a", help="PEFT adapter folder (individual or merged)")
    ],
    head: Annotated[
        Path | None, typer.Option("--head", help="take the task head from this adapter folder")
    ] = None,
    split: Annotated[str, typer.Option("--split")] = "dev",
    max_examples: Annotated[int | None, typer.Option("--max-examples", min=1)] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1)] = 64,
    max_length: MaxLengthOpt = 128,
    glue_dir: GlueDirOpt = None,
    files: FilesOpt = None,
    task_option: TaskOptionOpt = None,
    trust_remote_code: TrustRemoteCodeOpt = False,
    quiet: QuietOpt = False,
    allow_model_mismatch: AllowMismatchOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Score an adapter on a task's split with the task's metrics (batched, no gradients).

    An adapter (or --head) that osrm-lora trained records its base model; another --model is refused.
    \f
    Long because typer declares each of its 15 options as a parameter; the body is 41 lines.
    """
    from ..adapters import LoraAdapter
    from ..evaluate import EvaluationModel, evaluate_task
    from ..runtime.weights import task_head

    quiet_libraries()
    the_task = load_task(task, glue_dir, files, task_option)
    lora = LoraAdapter.load(adapter)
    head_adapter = LoraAdapter.load(head) if head else lora
    head_tensors = task_head(head_adapter)
    if not head_tensors:
        fail(f"{adapter}: carries no task head; pass --head with the task's own adapter folder")
    evaluator = EvaluationModel.load(model, the_task.spec, trust_remote_code=trust_remote_code)
    with identity.allow_model_mismatch(allow_model_mismatch):
        _check_base_model(model, evaluator.model, [lora, head_adapter])
    _check_head(head_tensors, evaluator.model, the_task, head or adapter)
    dressed = evaluator.apply(lora.deltas(), head_tensors, source=str(adapter))
    with to_stderr():
        metrics = evaluate_task(
            dressed,
            evaluator.tokenizer,
            the_task,
            split=split,
            max_examples=max_examples,
            batch_size=batch_size,
            max_length=max_length,
            progress=not quiet,
        )
    if as_json:
        print_json(
            {
                "task": the_task.name,
                "split": split,
                "primary_metric": the_task.spec.primary_metric,
                "metrics": metrics,
            }
        )
        return
    table = Table("metric", "value", title=f"{the_task.name} ({split})", title_justify="left")
    for key, value in metrics.items():
        table.add_row(key + (" (primary)" if key == the_task.spec.primary_metric else ""), f"{value:.4f}")
    out.print(table)


def _check_base_model(name: str, model, adapters: list) -> None:
    """Each adapter that records its base model (trained by osrm-lora) must record this one."""
    from ..stats import model_identity

    given = model_identity(model, "--model", name)
    for adapter in adapters:
        recorded = adapter.identity()
        if recorded is not None:
            identity.check_same_model(recorded, given)


def _check_head(head: dict, model, task, source: Path) -> None:
    """A head of another task's size would score without error and mean nothing: refused before evaluating."""
    from ..errors import EvaluationError

    params = dict(model.named_parameters())
    for key, tensor in head.items():
        wanted = params.get(key)
        if wanted is not None and tuple(tensor.shape) != tuple(wanted.shape):
            raise EvaluationError(
                f"{source}: head tensor {key} is {tuple(tensor.shape)}, but task {task.name!r} "
                f"({task.spec.num_labels} outputs) needs {tuple(wanted.shape)}: the head is another task's; "
                f"pass --head with an adapter trained on this task"
            )


@app.command(
    epilog="Example: osrm-lora interference runs/demo/adapters/osrm/seed0/* --stats runs/demo/stats --json",
)
def interference(
    adapters: Annotated[
        list[Path], typer.Argument(help="PEFT adapter folders, one per task (the task each records, else the "
                                   "folder name)")
    ],
    stats_files: Annotated[
        list[Path],
        typer.Option(
            "--stats",
            help="statistics of the same tasks: a folder of .safetensors files, or files (repeatable)",
        ),
    ],
    out_file: Annotated[
        Path | None, typer.Option("--out", "-o", help="also write the result as JSON here")
    ] = None,
    overwrite: OverwriteOpt = False,
    allow_model_mismatch: AllowMismatchOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Interference matrix: how much adapter j disturbs task i's activations, relative to task i's own.

    Computed exactly from the statistics' second moments; the smaller off the diagonal, the safer the merge.
    """
    from ..adapters import LoraAdapter
    from ..errors import AdapterError
    from ..interference import by_task, interference_matrix
    from ..io import check_output, write_json
    from ..stats import TaskStats

    inputs = input_paths(adapters, stats_files)
    if out_file is not None:  # refused before anything is read
        check_output(out_file, INTERFERENCE_FORMAT, folder=False, overwrite=overwrite, inputs=inputs)
    loaded = by_task((LoraAdapter.load(p) for p in adapters), "adapters", AdapterError)
    paths = [f for p in stats_files for f in (sorted(p.glob("*.safetensors")) if p.is_dir() else [p])]
    pool = by_task((TaskStats.load(p) for p in paths), "statistics")
    with identity.allow_model_mismatch(allow_model_mismatch):
        result = interference_matrix(loaded, pool)
    data = {"tasks": result.tasks, "matrix": result.matrix.tolist()}
    if out_file is not None:
        write_json(out_file, {**data, "per_module": {m: v.tolist() for m, v in result.per_module.items()}},
                   kind=INTERFERENCE_FORMAT, overwrite=overwrite, inputs=inputs)
    if as_json:
        print_json(data)
        return
    table = Table("task i (data) \\ adapter j", *result.tasks)
    for name, row in zip(result.tasks, result.matrix):
        table.add_row(name, *(f"{v:.3g}" for v in row))
    out.print(table)
