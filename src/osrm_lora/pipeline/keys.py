"""Typed keys of the pipeline's units of work.

A key's `name` is the unit's name in its manifest (``manifests/<stage>/<name>.json``) and in the run summary,
and `Layout` derives the unit's output paths from it, so both stay exactly what finished caches hold.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol


class UnitKey(Protocol):
    @property
    def name(self) -> str: ...


def _lambda_name(lam: float | None) -> str:
    """How a λ appears in unit names and file names ("none" for a method without λ)."""
    return "none" if lam is None else f"lambda{lam:g}"


def _samples_name(samples: int | None) -> list[str]:
    """The sample-size part of a unit name: none for the reference sample (a single-size study's only one)."""
    return [] if samples is None else [f"samples{samples}"]


@dataclass(frozen=True)
class StatsKey:
    """The base model's statistics of one task: of one statistics sample size (None: the reference, the
    largest), as moments over real tokens or, `padded`, as the official OSRM code's padded means."""

    task: str
    samples: int | None = None
    padded: bool = False

    @property
    def name(self) -> str:
        return "/".join([*(["padded"] if self.padded else []), *_samples_name(self.samples), self.task])


@dataclass(frozen=True)
class SubspaceKey:
    """The subspaces of every merged task for one variant and statistics sample size (None: the reference)."""

    variant: str
    samples: int | None = None

    @property
    def name(self) -> str:
        return "/".join([self.variant, *_samples_name(self.samples)])


@dataclass(frozen=True)
class RunKey:
    """One init × seed: the adapters that are merged and compared together."""

    init: str
    seed: int

    @property
    def name(self) -> str:
        return f"{self.init}/seed{self.seed}"

    def adapter(self, task: str) -> AdapterKey:
        return AdapterKey(self.init, self.seed, task)


@dataclass(frozen=True)
class AdapterKey:
    """One fine-tuned adapter, and every per-adapter unit (evaluation, Fisher, Grams) derived from it."""

    init: str
    seed: int
    task: str

    @property
    def name(self) -> str:
        return f"{self.init}/seed{self.seed}/{self.task}"

    @property
    def run(self) -> RunKey:
        return RunKey(self.init, self.seed)


@dataclass(frozen=True)
class MergeKey:
    """One merge entry (by label) of one init × seed's adapters at one λ."""

    label: str
    init: str
    seed: int
    lam: float | None

    @property
    def name(self) -> str:
        return f"{self.label}/{self.run.name}/{_lambda_name(self.lam)}"

    @property
    def run(self) -> RunKey:
        return RunKey(self.init, self.seed)


@dataclass(frozen=True)
class ReportKey:
    """The experiment's one report."""

    @property
    def name(self) -> str:
        return "report"
