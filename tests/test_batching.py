"""Length-sorted (bucketed) batches: less padding, the same predictions in the same order, the same statistics."""

from __future__ import annotations

import pytest
import torch
from helpers_merge import tiny_bert

from osrm_lora.stats import collect_stats
from osrm_lora.tasks import Task, TaskError, TaskSpec, make_dataloader
from osrm_lora.tasks.batching import restore_order

SPEC = TaskSpec("pairs", ("a", "b"), ("x", "y", "z"), ("accuracy",), "accuracy")
WORDS = ["the", "a", "cat", "dog", "sat", "on", "mat", "is", "not", "good", "bad", "very", "movie", "was"]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from transformers import BertTokenizerFast

    vocab = tmp_path_factory.mktemp("tok") / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]) + "\n")
    return BertTokenizerFast(vocab_file=str(vocab))


@pytest.fixture(scope="module")
def task():
    g = torch.Generator().manual_seed(0)
    rows = []
    for i in range(37):
        n, m = (int(v) for v in torch.randint(1, 20, (2,), generator=g))
        words = [WORDS[int(j)] for j in torch.randint(len(WORDS), (n + m,), generator=g)]
        rows.append({"text": " ".join(words[:n]), "text_pair": " ".join(words[n:]), "label": i % 3})
    return Task.from_records(SPEC, {"dev": rows})


def varied_bert(seed: int):
    """A tiny BERT with weights large enough that its predictions differ between inputs."""
    model = tiny_bert(seed=seed, num_labels=3)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.copy_(0.3 * torch.randn(p.shape, generator=g))
    return model


def loaders(task, tokenizer, batch_size=6):
    data = task.split("dev")
    return [make_dataloader(data, tokenizer, SPEC, batch_size, max_length=32, by_length=b) for b in (False, True)]


def logits_of(model, batches) -> tuple[torch.Tensor, list]:
    """One pass, outputs put back in row order as evaluation does."""
    out, labels = [], []
    with torch.inference_mode():
        for batch in batches:
            batch = dict(batch)
            labels.extend(batch.pop("labels").tolist())
            out.extend(model(**batch).logits)
    return torch.stack(restore_order(out, batches)), restore_order(labels, batches)


def test_sorted_batches_pad_less_and_keep_every_row(task, tokenizer):
    plain, sorted_ = loaders(task, tokenizer)
    positions = [sum(b["input_ids"].numel() for b in loader) for loader in (plain, sorted_)]
    tokens = [sum(int(b["attention_mask"].sum()) for b in loader) for loader in (plain, sorted_)]
    assert tokens[0] == tokens[1] and positions[1] < positions[0]
    lengths = [int(n) for b in sorted_ for n in b["attention_mask"].sum(1)]
    assert lengths == sorted(lengths, reverse=True)
    rows = [r for b in plain for r in b["input_ids"].tolist()]
    back = restore_order([r for b in sorted_ for r in b["input_ids"].tolist()], sorted_)
    assert [[t for t in r if t] for r in back] == [[t for t in r if t] for r in rows]
    assert restore_order([1, 2], [{"x": 1}]) == [1, 2]  # not a sorted pass: order unchanged
    with pytest.raises(ValueError, match="3 outputs for a pass over 37 rows"):
        restore_order([1, 2, 3], sorted_)
    with pytest.raises(TaskError, match="shuffled or sorted by length"):
        make_dataloader(task.split("dev"), tokenizer, SPEC, 4, shuffle=True, by_length=True)


def test_predictions_are_identical_in_the_original_order(task, tokenizer):
    model = varied_bert(seed=1)
    (plain, plain_labels), (bucketed, bucketed_labels) = (logits_of(model, b) for b in loaders(task, tokenizer))
    assert bucketed_labels == plain_labels == [i % 3 for i in range(37)]
    torch.testing.assert_close(bucketed, plain, rtol=1e-5, atol=1e-6)
    assert torch.equal(bucketed.argmax(-1), plain.argmax(-1))
    assert len(set(plain.argmax(-1).tolist())) > 1  # the comparison is not between constant predictions


def test_statistics_sums_agree(task, tokenizer):
    model = varied_bert(seed=2)
    plain, bucketed = (collect_stats(model, b, ["query", "value", "intermediate.dense"], task="pairs")
                       for b in loaders(task, tokenizer, batch_size=5))
    assert plain.tokens == bucketed.tokens == sum(int(b["attention_mask"].sum()) for b in loaders(task, tokenizer)[0])
    assert plain.modules == bucketed.modules and any("intermediate" in m for m in plain.modules)
    for m in plain.modules:
        torch.testing.assert_close(bucketed.second[m], plain.second[m], rtol=1e-5, atol=1e-4)
        torch.testing.assert_close(bucketed.first[m], plain.first[m], rtol=1e-5, atol=1e-4)


def _padded_by_hand(rows, key, fill, left):
    """The reference: each row padded to the longest with `fill`, on the left or the right."""
    length = max(len(r[key]) for r in rows)
    pad = [[fill] * (length - len(r[key])) for r in rows]
    return torch.tensor([p + list(r[key]) if left else list(r[key]) + p for p, r in zip(pad, rows)])


@pytest.mark.parametrize("side", ["right", "left"])
def test_the_one_collator_pads_like_the_definition_on_either_side(tokenizer, side):
    """Training, statistics and evaluation share `make_collator` (transformers' DataCollatorWithPadding)."""
    from osrm_lora.tasks import make_collator

    rows = [{"input_ids": list(range(5, 5 + n)), "attention_mask": [1] * n, "token_type_ids": [0] * n,
             "labels": n % 3} for n in (3, 7, 1, 5)]
    tokenizer.padding_side = side
    try:
        batch = make_collator(tokenizer, regression=False)(rows)
    finally:
        tokenizer.padding_side = "right"
    left = side == "left"
    assert torch.equal(batch["input_ids"], _padded_by_hand(rows, "input_ids", tokenizer.pad_token_id, left))
    assert torch.equal(batch["attention_mask"], _padded_by_hand(rows, "attention_mask", 0, left))
    assert torch.equal(batch["token_type_ids"], _padded_by_hand(rows, "token_type_ids", 0, left))
    assert batch["labels"].dtype == torch.long and batch["labels"].tolist() == [0, 1, 1, 2]
    regression = make_collator(tokenizer, regression=True)(rows)
    assert regression["labels"].dtype == torch.float32  # whole-number scores still train a regression head


def test_a_tokenizer_without_pad_token_pads_with_eos(tokenizer):
    import copy

    from osrm_lora.tasks import make_collator

    no_pad = copy.deepcopy(tokenizer)
    no_pad.eos_token = "[SEP]"
    no_pad.pad_token = None
    batch = make_collator(no_pad, regression=False)([{"input_ids": [5, 6], "labels": 0}, {"input_ids": [5], "labels": 1}])
    assert batch["input_ids"][1, 1].item() == no_pad.convert_tokens_to_ids("[SEP]")
    no_pad.eos_token = None
    no_pad.pad_token = None
    with pytest.raises(TaskError, match="neither a pad nor an eos"):
        make_collator(no_pad, regression=False)
