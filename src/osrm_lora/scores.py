"""The paper's score aggregates over tasks: the average, and the normalised score of a merged model.

Merged models are compared to the individually fine-tuned adapters through the *normalised* score (merged /
individual, per task), which removes the differences in task difficulty before averaging (as in the OSRM and
TIES papers). Plain Python, so reports are rebuilt without torch.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping

from .errors import EvaluationError


def average(scores: Mapping[str, float]) -> float:
    """Unweighted mean over tasks."""
    if not scores:
        raise EvaluationError("cannot average an empty set of task scores")
    return statistics.fmean(float(v) for v in scores.values())


def normalised_scores(merged: Mapping[str, float], individual: Mapping[str, float]) -> dict[str, float]:
    """merged[t] / individual[t] per task; NaN where the individual score is <= 0 (an MCC or a correlation at
    or below chance gives a ratio with no meaning)."""
    missing = sorted(set(merged) - set(individual))
    if missing:
        raise EvaluationError(f"no individual fine-tuned score for tasks {missing} to normalise by")
    return {
        t: (float(s) / float(individual[t]) if individual[t] > 0 else math.nan) for t, s in merged.items()
    }


def normalised_average(normalised: Mapping[str, float]) -> float:
    """Mean of the defined (non-NaN) normalised scores; NaN when none is defined."""
    defined = [float(v) for v in normalised.values() if not math.isnan(v)]
    return statistics.fmean(defined) if defined else math.nan
