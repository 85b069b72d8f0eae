"""Several processes: sharding, statistics under torchrun equal to one process, DDP training saved once.

The multi-process tests share one launch of `python -m torch.distributed.run --nproc_per_node 2` on CPU (Gloo)
of tests/dist_scripts/worker.py (which also runs the `osrm-lora stats` and `osrm-lora train` commands), on a
tiny random BERT saved with an offline word-level tokenizer.
"""

from __future__ import annotations

import json
import os
import random
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from peft import PeftModel, get_peft_model_state_dict
from safetensors.torch import load_file
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import BertConfig, BertForSequenceClassification, BertModel, PreTrainedTokenizerFast

from osrm_lora import distributed
from osrm_lora.distributed import collect_task_stats, shard_indices
from osrm_lora.stats import TaskStats
from osrm_lora.tasks import Task, TaskSpec

WORKER = Path(__file__).parent / "dist_scripts" / "worker.py"
FILLERS = [f"w{i}" for i in range(20)]
WORDS = ["good", "bad", *FILLERS]
SPEC = TaskSpec("sentiment", ("text",), ("negative", "positive"), ("accuracy",), "accuracy")
LAUNCH_TIMEOUT_S = 300
STATS_SAMPLES, STATS_BATCH = 41, 4  # 41 of 61 rows: odd, so the two shards differ in size
# `osrm-lora train` under torchrun vs one process: 64 rows, 4 per process and step vs 8 in one process
TRAIN_ROWS, DDP_BATCH = 64, 4
TRAIN_SETTINGS = {"lora": {"r": 2, "dropout": 0.0},
                  "training": {"epochs": 1, "logging_steps": 1, "warmup_ratio": 0.0, "progress": False}}


def _rows(n: int, seed: int) -> list[dict]:
    """Sentences of varied lengths (so batches pad) whose label is whether they contain "good"."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        words = rng.choices(FILLERS, k=rng.randint(2, 12))
        words.insert(rng.randrange(len(words) + 1), "good" if i % 2 else "bad")
        rows.append({"text": " ".join(words), "label": i % 2})
    return rows


def _tokenizer() -> PreTrainedTokenizerFast:
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]"]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(specials + WORDS)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", 2), ("[SEP]", 3)]
    )
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                                   sep_token="[SEP]")


def _save_bert(path: Path, **dropout: float) -> str:
    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(WORDS) + 4, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=48, max_position_embeddings=32, initializer_range=0.2, **dropout)
    BertModel(config).save_pretrained(path)
    _tokenizer().save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory) -> str:
    return _save_bert(tmp_path_factory.mktemp("tiny-bert"))


@pytest.fixture(scope="module")
def train_inputs(tmp_path_factory) -> dict:
    """For the training comparison: a BERT without dropout (whose random masks would differ between one
    process and two), TRAIN_ROWS training rows (whole global batches) and 16 dev rows as JSONL, the settings."""
    root = tmp_path_factory.mktemp("ddp-train")
    model = _save_bert(root / "bert", hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    for split, rows in (("train", _rows(TRAIN_ROWS, 2)), ("dev", _rows(16, 3))):
        (root / f"{split}.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    (root / "settings.yaml").write_text(json.dumps(TRAIN_SETTINGS))  # JSON is YAML
    return {"model": model, "data": root, "adapter": root / "adapters" / "sentiment"}


@pytest.fixture(scope="module")
def task_file(tmp_path_factory) -> Path:
    """The task as one JSON file of spec and rows, and the same rows as train/dev JSONL files beside it."""
    path = tmp_path_factory.mktemp("task") / "task.json"
    splits = {"train": _rows(61, 0), "dev": _rows(10, 1)}
    path.write_text(json.dumps({"spec": SPEC.to_dict(), **splits}))
    for split, rows in splits.items():
        (path.parent / f"{split}.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(script: Path, *args: object, cwd: Path) -> str:
    """Run a script under torchrun with 2 CPU processes; returns its output, fails with it on error."""
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_PORT")}
    env.update(CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr",
               "127.0.0.1", "--master_port", str(_free_port()), str(script), *map(str, args)]
    done = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=LAUNCH_TIMEOUT_S,
                          check=False)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-4000:]
    return output


@pytest.fixture(scope="module")
def two_process_run(bert_dir, task_file, train_inputs, tmp_path_factory) -> dict:
    """One torchrun launch of tests/dist_scripts/worker.py: the stats command, sharded statistics, DDP training,
    the train command; the output paths and the launch's printed output."""
    root = tmp_path_factory.mktemp("torchrun")
    paths = {"stats": root / "stats" / "sentiment.safetensors", "adapter": root / "adapters" / "sentiment",
             "logs": root / "logs", "cli_stats": root / "cli" / "sentiment.safetensors"}
    paths["logs"].mkdir()
    output = _torchrun(WORKER, bert_dir, task_file, paths["stats"], STATS_SAMPLES, STATS_BATCH, paths["adapter"],
                       paths["logs"], paths["cli_stats"], train_inputs["model"], train_inputs["data"],
                       train_inputs["adapter"], cwd=root)
    return {**paths, "output": output}


@pytest.mark.parametrize("n", [0, 1, 5, 7, 8, 61])
@pytest.mark.parametrize("world", [1, 2, 3, 8])
def test_shards_partition_the_examples_without_padding(n, world):
    shards = [shard_indices(n, r, world) for r in range(world)]
    flat = sorted(i for shard in shards for i in shard)
    assert flat == list(range(n))  # every example exactly once
    sizes = [len(s) for s in shards]
    assert max(sizes) - min(sizes) <= 1


def test_bad_rank_is_refused():
    with pytest.raises(ValueError, match="rank 2 is not in a world of 2"):
        shard_indices(10, 2, 2)


def test_single_process_defaults(monkeypatch):
    for key in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(key, raising=False)
    assert distributed.init_from_env() is False
    assert (distributed.rank(), distributed.world_size(), distributed.is_main()) == (0, 1, True)
    distributed.barrier()  # no process group: returns at once


def test_rank_from_env_before_the_group_exists(monkeypatch):
    """A torchrun worker that has not joined the group yet must still know it is not the writer."""
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert (distributed.rank(), distributed.world_size(), distributed.is_main()) == (1, 2, False)


def _train_task(task_file: Path) -> Task:
    return Task.from_records(SPEC, {"train": json.loads(task_file.read_text())["train"]})


def test_model_dtype_casts_the_model_but_not_the_sums(bert_dir, task_file):
    task = _train_task(task_file)
    options = {"samples": 12, "seed": 0, "batch_size": 4, "max_length": 16}
    full = collect_task_stats(task, bert_dir, **options)
    half = collect_task_stats(task, bert_dir, model_dtype=torch.bfloat16, **options)
    assert half.tokens == full.tokens and half.dtype == torch.float32
    m = "bert.encoder.layer.1.attention.self.query"
    assert half.second[m].dtype == torch.float32
    assert not torch.equal(half.second[m], full.second[m])  # the forward really ran in bfloat16
    torch.testing.assert_close(half.second[m], full.second[m], rtol=0.05, atol=0.05 * full.second[m].abs().max())


def test_a_model_object_needs_its_tokenizer(task_file):
    model = BertForSequenceClassification(BertConfig(vocab_size=30, hidden_size=8, num_hidden_layers=1,
                                                     num_attention_heads=2, intermediate_size=8))
    with pytest.raises(ValueError, match="task 'sentiment': pass the tokenizer"):
        collect_task_stats(_train_task(task_file), model)


def test_two_process_statistics_equal_one_process(bert_dir, task_file, two_process_run):
    single = collect_task_stats(_train_task(task_file), bert_dir, split="train", samples=STATS_SAMPLES, seed=3,
                                batch_size=STATS_BATCH, max_length=24)
    out_file = two_process_run["stats"]
    sharded = TaskStats.load(out_file)
    assert sharded.tokens == single.tokens  # no example dropped or counted twice
    for r in (0, 1):  # every rank returned the reduced statistics
        seen = json.loads((two_process_run["logs"] / f"stats_rank{r}.json").read_text())
        assert seen == {"tokens": single.tokens, "world": 2}
    assert sharded.modules == single.modules and len(single.modules) == 4
    assert (sharded.config_hash, sharded.model) == (single.config_hash, single.model)
    for m in single.modules:
        torch.testing.assert_close(sharded.second[m], single.second[m], rtol=1e-5, atol=1e-4)
        torch.testing.assert_close(sharded.first[m], single.first[m], rtol=1e-5, atol=1e-4)
    # query and value of a layer still share one stored sum after the reduction
    assert sharded.second["bert.encoder.layer.0.attention.self.query"] is \
        sharded.second["bert.encoder.layer.0.attention.self.value"]
    assert sorted(p.name for p in out_file.parent.iterdir()) == [out_file.name]  # one file, no leftovers


def test_two_process_stats_command_equals_one_process(bert_dir, task_file, two_process_run):
    """`osrm-lora stats` under torchrun joins the group itself, writes once and prints on rank 0 only."""
    single = collect_task_stats(_train_task(task_file), bert_dir, split="train", samples=STATS_SAMPLES, seed=3,
                                batch_size=STATS_BATCH, max_length=24)
    out_file = two_process_run["cli_stats"]
    from_cli = TaskStats.load(out_file)
    assert from_cli.tokens == single.tokens and from_cli.modules == single.modules
    for m in single.modules:
        torch.testing.assert_close(from_cli.second[m], single.second[m], rtol=1e-5, atol=1e-4)
        torch.testing.assert_close(from_cli.first[m], single.first[m], rtol=1e-5, atol=1e-4)
    assert sorted(p.name for p in out_file.parent.iterdir()) == [out_file.name]
    assert two_process_run["output"].count(f"{out_file}: task sentiment, 4 modules, {single.tokens} tokens") == 1


def test_two_process_training_saves_the_adapter_once(bert_dir, two_process_run):
    out_dir, logs = two_process_run["adapter"], two_process_run["logs"]
    assert (logs / "saves.txt").read_text() == "0\n"  # written by rank 0 only
    assert sorted(p.name for p in out_dir.parent.iterdir()) == ["sentiment"]  # no partial or temporary folder
    meta = json.loads((out_dir / "osrm_lora.json").read_text())
    assert meta["world_size"] == 2
    # 61 training examples, 4 per process and step, 2 processes: DDP splits the epoch into ceil(61/8) steps
    assert meta["steps"] == 8
    assert "accuracy" in meta["dev_metrics"]
    for name in ("adapter_config.json", "adapter_model.safetensors", "tokenizer.json"):
        assert (out_dir / name).is_file(), name

    ranks = [load_file(str(logs / f"lora_rank{r}.safetensors")) for r in (0, 1)]
    assert ranks[0].keys() == ranks[1].keys() and ranks[0]
    for key in ranks[0]:  # DDP keeps the replicas identical
        torch.testing.assert_close(ranks[0][key], ranks[1][key], rtol=0, atol=0)

    base = BertForSequenceClassification.from_pretrained(bert_dir, num_labels=2)
    model = PeftModel.from_pretrained(base, str(out_dir))
    saved = load_file(str(out_dir / "adapter_model.safetensors"))
    loaded = get_peft_model_state_dict(model)
    assert loaded.keys() == saved.keys()
    for key, value in saved.items():
        torch.testing.assert_close(loaded[key], value, rtol=0, atol=0)
    lora_b = [v for k, v in saved.items() if "lora_B" in k]
    assert lora_b and all(v.abs().sum() > 0 for v in lora_b)  # trained, not the zero init


def _logged(history: list[dict], key: str) -> list[float]:
    return [entry[key] for entry in history if key in entry]


def test_two_process_train_command_equals_one_process_at_the_same_global_batch(train_inputs, two_process_run,
                                                                                tmp_path):
    """`osrm-lora train` under torchrun (2 × 4 examples per step) logs the losses and gradient norms of one
    process with 8 per step, ends with the same adapter, and prints its result once. transformers 5 once
    multiplied the losses and gradients by the number of processes (`average_tokens_across_devices` with a
    loss that ignores `num_items_in_batch`)."""
    from osrm_lora import train
    from osrm_lora.tasks import get_task

    data = train_inputs["data"]
    task = get_task("sentiment", files={s: str(data / f"{s}.jsonl") for s in ("train", "dev")},
                    label_names=["negative", "positive"])
    single = train.finetune(task, train_inputs["model"], tmp_path / "one", init="gaussian", lora=TRAIN_SETTINGS["lora"],
                            training={**TRAIN_SETTINGS["training"], "batch_size": 2 * DDP_BATCH}, seed=5)
    logs = two_process_run["logs"]
    histories = [json.loads((logs / f"cli_history_rank{r}.json").read_text()) for r in (0, 1)]
    assert single.steps == TRAIN_ROWS // (2 * DDP_BATCH) == len(_logged(histories[0], "loss"))
    for key in ("loss", "grad_norm", "eval_loss", "eval_accuracy"):
        expected = _logged(single.history, key)
        assert expected, key
        for history in histories:
            torch.testing.assert_close(_logged(history, key), expected, rtol=1e-4, atol=1e-6, msg=key)
    want = train._lora_state(single.model)
    for r in (0, 1):
        got = load_file(str(logs / f"cli_lora_rank{r}.safetensors"))
        assert got.keys() == want.keys()
        for key, value in want.items():
            torch.testing.assert_close(got[key], value, rtol=1e-4, atol=1e-5, msg=key)
    assert two_process_run["output"].count(f"{train_inputs['adapter']}: {single.steps} steps, train loss") == 1


def test_gradient_accumulation_equals_the_larger_batch(train_inputs, tmp_path):
    """The same fix in one process: 4 examples × 2 accumulated micro-batches log and train as 8 at once
    (the per-batch mean loss was not divided by grad_accum, so losses and gradients came out doubled)."""
    from osrm_lora import train
    from osrm_lora.tasks import get_task

    data = train_inputs["data"]
    task = get_task("sentiment", files={s: str(data / f"{s}.jsonl") for s in ("train", "dev")},
                    label_names=["negative", "positive"])
    runs = [train.finetune(task, train_inputs["model"], tmp_path / f"b{batch}", init="gaussian",
                           lora=TRAIN_SETTINGS["lora"], seed=5,
                           training={**TRAIN_SETTINGS["training"], "batch_size": batch, "grad_accum": accum,
                                     "eval_each_epoch": False})
            for batch, accum in ((8, 1), (4, 2))]
    for key in ("loss", "grad_norm"):
        torch.testing.assert_close(_logged(runs[1].history, key), _logged(runs[0].history, key), rtol=1e-4,
                                   atol=1e-6, msg=key)
    want = train._lora_state(runs[0].model)
    for key, value in train._lora_state(runs[1].model).items():
        torch.testing.assert_close(value, want[key], rtol=1e-4, atol=1e-5, msg=key)
