"""Launched by tests/test_distributed.py under torchrun (2 CPU processes, Gloo), one launch for all checks:

1. the `osrm-lora stats` command on the task's JSONL files (next to TASK_JSON), which joins the process
   group itself, shards the sample and writes CLI_STATS_FILE from rank 0;
2. statistics of the same task sharded across the ranks (`collect_task_stats`), written by rank 0;
3. `train.finetune` with the Trainer's DDP in the same process group. Which ranks write the adapter is
   logged by wrapping `train._save_adapter`, and each rank's final LoRA state is saved, so the test can
   check that only rank 0 saved and that the replicas stayed in sync;
4. the `osrm-lora train` command on a dropout-free model (TRAIN_MODEL_DIR, with the JSONL files and settings
   file in TRAIN_DATA_DIR), `train.finetune` wrapped to save each rank's log history and final LoRA state,
   so the test can compare them with one process at the same global batch.

Usage: worker.py MODEL_DIR TASK_JSON STATS_FILE SAMPLES BATCH_SIZE ADAPTER_DIR LOG_DIR CLI_STATS_FILE
       TRAIN_MODEL_DIR TRAIN_DATA_DIR TRAIN_ADAPTER_DIR
"""

import json
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from osrm_lora import train
from osrm_lora.cli import app
from osrm_lora.distributed import collect_task_stats, init_from_env, rank, world_size
from osrm_lora.tasks import Task, TaskSpec

model_dir, task_json, stats_file, samples, batch_size, adapter_dir, log_dir, cli_stats_file = sys.argv[1:9]
train_model_dir, train_data, train_adapter_dir = sys.argv[9:12]
torch.set_num_threads(1)
log = Path(log_dir)
files = Path(task_json).parent
code = app(
    ["stats", "--model", model_dir, "--task", "sentiment", "--files", f"train={files / 'train.jsonl'}",
     "--files", f"dev={files / 'dev.jsonl'}", "--task-option", "label_names=[negative, positive]",
     "--samples", samples, "--seed", "3", "--batch-size", batch_size, "--max-length", "24",
     "--out", cli_stats_file, "--quiet"],
    standalone_mode=False,
)
assert not code, f"osrm-lora stats exited with {code}"
assert init_from_env(), "expected a torchrun launch with WORLD_SIZE > 1"
data = json.loads(Path(task_json).read_text())
task = Task.from_records(TaskSpec.from_dict(data["spec"]), {"train": data["train"], "dev": data["dev"]})

stats = collect_task_stats(task, model_dir, split="train", samples=int(samples), seed=3,
                           batch_size=int(batch_size), max_length=24, out_path=stats_file)
(log / f"stats_rank{rank()}.json").write_text(json.dumps({"tokens": stats.tokens, "world": world_size()}))

save_adapter = train._save_adapter


def counted_save(*args, **kwargs):
    with open(log / "saves.txt", "a") as f:
        f.write(f"{rank()}\n")
    return save_adapter(*args, **kwargs)


train._save_adapter = counted_save
result = train.finetune(
    task, model_dir, adapter_dir, lora={"r": 2, "dropout": 0.0},
    training={"epochs": 1, "batch_size": 4, "logging_steps": 1, "progress": False, "warmup_ratio": 0.0},
    seed=5,
)
save_file({k: v.contiguous() for k, v in train._lora_state(result.model).items()},
          str(log / f"lora_rank{rank()}.safetensors"))

train._save_adapter = save_adapter  # saves.txt counts the saves of step 3 only
finetune = train.finetune


def recorded_finetune(*args, **kwargs):
    result = finetune(*args, **kwargs)
    (log / f"cli_history_rank{rank()}.json").write_text(json.dumps(result.history))
    save_file({k: v.contiguous() for k, v in train._lora_state(result.model).items()},
              str(log / f"cli_lora_rank{rank()}.safetensors"))
    return result


train.finetune = recorded_finetune
data_dir = Path(train_data)
code = app(
    ["train", "--model", train_model_dir, "--task", "sentiment", "--files", f"train={data_dir / 'train.jsonl'}",
     "--files", f"dev={data_dir / 'dev.jsonl'}", "--task-option", "label_names=[negative, positive]",
     "--settings", str(data_dir / "settings.yaml"), "--batch-size", "4", "--seed", "5", "--init", "gaussian",
     "--out", train_adapter_dir, "--quiet"],
    standalone_mode=False,
)
assert not code, f"osrm-lora train exited with {code}"
