"""PEFT's default LoRA init, the baseline every other init is compared with."""

from __future__ import annotations

from .registry import InitSpec, register

register(InitSpec(
    "gaussian", "PEFT's default (the baseline): kaiming-uniform A, B = 0.", peft_init=True,
))
