"""The errors a user can fix: one base class, so callers catch one type and the CLI reports them alike.

Every domain error subclasses `OsrmLoraError`: a bad file, option, task, model or combination of inputs, with
a message that names it. The CLI prints one as a single `error: …` line and exits with code 2; any other
exception is a bug and keeps its traceback. `OsrmLoraError` is a `ValueError`, so code that caught
`ValueError` before keeps working. Module-specific errors (`ConfigError`, `OsrmFileError`, `TaskError`,
`StatsMismatchError`, ...) live beside the code that raises them; the general ones of each layer live here.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class OsrmLoraError(ValueError):
    """Base of every error the user can fix; the message names the file, option, task or module."""


class AdapterError(OsrmLoraError):
    """Adapters that cannot be used together: different modules, shapes or base models."""


class ModelError(OsrmLoraError):
    """A base model without what is asked of it: no such target module, no token to pad with."""


class StatsError(OsrmLoraError):
    """Statistics that cannot be collected or used: no batches, non-per-token inputs, NaN/Inf, missing tasks."""


class SubspaceError(OsrmLoraError):
    """Subspace options that cannot be met: too few tasks, a rank above the input dim, an unknown variant."""


class MergeError(OsrmLoraError):
    """A merge its method cannot compute or export as asked: missing inputs, unknown hyper-parameters."""


class TrainingError(OsrmLoraError):
    """Training settings that do not fit the machine or the task (bf16 without CUDA, keep_best without dev)."""


class EvaluationError(OsrmLoraError):
    """Nothing to score or average, or a task head that does not fit the model."""


class RegistryError(OsrmLoraError):
    """An unknown init or merge method name, or options that do not fit its typed options."""


def did_you_mean(name: str, known: Iterable[str]) -> str:
    """` (did you mean 'x'?)` for the known name closest to a misspelt `name`, or "" when none is close."""
    close = difflib.get_close_matches(name, list(known), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""
