"""The `osrm-reg` interference penalty: against its definition on recorded activations (value and gradient),
μ = 0 as plain training bit for bit, the logged parts, and its weight once per optimizer step under gradient
accumulation and under DDP (a 2-process Gloo launch of tests/dist_scripts/reg_worker.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers_core import stats_from_inputs
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file
from test_distributed import _rows, _save_bert, _torchrun
from test_train import FAST, SPEC, _sentences
from torch import nn

from osrm_lora.inits.osrm_tensors import _lora_layers
from osrm_lora.moments import task_moments
from osrm_lora.penalty import InterferencePenalty
from osrm_lora.runtime.models import load_model_and_tokenizer
from osrm_lora.stats import TaskStats, _model_config_hash
from osrm_lora.tasks import Task
from osrm_lora.train import _lora_state, finetune

WORKER = Path(__file__).parent / "dist_scripts" / "reg_worker.py"


class Toy(nn.Module):
    """q and v read the same input (one shared moment); o reads another."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.q, self.v, self.o = nn.Linear(6, 4), nn.Linear(6, 3), nn.Linear(4, 5)

    def forward(self, x, h):
        return self.q(x).sum() + self.v(x).sum() + self.o(h).sum()


def _toy_lora(r: int = 2):
    model = get_peft_model(Toy(), LoraConfig(r=r, lora_alpha=3, target_modules=["q", "v", "o"]))
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen))
    return model


def _activations(n_tasks: int = 3) -> list[dict[str, torch.Tensor]]:
    """Per task, its recorded inputs per module (q and v share one tensor), of different sizes and scales."""
    gen = torch.Generator().manual_seed(7)
    tasks = []
    for j in range(n_tasks):
        x = torch.randn(20 + 7 * j, 6, generator=gen) * torch.linspace(0.2, 2.0 + j, 6) + 0.3 * j
        h = torch.randn(20 + 7 * j, 4, generator=gen) * (1 + j)
        tasks.append({"q": x, "v": x, "o": h})
    return tasks


def _brute_force(model, activations: list[dict[str, torch.Tensor]], weighting: str,
                 factors: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None) -> torch.Tensor:
    """The definition: per module, the other tasks' mean ‖ΔW x‖² over their mean ‖W₀ x‖² (tasks mixed with equal
    weights, or pooled by tokens), averaged over modules; in float64 from the recorded rows."""
    layers = _lora_layers(model, "default")
    ratios = []
    for m, layer in sorted(layers.items()):
        A, B = factors[m] if factors else (layer.lora_A["default"].weight.double(), layer.lora_B["default"].weight.double())
        dW = layer.scaling["default"] * B @ A
        W0 = layer.get_base_layer().weight.double()
        xs = [t[m].double() for t in activations]
        if weighting == "tokens":
            x = torch.cat(xs)
            ratios.append(((x @ dW.T) ** 2).sum() / ((x @ W0.T) ** 2).sum())
        else:
            num = sum(((x @ dW.T) ** 2).sum(1).mean() for x in xs) / len(xs)
            den = sum(((x @ W0.T) ** 2).sum(1).mean() for x in xs) / len(xs)
            ratios.append(num / den)
    return torch.stack(ratios).mean()


def _penalty(model, activations, weighting: str) -> InterferencePenalty:
    others = [stats_from_inputs(f"t{j}", acts) for j, acts in enumerate(activations)]
    moments = task_moments("me", others, weighting=weighting)
    return InterferencePenalty(_lora_layers(model, "default"), moments)


@pytest.mark.parametrize("weighting", ["equal", "tokens"])
def test_penalty_equals_its_definition_on_recorded_activations(weighting):
    model, activations = _toy_lora(), _activations()
    penalty = _penalty(model, activations, weighting)
    assert penalty.modules == ["q", "v", "o"] or sorted(penalty.modules) == ["o", "q", "v"]
    torch.testing.assert_close(penalty().double(), _brute_force(model, activations, weighting), rtol=1e-5, atol=0)
    assert penalty.shared_inputs == 2  # q and v share one moment and one stacked product


def test_penalty_gradient_matches_autograd_of_the_definition():
    model, activations = _toy_lora(), _activations()
    penalty = _penalty(model, activations, "equal")
    penalty().backward()
    layers = _lora_layers(model, "default")
    leaves = {m: (layer.lora_A["default"].weight.detach().double().requires_grad_(),
                  layer.lora_B["default"].weight.detach().double().requires_grad_()) for m, layer in layers.items()}
    _brute_force(model, activations, "equal", leaves).backward()
    for m, layer in layers.items():
        for param, leaf in zip((layer.lora_A["default"].weight, layer.lora_B["default"].weight), leaves[m]):
            torch.testing.assert_close(param.grad.double(), leaf.grad, rtol=1e-4, atol=1e-9, msg=m)


def test_zero_update_has_zero_penalty_and_a_zero_base_energy_is_refused():
    model, activations = _toy_lora(), _activations()
    with torch.no_grad():
        for layer in _lora_layers(model, "default").values():
            layer.lora_B["default"].weight.zero_()
    assert float(_penalty(model, activations, "equal")()) == 0.0
    with torch.no_grad():
        model.get_base_model().o.weight.zero_()
    with pytest.raises(Exception, match="module o: the other tasks' base output energy"):
        _penalty(model, activations, "equal")


# --------------------------------------------------------------------------------------- in training


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory) -> str:
    """A dropout-free tiny BERT (so runs with different batch layouts are comparable)."""
    return _save_bert(tmp_path_factory.mktemp("bert"), hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)


def random_stats(model_dir: str, task: str, seed: int) -> TaskStats:
    """Statistics of a foreign task with a distinct spectrum at the q/v inputs of the tiny BERT."""
    model, _ = load_model_and_tokenizer(model_dir, SPEC)
    gen = torch.Generator().manual_seed(seed)
    second, first = {}, {}
    for layer in range(2):
        x = torch.randn(300, 32, generator=gen) * torch.linspace(0.1, 3.0, 32)
        for proj in ("query", "value"):
            name = f"bert.encoder.layer.{layer}.attention.self.{proj}"
            second[name], first[name] = x.T @ x, x.sum(0)
    return TaskStats(task, model_dir, _model_config_hash(model), second, first, tokens=300)


@pytest.fixture(scope="module")
def other(bert_dir) -> TaskStats:
    return random_stats(bert_dir, "other", 1)


@pytest.fixture(scope="module")
def task() -> Task:
    return Task.from_records(SPEC, {"train": _sentences(64, 0), "dev": _sentences(16, 1)})


def _train(task, bert_dir, other, out, init="osrm-reg", options=None, **training):
    return finetune(task, bert_dir, out, init=init, init_options=options or {}, other_stats=[other], seed=2,
                    lora={"r": 2, "dropout": 0.0}, training={**FAST, "lr": 2e-2, "max_steps": 6, **training})


def test_mu_zero_reproduces_plain_training_bit_for_bit(task, bert_dir, other, tmp_path):
    plain = _train(task, bert_dir, other, tmp_path / "osrm", init="osrm")
    reg = _train(task, bert_dir, other, tmp_path / "reg", options={"mu": 0.0})
    want, got = load_file(str(tmp_path / "osrm" / "adapter_model.safetensors")), \
        load_file(str(tmp_path / "reg" / "adapter_model.safetensors"))
    assert want.keys() == got.keys()
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=0, atol=0, msg=key)
    logged = [h for h in reg.history if "loss" in h]
    assert [h["loss"] for h in logged] == [h["loss"] for h in plain.history if "loss" in h]
    assert all(h["task_loss"] == pytest.approx(h["loss"], rel=1e-6) and h["penalty"] >= 0 for h in logged)
    assert logged[-1]["penalty"] > 0  # measured even when it does not act


def test_logged_loss_is_task_loss_plus_mu_penalty_and_mu_lowers_the_penalty(task, bert_dir, other, tmp_path):
    mu = 30.0
    reg = _train(task, bert_dir, other, tmp_path / "reg", options={"mu": mu})
    plain = _train(task, bert_dir, other, tmp_path / "plain", options={"mu": 0.0})
    for h in (h for h in reg.history if "loss" in h):
        assert h["loss"] == pytest.approx(h["task_loss"] + mu * h["penalty"], rel=1e-5)
    mode = reg.metadata["mode"]
    assert mode["mode"] == "osrm-reg" and mode["mu"] == mu and mode["start"] == "osrm"
    assert mode["penalty_initial"] == 0.0  # B = 0 at the start
    assert mode["penalty_final"] < plain.metadata["mode"]["penalty_final"]
    saved = json.loads((tmp_path / "reg" / "osrm_lora.json").read_text())
    assert saved["mode"]["penalty_final"] == pytest.approx(mode["penalty_final"])
    logged = [{k: h[k] for k in ("step", "loss", "task_loss", "penalty")} for h in reg.history if "penalty" in h]
    assert saved["mode"]["log"] == logged and len(logged) == 6  # logging_steps 1, 6 steps


def test_penalty_counts_once_per_optimizer_step_under_gradient_accumulation(task, bert_dir, other, tmp_path):
    one = _train(task, bert_dir, other, tmp_path / "one", options={"mu": 50.0}, batch_size=8)
    accumulated = _train(task, bert_dir, other, tmp_path / "acc", options={"mu": 50.0}, batch_size=4, grad_accum=2)
    want, got = _lora_state(one.model), _lora_state(accumulated.model)
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=1e-4, atol=1e-6, msg=key)


def test_two_process_training_adds_the_penalty_once(bert_dir, other, tmp_path):
    """2 processes × 4 examples per step (DDP averages the gradients of the same μ·P on both ranks) end where
    one process with 8 per step ends."""
    data = tmp_path / "data"
    data.mkdir()
    for split, rows in (("train", _rows(32, 2)), ("dev", _rows(8, 3))):
        (data / f"{split}.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    other.save(tmp_path / "other.safetensors")
    logs = tmp_path / "logs"
    logs.mkdir()
    _torchrun(WORKER, bert_dir, data, tmp_path / "other.safetensors", logs, cwd=tmp_path)

    from osrm_lora.tasks import get_task

    task = get_task("sentiment", files={s: str(data / f"{s}.jsonl") for s in ("train", "dev")},
                    label_names=["negative", "positive"])
    single = finetune(task, bert_dir, tmp_path / "single", init="osrm-reg", init_options={"mu": 50.0},
                      other_stats=[other], seed=5, lora={"r": 2, "dropout": 0.0},
                      training={**FAST, "lr": 2e-2, "epochs": 1, "batch_size": 8})
    want = _lora_state(single.model)
    for r in (0, 1):
        got = load_file(str(logs / f"lora_rank{r}.safetensors"))
        for key, value in want.items():
            torch.testing.assert_close(got[key], value, rtol=1e-4, atol=1e-5, msg=key)
        history = json.loads((logs / f"history_rank{r}.json").read_text())
        expected = [h["penalty"] for h in single.history if "penalty" in h]
        torch.testing.assert_close([h["penalty"] for h in history if "penalty" in h], expected, rtol=1e-4, atol=1e-9)
