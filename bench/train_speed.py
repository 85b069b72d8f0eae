"""What OSRM adds to training, each figure measured in one run on the same model and data (models and data:
bench/speed_setup.py).

1. Subspace computation: `compute_subspaces` (all modules, leave-one-out for every task) on the statistics
   of `--subspace-tasks` built-in tasks, as a fraction of one training epoch, estimated as the median train
   step time x ceil(train split size / batch size) for the task's full train split (stated in the output).
2. Training step time with PEFT's default (kaiming) LoRA init and with `osrm_init`: two adapters on one
   PEFT model, same batches, same dropout seeds, alternating steps (and which goes first); the ratio, the
   median of per-step ratios, should be 1.

The two live in one script because each needs the other: the OSRM adapter is initialised from the measured
subspaces, and the epoch the subspaces are compared with is timed by the training steps.

    python bench/train_speed.py            # CPU, 1 thread, MiniLM and a 2-layer d=2048 Llama
    python bench/train_speed.py --quick    # smoke run: tiny data, 2 subspace tasks, 1 Llama layer

Results go to bench/results/train_speed.json: per model the `model`, `data`, `subspace` and `training` records
of bench/results/speed.json (which `bench/speed.py` writes with these and the statistics figures).
"""

from __future__ import annotations

import functools
import math
import warnings

import torch
from common import fmt, median, timed
from speed_setup import BENCH_TASK, RANK, Data, Setup, build_data, make_parser, markdown, parse, run

from osrm_lora import tasks
from osrm_lora.inits import osrm_init
from osrm_lora.settings import LoraSettings, TrainingSettings
from osrm_lora.stats import collect_stats
from osrm_lora.subspace import compute_subspaces


def bench_subspace(
    model,
    tokenizer,
    targets,
    names: list[str],
    examples: int,
    batch_size: int,
    max_length: int,
    repeats: int,
    device,
) -> tuple[dict, dict]:
    """Statistics of each task (untimed), then `compute_subspaces` timed; returns (report, subspaces)."""
    stats = []
    for name in names:
        task = tasks.get_task(name)
        data = build_data(task, tokenizer, model, examples, batch_size, max_length, device)
        stats.append(collect_stats(model, data.batches, targets, task=name))
    seconds = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # few tokens per task: the rank warnings are expected here
        for _ in range(repeats):
            s, subspaces = timed(lambda: compute_subspaces(stats, RANK), device)
            seconds.append(s)
    groups = len({id(stats[0].second[m]) for m in stats[0].modules})
    report = {
        "tasks": names,
        "rank": RANK,
        "variant": "cov",
        "modules": len(stats[0].modules),
        "distinct_inputs": groups,
        "eigendecompositions": groups * len(names),
        "examples_per_task": examples,
        "seconds": seconds,
        "median_s": median(seconds),
    }
    return report, subspaces


# ---------------------------------------------------------------------------------------------- training


def bench_training(model, targets, data: Data, subspace, steps: int, lr: float, device) -> dict:
    """Median optimizer-step time of the kaiming and the OSRM-initialised adapter, alternating on one
    model."""
    from peft import LoraConfig, TaskType, get_peft_model

    lora = LoraSettings(r=RANK)
    config = LoraConfig(
        task_type=TaskType.SEQ_CLS,
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=list(targets),
    )
    torch.manual_seed(0)
    peft_model = get_peft_model(model, config, adapter_name="kaiming")
    peft_model.add_adapter("osrm", config)
    osrm_init(peft_model, subspace, adapter_name="osrm")
    optimizers = {}
    for adapter in ("kaiming", "osrm"):
        peft_model.set_adapter(adapter)
        optimizers[adapter] = torch.optim.AdamW(
            [p for p in peft_model.parameters() if p.requires_grad], lr=lr
        )
    peft_model.train()

    def step(adapter: str, i: int) -> int:
        peft_model.set_adapter(adapter)
        batch = data.batches[i % len(data.batches)]
        torch.manual_seed(1000 + i)  # same dropout masks for both inits
        loss = peft_model(**batch, labels=data.labels[i % len(data.labels)]).loss
        loss.backward()
        optimizers[adapter].step()
        optimizers[adapter].zero_grad(set_to_none=True)
        return int(batch["attention_mask"].sum())

    seconds: dict[str, list[float]] = {"kaiming": [], "osrm": []}
    for adapter in seconds:  # warm-up
        step(adapter, 0)
    for i in range(steps):
        for adapter in ("kaiming", "osrm") if i % 2 == 0 else ("osrm", "kaiming"):
            seconds[adapter].append(timed(functools.partial(step, adapter, i), device)[0])
    peft_model.eval()
    med = {adapter: median(values) for adapter, values in seconds.items()}
    return {
        "seconds": seconds,
        "median_s": med,
        "ratio_osrm/kaiming": median([o / g for o, g in zip(seconds["osrm"], seconds["kaiming"])]),
        "batch_size": len(data.batches[0]["input_ids"]),
        "optimizer": f"AdamW(lr={lr})",
        "lora": {"r": lora.r, "alpha": lora.alpha, "dropout": lora.dropout},
    }


def epoch_estimate(training: dict) -> dict:
    """One epoch of the bench task's full train split at the measured kaiming step time."""
    train_examples = len(tasks.get_task(BENCH_TASK).split("train"))
    steps = math.ceil(train_examples / training["batch_size"])
    step_s = training["median_s"]["kaiming"]
    return {
        "task": BENCH_TASK,
        "train_examples": train_examples,
        "batch_size": training["batch_size"],
        "steps": steps,
        "step_s": step_s,
        "epoch_s": steps * step_s,
    }


def bench(setup: Setup, args) -> dict:
    """Subspaces of --subspace-tasks tasks, then training steps from them; the subspaces as a fraction of an
    epoch."""
    size = setup.size
    subspace, subspaces = bench_subspace(
        setup.model,
        setup.tokenizer,
        setup.targets,
        args.subspace_task_names,
        size.subspace_examples,
        size.batch_size,
        args.max_length,
        size.subspace_repeats,
        setup.device,
    )
    print(f"[{setup.key}] subspaces {subspace['median_s']:.2f} s", flush=True)
    training = bench_training(
        setup.model,
        setup.targets,
        setup.data,
        subspaces[BENCH_TASK],
        size.train_steps,
        TrainingSettings().lr,
        setup.device,
    )
    print(f"[{setup.key}] train step {training['median_s']}", flush=True)
    epoch = epoch_estimate(training)
    subspace.update(epoch_estimate=epoch, fraction_of_epoch=subspace["median_s"] / epoch["epoch_s"])
    return {"subspace": subspace, "training": training}


def table_rows(label: str, r: dict) -> list[str]:
    s, t = r["subspace"], r["training"]
    subspace = (
        f"| {label} | subspaces ({len(s['tasks'])} tasks, leave-one-out, {s['modules']} modules) / "
        f"one epoch ({s['epoch_estimate']['train_examples']} examples) | "
        f"{fmt(s['fraction_of_epoch'])} ({fmt(s['median_s'])} s / "
        f"{fmt(s['epoch_estimate']['epoch_s'])} s) | |"
    )
    training = (
        f"| {label} | train step, osrm / kaiming init | {fmt(t['ratio_osrm/kaiming'])} "
        f"({fmt(t['median_s']['osrm'])} s / {fmt(t['median_s']['kaiming'])} s) | ≈ 1 |"
    )
    return [subspace, training]


def main() -> None:
    args = parse(make_parser(__doc__, "train_speed.json", subspace_tasks=True))
    run(args, bench, lambda results: markdown(results["models"], table_rows))


if __name__ == "__main__":
    main()
