"""Shared test helpers for the OSRM core: statistics built directly from synthetic activations.

Tests compare the library against numpy computed from the same explicit sample rows, so nothing here
goes through `collect_stats`.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch
from torch import nn

from osrm_lora.stats import TaskStats


def stats_from_inputs(task: str, inputs: Mapping[str, torch.Tensor], *, model: str = "toy",
                      config_hash: str = "toy-hash") -> TaskStats:
    """TaskStats of explicit input rows per module; modules given the same tensor object share one sum."""
    tokens = {int(x.shape[0]) for x in inputs.values()}
    assert len(tokens) == 1, "every module sees the same tokens"
    shared: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    second, first = {}, {}
    for m, x in inputs.items():
        x64 = x.double()
        second[m], first[m] = shared.setdefault(id(x), ((x64.T @ x64).float(), x64.sum(0).float()))
    return TaskStats(task, model, config_hash, second, first, tokens.pop())


def anisotropic_inputs(n: int, d: int, seed: int, offset: float = 0.3) -> torch.Tensor:
    """Full-rank rows with well-separated variances per direction and a non-zero mean."""
    g = torch.Generator().manual_seed(seed)
    basis = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))[0]
    scales = torch.linspace(0.2, 3.0, d, dtype=torch.float64) * (1 + 0.1 * seed)
    return (torch.randn(n, d, generator=g, dtype=torch.float64) * scales) @ basis.T + offset * (seed + 1)


def subspace_inputs(n: int, basis: torch.Tensor, noise: float, seed: int) -> torch.Tensor:
    """Rows concentrated in span(basis columns) plus small isotropic noise."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, basis.shape[1], generator=g)
    return z @ basis.T + noise * torch.randn(n, basis.shape[0], generator=g)


def naive_second_moment(xs: list[np.ndarray], weighting: str, centered: bool = False) -> np.ndarray:
    """The mixture of the given tasks' moments, written out the obvious way."""
    mats, weights = [], []
    for x in xs:
        m = x.T @ x / len(x)
        if centered:
            m = np.cov(x, rowvar=False, bias=True)
        mats.append(m)
        weights.append({"equal": 1.0, "tokens": float(len(x)), "trace": 1.0 / np.trace(m)}[weighting])
    return sum(w * m for w, m in zip(weights, mats)) / sum(weights)


class OneLinear(nn.Module):
    """The smallest model PEFT can wrap: one linear layer named `proj`."""

    def __init__(self, d_in: int, d_out: int, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.proj = nn.Linear(d_in, d_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)
