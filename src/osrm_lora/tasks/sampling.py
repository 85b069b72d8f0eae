"""Seeded, stratified choice of examples that gives the same rows for the same seed on any machine.

Randomness comes only from numpy's PCG64 seeded with explicit integers (a task or split name enters as a
CRC-32, never through Python's salted `hash`), and every result is returned in ascending row order so that
the subset, not an accident of iteration order, is what the seed decides.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence

import numpy as np


def make_rng(seed: int, salt: str = "") -> np.random.Generator:
    """PCG64 generator from an integer seed and an optional name that separates independent streams."""
    entropy = [int(seed)] if not salt else [int(seed), zlib.crc32(salt.encode("utf-8"))]
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence(entropy)))


def proportional_allocation(counts: Sequence[int], total: int) -> list[int]:
    """Split `total` over groups in proportion to `counts` (largest remainder; ties go to the earlier group).

    Every share is the exact proportional share rounded down or up, so it is within one of it.
    """
    counts = np.asarray(counts, dtype=np.int64)
    available = int(counts.sum())
    if not 0 <= total <= available:
        raise ValueError(f"cannot take {total} of {available} examples")
    exact = counts * total / available if available else np.zeros(len(counts))
    shares = np.floor(exact).astype(np.int64)
    remainder = exact - shares
    order = sorted(range(len(counts)), key=lambda i: (-remainder[i], i))
    for i in order[: total - int(shares.sum())]:
        shares[i] += 1
    return [int(s) for s in shares]


def sample_indices(labels: Sequence | None, n_rows: int, n: int, rng: np.random.Generator) -> np.ndarray:
    """`n` distinct row indices, stratified by class when `labels` (class ids) are given, sorted ascending."""
    if n >= n_rows:
        return np.arange(n_rows)
    if labels is None:
        return np.sort(rng.choice(n_rows, size=n, replace=False))
    labels = np.asarray(labels)
    classes, counts = np.unique(labels, return_counts=True)
    chosen = [
        rng.permutation(np.flatnonzero(labels == c))[:k]
        for c, k in zip(classes, proportional_allocation(counts, n))
    ]
    return np.sort(np.concatenate(chosen))


def partition_indices(
    labels: Sequence | None, n_rows: int, fractions: Sequence[float], rng: np.random.Generator
) -> list[np.ndarray]:
    """Disjoint parts covering all rows with sizes in the given fractions, stratified by class when given."""
    fractions = np.asarray(fractions, dtype=np.float64)
    if np.any(fractions < 0) or not np.isclose(fractions.sum(), 1.0):
        raise ValueError(f"fractions must be non-negative and sum to 1, got {fractions.tolist()}")
    groups = [np.arange(n_rows)] if labels is None else [
        np.flatnonzero(np.asarray(labels) == c) for c in np.unique(np.asarray(labels))
    ]
    parts: list[list[np.ndarray]] = [[] for _ in fractions]
    for group in groups:
        shuffled = rng.permutation(group)
        sizes = proportional_allocation(np.round(fractions * 1e9).astype(np.int64), len(group))
        for i, piece in enumerate(np.split(shuffled, np.cumsum(sizes)[:-1])):
            parts[i].append(piece)
    return [np.sort(np.concatenate(p)) if p else np.arange(0) for p in parts]


def select_report_indices(
    labels: Sequence | None, n_rows: int, seed: int, select: int = 200, report_max: int | None = None,
    salt: str = "",
) -> tuple[np.ndarray, np.ndarray]:
    """Two disjoint seeded parts of one task's evaluation rows: `select` rows to choose λ on, and `report`
    (the rest, at most `report_max`) to report at that λ; both stratified by class and ascending.

    The generator is made here from (seed, salt) so the parts depend on nothing drawn before; give the task
    name as `salt` for independent splits per task.
    """
    if select < 1:
        raise ValueError(f"select must be positive, got {select}")
    if n_rows <= select:
        raise ValueError(f"cannot hold out {select} of {n_rows} examples for selecting λ and report on the rest")
    if report_max is not None and report_max < 1:
        raise ValueError(f"report_max must be positive, got {report_max}")
    rng = make_rng(seed, f"select-report/{salt}")
    chosen = sample_indices(labels, n_rows, select, rng)
    rest = np.setdiff1d(np.arange(n_rows), chosen, assume_unique=True)
    limit = len(rest) if report_max is None else report_max
    rest_labels = None if labels is None else np.asarray(labels)[rest]
    return chosen, rest[sample_indices(rest_labels, len(rest), limit, rng)]
