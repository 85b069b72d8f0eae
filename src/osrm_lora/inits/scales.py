"""The `scale` option of the inits with orthonormal rows: which baseline's size their lora_A takes.

Orthonormal rows have ‖A‖²_F = r. The other scales multiply every row by one factor c so that ‖A‖²_F equals
the expected ‖A‖²_F of a baseline's lora_A (r×d, fan_in d), as PEFT draws it:

- ``kaiming`` (PEFT's default, `init_lora_weights=True`): ``kaiming_uniform_(a=√5)`` draws U(−b, b) with
  b = gain·√(3/d), gain² = 2/(1+a²) = 1/3, so b = 1/√d, each entry has variance b²/3 = 1/(3d) and
  E‖A‖²_F = r·d/(3d) = r/3: c = 1/√3, whatever d.
- ``gaussian`` (`init_lora_weights="gaussian"`, the official OSRM code's baseline): N(0, (1/r)²) entries, so
  E‖A‖²_F = r·d/r² = d/r: c = √d / r (3.5 to 4 on RoBERTa-large, d = 1024, r = 8).

Torch-free: the factor is plain arithmetic, applied by each init's tensor side.
"""

from __future__ import annotations

import math
from typing import Literal

from pydantic import Field

from .registry import InitOptions

SCALES = ("orthonormal", "kaiming", "gaussian")
Scale = Literal["orthonormal", "kaiming", "gaussian"]


def row_scale(scale: str, r: int, d: int) -> float:
    """The factor c on every orthonormal row of an r×d lora_A (see the module docstring)."""
    if scale == "orthonormal":
        return 1.0
    if scale == "kaiming":
        return 1.0 / math.sqrt(3.0)
    if scale == "gaussian":
        return math.sqrt(d) / r
    raise ValueError(f"unknown scale {scale!r}; choose one of {', '.join(SCALES)}")


class ScaleOptions(InitOptions):
    """Options of an init with orthonormal rows: the size of A (its directions do not change)."""

    scale: Scale = Field(
        "orthonormal",
        description="orthonormal rows, or rows scaled to the expected ‖A‖_F of PEFT's kaiming or gaussian init",
    )
