"""Speed of OSRM's extra work, each figure a ratio measured in one run on the same model and data.

Two models: the built-in MiniLM (`builtin:minilm`, d = 384) and a Llama-like random model built from
`LlamaConfig` (d = 2048, GQA, 2 layers by default so it fits a small CPU; `--full` builds all 22 layers of a
TinyLlama-sized model). Both read the same batches of the built-in `movie_valence` task, tokenised by
MiniLM's tokenizer; the target modules are the q/v projections of every layer.

1. Statistics collection throughput (real, unmasked tokens per second) of `collect_stats` against:
   - `plain`: a `torch.no_grad()` forward pass with no hooks (target: ours >= 0.85 of it);
   - `corda`: PEFT's CorDA covariance collection (`calib_cov_distribution`, the collection step of
     `preprocess_corda`; its hook squeezes the batch dimension, so it runs one example at a time, unpadded).
     `preprocess_corda` as a whole (collection plus its per-module inverse and SVD) is timed once besides;
   - `eva`: PEFT's `get_eva_state_dict` (incremental PCA per module input), capped at one pass over the
     batches after its hashing pass; whether it converged within that is recorded;
   - `osrm_official`: the official OSRM code's per-sample mean collection as it is (timing only): batch size
     1, each example padded to `max_length`, a forward hook per module taking the mean of the module input
     over all positions, padding included, appended in a Python loop.
   `plain_bs1` (no hooks, one unpadded example at a time) is reported for reference: it separates the cost
   of the hooks from that of batch size and padding. Contestants run round-robin (the order rotating each
   round), `--repeats` times, after a warm-up on the first batch. Tokens/s are medians over rounds; each
   ratio is the median over rounds of that round's ratio, so load drifting between rounds cancels out.
2. Subspace computation: `compute_subspaces` (all modules, leave-one-out for every task) on the statistics
   of `--subspace-tasks` built-in tasks, as a fraction of one training epoch, estimated as the median train
   step time x ceil(train split size / batch size) for the task's full train split (stated in the output).
3. Training step time with PEFT's default (gaussian) LoRA init and with `osrm_init`: two adapters on one
   PEFT model, same batches, same dropout seeds, alternating steps (and which goes first); the ratio, the
   median of per-step ratios, should be 1.
4. Merge times: a summary of `bench/results/merge_speed.json` (written by `bench/merge_speed.py`), not rerun.

    python bench/speed.py                  # CPU, 1 thread, MiniLM and a 2-layer d=2048 Llama
    python bench/speed.py --quick          # smoke run: tiny data, 1 repeat, 2 subspace tasks, 1 Llama layer
    python bench/speed.py --device cuda    # on a GPU (threads left at torch's default unless given)
    python bench/speed.py --full           # 22 Llama layers, more data and train steps

Results go to bench/results/speed.json (with the machine and its load average at start and end); a markdown
table is printed. One CPU thread is the default on CPU: on a shared, loaded machine it is both faster and far
steadier than several threads competing for the same cores.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import inspect
import math
import os
import platform
import statistics
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import torch

from osrm_lora import tasks
from osrm_lora.init import osrm_init
from osrm_lora.io import write_json
from osrm_lora.modules import default_target_modules, find_target_modules, in_out_features
from osrm_lora.stats import collect_stats
from osrm_lora.subspace import compute_subspaces
from osrm_lora.train import LoraSettings, TrainingSettings, load_model_and_tokenizer

RESULTS = Path(__file__).parent / "results"
BENCH_TASK = "movie_valence"
RANK = 8
LLAMA_FULL_LAYERS = 22  # TinyLlama-1.1B: d = 2048, 22 layers, 32 heads, 4 key/value heads
COLLECTORS = ("plain", "ours", "corda", "eva", "osrm_official", "plain_bs1")
T = TypeVar("T")


# ---------------------------------------------------------------------------------------------- data


@dataclasses.dataclass
class Data:
    """The same examples in the three layouts the contestants need, already on the device."""

    batches: list[dict]  # dynamically padded batches, no labels
    labels: list[torch.Tensor]  # per batch, for the training steps
    singles: list[dict]  # one example per batch, unpadded
    padded: list[dict]  # one example per batch, padded to max_length (the official OSRM code's input)
    tokens: int  # real tokens (attention mask) over all examples

    def head(self, n_batches: int) -> Data:
        """The first batches and their examples: a cheap warm-up with every code path."""
        batches = self.batches[:n_batches]
        n = sum(len(b["input_ids"]) for b in batches)
        return Data(
            batches,
            self.labels[:n_batches],
            self.singles[:n],
            self.padded[:n],
            sum(int(b["attention_mask"].sum()) for b in batches),
        )

    def positions(self) -> dict[str, int]:
        return {
            layout: sum(b["input_ids"].numel() for b in getattr(self, layout))
            for layout in ("batches", "singles", "padded")
        }


def model_inputs(model) -> set[str]:
    return set(inspect.signature(model.forward).parameters)


def build_data(task, tokenizer, model, examples: int, batch_size: int, max_length: int, device) -> Data:
    spec = task.spec
    rows = tasks.tokenize(task.split("train", max_examples=examples, seed=0), tokenizer, spec, max_length)
    accepted = model_inputs(model)
    batches, labels, singles, padded = [], [], [], []
    for batch in tasks.make_dataloader(rows, tokenizer, spec, batch_size, max_length):
        inputs = {k: v.to(device) for k, v in batch.items() if k != "labels" and k in accepted}
        batches.append(inputs)
        labels.append(batch["labels"].to(device))
        for i, length in enumerate(batch["attention_mask"].sum(1).tolist()):
            single = {k: v[i : i + 1, :length] for k, v in inputs.items()}  # right padding: real tokens first
            singles.append(single)
            pad = max_length - length
            padded.append(
                {
                    k: torch.nn.functional.pad(
                        v, (0, pad), value=tokenizer.pad_token_id if k == "input_ids" else 0
                    )
                    for k, v in single.items()
                }
            )
    return Data(batches, labels, singles, padded, sum(int(b["attention_mask"].sum()) for b in batches))


# ---------------------------------------------------------------------------------------------- models


def load_minilm(spec, device):
    model, tokenizer = load_model_and_tokenizer("builtin:minilm", spec)
    return model.to(device).eval(), tokenizer


def build_llama(spec, tokenizer, layers: int, device):
    """A random Llama-like classifier with TinyLlama's widths; it reads MiniLM's token ids."""
    from transformers import LlamaConfig, LlamaForSequenceClassification

    config = LlamaConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=2048,
        intermediate_size=5632,
        num_hidden_layers=layers,
        num_attention_heads=32,
        num_key_value_heads=4,
        max_position_embeddings=512,
        pad_token_id=tokenizer.pad_token_id,
        num_labels=1 if spec.is_regression else len(spec.label_names),
    )
    torch.manual_seed(0)
    return LlamaForSequenceClassification(config).to(device).eval()


def describe_model(model, targets) -> dict:
    layers = find_target_modules(model, targets)
    return {
        "type": model.config.model_type,
        "hidden_size": model.config.hidden_size,
        "layers": model.config.num_hidden_layers,
        "parameters": sum(p.numel() for p in model.parameters()),
        "target_modules": list(targets),
        "n_target_modules": len(layers),
        "target_in_dims": sorted({in_out_features(layer)[0] for layer in layers.values()}),
    }


# ---------------------------------------------------------------------------------------------- timing


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], T], device: torch.device) -> tuple[float, T]:
    """(seconds, result) of fn(), with the device's queue drained on both sides."""
    sync(device)
    start = time.perf_counter()
    result = fn()
    sync(device)
    return time.perf_counter() - start, result


def median(values: list[float]) -> float:
    return statistics.median(values) if values else math.nan


# ---------------------------------------------------------------------------------------------- contestants


def run_plain(model, data: Data) -> int:
    with torch.no_grad():
        for batch in data.batches:
            model(**batch)
    return data.tokens


def run_plain_bs1(model, data: Data) -> int:
    with torch.no_grad():
        for single in data.singles:
            model(**single)
    return data.tokens


def run_ours(model, data: Data, targets) -> int:
    return collect_stats(model, data.batches, targets, task=BENCH_TASK).tokens


def corda_config(targets):
    from peft import LoraConfig
    from peft.tuners.lora.config import CordaConfig

    return LoraConfig(
        r=RANK,
        target_modules=list(targets),
        init_lora_weights="corda",
        corda_config=CordaConfig(corda_method="ipm"),
    )


def clear_corda_fields(model) -> None:
    for module in model.modules():
        for field in ("sample_count", "covariance_matrix", "eigens", "corda_method", "rank"):
            if field in module.__dict__:
                delattr(module, field)


def run_corda_collection(model, data: Data, targets) -> int:
    """CorDA's collection step (as `preprocess_corda` calls it); its hook needs batch size 1."""
    from peft.tuners.lora.corda import calib_cov_distribution

    def run_model():
        for single in data.singles:
            model(**single)

    try:
        calib_cov_distribution(model, corda_config(targets), run_model, None, None)
    finally:
        clear_corda_fields(model)
    return data.tokens


@contextlib.contextmanager
def phase_timers(module, names: list[str], device: torch.device, seconds: dict[str, float]):
    """Time calls of module-level functions (`preprocess_corda`'s phases) without changing what they do."""
    originals = {name: getattr(module, name) for name in names}

    def wrap(name, fn):
        def timed_phase(*args, **kwargs):
            sync(device)
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                sync(device)
                seconds[name] = seconds.get(name, 0.0) + time.perf_counter() - start

        return timed_phase

    try:
        for name, fn in originals.items():
            setattr(module, name, wrap(name, fn))
        yield seconds
    finally:
        for name, fn in originals.items():
            setattr(module, name, fn)


def run_corda_preprocess(model, data: Data, targets, device) -> dict[str, float]:
    """`preprocess_corda` end to end, once, with its collection and decomposition phases timed."""
    from peft.tuners.lora import corda

    def run_model():
        for single in data.singles:
            model(**single)

    seconds: dict[str, float] = {}
    try:
        with phase_timers(corda, ["calib_cov_distribution", "collect_eigens"], device, seconds):
            total, _ = timed(lambda: corda.preprocess_corda(model, corda_config(targets), run_model), device)
    finally:
        clear_corda_fields(model)
    return {
        "total_s": total,
        "collection_s": seconds["calib_cov_distribution"],
        "decomposition_s": seconds["collect_eigens"],
    }


class _EvaBudgetSpent(Exception):
    pass


def remove_eva_hooks(model) -> None:
    """EVA removes its hooks only when it returns; after an early stop they are removed here."""
    from peft.tuners.lora.eva import _Hook

    for module in model.modules():
        for key, hook in list(module._forward_hooks.items()):
            if isinstance(hook, _Hook):
                del module._forward_hooks[key]


def run_eva(model, data: Data, targets, report: dict) -> int:
    """EVA over the same batches: its hashing pass on the first batch plus at most one pass over all of them
    (it cycles through the data until every component converges, so it is capped here)."""
    from peft import LoraConfig
    from peft.tuners.lora.config import EvaConfig
    from peft.tuners.lora.eva import get_eva_state_dict

    budget = 1 + len(data.batches)
    seen = {"forwards": 0, "tokens": 0}

    def forward(model, inputs):
        if seen["forwards"] == budget:
            raise _EvaBudgetSpent
        seen["forwards"] += 1
        seen["tokens"] += int(inputs["attention_mask"].sum())
        return model(**inputs)

    config = LoraConfig(r=RANK, target_modules=list(targets), init_lora_weights="eva", eva_config=EvaConfig())
    converged = True
    try:
        get_eva_state_dict(model, data.batches, config, forward_fn=forward, show_progress_bar=False)
    except _EvaBudgetSpent:
        converged = False
    finally:
        remove_eva_hooks(model)
        model.eval()
    report.update(converged=converged, forwards=seen["forwards"], budget=budget)
    return seen["tokens"]


def official_sample_means(model, examples: list[dict], targets) -> dict[str, torch.Tensor]:
    """The official code's collection as it is: per example (padded), the mean input of each module over
    every position, padding included, gathered in Python lists. Timing only: padding biases these means."""
    layers = find_target_modules(model, targets)
    means: dict[str, list[torch.Tensor]] = {name: [] for name in layers}

    def make(name):
        def hook(module, args, output):
            means[name].append(args[0].mean(dim=1))

        return hook

    handles = [layer.register_forward_hook(make(name)) for name, layer in layers.items()]
    try:
        with torch.no_grad():
            for example in examples:
                model(**example)
    finally:
        for handle in handles:
            handle.remove()
    return {name: torch.cat(values) for name, values in means.items()}


def run_osrm_official(model, data: Data, targets) -> int:
    official_sample_means(model, data.padded, targets)
    return data.tokens


def collection_contestants(model, targets, device, eva_report: dict) -> dict[str, Callable[[Data], int]]:
    return {
        "plain": lambda data: run_plain(model, data),
        "ours": lambda data: run_ours(model, data, targets),
        "corda": lambda data: run_corda_collection(model, data, targets),
        "eva": lambda data: run_eva(model, data, targets, eva_report),
        "osrm_official": lambda data: run_osrm_official(model, data, targets),
        "plain_bs1": lambda data: run_plain_bs1(model, data),
    }


def bench_collection(model, targets, data: Data, repeats: int, device) -> dict:
    """Round-robin timings of every collector on the same data; medians, tokens/s and ratios."""
    eva_report: dict = {}
    contestants = collection_contestants(model, targets, device, eva_report)
    warm = data.head(1)
    for fn in contestants.values():
        fn(warm)
    names = list(contestants)
    seconds: dict[str, list[float]] = {name: [] for name in names}
    tokens: dict[str, int] = {}
    for r in range(repeats):
        for name in names[r % len(names) :] + names[: r % len(names)]:  # rotate who goes first
            s, tokens[name] = timed(functools.partial(contestants[name], data), device)
            seconds[name].append(s)
    rate = {name: tokens[name] / median(seconds[name]) for name in names}
    # Ratios pair the timings of one round, so load drifting between rounds cancels out.
    paired = {
        name: median(
            [(tokens["ours"] / o) / (tokens[name] / t) for o, t in zip(seconds["ours"], seconds[name])]
        )
        for name in names
        if name != "ours"
    }
    preprocess = run_corda_preprocess(model, data, targets, device)
    corda_end_to_end = tokens["corda"] / preprocess["total_s"]
    return {
        "seconds": seconds,
        "tokens": tokens,
        "tokens_per_s": rate,
        "ratios": {f"ours/{name}": ratio for name, ratio in paired.items()},
        "eva": eva_report,
        "corda_preprocess_once": preprocess,
        "ratio_ours/corda_preprocess_total": rate["ours"] / corda_end_to_end,
    }


# ---------------------------------------------------------------------------------------------- subspaces


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
    """Median optimizer-step time of the gaussian and the OSRM-initialised adapter, alternating on one
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
    peft_model = get_peft_model(model, config, adapter_name="gaussian")
    peft_model.add_adapter("osrm", config)
    osrm_init(peft_model, subspace, adapter_name="osrm")
    optimizers = {}
    for adapter in ("gaussian", "osrm"):
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

    seconds: dict[str, list[float]] = {"gaussian": [], "osrm": []}
    for adapter in seconds:  # warm-up
        step(adapter, 0)
    for i in range(steps):
        for adapter in ("gaussian", "osrm") if i % 2 == 0 else ("osrm", "gaussian"):
            seconds[adapter].append(timed(functools.partial(step, adapter, i), device)[0])
    peft_model.eval()
    med = {adapter: median(values) for adapter, values in seconds.items()}
    return {
        "seconds": seconds,
        "median_s": med,
        "ratio_osrm/gaussian": median([o / g for o, g in zip(seconds["osrm"], seconds["gaussian"])]),
        "batch_size": len(data.batches[0]["input_ids"]),
        "optimizer": f"AdamW(lr={lr})",
        "lora": {"r": lora.r, "alpha": lora.alpha, "dropout": lora.dropout},
    }


# ---------------------------------------------------------------------------------------------- one model


def bench_model(key: str, model, tokenizer, args, device) -> dict:
    task = tasks.get_task(BENCH_TASK)
    targets = default_target_modules(model.config.model_type)
    size = args.sizes[key]
    described = describe_model(model, targets)  # before training wraps its layers in LoRA
    data = build_data(task, tokenizer, model, size.examples, size.batch_size, args.max_length, device)
    print(
        f"[{key}] {len(data.singles)} examples, {data.tokens} tokens, positions {data.positions()}",
        flush=True,
    )

    collection = bench_collection(model, targets, data, args.repeats, device)
    print(
        f"[{key}] collection tokens/s { {k: round(v, 1) for k, v in collection['tokens_per_s'].items()} }",
        flush=True,
    )
    subspace, subspaces = bench_subspace(
        model,
        tokenizer,
        targets,
        args.subspace_task_names,
        size.subspace_examples,
        size.batch_size,
        args.max_length,
        size.subspace_repeats,
        device,
    )
    print(f"[{key}] subspaces {subspace['median_s']:.2f} s", flush=True)
    training = bench_training(
        model, targets, data, subspaces[BENCH_TASK], size.train_steps, TrainingSettings().lr, device
    )
    print(f"[{key}] train step {training['median_s']}", flush=True)

    train_examples = len(task.split("train"))
    steps_per_epoch = math.ceil(train_examples / training["batch_size"])
    epoch_s = steps_per_epoch * training["median_s"]["gaussian"]
    tokens_per_example = data.tokens / len(data.singles)
    subspace.update(
        epoch_estimate={
            "task": BENCH_TASK,
            "train_examples": train_examples,
            "batch_size": training["batch_size"],
            "steps": steps_per_epoch,
            "step_s": training["median_s"]["gaussian"],
            "epoch_s": epoch_s,
        },
        fraction_of_epoch=subspace["median_s"] / epoch_s,
    )
    # For scale: our statistics over the whole train split, at the measured throughput.
    stats_s = train_examples * tokens_per_example / collection["tokens_per_s"]["ours"]
    return {
        "model": described,
        "data": {
            "task": BENCH_TASK,
            "split": "train",
            "examples": len(data.singles),
            "tokens": data.tokens,
            "positions": data.positions(),
            "batch_size": size.batch_size,
            "max_length": args.max_length,
            "repeats": args.repeats,
        },
        "collection": collection,
        "subspace": subspace,
        "training": training,
        "stats_over_train_split": {"seconds_est": stats_s, "fraction_of_epoch": stats_s / epoch_s},
    }


# ---------------------------------------------------------------------------------------------- report


def machine(device: torch.device) -> dict:
    cpu = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    import peft
    import transformers

    info = {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "device": str(device),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def merge_summary(path: Path) -> dict | None:
    """Per configuration of `bench/merge_speed.py`'s results: seconds of each of our methods and of PEFT's."""
    if not path.is_file():
        return None
    import json

    saved = json.loads(path.read_text())
    rows = [
        {
            "d": r["d"],
            "layers": r["layers"],
            "tasks": r["tasks"],
            "rank": r["rank"],
            "ours_s": {m: v["seconds"] for m, v in r["ours"].items()},
            "peft_s": {c: v["seconds"] for c, v in r["peft"].items()},
        }
        for r in saved["results"]
    ]
    return {"source": str(path), "machine": saved.get("machine"), "args": saved.get("args"), "rows": rows}


def fmt(x: float, digits: int = 3) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}g}"


def markdown(results: dict) -> str:
    lines = ["| model | figure | value | target |", "|---|---|---|---|"]
    names = {
        "plain": "plain no_grad forward (no hooks)",
        "corda": "PEFT CorDA collection (bs 1)",
        "eva": "PEFT EVA (get_eva_state_dict)",
        "osrm_official": "official OSRM per-sample means (bs 1, padded)",
        "plain_bs1": "plain forward, bs 1 unpadded (reference)",
    }
    for key, r in results["models"].items():
        m = r["model"]
        label = f"{key} (d={m['hidden_size']}, {m['layers']} layers)"
        c = r["collection"]
        for name, text in names.items():
            target = "≥ 0.85" if name == "plain" else ""
            if name == "plain":
                target += " ✓" if c["ratios"]["ours/plain"] >= 0.85 else " ✗"
            lines.append(
                f"| {label} | stats tokens/s, ours / {text} | {fmt(c['ratios'][f'ours/{name}'])} | {target} |"
            )
        lines.append(
            f"| {label} | ours / preprocess_corda end to end (once) | "
            f"{fmt(c['ratio_ours/corda_preprocess_total'])} | |"
        )
        s = r["subspace"]
        lines.append(
            f"| {label} | subspaces ({len(s['tasks'])} tasks, leave-one-out, {s['modules']} modules) / "
            f"one epoch ({s['epoch_estimate']['train_examples']} examples) | "
            f"{fmt(s['fraction_of_epoch'])} ({fmt(s['median_s'])} s / "
            f"{fmt(s['epoch_estimate']['epoch_s'])} s) | |"
        )
        t = r["training"]
        lines.append(
            f"| {label} | train step, osrm / gaussian init | {fmt(t['ratio_osrm/gaussian'])} "
            f"({fmt(t['median_s']['osrm'])} s / {fmt(t['median_s']['gaussian'])} s) | ≈ 1 |"
        )
    lines += ["", "| model | " + " | ".join(COLLECTORS) + " |", "|---" * (len(COLLECTORS) + 1) + "|"]
    for key, r in results["models"].items():
        rate = r["collection"]["tokens_per_s"]
        lines.append(f"| {key} tokens/s | " + " | ".join(fmt(rate[n], 4) for n in COLLECTORS) + " |")
    merge = results.get("merge")
    if merge:
        methods = sorted({m for row in merge["rows"] for m in row["ours_s"]})
        peft = sorted({c for row in merge["rows"] for c in row["peft_s"]})
        lines += [
            "",
            f"Merge seconds (from {Path(merge['source']).name}, not rerun):",
            "",
            "| d | layers | T | r | "
            + " | ".join(methods)
            + " | "
            + " | ".join(f"peft {c}" for c in peft)
            + " |",
            "|---" * (4 + len(methods) + len(peft)) + "|",
        ]
        for row in merge["rows"]:
            lines.append(
                f"| {row['d']} | {row['layers']} | {row['tasks']} | {row['rank']} | "
                + " | ".join(fmt(row["ours_s"].get(m), 3) for m in methods)
                + " | "
                + " | ".join(fmt(row["peft_s"].get(c), 3) for c in peft)
                + " |"
            )
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- main


@dataclasses.dataclass(frozen=True)
class Sizes:
    """Work per model: examples timed, batch size, examples per subspace task, repeats, train steps."""

    examples: int
    batch_size: int
    subspace_examples: int
    subspace_repeats: int
    train_steps: int


SIZES = {  # (default, --quick, --full) per model
    "minilm": (Sizes(48, 16, 32, 3, 7), Sizes(8, 4, 4, 1, 1), Sizes(256, 32, 128, 3, 9)),
    "llama": (Sizes(16, 8, 8, 1, 5), Sizes(4, 2, 2, 1, 1), Sizes(64, 16, 32, 2, 7)),
}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch intra-op threads (default: 1 on CPU, torch's default on CUDA)",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="smoke run: tiny data, one repeat, 2 subspace tasks, 1 Llama layer",
    )
    parser.add_argument(
        "--full", action="store_true", help=f"{LLAMA_FULL_LAYERS}-layer Llama, more data and repeats"
    )
    parser.add_argument("--models", nargs="+", choices=["minilm", "llama"], default=["minilm", "llama"])
    parser.add_argument(
        "--llama-layers", type=int, default=None, help="layers of the d=2048 model (default 2)"
    )
    parser.add_argument("--repeats", type=int, default=None, help="timed rounds per collector (default 5)")
    parser.add_argument(
        "--max-length", type=int, default=64, help="tokens per example (official code pads to it)"
    )
    parser.add_argument(
        "--subspace-tasks", type=int, default=None, help="built-in tasks for subspaces (default 8)"
    )
    parser.add_argument("--output", type=Path, default=RESULTS / "speed.json")
    parser.add_argument("--merge-results", type=Path, default=RESULTS / "merge_speed.json")
    args = parser.parse_args()
    if args.quick and args.full:
        parser.error("--quick and --full exclude each other")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")
    device = torch.device(args.device)
    threads = args.threads or (1 if device.type == "cpu" else torch.get_num_threads())
    torch.set_num_threads(threads)
    args.repeats = args.repeats or (1 if args.quick else 5)
    args.llama_layers = args.llama_layers or (LLAMA_FULL_LAYERS if args.full else 1 if args.quick else 2)
    n_tasks = args.subspace_tasks or (2 if args.quick else 8)
    names = [BENCH_TASK] + [t for t in tasks.BUILTIN_TASKS if t != BENCH_TASK]
    if not 2 <= n_tasks <= len(names):
        parser.error(f"--subspace-tasks must be between 2 and {len(names)}")
    args.subspace_task_names = names[:n_tasks]
    args.sizes = {key: SIZES[key][1 if args.quick else 2 if args.full else 0] for key in SIZES}

    load_start = os.getloadavg()
    started = time.perf_counter()
    spec = tasks.get_task(BENCH_TASK).spec
    minilm, tokenizer = load_minilm(spec, device)
    results: dict = {"models": {}}
    for key in args.models:
        model = minilm if key == "minilm" else build_llama(spec, tokenizer, args.llama_layers, device)
        results["models"][key] = bench_model(key, model, tokenizer, args, device)
        del model
    results["merge"] = merge_summary(args.merge_results)
    results["machine"] = machine(device)
    results["load_average"] = {
        "start": load_start,
        "end": os.getloadavg(),
        "note": "1/5/15-minute load; other processes shared the cores when it exceeds the threads",
    }
    results["wall_s"] = time.perf_counter() - started
    results["args"] = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    results["args"]["sizes"] = {key: dataclasses.asdict(size) for key, size in args.sizes.items()}
    table = markdown(results)
    results["table"] = table
    write_json(args.output, results)
    print(table)
    print(f"\nwrote {args.output} ({results['wall_s']:.0f} s)")


if __name__ == "__main__":
    main()
