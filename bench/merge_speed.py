"""Wall time and peak memory of every merge method, side by side with PEFT's `add_weighted_adapter`.

Random rank-r LoRA adapters on a Llama-like stack of q_proj/v_proj layers (d×d each) are merged by every
registered method (module by module, each result dropped after it is produced) and by PEFT's
`add_weighted_adapter` with combination types `svd`, `ties` and `cat` on the same adapters. Peak memory is
the process RSS above its level at the start of the call, sampled every 2 ms by a background thread
(torch's allocations are invisible to tracemalloc). Ratios are our time / PEFT's time.

Caveats: PEFT's `ties` merges A and B separately (not the update), so it is cheap but not the same merge; its
`ties_svd` and `dare_linear_svd` apply TIES / DARE to the dense updates like ours, then truncate with an SVD;
PEFT's `svd` forms each dense update and takes its full SVD, which dominates the run time at d = 4096.
`dense_floor` is the time and memory of only forming each dense update ΔW_i once: the least any exact TIES or DARE
can cost, since they read every entry.
RegMean's Gram matrices are shared by the tasks (same cost as distinct ones), Fisher diagonals are generated
on access (their generation time is included).

    python bench/merge_speed.py                      # d = 2048, 4096; 1 layer; T = 2, 4, 8; r = 8, 16
    python bench/merge_speed.py --full               # 22 layers at d = 2048, 32 at d = 4096 (Llama sizes)
    python bench/merge_speed.py --dims 1024 --tasks 2 4 --ranks 8 --peft svd cat   # a quick check
    python bench/merge_speed.py --methods ties dare --peft ties_svd dare_linear_svd --output \
        bench/results/merge_speed_exact.json       # TIES and DARE on the dense updates, ours vs PEFT's
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import os
import threading
import time
from collections.abc import Mapping
from pathlib import Path

import torch
from common import RESULTS, timed, write_results
from torch import nn

from osrm_lora.adapters import LoraAdapter, LoraFactors
from osrm_lora.merge import list_methods, merge_adapters
from osrm_lora.stats import TaskStats

FULL_LAYERS = {2048: 22, 4096: 32}
METHOD_ARGS = {"ties": {"density": 0.2}, "dare": {"drop_rate": 0.9}}
PEFT_ARGS = {"ties": {"density": 0.2}, "svd": {}, "cat": {},
             "ties_svd": {"density": 0.2}, "dare_linear_svd": {"density": 0.1}}  # DARE density = 1 - drop rate


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def release_freed_memory() -> None:
    """Return freed heap pages to the OS (glibc), so the next RSS baseline is not inflated by earlier runs."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def measure(fn, *args, **kwargs) -> dict[str, float]:
    """Seconds and peak RSS increase (MB) of fn(*args, **kwargs)."""
    gc.collect()
    release_freed_memory()
    start_rss, peak, done = rss_bytes(), [0], threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], rss_bytes())
            time.sleep(0.002)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    seconds, _ = timed(lambda: fn(*args, **kwargs))
    done.set()
    sampler.join()
    peak[0] = max(peak[0], rss_bytes())
    return {"seconds": round(seconds, 4), "peak_rss_mb": round(max(peak[0] - start_rss, 0) / 2**20, 1)}


def module_names(layers: int) -> list[str]:
    return [f"model.layers.{i}.self_attn.{p}" for i in range(layers) for p in ("q_proj", "v_proj")]


def random_adapters(d: int, layers: int, tasks: int, rank: int) -> list[LoraAdapter]:
    g = torch.Generator().manual_seed(0)
    return [
        LoraAdapter(
            {m: LoraFactors(torch.randn(rank, d, generator=g) / d**0.5, torch.randn(d, rank, generator=g), 2.0)
             for m in module_names(layers)},
            {"base_model_name_or_path": "llama-like", "r": rank, "lora_alpha": 2 * rank}, name=f"task{t}",
        )
        for t in range(tasks)
    ]


class LazyFisher(Mapping):
    """{module: random out×in diagonal Fisher}, generated when read so inputs never fill memory."""

    def __init__(self, names: list[str], d: int, seed: int):
        self.names, self.d, self.seed = names, d, seed

    def __getitem__(self, name: str) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.names.index(name))
        return torch.rand(self.d, self.d, generator=g)

    def __iter__(self):
        return iter(self.names)

    def __len__(self) -> int:
        return len(self.names)


def shared_stats(adapters: list[LoraAdapter], d: int, layers: int) -> list[TaskStats]:
    """One Gram per layer input (q and v read the same hidden states), reused by every task."""
    g = torch.Generator().manual_seed(1)
    second = {}
    for i in range(layers):
        x = torch.randn(4 * d, d, generator=g)
        gram = x.T @ x
        for p in ("q_proj", "v_proj"):
            second[f"model.layers.{i}.self_attn.{p}"] = gram
    first = {m: torch.zeros(d) for m in second}
    return [TaskStats(a.name, "llama-like", "bench", second, first, 4 * d) for a in adapters]


class Attention(nn.Module):
    def __init__(self, d: int):
        super().__init__()
        self.q_proj = nn.Linear(d, d, bias=False, device="meta")
        self.v_proj = nn.Linear(d, d, bias=False, device="meta")


class Layer(nn.Module):
    def __init__(self, d: int):
        super().__init__()
        self.self_attn = Attention(d)


class LlamaLike(nn.Module):
    """Only the q/v projections of a Llama stack; weights are allocated but never initialised."""

    def __init__(self, d: int, layers: int):
        super().__init__()
        self.model = nn.Module()
        self.model.layers = nn.ModuleList([Layer(d) for _ in range(layers)])
        self.to_empty(device="cpu")


def peft_model(adapters: list[LoraAdapter], d: int, layers: int, rank: int):
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=["q_proj", "v_proj"])
    model = get_peft_model(LlamaLike(d, layers), config, adapter_name=adapters[0].name)
    for a in adapters[1:]:
        model.add_adapter(a.name, config)
    with torch.no_grad():
        for a in adapters:
            for m, f in a.modules.items():
                layer = model.base_model.model.get_submodule(m)
                layer.lora_A[a.name].weight.copy_(f.A)
                layer.lora_B[a.name].weight.copy_(f.B)
    return model


def run_ours(adapters, method: str, stats, d: int, layers: int) -> None:
    kwargs = dict(METHOD_ARGS.get(method, {}))
    if method == "regmean":
        kwargs["stats"] = stats
    if method == "fisher":
        kwargs["fisher"] = [LazyFisher(module_names(layers), d, seed=i) for i in range(len(adapters))]
    for module in merge_adapters(adapters, method, **kwargs):
        del module


def form_dense_updates(adapters) -> None:
    """The floor of any merge that reads every entry of every ΔW_i (TIES, DARE, ...): just form each one."""
    for name in adapters[0].modules:
        for a in adapters:
            a.modules[name].delta()  # formed, then dropped at once


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dims", type=int, nargs="+", default=[2048, 4096])
    parser.add_argument("--tasks", type=int, nargs="+", default=[2, 4, 8])
    parser.add_argument("--ranks", type=int, nargs="+", default=[8, 16])
    parser.add_argument("--layers", type=int, default=1, help="q/v layer pairs per model (default 1)")
    parser.add_argument("--full", action="store_true", help="Llama sizes: 22 layers at d=2048, 32 at d=4096")
    parser.add_argument("--methods", nargs="+", default=[m["name"] for m in list_methods()])
    parser.add_argument("--peft", nargs="+", default=["ties", "svd", "cat"], choices=list(PEFT_ARGS))
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--output", type=Path, default=RESULTS / "merge_speed.json")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    results = []
    for d in args.dims:
        layers = FULL_LAYERS.get(d, args.layers) if args.full else args.layers
        for tasks in args.tasks:
            for rank in args.ranks:
                adapters = random_adapters(d, layers, tasks, rank)
                stats = shared_stats(adapters, d, layers)
                row = {"d": d, "layers": layers, "modules": 2 * layers, "tasks": tasks, "rank": rank,
                       "ours": {}, "peft": {}, "ratios": {},
                       "dense_floor": measure(form_dense_updates, adapters)}
                for method in args.methods:
                    row["ours"][method] = measure(run_ours, adapters, method, stats, d, layers)
                    print(f"d={d} T={tasks} r={rank} {method:16s} {row['ours'][method]}", flush=True)
                if args.peft:
                    model = peft_model(adapters, d, layers, rank)
                    names = [a.name for a in adapters]
                    for ctype in args.peft:
                        row["peft"][ctype] = measure(model.add_weighted_adapter, names, [1.0] * tasks, "merged",
                                                     combination_type=ctype, **PEFT_ARGS[ctype])
                        model.delete_adapter("merged")
                        print(f"d={d} T={tasks} r={rank} peft:{ctype:11s} {row['peft'][ctype]}", flush=True)
                    del model
                for method, ours in row["ours"].items():
                    row["ratios"][method] = {
                        ctype: round(ours["seconds"] / peft["seconds"], 3) for ctype, peft in row["peft"].items()
                    }
                results.append(row)
    write_results(args.output, {"results": results}, vars(args))


if __name__ == "__main__":
    main()
