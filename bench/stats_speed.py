"""Statistics collection throughput (real, unmasked tokens per second) of `collect_stats`, each figure a ratio
measured in one run on the same model and data (models and data: bench/speed_setup.py), against:

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

    python bench/stats_speed.py            # CPU, 1 thread, MiniLM and a 2-layer d=2048 Llama
    python bench/stats_speed.py --quick    # smoke run: tiny data, 1 repeat, 1 Llama layer

Results go to bench/results/stats_speed.json: per model the `model`, `data` and `collection` records of
bench/results/speed.json (which `bench/speed.py` writes with these and the subspace and training figures).
"""

from __future__ import annotations

import contextlib
import functools
import time
from collections.abc import Callable

import torch
from common import fmt, median, sync, timed
from speed_setup import BENCH_TASK, RANK, Data, Setup, make_parser, markdown, parse, run

from osrm_lora.modules import find_target_modules
from osrm_lora.stats import collect_stats

COLLECTORS = ("plain", "ours", "corda", "eva", "osrm_official", "plain_bs1")


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


def bench(setup: Setup, args) -> dict:
    collection = bench_collection(setup.model, setup.targets, setup.data, args.repeats, setup.device)
    rates = {k: round(v, 1) for k, v in collection["tokens_per_s"].items()}
    print(f"[{setup.key}] collection tokens/s {rates}", flush=True)
    return {"collection": collection}


NAMES = {
    "plain": "plain no_grad forward (no hooks)",
    "corda": "PEFT CorDA collection (bs 1)",
    "eva": "PEFT EVA (get_eva_state_dict)",
    "osrm_official": "official OSRM per-sample means (bs 1, padded)",
    "plain_bs1": "plain forward, bs 1 unpadded (reference)",
}


def table_rows(label: str, r: dict) -> list[str]:
    """Ours against each other collector, then against `preprocess_corda` end to end."""
    c = r["collection"]
    lines = []
    for name, text in NAMES.items():
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
    return lines


def rate_table(models: dict) -> list[str]:
    """Tokens/s of every collector, one row per model."""
    lines = ["", "| model | " + " | ".join(COLLECTORS) + " |", "|---" * (len(COLLECTORS) + 1) + "|"]
    for key, r in models.items():
        rate = r["collection"]["tokens_per_s"]
        lines.append(f"| {key} tokens/s | " + " | ".join(fmt(rate[n], 4) for n in COLLECTORS) + " |")
    return lines


def main() -> None:
    args = parse(make_parser(__doc__, "stats_speed.json", repeats=True))
    run(
        args,
        bench,
        lambda results: markdown(results["models"], table_rows, tail=rate_table(results["models"])),
    )


if __name__ == "__main__":
    main()
