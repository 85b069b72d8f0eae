"""A tiny offline world for end-to-end tests: a random BERT with a word-level tokenizer, two synthetic tasks
written as user files (CSV and JSONL), and an experiment YAML that uses them."""

from __future__ import annotations

import csv
import json
import random
from pathlib import Path

import torch
import yaml
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import BertConfig, BertModel, PreTrainedTokenizerFast

FILLERS = [f"w{i}" for i in range(12)]
CUES = {"sentiment": ("bad", "good"), "topic": ("cat", "dog")}
WORDS = [*FILLERS, *(w for pair in CUES.values() for w in pair)]


def write_tiny_model(path: Path) -> Path:
    """A 2-layer BERT (hidden 32) with random weights and an offline word-level tokenizer."""
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]"]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(specials + WORDS)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", 2), ("[SEP]", 3)],
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]", sep_token="[SEP]"
    )
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=len(specials) + len(WORDS),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=32,
    )
    BertModel(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def _rows(task: str, n: int, seed: int) -> list[dict]:
    """Label = which of the task's two cue words the sentence contains."""
    rng = random.Random(f"{task}-{seed}")
    rows = []
    for i in range(n):
        label = i % 2
        words = rng.choices(FILLERS, k=rng.randint(3, 6))
        words.insert(rng.randrange(len(words) + 1), CUES[task][label])
        rows.append(
            {
                "sentence": " ".join(words),
                "label": ["negative", "positive"][label] if task == "sentiment" else label,
            }
        )
    return rows


def write_tasks(folder: Path, n_train: int = 48, n_dev: int = 24) -> list[dict]:
    """`sentiment` as CSV (label names), `topic` as JSONL (label ids); returns their experiment entries."""
    folder.mkdir(parents=True, exist_ok=True)
    for split, n, seed in (("train", n_train, 0), ("dev", n_dev, 1)):
        with open(folder / f"sentiment_{split}.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=["sentence", "label"])
            writer.writeheader()
            writer.writerows(_rows("sentiment", n, seed))
        with open(folder / f"topic_{split}.jsonl", "w") as f:
            f.writelines(json.dumps(row) + "\n" for row in _rows("topic", n, seed))
    return [
        {
            "name": "sentiment",
            "files": {"train": "data/sentiment_train.csv", "dev": "data/sentiment_dev.csv"},
            "text_column": "sentence",
            "label_names": ["negative", "positive"],
        },
        {
            "name": "topic",
            "files": {"train": "data/topic_train.jsonl", "dev": "data/topic_dev.jsonl"},
            "text_column": "sentence",
        },
    ]


def experiment_dict(model_dir: Path | str, tasks: list[dict]) -> dict:
    return {
        "name": "tiny",
        "model": str(model_dir),
        "tasks": tasks,
        "lora": {"r": 2, "alpha": 4, "dropout": 0.0},
        "inits": ["kaiming", "osrm"],
        "training": {
            "max_steps": 12,
            "batch_size": 16,
            "lr": 0.05,
            "warmup_ratio": 0.0,
            "logging_steps": 4,
            "eval_each_epoch": False,
            "progress": False,
        },
        "statistics": {"samples_per_task": 32, "batch_size": 16, "max_length": 16},
        "evaluation": {"select_examples": 6, "max_examples": 24, "batch_size": 24, "max_length": 16},
        "merge": [
            {"method": "task_arithmetic", "lambdas": [0.5, 1.0]},
            {"method": "ties", "params": {"density": 0.5}, "lambdas": [0.5], "fixed_lambda": 1.0},
            {"method": "emr"},
        ],
        "seeds": [0],
        "output_dir": "out",
    }


def write_experiment(folder: Path, model_dir: Path, **overrides) -> Path:
    """The experiment YAML in `folder` with its task files under `folder/data`; returns the YAML path."""
    tasks = write_tasks(folder / "data")
    data = {**experiment_dict(model_dir, tasks), **overrides}
    path = folder / "experiment.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path
