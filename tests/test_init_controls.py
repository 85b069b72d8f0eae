"""The data-free controls: `random-orthonormal` (Haar rows per task and seed) and `task-orthogonal`
(one Haar basis per module and seed, disjoint row blocks per task)."""

from __future__ import annotations

import math

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import BertConfig, BertForSequenceClassification

from osrm_lora.inits import InitContext, get_init
from osrm_lora.inits.controls_tensors import _haar_rows, _random_orthonormal_rows, _task_orthogonal_rows
from osrm_lora.inits.scales import row_scale

TASKS = ("a", "b", "c")
TARGETS = ["query", "value"]


def tiny_bert(hidden: int = 24) -> BertForSequenceClassification:
    torch.manual_seed(0)
    config = BertConfig(vocab_size=40, hidden_size=hidden, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=16, num_labels=2)
    return BertForSequenceClassification(config).eval()


def init_A(init: str, context: InitContext, r: int = 4, hidden: int = 24, **options) -> dict[str, torch.Tensor]:
    """Every lora_A the registered init sets on a tiny BERT (PEFT built as `finetune` builds it)."""
    spec = get_init(init)
    model = tiny_bert(hidden)
    with torch.no_grad():
        base = model(torch.arange(8)[None]).logits
    peft_model = get_peft_model(model, LoraConfig(r=r, target_modules=TARGETS, init_lora_weights=spec.peft_init,
                                                  rank_pattern={"layer.1.attention.self.value": 2}))
    spec.apply(peft_model, None, spec.parse(options), context)
    with torch.no_grad():
        assert torch.equal(peft_model(torch.arange(8)[None]).logits, base)  # B = 0: the base model's function
    return {n.removeprefix("base_model.model."): m.lora_A["default"].weight.detach().double()
            for n, m in peft_model.named_modules() if "default" in getattr(m, "lora_A", {})}


def test_haar_rows_are_orthonormal_and_unbiased():
    g = torch.Generator().manual_seed(0)
    draws = _haar_rows(torch.randn(4000, 6, 2, generator=g, dtype=torch.float64))
    torch.testing.assert_close(draws @ draws.mT, torch.eye(2, dtype=torch.float64).expand(4000, 2, 2))
    # Haar: E[AᵀA] = (r/d)·I and E[A] = 0 (a QR without the sign fix would bias the first column)
    torch.testing.assert_close((draws.mT @ draws).mean(0), torch.eye(6, dtype=torch.float64) / 3, atol=0.02, rtol=0)
    assert float(draws.mean(0).abs().max()) < 0.03
    torch.testing.assert_close(_haar_rows(draws.mT[0] * 2), draws[0])  # orthogonal rows are kept, signs too


def test_random_orthonormal_rows_are_orthonormal_and_fresh_per_task_and_seed():
    A = init_A("random-orthonormal", InitContext("a", seed=0))
    assert len(A) == 4
    for name, a in A.items():
        r = 2 if name.endswith("layer.1.attention.self.value") else 4
        assert a.shape == (r, 24)
        torch.testing.assert_close(a @ a.T, torch.eye(r, dtype=torch.float64), atol=1e-6, rtol=0)
    again = init_A("random-orthonormal", InitContext("a", seed=0))
    other_task = init_A("random-orthonormal", InitContext("b", seed=0))
    other_seed = init_A("random-orthonormal", InitContext("a", seed=1))
    for name, a in A.items():
        assert torch.equal(again[name], a)  # reproducible
        for other in (other_task, other_seed):
            assert not torch.allclose(other[name], a, atol=1e-3)
            assert float((other[name] @ a.T).abs().max()) < 0.99  # not the same rows, nor a sign flip of them
    names = sorted(A)
    assert not torch.allclose(A[names[0]], A[names[2]])  # every module draws its own rows


@pytest.mark.parametrize("scale", ["kaiming", "gaussian"])
def test_random_orthonormal_scale_keeps_the_directions(scale):
    plain = init_A("random-orthonormal", InitContext("a", seed=3))
    scaled = init_A("random-orthonormal", InitContext("a", seed=3), scale=scale)
    for name, a in plain.items():
        r, d = a.shape
        torch.testing.assert_close(scaled[name], a * row_scale(scale, r, d), atol=1e-6, rtol=1e-6)
        expected = {"kaiming": r / 3, "gaussian": d / r}[scale]
        assert float(scaled[name].square().sum()) == pytest.approx(expected, rel=1e-5)


def test_task_orthogonal_rows_are_mutually_orthogonal_across_tasks():
    per_task = {t: init_A("task-orthogonal", InitContext(t, seed=0, tasks=TASKS)) for t in TASKS}
    for name in per_task["a"]:
        stacked = torch.cat([per_task[t][name] for t in TASKS])
        k = stacked.shape[0]
        # A_i A_jᵀ = 0 for i ≠ j and A_i A_iᵀ = I: the stack is one orthonormal frame
        torch.testing.assert_close(stacked @ stacked.T, torch.eye(k, dtype=torch.float64), atol=1e-6, rtol=0)
        for i, t in enumerate(TASKS):
            for u in TASKS[i + 1:]:
                assert float((per_task[t][name] @ per_task[u][name].T).abs().max()) < 1e-6
    other_seed = init_A("task-orthogonal", InitContext("a", seed=1, tasks=TASKS))
    assert all(not torch.allclose(other_seed[n], per_task["a"][n], atol=1e-3) for n in other_seed)


def test_task_orthogonal_rows_do_not_depend_on_how_many_tasks_follow():
    first_of_two = _task_orthogonal_rows(0, "m", 1, 3, 10)
    first_of_three = _task_orthogonal_rows(0, "m", 1, 3, 10)
    torch.testing.assert_close(first_of_two, first_of_three)
    basis = torch.cat([_task_orthogonal_rows(0, "m", i, 3, 10) for i in range(3)])
    torch.testing.assert_close(basis @ basis.T, torch.eye(9, dtype=torch.float64), atol=1e-9, rtol=0)
    assert not torch.allclose(_random_orthonormal_rows(0, "a", "m", 3, 10), _task_orthogonal_rows(0, "m", 0, 3, 10))


def test_task_orthogonal_refuses_too_many_rows_and_an_unknown_task():
    with pytest.raises(ValueError, match=r"module bert\.encoder\.layer\.0\.attention\.self\.query: 7 tasks × "
                                         r"rank 4 = 28 orthogonal rows do not fit in its input dim 24"):
        init_A("task-orthogonal", InitContext("a", tasks=tuple("abcdefg")))
    with pytest.raises(ValueError, match=r"needs the merged tasks, and task 'z' is not among \['a', 'b', 'c'\]"):
        init_A("task-orthogonal", InitContext("z", tasks=TASKS))
    with pytest.raises(ValueError, match="not among"):
        init_A("task-orthogonal", InitContext("a"))
    assert math.isclose(row_scale("gaussian", 4, 64), 2.0)
