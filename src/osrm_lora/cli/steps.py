"""The study's steps on plain files: collect `stats`, compute OSRM subspaces (`init`), `train` an adapter."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from .. import identity
from ..inits import get_init, list_inits
from .common import (
    fail,
    input_paths,
    interrupted,
    key_values,
    load_task,
    out,
    print_json,
    print_listing,
    quiet_libraries,
    to_stderr,
)
from .options import (
    MODEL,
    TASK,
    AllowMismatchOpt,
    FilesOpt,
    GlueDirOpt,
    JsonOpt,
    MaxLengthOpt,
    ModelOpt,
    OverwriteOpt,
    PushOpt,
    QuietOpt,
    TaskOpt,
    TaskOptionOpt,
    TrustRemoteCodeOpt,
    float_option,
)

app = typer.Typer()


@app.command(
    epilog="Examples:\n\n"
    "  osrm-lora stats --model builtin:minilm --task trec --samples 64 --out trec.safetensors\n\n"
    "  osrm-lora stats --model builtin:minilm --task trec --samples 100 --padded --out padded/trec.safetensors"
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
    batch_size: Annotated[
        int, typer.Option("--batch-size", min=1, help="per process (with --padded: one example at a time)")
    ] = 16,
    max_length: MaxLengthOpt = 128,
    target_modules: Annotated[
        str | None,
        typer.Option(
            "--target-modules", help="comma-separated module names (default: the model type's query/value)"
        ),
    ] = None,
    padded: Annotated[
        bool,
        typer.Option("--padded", help="the official OSRM code's padded means, for `init --variant official`: "
                     "its own seeded sample, each example padded to --max-length, padding counted"),
    ] = False,
    glue_dir: GlueDirOpt = None,
    files: FilesOpt = None,
    task_option: TaskOptionOpt = None,
    trust_remote_code: TrustRemoteCodeOpt = False,
    overwrite: OverwriteOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Collect a task's input statistics (Σxxᵀ, Σx per target module) on the base model.

    Runs on several GPUs or nodes unchanged under `torchrun` or `accelerate launch` (`-m osrm_lora.cli
    stats ...`): each process feeds its share of the sample, the sums are all-reduced, rank 0 writes.
    \f
    Long because typer declares each of its 16 options as a parameter; the body is 30 lines.
    """
    from ..distributed import collect_task_stats, init_from_env, is_main
    from ..io import check_output
    from ..stats import FORMAT

    inputs = input_paths(model, glue_dir, files=files)
    check_output(out_file, FORMAT, folder=False, overwrite=overwrite, inputs=inputs)  # before the model runs
    quiet_libraries()
    init_from_env()
    the_task = load_task(task, glue_dir, files, task_option)
    common = {
        "split": split,
        "samples": samples,
        "seed": seed,
        "max_length": max_length,
        "target_modules": target_modules.split(",") if target_modules else None,
        "out_path": out_file,
        "progress": not quiet,
        "overwrite": overwrite,
        "inputs": inputs,
    }
    with to_stderr():
        if padded:
            result = _padded_means(the_task, model, trust_remote_code, **common)
        else:
            result = collect_task_stats(the_task, model, batch_size=batch_size, trust_remote_code=trust_remote_code,
                                        **common)
    if is_main():
        what = "padded means, " if padded else ""
        out.print(f"{out_file}: task {the_task.name}, {what}{len(result.modules)} modules, {result.tokens} tokens")


def _padded_means(task, model: str, trust_remote_code: bool, **options):
    """The official OSRM code's padded means: `inits.official_tensors.official_stats`, the function that writes
    an experiment's stats/padded/ files, on the model loaded as for plain statistics."""
    from ..distributed import load_on_device
    from ..inits.official_tensors import official_stats

    loaded, tokenizer = load_on_device(model, task, trust_remote_code=trust_remote_code)
    return official_stats(task, loaded, tokenizer, model_id=model, **options)


@app.command(
    "init",
    epilog="Examples:\n\n"
    "  osrm-lora init stats/*.safetensors --rank 8 --out subspaces/\n\n"
    "  osrm-lora init padded/*.safetensors --variant official --rank 8 --out official/",
)
def init_subspaces(
    stats_files: Annotated[
        list[Path],
        typer.Argument(help="statistics files of every task (from `osrm-lora stats`; `stats --padded` for "
                       "--variant official); Hub files user/repo/path[@revision] too"),
    ],
    out_dir: Annotated[
        Path, typer.Option("--out", "-o", help="folder for one <task>.safetensors subspace per task")
    ],
    rank: Annotated[
        int, typer.Option("--rank", "-r", min=1, help="directions per module (≥ the LoRA rank)")
    ] = 8,
    variant: Annotated[
        str,
        typer.Option("--variant", help="cov (paper), centered, mean (null space of the others' means), or "
                     "official (the official code's, from padded means)"),
    ] = "cov",
    weighting: Annotated[
        str, typer.Option("--weighting", help="equal, tokens or trace (official stacks the means unweighted)")
    ] = "equal",
    overwrite: OverwriteOpt = False,
    allow_model_mismatch: AllowMismatchOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Compute OSRM subspaces: each task's lora_A init from the OTHER tasks' statistics (leave-one-out).

    Train with them via `osrm-lora train --init osrm --subspace subspaces/<task>.safetensors` (`--init
    osrm-official` for --variant official), or in your own trainer with `osrm_lora.osrm_init(peft_model,
    Subspace.load(path))`.
    \f
    Long because typer declares each of its 8 options as a parameter; the body is 35 lines.
    """
    from ..forecast import summarise
    from ..hub import hub_file
    from ..io import check_output
    from ..stats import TaskStats
    from ..subspace import FORMAT, OFFICIAL, VARIANTS

    if variant not in (*VARIANTS, OFFICIAL):
        fail(f"--variant {variant!r}: choose one of {', '.join((*VARIANTS, OFFICIAL))}")
    local = [hub_file(p) for p in stats_files]
    pool = [TaskStats.load(p) for p in local]
    _check_padding(stats_files, pool, variant)
    paths = {s.task: out_dir / f"{s.task}.safetensors" for s in pool}
    for path in paths.values():  # refused before computing, not after
        check_output(path, FORMAT, folder=False, overwrite=overwrite, inputs=local)
    with identity.allow_model_mismatch(allow_model_mismatch):
        subspaces = _subspaces(pool, rank, variant, weighting)
    summary = {}
    for name, subspace in subspaces.items():
        path = paths[name]
        subspace.save(path, overwrite=overwrite, inputs=local)
        energies = list(subspace.energy.values())
        summary[name] = {
            "path": str(path),
            "others": subspace.others,
            # a share of a PSD moment: ≥ 0, and a tiny negative mean is float noise
            "mean_captured_energy": max(0.0, sum(energies) / max(len(energies), 1)),
            "forecast": summarise(subspace.spectrum),
        }
    if as_json:
        print_json(summary)
        return
    table = Table("task", "subspace", "other tasks", "other-task energy in the subspace")
    for name, info in summary.items():
        table.add_row(name, info["path"], ", ".join(info["others"]), f"{info['mean_captured_energy']:.3g}")
    out.print(table)
    _print_forecast({name: info["forecast"] for name, info in summary.items() if info["forecast"]})


def _check_padding(paths: list[Path], pool: list, variant: str) -> None:
    """Padded means (`stats --padded`) make the official subspaces and nothing else: a file of the wrong kind
    is named before any work."""
    from ..subspace import OFFICIAL

    for path, stats in zip(paths, pool):
        padded = stats.extra.get("mask_padding") == "false"
        if variant == OFFICIAL and not padded:
            fail(f"{path}: statistics over real tokens; --variant official reads the official code's padded "
                 f"means (osrm-lora stats --padded)")
        if variant != OFFICIAL and padded:
            fail(f"{path}: padded means (osrm-lora stats --padded) are for --variant official only; --variant "
                 f"{variant} reads statistics over real tokens (osrm-lora stats without --padded)")


def _subspaces(pool: list, rank: int, variant: str, weighting: str) -> dict:
    """Every task's subspace from the other files' statistics: the functions of the experiment pipeline's
    subspaces stage (`official_subspaces` for the official code's variant, else `compute_subspaces`)."""
    from ..subspace import OFFICIAL, compute_subspaces, official_subspaces

    if variant == OFFICIAL:
        return official_subspaces(pool, rank)
    return compute_subspaces(pool, rank, variant=variant, weighting=weighting)


def _print_forecast(forecasts: dict[str, dict]) -> None:
    """The forecast table (docs/modes.md) and a plain sentence for every task the OSRM subspace starves; none
    for subspaces without a forecast (the official code's)."""
    from ..forecast import verdict

    if not forecasts:
        return
    table = Table("task", "OSRM: own", "OSRM: others", "contrast: own", "contrast: others", "null dim of Σ₋ᵢ",
                  title="Forecast: energy the rows capture, × the isotropic share r/d (mean over modules)")
    for name, f in forecasts.items():
        table.add_row(name, *(f"{f[mode][who]:.3g}" for mode in ("osrm", "contrast") for who in ("own", "others")),
                      str(f["others_null_dim"]))
    out.print(table)
    for name, f in forecasts.items():
        if f["starves"]:
            out.print(verdict(name, f))


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
    init: Annotated[str, typer.Option("--init", help=INIT_HELP)] = "kaiming",
    init_option: Annotated[
        list[str] | None,
        typer.Option("--init-option", help="the init's option key=value, e.g. scale=kaiming (see --list-inits)"),
    ] = None,
    merged_tasks: Annotated[
        str | None,
        typer.Option("--merged-tasks", help="comma-separated tasks the adapter will be merged with, in merge "
                     "order (task-orthogonal gives each its own rows)"),
    ] = None,
    subspace: Annotated[
        Path | None,
        typer.Option("--subspace", help="the task's subspace (for osrm inits): a file or a Hub file "
                     "user/repo/path[@revision]"),
    ] = None,
    stats_files: Annotated[
        list[Path] | None,
        typer.Option("--stats", help="statistics files of the pool, for the training modes (osrm-reg, "
                     "osrm-contrast, osrm-project): the other tasks' and the task's own (found by its name); "
                     "Hub files too"),
    ] = None,
    weighting: Annotated[
        str, typer.Option("--weighting", help="how --stats mix into the others' moment: equal, tokens or trace")
    ] = "equal",
    settings: Annotated[
        Path | None,
        typer.Option(
            "--settings", help="YAML with `lora:` and `training:` sections (as in an experiment file)"
        ),
    ] = None,
    r: Annotated[int | None, typer.Option("--r", min=1, help="LoRA rank")] = None,
    lr: Annotated[float | None, float_option("--lr", help="learning rate")] = None,
    max_steps: Annotated[
        int | None, typer.Option("--max-steps", min=1, help="optimizer steps (overrides epochs)")
    ] = None,
    epochs: Annotated[float | None, float_option("--epochs")] = None,
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
    overwrite: OverwriteOpt = False,
    quiet: QuietOpt = False,
    allow_model_mismatch: AllowMismatchOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Fine-tune one LoRA adapter (and its task head) on one task.

    Runs on several GPUs unchanged under `torchrun` or `accelerate launch` (`-m osrm_lora.cli train ...`).
    \f
    Long because typer declares each of its 27 options as a parameter; the body is 50 lines.
    """
    if list_inits_:
        print_listing(list_inits(), as_json, _inits_table)
        return
    if model is None or task is None or out_dir is None:
        fail("give --model, --task and --out (or --list-inits to see the inits)")
    init_options = key_values(init_option or [], "--init-option")
    get_init(init).parse(init_options)  # an unknown name or option fails here, before any loading
    if weighting not in ("equal", "tokens", "trace"):
        fail(f"--weighting {weighting!r}: choose equal, tokens or trace")
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
    subspace_file = hub_file(subspace) if subspace else None
    pool, pool_files = _pool_stats(stats_files or [], the_task.name, get_init(init).needs_moments)
    try:
        with to_stderr(), identity.allow_model_mismatch(allow_model_mismatch):
            result = finetune(
                the_task,
                model,
                out_dir,
                init=init,
                init_options=init_options,
                tasks=merged_tasks.split(",") if merged_tasks else (),
                subspace=Subspace.load(subspace_file) if subspace_file else None,
                **pool,
                weighting=weighting,
                lora=lora,
                training=training,
                seed=seed,
                resume=resume,
                trust_remote_code=trust_remote_code,
                overwrite=overwrite,
                inputs=input_paths(model, glue_dir, subspace_file, settings, *pool_files, files=files),
            )
    except KeyboardInterrupt:
        interrupted(f"checkpoints are kept in {partial_dir(out_dir)}; run the same command with --resume to "
                    f"continue from the last one")
    if is_main():  # every process returns the result; one prints it (and pushes)
        _print_trained(result, as_json, _push_trained(result, push_to_hub) if push_to_hub else None)


def _pool_stats(paths: list[Path], task: str, needs_own: bool) -> tuple[dict, list[Path]]:
    """finetune's `other_stats` and `own_stats` from --stats (the task's own file is the one of its name, used by
    the training modes only), and the files read."""
    from ..hub import hub_file
    from ..stats import TaskStats

    files = [hub_file(p) for p in paths]
    pool = [TaskStats.load(f) for f in files]
    own = next((s for s in pool if s.task == task), None)
    return {"other_stats": [s for s in pool if s.task != task] or None, "own_stats": own if needs_own else None}, files


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
