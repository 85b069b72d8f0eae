"""Launched by tests/test_sharded_merge.py in a fresh process: the peak resident memory of a sharded merge.

Resets the kernel's high-water mark (VmHWM) once the libraries and adapters are loaded, runs
merge_checkpoint_sharded, and prints JSON with the resident size before and the high-water mark after, in
bytes. Without permission to reset the mark, the reported peak includes the import phase (an over-estimate).

Usage: sharded_peak.py BASE_DIR OUT_DIR MAX_SHARD_SIZE ADAPTER_DIR...
"""

import json
import sys
from pathlib import Path

import torch

from osrm_lora.adapters import LoraAdapter
from osrm_lora.merge import merge_checkpoint_sharded


def status_bytes(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


base_dir, out_dir, max_shard_size, *adapter_dirs = sys.argv[1:]
torch.set_num_threads(1)
adapters = [LoraAdapter.load(path) for path in adapter_dirs]
try:
    Path("/proc/self/clear_refs").write_text("5")
    reset = True
except OSError:
    reset = False
before = status_bytes("VmRSS")
merge_checkpoint_sharded(base_dir, adapters, "ties", out_dir, max_shard_size=max_shard_size, density=0.5)
print(json.dumps({"rss_before": before, "hwm_after": status_bytes("VmHWM"), "reset": reset}))
