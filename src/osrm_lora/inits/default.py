"""PEFT's own random inits, the baselines every other init is compared with.

``kaiming`` is PEFT's default (`init_lora_weights=True`); ``gaussian`` is `init_lora_weights="gaussian"`,
the baseline of the official OSRM code. Their ‖A‖_F differ by a factor √(3d)/r (see `inits.scales`).
"""

from __future__ import annotations

from .registry import InitSpec, register

register(InitSpec(
    "kaiming", "PEFT's default: kaiming-uniform A (U(-1/√d, 1/√d), row norm ≈ 0.577), B = 0.", peft_init=True,
))
register(InitSpec(
    "gaussian", "PEFT's 'gaussian' (the official OSRM code's baseline): A ~ N(0, 1/r²), row norm ≈ √d/r, B = 0.",
    peft_init="gaussian",
))
