"""PiSSA and OLoRA: PEFT starts the adapter on W's principal singular directions (PiSSA) or its QR (OLoRA).

Both subtract the initial product B₀A₀ from the base weights, so training sees ``W − s·B₀A₀ + s·BA``. The base
then differs from the one merging shares; `finetune` therefore saves these adapters converted to rank 2r on
the unmodified base.
"""

from __future__ import annotations

from .registry import InitSpec, register

register(InitSpec(
    "pissa", "PiSSA (PEFT): A, B from the top-r SVD of W, subtracted from the base; saved as rank 2r.",
    peft_init="pissa", mutates_base=True,
))
register(InitSpec(
    "olora", "OLoRA (PEFT): A, B from the QR of W, subtracted from the base; saved as rank 2r.",
    peft_init="olora", mutates_base=True,
))
