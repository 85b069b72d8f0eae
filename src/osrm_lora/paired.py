"""Seeds as paired replicates: how an init differs from a reference init, with intervals that say how surely.

Seed s trains both inits on the same data order and evaluates them on the same examples, so the unit of
comparison is the per-seed difference ``d_s = score_s(init) − score_s(reference)`` (scores averaged over
tasks). Two intervals for the mean difference:

- the t-interval over seeds, ``mean ± t_{(1+level)/2, n−1} · sd / √n`` (undefined, NaN, for one seed);
- a hierarchical bootstrap: resample seeds with replacement, then, within each drawn seed and task, the
  evaluation examples (jointly for both inits, so the pairing is kept), and recompute the mean difference.
  It sees the example noise that the per-seed scores hide, and is defined for one seed too (where it then
  measures example noise only).

Numpy and scipy only: the report can use it without loading torch.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass

import numpy as np
from scipy import stats

POINTS = 100.0  # scores are fractions (as in results.json); words give percentage points, as the report does
_CHUNK = 1 << 22  # multinomial counts held at once in the bootstrap


@dataclass(frozen=True)
class PairedDifference:
    """`init` − `reference` for one merge method (or the unmerged adapters), over n paired seeds."""

    init: str
    reference: str
    method: str
    n: int
    mean: float
    sd: float  # NaN for one seed
    t_low: float  # NaN for one seed
    t_high: float
    level: float
    bootstrap_low: float | None = None  # None when no per-example results were given
    bootstrap_high: float | None = None
    resamples: int = 0
    note: str = ""

    @property
    def excludes_zero(self) -> bool:
        """Whether the t-interval excludes 0 (False when it is undefined)."""
        return bool(self.t_low > 0 or self.t_high < 0)

    @property
    def bootstrap_excludes_zero(self) -> bool | None:
        if self.bootstrap_low is None:
            return None
        return bool(self.bootstrap_low > 0 or self.bootstrap_high < 0)

    def to_dict(self) -> dict:
        """JSON-ready: NaN becomes None (JSON has no NaN)."""
        out = {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in asdict(self).items()}
        out.update(excludes_zero=self.excludes_zero, bootstrap_excludes_zero=self.bootstrap_excludes_zero)
        return out


def _finite(values: np.ndarray, what: str) -> np.ndarray:
    if not np.all(np.isfinite(values)):
        raise ValueError(f"{what}: NaN/Inf values {values[~np.isfinite(values)][:3].tolist()}")
    return values


def t_interval(differences: Sequence[float], level: float = 0.95) -> tuple[float, float]:
    """``mean ± t_{(1+level)/2, n−1} · sd / √n``; (NaN, NaN) for a single difference."""
    d = np.asarray(differences, dtype=np.float64)
    if d.size < 2:
        return math.nan, math.nan
    half = stats.t.ppf((1 + level) / 2, d.size - 1) * d.std(ddof=1) / math.sqrt(d.size)
    return float(d.mean() - half), float(d.mean() + half)


def _resampled_means(d: np.ndarray, draws: int, rng: np.random.Generator) -> np.ndarray:
    """`draws` means of len(d) values drawn from d with replacement.

    Drawing with replacement only decides how often each distinct value is taken, so with few distinct
    values (correctness: −1, 0, 1) one multinomial over them gives exactly the same distribution at O(1)
    cost per draw; otherwise the examples themselves are drawn. Chunks bound the memory.
    """
    values, counts = np.unique(d, return_counts=True)
    few = values.size * 16 <= d.size
    rows = max(1, _CHUNK // (values.size if few else d.size))
    out = np.empty(draws)
    for start in range(0, draws, rows):
        size = min(draws, start + rows) - start
        if few:
            out[start:start + size] = rng.multinomial(d.size, counts / d.size, size=size) @ values / d.size
        else:
            out[start:start + size] = d[rng.integers(d.size, size=(size, d.size))].mean(1)
    return out


def _bootstrap_interval(
    differences: Sequence[Sequence[np.ndarray]], level: float = 0.95, resamples: int = 2000, seed: int = 0
) -> tuple[float, float]:
    """Percentile interval of the hierarchical bootstrap of the mean difference.

    `differences[s][t]` holds, for seed s and task t, the per-example init − reference values (correctness
    or per-example scores, same examples for both). A replicate draws n seeds with replacement and, for
    each draw, resamples every task's examples; its value is the mean over draws of the mean over tasks.
    """
    if resamples < 1:
        raise ValueError(f"resamples must be positive, got {resamples}")
    n = len(differences)
    rng = np.random.default_rng(seed)
    picks = rng.integers(n, size=(resamples, n))
    total = np.zeros(resamples)
    for s, tasks in enumerate(differences):
        replicate = np.nonzero(picks == s)[0]  # one entry per time seed s is drawn
        per_task = [_resampled_means(np.asarray(d, dtype=np.float64), replicate.size, rng) for d in tasks]
        np.add.at(total, replicate, np.mean(per_task, axis=0))
    low, high = np.quantile(total / n, [(1 - level) / 2, (1 + level) / 2])
    return float(low), float(high)


def _example_differences(
    examples: Mapping[int, Mapping[str, Sequence[float]]],
    reference_examples: Mapping[int, Mapping[str, Sequence[float]]],
    seeds: list[int],
    where: str,
) -> list[list[np.ndarray]]:
    """Per seed (in `seeds` order) and task (by name), init − reference per example, checked to pair."""
    if sorted(examples) != seeds or sorted(reference_examples) != seeds:
        raise ValueError(f"{where}: per-example results cover seeds {sorted(examples)} and "
                         f"{sorted(reference_examples)}, but the scores cover {seeds}")
    out = []
    for s in seeds:
        mine, theirs = examples[s], reference_examples[s]
        if sorted(mine) != sorted(theirs) or not mine:
            raise ValueError(f"{where}, seed {s}: tasks {sorted(mine)} and {sorted(theirs)} do not pair")
        row = []
        for t in sorted(mine):
            a = _finite(np.asarray(mine[t], dtype=np.float64), f"{where}, seed {s}, task {t!r}")
            b = _finite(np.asarray(theirs[t], dtype=np.float64), f"{where} (reference), seed {s}, task {t!r}")
            if a.shape != b.shape or a.ndim != 1 or a.size == 0:
                raise ValueError(f"{where}, seed {s}, task {t!r}: {a.shape} and {b.shape} examples do not pair")
            row.append(a - b)
        out.append(row)
    return out


def paired_difference(
    init: str,
    reference: str,
    method: str,
    scores: Mapping[int, float],
    reference_scores: Mapping[int, float],
    examples: Mapping[int, Mapping[str, Sequence[float]]] | None = None,
    reference_examples: Mapping[int, Mapping[str, Sequence[float]]] | None = None,
    *,
    level: float = 0.95,
    resamples: int = 2000,
    seed: int = 0,
) -> PairedDifference:
    """Paired comparison over seeds; `scores[seed]` is the init's score averaged over tasks.

    With `examples[seed][task]` (per-example correctness or scores of the same evaluation examples for both
    inits) the hierarchical bootstrap interval is added; `seed` fixes its draws.
    """
    where = f"init {init!r} vs {reference!r}, method {method!r}"
    seeds = sorted(scores)
    if sorted(reference_scores) != seeds or not seeds:
        raise ValueError(f"{where}: seeds {seeds} and {sorted(reference_scores)} do not pair")
    if not 0 < level < 1:
        raise ValueError(f"{where}: level must be in (0, 1), got {level}")
    a = _finite(np.array([scores[s] for s in seeds], dtype=np.float64), where)
    b = _finite(np.array([reference_scores[s] for s in seeds], dtype=np.float64), f"{where} (reference)")
    if (examples is None) != (reference_examples is None):
        raise ValueError(f"{where}: per-example results given for only one of the two inits")
    boot_low = boot_high = None
    if examples is not None:
        diffs = _example_differences(examples, reference_examples, seeds, where)
        boot_low, boot_high = _bootstrap_interval(diffs, level, resamples, seed)
    d = a - b
    low, high = t_interval(d, level)
    return PairedDifference(
        init, reference, method, n=len(seeds), mean=float(d.mean()),
        sd=float(d.std(ddof=1)) if d.size > 1 else math.nan, t_low=low, t_high=high, level=level,
        bootstrap_low=boot_low, bootstrap_high=boot_high, resamples=resamples if examples is not None else 0,
        note="one seed: the s.d. and t-interval are undefined" if d.size == 1 else "",
    )


def _interval_words(low: float, high: float, threshold: float, init: str) -> str:
    if low > threshold:
        return f"excludes 0{f' and lies above +{POINTS * threshold:g}' if threshold else ''}: {init} is better"
    if high < -threshold:
        return f"excludes 0{f' and lies below −{POINTS * threshold:g}' if threshold else ''}: {init} is worse"
    if low > 0 or high < 0:
        return (f"excludes 0 but not differences within ±{POINTS * threshold:g}: a difference smaller than "
                "the threshold cannot be ruled out")
    return "includes 0: no evidence of a difference"


def verdict_text(result: PairedDifference, threshold: float = 0.0) -> str:
    """One sentence per interval, in percentage points; `threshold` (in score units) is the smallest
    difference that matters, so an interval that excludes 0 but not ±threshold is called so."""
    head = f"{result.init} − {result.reference} ({result.method}): {POINTS * result.mean:+.2f} points"
    pct = f"{100 * result.level:g} %"
    if result.n < 2:
        text = f"{head} from one seed; no t-interval (it needs at least two seeds)."
    else:
        text = (f"{head} (s.d. {POINTS * result.sd:.2f}, n = {result.n} seeds); the {pct} t-interval "
                f"[{POINTS * result.t_low:+.2f}, {POINTS * result.t_high:+.2f}] "
                f"{_interval_words(result.t_low, result.t_high, threshold, result.init)}.")
    if result.bootstrap_low is not None:
        text += (f" The {pct} bootstrap interval over seeds and examples "
                 f"[{POINTS * result.bootstrap_low:+.2f}, {POINTS * result.bootstrap_high:+.2f}] "
                 f"{_interval_words(result.bootstrap_low, result.bootstrap_high, threshold, result.init)}"
                 f"{' (example noise only: one seed)' if result.n < 2 else ''}.")
    return text
