"""What a training mode adds to plain training, returned by its init's `apply` (plain inits return None).

`finetune` calls, in order: `prepare` once the initial lora_A is recorded (and a factor frozen), `loss` on
every training micro-batch (added to the task loss; never in evaluation), `logs` at every Trainer log (means
since the last one, logged beside the loss), `export` after training and before saving (turn a training-time
parametrisation back into a plain PEFT adapter), and `metadata` for the adapter's osrm_lora.json.
Torch-free: the modes' tensor halves subclass it.
"""

from __future__ import annotations

from typing import Any


class TrainingHook:
    """No-op defaults: a mode overrides what it changes."""

    name = "mode"
    logged: tuple[str, ...] = ()  # the keys `logs` returns

    def prepare(self, peft_model: Any) -> None:
        """Called once before training starts."""

    def loss(self, peft_model: Any) -> Any:
        """A scalar tensor added to the task loss of a training micro-batch, or None."""
        return None

    def logs(self) -> dict[str, float]:
        """Values to log beside the Trainer's loss (means since the last log); read once per log."""
        return {}

    def export(self, peft_model: Any) -> None:
        """Leave `peft_model` a plain PEFT LoRA model, as saved and returned."""

    def metadata(self) -> dict[str, Any]:
        """What the adapter's metadata records about the mode."""
        return {}
