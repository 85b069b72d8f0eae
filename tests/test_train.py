"""Fine-tuning one LoRA adapter: inits, freezing, saving, determinism, decoders, regression, resume.

Everything runs on tiny random models saved with an offline word-level tokenizer, on a synthetic task whose
label is whether the sentence contains "good" or "bad".
"""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch
from peft import PeftModel
from pydantic import ValidationError
from safetensors.torch import load_file
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import (
    BertConfig,
    BertModel,
    GPT2Config,
    GPT2Model,
    LlamaConfig,
    LlamaModel,
    PreTrainedTokenizerFast,
    TrainerCallback,
)

from osrm_lora.runtime.models import load_model_and_tokenizer
from osrm_lora.settings import LoraSettings, TrainingSettings
from osrm_lora.stats import TaskStats, _model_config_hash
from osrm_lora.subspace import subspace_from_others
from osrm_lora.tasks import Task, TaskSpec
from osrm_lora.train import _resolve_precision, _start_regression_head_at_mean, finetune

FILLERS = [f"w{i}" for i in range(16)]
WORDS = ["good", "bad", *FILLERS]
SPEC = TaskSpec("sentiment", ("text",), ("negative", "positive"), ("accuracy", "f1"), "accuracy")
REG_SPEC = TaskSpec("count", ("text",), None, ("pearson", "spearman"), "pearson")
FAST = {"batch_size": 16, "logging_steps": 1, "progress": False, "warmup_ratio": 0.0}


def _sentences(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        label = i % 2
        words = rng.choices(FILLERS, k=rng.randint(3, 7))
        words.insert(rng.randrange(len(words) + 1), "good" if label else "bad")
        rows.append({"text": " ".join(words), "label": label})
    return rows


def _counts(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        k = rng.randint(0, 4)
        words = rng.choices(FILLERS, k=4) + ["good"] * k
        rng.shuffle(words)
        rows.append({"text": " ".join(words), "label": float(k)})
    return rows


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models run far faster on one thread than contending for busy cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def task():
    return Task.from_records(SPEC, {"train": _sentences(64, 0), "dev": _sentences(32, 1)})


def _tokenizer(decoder: bool) -> PreTrainedTokenizerFast:
    specials = ["</s>", "[UNK]"] if decoder else ["[PAD]", "[UNK]", "[CLS]", "[SEP]"]
    vocab = {w: i for i, w in enumerate(specials + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    if decoder:  # Llama-style: an eos token and no pad token, the case finetune must handle
        return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", eos_token="</s>",
                                       model_input_names=["input_ids", "attention_mask"])
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", 2), ("[SEP]", 3)]
    )
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                                   sep_token="[SEP]")


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-bert")
    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(WORDS) + 4, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=32, initializer_range=0.2)
    BertModel(config).save_pretrained(path)
    _tokenizer(decoder=False).save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def decoder_dirs(tmp_path_factory):
    """Tiny Llama and GPT-2 models whose tokenizer has eos but no pad token."""
    common = {"vocab_size": len(WORDS) + 2, "eos_token_id": 0, "bos_token_id": None, "pad_token_id": None,
              "initializer_range": 0.2}
    models_ = {
        "llama": LlamaModel(LlamaConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                        num_key_value_heads=2, intermediate_size=64, max_position_embeddings=32,
                                        **common)),
        "gpt2": GPT2Model(GPT2Config(n_embd=32, n_layer=2, n_head=2, n_positions=32, **common)),
    }
    paths = {}
    for name, model in models_.items():
        paths[name] = str(tmp_path_factory.mktemp(f"tiny-{name}"))
        model.save_pretrained(paths[name])
        _tokenizer(decoder=True).save_pretrained(paths[name])
    return paths


@pytest.fixture(scope="module")
def other_stats(bert_dir):
    """A foreign task's input statistics with a distinct spectrum, shared by query and value of a layer."""
    model, _ = load_model_and_tokenizer(bert_dir, SPEC)
    gen = torch.Generator().manual_seed(1)
    second, first = {}, {}
    for layer in range(2):
        x = torch.randn(200, 32, generator=gen) * torch.linspace(0.1, 3.0, 32)
        s, f = x.T @ x, x.sum(0)
        for proj in ("query", "value"):
            name = f"bert.encoder.layer.{layer}.attention.self.{proj}"
            second[name], first[name] = s, f
    return [TaskStats("other", bert_dir, _model_config_hash(model), second, first, tokens=200)]


class Snapshot(TrainerCallback):
    """Copies of the adapter's and head's trainable tensors when training begins."""

    def __init__(self):
        self.before: dict[str, torch.Tensor] = {}

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.before = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n or "modules_to" in n}


class CountSteps(TrainerCallback):
    def __init__(self):
        self.steps = 0

    def on_step_end(self, args, state, control, **kwargs):
        self.steps += 1


class Interrupt(TrainerCallback):
    def on_save(self, args, state, control, **kwargs):
        raise KeyboardInterrupt("simulated interruption after the first checkpoint")


def _losses(result) -> list[float]:
    return [entry["loss"] for entry in result.history if "loss" in entry]


def _adapter_tensors(folder) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "adapter_model.safetensors"))


@pytest.mark.parametrize("init", ["kaiming", "osrm"])
def test_training_reduces_loss_and_keeps_best_epoch(task, bert_dir, other_stats, tmp_path, init):
    stats = other_stats if init == "osrm" else None
    result = finetune(task, bert_dir, tmp_path / "out", init=init, other_stats=stats, seed=0,
                      lora={"r": 4, "dropout": 0.0},
                      training=dict(FAST, lr=2e-2, epochs=8, keep_best=True))
    losses = _losses(result)
    assert np.mean(losses[-4:]) < 0.7 * np.mean(losses[:4])
    *epoch_scores, final = [e["eval_accuracy"] for e in result.history if "eval_accuracy" in e]
    assert len(epoch_scores) == 8  # one evaluation per epoch, then the final one of the kept adapter
    assert result.metrics["accuracy"] == final == pytest.approx(max(epoch_scores))
    assert result.metrics["accuracy"] > 0.75


def test_osrm_init_sets_A_to_the_smallest_eigenvectors_of_the_other_tasks(task, bert_dir, other_stats, tmp_path):
    subspace = subspace_from_others("sentiment", other_stats, 4)
    snap = Snapshot()
    result = finetune(task, bert_dir, tmp_path / "out", init="osrm", subspace=subspace, lora={"r": 4},
                      training=dict(FAST, max_steps=1), callbacks=[snap])
    A = {n: t for n, t in snap.before.items() if ".lora_A." in n}
    assert len(A) == 4
    for name, a in A.items():
        module = name.removeprefix("base_model.model.").split(".lora_A.")[0]
        assert torch.equal(a, subspace.rows(module, 4))
        moment = other_stats[0].moment(module).numpy()
        _, vectors = np.linalg.eigh(moment)
        reference = vectors[:, :4] @ vectors[:, :4].T  # projector onto the 4 least-energy directions
        np.testing.assert_allclose(a.double().T.numpy() @ a.double().numpy(), reference, atol=1e-5)
    assert all(torch.count_nonzero(t) == 0 for n, t in snap.before.items() if ".lora_B." in n)
    meta = json.loads((result.path / "osrm_lora.json").read_text())
    assert meta["init"] == "osrm" and meta["subspace"]["variant"] == "cov"
    assert meta["subspace"]["others"] == ["other"]


def test_init_options_tasks_and_the_official_init_reach_the_adapter(task, bert_dir, other_stats, tmp_path):
    subspace = subspace_from_others("sentiment", other_stats, 4)
    snap = Snapshot()
    result = finetune(task, bert_dir, tmp_path / "scaled", init="osrm", init_options={"scale": "gaussian"},
                      subspace=subspace, lora={"r": 4}, training=dict(FAST, max_steps=1), callbacks=[snap])
    for name, a in snap.before.items():
        if ".lora_A." in name:
            module = name.removeprefix("base_model.model.").split(".lora_A.")[0]
            torch.testing.assert_close(a, subspace.rows(module, 4) * (32 ** 0.5 / 4))  # √d / r
    meta = json.loads((result.path / "osrm_lora.json").read_text())
    assert meta["init_options"] == {"scale": "gaussian"} and meta["merged_tasks"] == []

    tasks = ["other", "sentiment"]
    other = Task.from_records(TaskSpec("other", ("text",), ("negative", "positive"), ("accuracy",), "accuracy"),
                              {"train": _sentences(32, 2)})
    snaps = {t: Snapshot() for t in tasks}
    for t, data in zip(tasks, (other, task)):  # the adapters of two merged tasks start on orthogonal rows
        finetune(data, bert_dir, tmp_path / t, init="task-orthogonal", tasks=tasks, lora={"r": 4},
                 training=dict(FAST, max_steps=1), callbacks=[snaps[t]])
    for name, a in snaps["other"].before.items():
        if ".lora_A." in name:
            assert float((a @ snaps["sentiment"].before[name].T).abs().max()) < 1e-5
    assert json.loads((tmp_path / "other" / "osrm_lora.json").read_text())["merged_tasks"] == tasks

    from osrm_lora.inits.official_tensors import official_stats
    model, tokenizer = load_model_and_tokenizer(bert_dir, SPEC)
    foreign = Task.from_records(SPEC, {"train": _sentences(20, 5)})
    padded = [official_stats(foreign, model, tokenizer, samples=8, max_length=16)]
    padded[0].task = "other"
    snap = Snapshot()
    result = finetune(task, bert_dir, tmp_path / "official", init="osrm-official", other_stats=padded,
                      lora={"r": 4}, training=dict(FAST, max_steps=1), callbacks=[snap])
    meta = json.loads((result.path / "osrm_lora.json").read_text())
    assert meta["subspace"]["variant"] == "official" and meta["subspace"]["others"] == ["other"]
    for name, a in snap.before.items():
        if ".lora_A." in name:  # orthogonal to the other task's padded mean input
            module = name.removeprefix("base_model.model.").split(".lora_A.")[0]
            assert float((a.double() @ padded[0].mean(module)).abs().max()) < 1e-4
    with pytest.raises(ValueError, match="count real tokens only"):
        finetune(task, bert_dir, tmp_path / "y", init="osrm-official", other_stats=other_stats, lora={"r": 4})
    with pytest.raises(ValueError, match="init 'osrm': unknown option 'size'"):
        finetune(task, bert_dir, tmp_path / "y", init="osrm", init_options={"size": 2}, subspace=subspace)
    with pytest.raises(ValueError, match="not among"):
        finetune(task, bert_dir, tmp_path / "y", init="task-orthogonal", lora={"r": 4},
                 training=dict(FAST, max_steps=1))


@pytest.mark.parametrize("freeze, init", [("A", "kaiming"), ("B", "pissa")])
def test_freeze_keeps_exactly_that_factor(task, bert_dir, tmp_path, freeze, init):
    # PiSSA starts with B != 0, so with B frozen A still receives gradients.
    snap = Snapshot()
    result = finetune(task, bert_dir, tmp_path / "out", init=init, lora={"r": 4, "freeze": freeze},
                      training=dict(FAST, lr=1e-2, max_steps=4, eval_each_epoch=False), callbacks=[snap])
    trained = "B" if freeze == "A" else "A"
    params = dict(result.model.named_parameters())
    seen = {"frozen": 0, "trained": 0, "head": 0}
    for name, before in snap.before.items():
        if f".lora_{freeze}." in name:
            assert not params[name].requires_grad and torch.equal(params[name], before), name
            seen["frozen"] += 1
        elif f".lora_{trained}." in name:
            assert params[name].requires_grad and not torch.equal(params[name], before), name
            seen["trained"] += 1
        elif "modules_to_save" in name:
            assert params[name].requires_grad and not torch.equal(params[name], before), name
            seen["head"] += 1
    assert seen["frozen"] == seen["trained"] == 4 and seen["head"] > 0


def _logits(model, tokenizer, texts):
    batch = tokenizer(texts, padding=True, return_tensors="pt")
    model.eval()
    with torch.no_grad():
        return model(**batch).logits


@pytest.mark.parametrize("init", ["kaiming", "olora"])
def test_saved_folder_reloads_on_a_fresh_base_with_identical_logits(task, bert_dir, tmp_path, init):
    out = tmp_path / "out"
    result = finetune(task, bert_dir, out, init=init, lora={"r": 4}, seed=3,
                      training=dict(FAST, lr=1e-2, max_steps=6))
    assert not out.with_name("out.partial").exists()
    assert {"adapter_config.json", "adapter_model.safetensors", "osrm_lora.json", "tokenizer.json"} <= {
        p.name for p in out.iterdir()}
    base, tokenizer = load_model_and_tokenizer(bert_dir, SPEC)  # a differently initialised head: replaced
    reloaded = PeftModel.from_pretrained(base, str(out))
    texts = [r["text"] for r in _sentences(8, 5)]
    expected = _logits(result.model, tokenizer, texts)
    torch.testing.assert_close(_logits(reloaded, tokenizer, texts), expected, atol=1e-5, rtol=1e-5)
    meta = json.loads((out / "osrm_lora.json").read_text())
    assert meta["task"] == "sentiment" and meta["seed"] == 3 and meta["init"] == init
    assert meta["target_modules"] == ["query", "value"]
    assert meta["dev_metrics"] == result.metrics and "accuracy" in meta["dev_metrics"]
    assert meta["config_hash"] == _model_config_hash(base)
    if not torch.cuda.is_available():
        assert (meta["device"], meta["precision"]) == ("cpu", "fp32")
    if init == "olora":  # converted to a plain LoRA on the unmodified base: ΔW = BA − B₀A₀ has rank 2r
        assert json.loads((out / "adapter_config.json").read_text())["r"] == 8


def test_same_seed_gives_identical_weights(task, bert_dir, tmp_path):
    settings = dict(FAST, max_steps=4, eval_each_epoch=False)
    runs = [finetune(task, bert_dir, tmp_path / name, seed=seed, lora={"r": 4}, training=settings)
            for name, seed in (("a", 7), ("b", 7), ("c", 8))]
    a, b, c = (_adapter_tensors(r.path) for r in runs)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)


@pytest.mark.parametrize("arch, targets", [("llama", ["q_proj", "v_proj"]), ("gpt2", ["c_attn"])])
def test_tiny_decoders_train_with_eos_padding_and_a_score_head(task, decoder_dirs, tmp_path, arch, targets):
    result = finetune(task, decoder_dirs[arch], tmp_path / "out", lora={"r": 4, "dropout": 0.0},
                      training=dict(FAST, lr=1e-2, epochs=4))
    losses = _losses(result)
    assert np.mean(losses[-3:]) < 0.8 * np.mean(losses[:3])
    assert result.metadata["target_modules"] == targets
    assert result.model.config.pad_token_id == 0  # eos
    saved = _adapter_tensors(result.path)
    assert any(k.endswith("score.weight") for k in saved)
    assert sum(".lora_A." in k for k in saved) == 2 * len(targets)
    base, tokenizer = load_model_and_tokenizer(decoder_dirs[arch], SPEC)
    reloaded = PeftModel.from_pretrained(base, str(result.path))
    texts = [r["text"] for r in _sentences(8, 5)]
    batched = _logits(result.model, tokenizer, texts)
    torch.testing.assert_close(_logits(reloaded, tokenizer, texts), batched)
    # Sentences of different lengths padded with eos score as they do alone: the head reads the last real token.
    alone = torch.cat([_logits(result.model, tokenizer, [t]) for t in texts])
    torch.testing.assert_close(batched, alone, atol=1e-5, rtol=1e-5)


def test_regression_task_trains_a_single_output(bert_dir, tmp_path):
    regression = Task.from_records(REG_SPEC, {"train": _counts(64, 0), "dev": _counts(32, 1)})
    result = finetune(regression, bert_dir, tmp_path / "out", lora={"r": 4, "dropout": 0.0},
                      training=dict(FAST, lr=1e-2, epochs=5))
    assert result.model.config.problem_type == "regression" and result.model.config.num_labels == 1
    losses = _losses(result)
    assert np.mean(losses[-4:]) < 0.5 * np.mean(losses[:4])
    assert set(result.metrics) >= {"pearson", "spearman"} and result.metrics["pearson"] > 0.5
    # the head started at the mean training label (0-4 here), not at 0
    mean_label = np.mean([r["label"] for r in _counts(64, 0)])
    assert result.metadata["regression_head_bias_init"] == pytest.approx(mean_label)


def test_regression_head_bias_starts_at_mean_label_only_where_there_is_a_bias(decoder_dirs, bert_dir):
    bert, _ = load_model_and_tokenizer(bert_dir, REG_SPEC)
    assert _start_regression_head_at_mean(bert, [1.0, 2.0, 6.0]) == pytest.approx(3.0)
    assert torch.equal(bert.classifier.bias, torch.tensor([3.0]))
    llama, _ = load_model_and_tokenizer(decoder_dirs["llama"], REG_SPEC)  # `score` has no bias
    before = llama.score.weight.clone()
    assert _start_regression_head_at_mean(llama, [1.0, 2.0]) is None
    assert torch.equal(llama.score.weight, before)


def test_interrupted_run_leaves_no_folder_and_resumes(task, bert_dir, tmp_path, caplog):
    out, partial = tmp_path / "out", tmp_path / "out.partial"
    settings = dict(FAST, epochs=2, eval_each_epoch=False)

    def interrupted(**overrides):
        with pytest.raises(KeyboardInterrupt):
            finetune(task, bert_dir, out, seed=1, lora={"r": 4}, training=dict(settings, **overrides),
                     callbacks=[Interrupt()])
        assert (partial / "checkpoint-4").is_dir()

    interrupted(lr=1e-3)
    assert not out.exists()
    counter = CountSteps()
    finetune(task, bert_dir, out, seed=1, lora={"r": 4}, training=settings, resume=True, callbacks=[counter])
    assert counter.steps == 8 and "had a different training" in caplog.text  # other settings: started over
    finished = _adapter_tensors(out)
    interrupted()
    previous = _adapter_tensors(out)  # an interrupted run leaves the complete folder it would replace alone
    assert all(torch.equal(previous[k], finished[k]) for k in finished)
    counter = CountSteps()
    resumed = finetune(task, bert_dir, out, seed=1, lora={"r": 4}, training=settings, resume=True,
                       callbacks=[counter])
    assert resumed.metadata["resumed_from"] == "checkpoint-4" and resumed.steps == 8
    assert counter.steps == 4  # only the second epoch ran again
    assert out.is_dir() and not partial.exists()
    assert [e["step"] for e in resumed.history if "loss" in e][-1] == 8
    straight = finetune(task, bert_dir, tmp_path / "straight", seed=1, lora={"r": 4}, training=settings)
    a, b = _adapter_tensors(out), _adapter_tensors(straight.path)
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


def test_settings_errors_name_the_field():
    with pytest.raises(ValidationError, match="r\n"):
        LoraSettings(r=0)
    with pytest.raises(ValidationError, match="freeze"):
        LoraSettings(freeze="both")
    with pytest.raises(ValidationError, match="learning_rate"):
        TrainingSettings.model_validate({"learning_rate": 1e-3})
    with pytest.raises(ValidationError, match="keep_best"):
        TrainingSettings(keep_best=True, eval_each_epoch=False)
    with pytest.raises(ValueError, match="precision='bf16'"):
        _resolve_precision("bf16", cuda=False)
    assert _resolve_precision("auto", cuda=False) == "fp32"


def test_init_arguments_are_checked(task, bert_dir, other_stats, tmp_path):
    with pytest.raises(ValueError, match="needs the task's subspace"):
        finetune(task, bert_dir, tmp_path / "x", init="osrm")
    with pytest.raises(ValueError, match="uses no subspace"):
        finetune(task, bert_dir, tmp_path / "x", init="kaiming", other_stats=other_stats)
    with pytest.raises(ValueError, match="is unknown"):
        finetune(task, bert_dir, tmp_path / "x", init="lora-ga")
    foreign = subspace_from_others("another-task", other_stats, 4)
    with pytest.raises(ValueError, match="not for task 'sentiment'"):
        finetune(task, bert_dir, tmp_path / "x", init="osrm", subspace=foreign, lora={"r": 4})
    mean = subspace_from_others("sentiment", other_stats, 4, variant="mean")
    with pytest.raises(ValueError, match="variant"):
        finetune(task, bert_dir, tmp_path / "x", init="osrm", subspace=mean, lora={"r": 4})
    assert not (tmp_path / "x").exists() and not (tmp_path / "x.partial").exists()
