"""Which Trainer checkpoint an interrupted run resumes from: the newest complete one.

A run killed while saving leaves its last ``checkpoint-N`` empty or half-written (the Trainer writes the
weights, then the optimizer, scheduler and RNG states, and ``trainer_state.json`` last, none of them
atomically). Such a checkpoint is skipped, with a warning, and removed by the main process; an older complete
one is used instead. A file that is not a safe format (a pickle holding more than tensors) is refused, never
skipped: it was not left by an interruption.
"""

from __future__ import annotations

import contextlib
import json
import logging
import pickle
import re
import shutil
from pathlib import Path

from .errors import TrainingError

logger = logging.getLogger(__name__)

KEEP = 2  # checkpoints kept (`save_total_limit`); with keep_best the Trainer also keeps the best one
REQUIRED = ("trainer_state.json", "optimizer.pt", "scheduler.pt")
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
_LOADED_PICKLES = re.compile(r"^(optimizer\.pt|scheduler\.pt|scaler\.pt|rng_state(_\d+)?\.pth)$")


def _checkpoint_problem(folder: Path) -> str | None:
    """Why the Trainer could not resume from `folder` (a file missing, truncated or unreadable), or None.

    The files the Trainer loads are read as it reads them (safetensors headers, JSON, `torch.load` with
    `weights_only`); one that is not a safe format raises TrainingError naming it.
    """
    import torch
    from safetensors import SafetensorError, safe_open
    from transformers.trainer_pt_utils import safe_globals

    missing = [name for name in REQUIRED if not (folder / name).is_file()]
    if not any(folder.glob("*.safetensors")):
        missing.append("adapter_model.safetensors")
    if missing:
        return f"missing {', '.join(missing)}"
    for path in sorted(folder.iterdir()):
        try:
            if path.suffix == ".json":
                json.loads(path.read_text(encoding="utf-8"))
            elif path.suffix == ".safetensors":
                with safe_open(str(path), "pt"):
                    pass
            elif _LOADED_PICKLES.match(path.name):
                # As the Trainer reads them: RNG states may hold numpy arrays, nothing else any more.
                with safe_globals() if path.name.startswith("rng_state") else contextlib.nullcontext():
                    torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError:
            raise TrainingError(
                f"{path}: not a safe format (a pickle holding more than tensors), refused; remove {folder} "
                f"to resume from an earlier checkpoint"
            ) from None
        except (OSError, ValueError, RuntimeError, EOFError, SafetensorError) as exc:  # truncated, or gone
            return f"{path.name} unreadable ({type(exc).__name__}: {' '.join(str(exc).split())[:120]})"
    return None


def resumable_checkpoint(run_dir: Path, remove_incomplete: bool = False) -> str | None:
    """The newest complete ``checkpoint-N`` in `run_dir`, or None. Newer incomplete ones are skipped with a
    warning, and deleted with `remove_incomplete` (the main process): none is mistaken for the last later."""
    if not run_dir.is_dir():
        return None
    steps = sorted(
        (int(m.group(1)), p) for p in run_dir.iterdir() if (m := _CHECKPOINT.match(p.name)) and p.is_dir()
    )
    for _, folder in reversed(steps):
        problem = _checkpoint_problem(folder)
        if problem is None:
            return str(folder)
        logger.warning("%s is incomplete (%s), probably interrupted while saving; %s", folder, problem,
                       "removed" if remove_incomplete else "skipped")
        if remove_incomplete:
            shutil.rmtree(folder, ignore_errors=True)
    return None
