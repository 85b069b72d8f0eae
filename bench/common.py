"""What every bench script shares: the machine it ran on, timing, and writing its results.

A figure means little without the machine, library versions and load it was measured under, so every results
file carries the same `machine` record, written by `write_results` (or `machine()` where a script writes its
own layout).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import platform
import statistics
import time
from collections.abc import Callable
from importlib.metadata import version
from pathlib import Path
from typing import TypeVar

import torch

from osrm_lora.io import write_json

RESULTS = Path(__file__).parent / "results"
T = TypeVar("T")


def cpu_name() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def machine(device: str | torch.device = "cpu") -> dict:
    """CPU, cores, torch threads, device and the versions of the libraries the figures depend on."""
    device = torch.device(device)
    info = {
        "cpu": cpu_name(),
        "cores": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "device": str(device),
        "torch": torch.__version__,
        "transformers": version("transformers"),
        "peft": version("peft"),
        "python": platform.python_version(),
        "platform": platform.platform(),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], T], device: torch.device | None = None) -> tuple[float, T]:
    """(seconds, result) of fn(), with the device's queue drained on both sides (no device: the CPU)."""
    device = device or torch.device("cpu")
    sync(device)
    start = time.perf_counter()
    result = fn()
    sync(device)
    return time.perf_counter() - start, result


def median(values: list[float]) -> float:
    return statistics.median(values) if values else math.nan


def fmt(x: float | None, digits: int = 3) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}g}"


@dataclasses.dataclass
class Stopwatch:
    """Wall time and load average since the run began: on a shared machine the load says how far to trust
    the times."""

    started: float = dataclasses.field(default_factory=time.perf_counter)
    load_start: tuple[float, float, float] = dataclasses.field(default_factory=os.getloadavg)

    def record(self) -> dict:
        return {
            "load_average": {
                "start": self.load_start,
                "end": os.getloadavg(),
                "note": "1/5/15-minute load; other processes shared the cores when it exceeds the threads",
            },
            "wall_s": time.perf_counter() - self.started,
        }


def write_results(
    path: Path,
    results: dict,
    args: dict,
    device: str | torch.device = "cpu",
    stopwatch: Stopwatch | None = None,
) -> None:
    """Write results with the machine that produced them, the arguments that chose them and, given a
    stopwatch, the run's wall time and load."""
    record = {**results, "machine": machine(device), "args": args}
    if stopwatch is not None:
        record.update(stopwatch.record())
    write_json(path, record)
    took = f" ({record['wall_s']:.0f} s)" if stopwatch is not None else ""
    print(f"wrote {path}{took}")
