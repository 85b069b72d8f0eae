"""`osrm-official` against an independent transcription of the official OSRM code's steps on a tiny model, and
the finding that its A is nearly a fixed selection of the last r input coordinates."""

from __future__ import annotations

import dataclasses
import logging
import random

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import BertConfig, BertForSequenceClassification, PreTrainedTokenizerFast

from osrm_lora.diagnostics import _coordinate_mass
from osrm_lora.inits.official_tensors import _official_sample, _padded_examples, official_stats
from osrm_lora.modules import find_target_modules
from osrm_lora.stats import _model_config_hash
from osrm_lora.subspace import _official_null_space, official_subspaces
from osrm_lora.tasks import Task, TaskSpec

WORDS = [f"w{i}" for i in range(20)]
SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "</s>"]
TASKS = ("a", "b", "c")
L, R, N = 12, 4, 10  # max_length, rank, examples per task


def tokenizer(with_eos: bool) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(SPECIALS + WORDS)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2),
                                                                                                  ("[SEP]", 3)])
    eos = {"eos_token": "</s>"} if with_eos else {}
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                                   sep_token="[SEP]", **eos)


def tiny_bert() -> BertForSequenceClassification:
    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(SPECIALS + WORDS), hidden_size=32, num_hidden_layers=2,
                        num_attention_heads=2, intermediate_size=48, max_position_embeddings=32,
                        initializer_range=0.3, num_labels=2)
    return BertForSequenceClassification(config).eval()


def make_task(name: str, seed: int) -> Task:
    rng = random.Random(seed)
    vocab = WORDS[seed * 5:seed * 5 + 8]  # each task has its own word distribution
    rows = [{"text": " ".join(rng.choices(vocab, k=rng.randint(2, 16))), "label": i % 2} for i in range(30)]
    return Task.from_records(TaskSpec(name, ("text",), ("no", "yes"), ("accuracy",), "accuracy"), {"train": rows})


@pytest.fixture(scope="module")
def tasks():
    return {t: make_task(t, i) for i, t in enumerate(TASKS)}


def transcription(model, tok, texts_per_task: dict[str, list[str]], targets: list[str]) -> dict:
    """The official code's steps written out: per example a forward pass of [CLS] + the last L−2 tokens + [SEP],
    right-padded with eos; at each target module's input the mean over all L positions, then over examples;
    per task the other tasks' stacked means, full SVD, last R rows of Vᵀ."""
    layers = find_target_modules(model, targets)
    captured = {}
    handles = [layer.register_forward_hook(lambda mod, inp, out, name=name: captured.__setitem__(name, inp[0]))
               for name, layer in layers.items()]
    pad = tok.eos_token_id if tok.eos_token_id is not None else tok.pad_token_id
    features = {}
    for task, texts in texts_per_task.items():
        sums = {name: torch.zeros(32) for name in layers}
        for text in texts:
            words = tok(text, add_special_tokens=False)["input_ids"][-(L - 2):]  # truncated from the left
            ids = [tok.cls_token_id, *words, tok.sep_token_id]
            mask = [1] * len(ids) + [0] * (L - len(ids))
            ids = ids + [pad] * (L - len(ids))
            with torch.no_grad():
                model(input_ids=torch.tensor([ids]), attention_mask=torch.tensor([mask]),
                      token_type_ids=torch.zeros(1, L, dtype=torch.long))
            for name in layers:
                sums[name] += captured[name].mean(dim=1).mean(dim=0)
        features[task] = {name: total / len(texts) for name, total in sums.items()}
    for handle in handles:
        handle.remove()
    A = {}
    for task in texts_per_task:
        A[task] = {}
        for name in layers:
            X = torch.stack([features[other][name] for other in texts_per_task if other != task])
            _, _, Vt = torch.linalg.svd(X)
            A[task][name] = Vt.T[:, -R:].T
    return A


@pytest.mark.parametrize("with_eos", [True, False])
def test_official_subspaces_match_the_transcription(tasks, with_eos, caplog):
    model, tok = tiny_bert(), tokenizer(with_eos)
    targets = ["query", "value"]
    with caplog.at_level(logging.INFO, logger="osrm_lora.inits.official_tensors"):
        stats = [official_stats(tasks[t], model, tok, targets, samples=N, seed=3, max_length=L) for t in TASKS]
    assert ("has no eos token" in caplog.text) is not with_eos
    texts = {t: list(_official_sample(tasks[t].split("train"), N, 3)["text"]) for t in TASKS}
    assert any(len(x.split()) > L - 2 for v in texts.values() for x in v)  # left truncation is exercised
    expected = transcription(model, tok, texts, targets)
    subspaces = official_subspaces(stats, R)
    wider = official_subspaces(stats, 2 * R)  # computed with a larger rank, a rank-R LoRA still starts on these
    for t in TASKS:
        assert subspaces[t].variant == "official" and subspaces[t].others == [u for u in TASKS if u != t]
        assert subspaces[t].config_hash == _model_config_hash(model)
        for name, rows in expected[t].items():
            torch.testing.assert_close(subspaces[t].A[name], rows, atol=2e-5, rtol=0)
            torch.testing.assert_close(rows @ rows.T, torch.eye(R), atol=1e-5, rtol=0)
            torch.testing.assert_close(wider[t].rows(name, R), rows, atol=2e-5, rtol=0)
            assert subspaces[t].spectrum[name]["null_dim"] == 32 - 2


def test_padding_is_eos_on_the_right_and_counted(tasks):
    tok = tokenizer(with_eos=True)
    data = tasks["a"].split("train").select(range(3))
    batches = _padded_examples(data, tok, tasks["a"].spec, L)
    assert len(batches) == 3 and all(b["input_ids"].shape == (1, L) for b in batches)
    for b in batches:
        n = int(b["attention_mask"].sum())
        assert b["input_ids"][0, n:].tolist() == [tok.convert_tokens_to_ids("</s>")] * (L - n)
    assert tok.pad_token == "[PAD]" and tok.truncation_side == "right"  # the caller's tokenizer is untouched
    stats = official_stats(tasks["a"], tiny_bert(), tok, ["query"], samples=3, seed=0, max_length=L)
    assert stats.tokens == 3 * L and stats.extra["mask_padding"] == "false"  # every position counts
    with pytest.raises(ValueError, match="count real tokens only"):
        official_subspaces([dataclasses.replace(stats, task="masked", extra={}), stats], R)


def test_the_sample_is_a_seeded_shuffle(tasks):
    data = tasks["b"].split("train")
    first, again, other = (list(_official_sample(data, 10, s)["text"]) for s in (0, 0, 1))
    assert first == again and first != other and len(first) == 10
    assert len(_official_sample(data, 100, 0)) == len(data)


def test_householder_completion_puts_the_rows_on_the_last_coordinates():
    """k ≪ d stacked means: LAPACK completes the null space with near-unit vectors e_{d−r..d−1}; the official A is
    then nearly the same coordinate selection for every task (docs/inits.md has the figures)."""
    rng = np.random.default_rng(0)
    d, k, r = 384, 7, 8  # MiniLM's width, the other 7 GLUE tasks, rank 8
    for _ in range(3):
        rows, _ = _official_null_space(torch.tensor(rng.standard_normal((k, d))), r)
        last = (rows[:, -r:].double().square().sum(1) / rows.double().square().sum(1))
        assert float(last.min()) > 0.93 and float(last.mean()) > 0.96
        assert _coordinate_mass(rows) == pytest.approx(float(rows[:, -r:].square().sum() / rows.square().sum()),
                                                      rel=1e-6)  # its r largest coordinates are the last r
        np.testing.assert_allclose(rows.double().numpy() @ rows.double().numpy().T, np.eye(r), atol=1e-5)
