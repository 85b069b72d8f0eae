"""PEFT's inits as registered: `kaiming` (PEFT's default) and `gaussian` (the official OSRM code's baseline)."""

from __future__ import annotations

import math

import pytest
import torch
from helpers_core import OneLinear
from peft import LoraConfig, get_peft_model

from osrm_lora.inits import get_init


def initial_A(init: str, r: int, d: int, seed: int) -> torch.Tensor:
    config = LoraConfig(r=r, target_modules=["proj"], init_lora_weights=get_init(init).peft_init)
    model = get_peft_model(OneLinear(d, 4, seed), config)
    assert torch.count_nonzero(model.base_model.model.proj.lora_B["default"].weight) == 0
    return model.base_model.model.proj.lora_A["default"].weight.detach().double()


@pytest.mark.parametrize("r,d", [(8, 256), (4, 1024)])
def test_gaussian_has_std_one_over_r_and_row_norm_sqrt_d_over_r(r, d):
    A = torch.cat([initial_A("gaussian", r, d, seed) for seed in range(4)])
    n = A.numel()
    assert float(A.mean()) == pytest.approx(0.0, abs=4 / (r * math.sqrt(n)))
    assert float(A.std()) == pytest.approx(1 / r, rel=0.03)
    rows = A.norm(dim=1)
    assert float(rows.mean()) == pytest.approx(math.sqrt(d) / r, rel=0.03)
    assert float(rows.min()) > 0.85 * math.sqrt(d) / r and float(rows.max()) < 1.15 * math.sqrt(d) / r


@pytest.mark.parametrize("r,d", [(8, 256), (4, 1024)])
def test_kaiming_is_uniform_within_one_over_sqrt_d_with_row_norm_sqrt_one_third(r, d):
    A = torch.cat([initial_A("kaiming", r, d, seed) for seed in range(4)])
    assert float(A.abs().max()) <= 1 / math.sqrt(d)
    assert float(A.std()) == pytest.approx(1 / math.sqrt(3 * d), rel=0.03)
    assert float(A.norm(dim=1).mean()) == pytest.approx(math.sqrt(1 / 3), rel=0.03)


def test_the_two_baselines_differ_by_sqrt_3d_over_r():
    r, d = 8, 1024  # RoBERTa-large's q/v: gaussian rows are ~7x kaiming's
    ratio = initial_A("gaussian", r, d, 0).norm() / initial_A("kaiming", r, d, 0).norm()
    assert float(ratio) == pytest.approx(math.sqrt(3 * d) / r, rel=0.05)
