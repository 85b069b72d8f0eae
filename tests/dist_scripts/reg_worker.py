"""Launched by tests/test_penalty.py under torchrun (2 CPU processes, Gloo): `train.finetune` with the osrm-reg
penalty (μ = 50) in DDP, 4 examples per process and step; each rank saves its final LoRA state and log history.

Usage: reg_worker.py MODEL_DIR DATA_DIR OTHER_STATS_FILE LOG_DIR
"""

import json
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from osrm_lora import train
from osrm_lora.distributed import init_from_env, rank
from osrm_lora.stats import TaskStats
from osrm_lora.tasks import get_task

model_dir, data_dir, stats_file, log_dir = sys.argv[1:5]
torch.set_num_threads(1)
assert init_from_env(), "expected a torchrun launch with WORLD_SIZE > 1"
data, log = Path(data_dir), Path(log_dir)
task = get_task("sentiment", files={s: str(data / f"{s}.jsonl") for s in ("train", "dev")},
                label_names=["negative", "positive"])
result = train.finetune(
    task, model_dir, data / "adapter", init="osrm-reg", init_options={"mu": 50.0},
    other_stats=[TaskStats.load(stats_file)], seed=5, lora={"r": 2, "dropout": 0.0},
    training={"epochs": 1, "batch_size": 4, "logging_steps": 1, "progress": False, "warmup_ratio": 0.0, "lr": 2e-2},
)
save_file({k: v.contiguous() for k, v in train._lora_state(result.model).items()},
          str(log / f"lora_rank{rank()}.safetensors"))
(log / f"history_rank{rank()}.json").write_text(json.dumps(result.history))
