"""Measuring adapters: `eval` scores one on a task, `interference` measures how much each disturbs the others."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from .common import fail, load_task, out, print_json, quiet_libraries, to_stderr
from .options import (
    FilesOpt,
    GlueDirOpt,
    JsonOpt,
    MaxLengthOpt,
    ModelOpt,
    QuietOpt,
    TaskOpt,
    TaskOptionOpt,
    TrustRemoteCodeOpt,
)

app = typer.Typer()


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
    as_json: JsonOpt = False,
) -> None:
    """Score an adapter on a task's split with the task's metrics (batched, no gradients)."""
    from ..adapters import LoraAdapter
    from ..evaluate import EvaluationModel, evaluate_task
    from ..runtime.weights import task_head

    quiet_libraries()
    the_task = load_task(task, glue_dir, files, task_option)
    lora = LoraAdapter.load(adapter)
    head_tensors = task_head(LoraAdapter.load(head) if head else lora)
    if not head_tensors:
        fail(f"{adapter}: carries no task head; pass --head with the task's own adapter folder")
    evaluator = EvaluationModel.load(model, the_task.spec, trust_remote_code=trust_remote_code)
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
        list[Path], typer.Argument(help="PEFT adapter folders, named by task (folder names)")
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
    as_json: JsonOpt = False,
) -> None:
    """Interference matrix: how much adapter j disturbs task i's activations, relative to task i's own.

    Computed exactly from the statistics' second moments; the smaller off the diagonal, the safer the merge.
    """
    from ..adapters import LoraAdapter
    from ..interference import interference_matrix
    from ..io import write_json
    from ..stats import TaskStats

    loaded = {a.name: a for a in (LoraAdapter.load(p) for p in adapters)}
    paths = [f for p in stats_files for f in (sorted(p.glob("*.safetensors")) if p.is_dir() else [p])]
    pool = {s.task: s for s in (TaskStats.load(p) for p in paths)}
    result = interference_matrix(loaded, pool)
    data = {"tasks": result.tasks, "matrix": result.matrix.tolist()}
    if out_file is not None:
        write_json(out_file, {**data, "per_module": {m: v.tolist() for m, v in result.per_module.items()}})
    if as_json:
        print_json(data)
        return
    table = Table("task i (data) \\ adapter j", *result.tasks)
    for name, row in zip(result.tasks, result.matrix):
        table.add_row(name, *(f"{v:.3g}" for v in row))
    out.print(table)
