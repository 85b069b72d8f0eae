"""The study's steps on plain files: collect `stats`, compute OSRM subspaces (`init`), `train` an adapter."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from ..inits import get_init, list_inits
from .common import fail, interrupted, load_task, out, print_json, print_listing, quiet_libraries, to_stderr
from .options import (
    MODEL,
    TASK,
    FilesOpt,
    GlueDirOpt,
    JsonOpt,
    MaxLengthOpt,
    ModelOpt,
    PushOpt,
    QuietOpt,
    TaskOpt,
    TaskOptionOpt,
    TrustRemoteCodeOpt,
)

app = typer.Typer()


@app.command(
    epilog="Example: osrm-lora stats --model builtin:minilm --task trec --samples 64 --out trec.safetensors"
)
def stats(
    model: ModelOpt,
    task: TaskOpt,
    out_file: Annotated[Path, typer.Option("--out", "-o", help="statistics file to write (.safetensors)")],
    samples: Annotated[
        int, typer.Option("--samples", min=1, help="examples of the split to feed through the model")
    ] = 64,
    split: Annotated[str, typer.Option("--split", help="split to sample")] = "train",
    seed: Annotated[int, typer.Option("--seed", help="seed of the sample of the split")] = 0,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1, help="per process")] = 16,
    max_length: MaxLengthOpt = 128,
    target_modules: Annotated[
        str | None,
        typer.Option(
            "--target-modules", help="comma-separated module names (default: the model type's query/value)"
        ),
    ] = None,
    glue_dir: GlueDirOpt = None,
    files: FilesOpt = None,
    task_option: TaskOptionOpt = None,
    trust_remote_code: TrustRemoteCodeOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Collect a task's input statistics (Σxxᵀ, Σx per target module) on the base model.

    Runs on several GPUs or nodes unchanged under `torchrun` or `accelerate launch` (`-m osrm_lora.cli
    stats ...`): each process feeds its share of the sample, the sums are all-reduced, rank 0 writes.
    """
    from ..distributed import collect_task_stats, init_from_env, is_main
    from ..io import check_output
    from ..stats import FORMAT

    check_output(out_file, FORMAT, folder=False)  # refused before the model runs, not after
    quiet_libraries()
    init_from_env()
    the_task = load_task(task, glue_dir, files, task_option)
    with to_stderr():
        result = collect_task_stats(
            the_task,
            model,
            split=split,
            samples=samples,
            seed=seed,
            batch_size=batch_size,
            max_length=max_length,
            target_modules=target_modules.split(",") if target_modules else None,
            out_path=out_file,
            trust_remote_code=trust_remote_code,
            progress=not quiet,
        )
    if is_main():
        out.print(f"{out_file}: task {the_task.name}, {len(result.modules)} modules, {result.tokens} tokens")


@app.command("init", epilog="Example: osrm-lora init stats/*.safetensors --rank 8 --out subspaces/")
def init_subspaces(
    stats_files: Annotated[
        list[Path],
        typer.Argument(help="statistics files of every task (from `osrm-lora stats`); Hub files "
                       "user/repo/path[@revision] too"),
    ],
    out_dir: Annotated[
        Path, typer.Option("--out", "-o", help="folder for one <task>.safetensors subspace per task")
    ],
    rank: Annotated[
        int, typer.Option("--rank", "-r", min=1, help="directions per module (≥ the LoRA rank)")
    ] = 8,
    variant: Annotated[
        str, typer.Option("--variant", help="cov (paper), centered, or mean (official code)")
    ] = "cov",
    weighting: Annotated[str, typer.Option("--weighting", help="equal, tokens or trace")] = "equal",
    scale: Annotated[
        str, typer.Option("--scale", help="orthonormal rows, or kaiming (PEFT's init norm)")
    ] = "orthonormal",
    as_json: JsonOpt = False,
) -> None:
    """Compute OSRM subspaces: each task's lora_A init from the OTHER tasks' statistics (leave-one-out).

    Train with them via `osrm-lora train --init osrm --subspace subspaces/<task>.safetensors`, or in your own
    trainer with `osrm_lora.osrm_init(peft_model, Subspace.load(path))`.
    """
    from ..hub import hub_file
    from ..stats import TaskStats
    from ..subspace import compute_subspaces

    pool = [TaskStats.load(hub_file(p)) for p in stats_files]
    subspaces = compute_subspaces(pool, rank, variant=variant, weighting=weighting, scale=scale)
    summary = {}
    for name, subspace in subspaces.items():
        path = out_dir / f"{name}.safetensors"
        subspace.save(path)
        energies = list(subspace.energy.values())
        summary[name] = {
            "path": str(path),
            "others": subspace.others,
            # a share of a PSD moment: ≥ 0, and a tiny negative mean is float noise
            "mean_captured_energy": max(0.0, sum(energies) / max(len(energies), 1)),
        }
    if as_json:
        print_json(summary)
        return
    table = Table("task", "subspace", "other tasks", "other-task energy in the subspace")
    for name, info in summary.items():
        table.add_row(name, info["path"], ", ".join(info["others"]), f"{info['mean_captured_energy']:.3g}")
    out.print(table)


def _inits_table(inits: list[dict]) -> Table:
    table = Table("init", "summary", "needs statistics", "mutates base", "options", show_lines=True)
    for i in inits:
        options = "\n".join(f"{o['name']}: {o['type']} = {o['default']!r}" for o in i["options"]) or "-"
        stats_need = f"yes ({', '.join(i['variants'])})" if i["needs_stats"] and i["variants"] else (
            "yes" if i["needs_stats"] else "no"
        )
        table.add_row(i["name"], i["summary"], stats_need, "yes" if i["mutates_base"] else "no", options)
    return table


def _settings_sections(path: Path) -> dict[str, dict]:
    """The --settings file's `lora:` and `training:` sections. Any experiment-file section may be there (an
    experiment file serves); another key is a typo, refused rather than leaving the defaults in force."""
    from ..errors import did_you_mean
    from ..settings import ConfigError, ExperimentConfig, read_yaml

    data = read_yaml(path, "settings file") or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a settings file is a mapping with `lora:` and `training:` sections, "
                          f"not a {type(data).__name__}")
    known = list(ExperimentConfig.model_fields)
    for key, value in data.items():
        if key not in known:
            raise ConfigError(f"{path}: unknown section {key!r}{did_you_mean(str(key), known)}; train reads "
                              f"`lora:` and `training:`")
        if key in ("lora", "training") and not isinstance(value or {}, dict):
            raise ConfigError(f"{path}: {key}: a mapping of settings, not a {type(value).__name__}")
    return {key: dict(data.get(key) or {}) for key in ("lora", "training")}


def _train_settings(path: Path | None, r: int | None, flags: dict[str, Any], quiet: bool):
    """The LoRA and training settings: the --settings file's `lora:`/`training:` sections, then the flags."""
    from pydantic import ValidationError

    from ..settings import ConfigError, LoraSettings, TrainingSettings, format_validation_error

    sections = _settings_sections(path) if path else {"lora": {}, "training": {}}
    lora_opts, train_opts = sections["lora"], sections["training"]
    if r is not None:
        lora_opts["r"] = r
    train_opts.update({k: v for k, v in flags.items() if v is not None})
    if quiet:
        train_opts["progress"] = False
    try:
        return LoraSettings.model_validate(lora_opts), TrainingSettings.model_validate(train_opts)
    except ValidationError as exc:  # name the file the bad key came from
        raise ConfigError(format_validation_error(exc, str(path or "options"))) from None


INIT_HELP = f"LoRA init: {', '.join(i['name'] for i in list_inits())} (see --list-inits)"


@app.command(
    epilog="Examples:\n\n"
    "  osrm-lora train --list-inits\n\n"
    "  osrm-lora train --model builtin:minilm --task trec --init osrm "
    "--subspace subspaces/trec.safetensors --out adapters/trec --max-steps 200",
)
def train(
    model: Annotated[str | None, MODEL] = None,
    task: Annotated[str | None, TASK] = None,
    out_dir: Annotated[
        Path | None, typer.Option("--out", "-o", help="adapter folder to write (PEFT format, with the head)")
    ] = None,
    init: Annotated[str, typer.Option("--init", help=INIT_HELP)] = "gaussian",
    subspace: Annotated[
        Path | None,
        typer.Option("--subspace", help="the task's subspace (for osrm inits): a file or a Hub file "
                     "user/repo/path[@revision]"),
    ] = None,
    settings: Annotated[
        Path | None,
        typer.Option(
            "--settings", help="YAML with `lora:` and `training:` sections (as in an experiment file)"
        ),
    ] = None,
    r: Annotated[int | None, typer.Option("--r", min=1, help="LoRA rank")] = None,
    lr: Annotated[float | None, typer.Option("--lr", help="learning rate")] = None,
    max_steps: Annotated[
        int | None, typer.Option("--max-steps", min=1, help="optimizer steps (overrides epochs)")
    ] = None,
    epochs: Annotated[float | None, typer.Option("--epochs")] = None,
    batch_size: Annotated[int | None, typer.Option("--batch-size", min=1)] = None,
    seed: Annotated[int, typer.Option("--seed")] = 0,
    resume: Annotated[
        bool, typer.Option("--resume", help="continue an interrupted run from its last checkpoint")
    ] = False,
    glue_dir: GlueDirOpt = None,
    files: FilesOpt = None,
    task_option: TaskOptionOpt = None,
    trust_remote_code: TrustRemoteCodeOpt = False,
    list_inits_: Annotated[
        bool, typer.Option("--list-inits", help="list the inits: what each needs and changes, its options")
    ] = False,
    push_to_hub: PushOpt = None,
    quiet: QuietOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Fine-tune one LoRA adapter (and its task head) on one task.

    Runs on several GPUs unchanged under `torchrun` or `accelerate launch` (`-m osrm_lora.cli train ...`).
    """
    if list_inits_:
        print_listing(list_inits(), as_json, _inits_table)
        return
    if model is None or task is None or out_dir is None:
        fail("give --model, --task and --out (or --list-inits to see the inits)")
    get_init(init)  # an unknown name fails here, before any loading
    if push_to_hub is not None:
        from ..hub import check_repo_id

        check_repo_id(push_to_hub)
    lora, training = _train_settings(
        settings, r, {"lr": lr, "max_steps": max_steps, "epochs": epochs, "batch_size": batch_size}, quiet
    )
    from ..distributed import is_main
    from ..hub import hub_file
    from ..subspace import Subspace
    from ..train import finetune, partial_dir

    quiet_libraries()
    the_task = load_task(task, glue_dir, files, task_option)
    try:
        with to_stderr():
            result = finetune(
                the_task,
                model,
                out_dir,
                init=init,
                subspace=Subspace.load(hub_file(subspace)) if subspace else None,
                lora=lora,
                training=training,
                seed=seed,
                resume=resume,
                trust_remote_code=trust_remote_code,
            )
    except KeyboardInterrupt:
        interrupted(f"checkpoints are kept in {partial_dir(out_dir)}; run the same command with --resume to "
                    f"continue from the last one")
    if is_main():  # every process returns the result; one prints it (and pushes)
        _print_trained(result, as_json, _push_trained(result, push_to_hub) if push_to_hub else None)


def _push_trained(result, repo_id: str) -> str:
    from ..hub import push_folder, train_card
    from .common import err

    url = push_folder(result.path, repo_id, train_card(result.metadata),
                      f"osrm-lora train: {result.metadata['task']}, init {result.metadata['init']}")
    err.print(f"pushed {result.path} to {url}")
    return url


def _print_trained(result, as_json: bool, url: str | None) -> None:
    if as_json:
        print_json(
            {
                "path": str(result.path),
                "metrics": result.metrics,
                "steps": result.steps,
                "train_loss": result.train_loss,
                "wall_time_s": result.wall_time,
                **({"url": url} if url else {}),
            }
        )
        return
    metrics = ", ".join(f"{k} {v:.4g}" for k, v in result.metrics.items())
    out.print(
        f"{result.path}: {result.steps} steps, train loss {result.train_loss:.4g}; dev: {metrics or 'n/a'}"
    )
