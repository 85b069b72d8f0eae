"""Where every output of an experiment lives.

Output folder layout::

    experiment.json                       the validated config (the whole study, whichever chunk ran)
    stats/<task>.safetensors              TaskStats of the base model's inputs (the reference sample size)
    stats/samples<n>/<task>.safetensors   ... of another sample size of `statistics.samples_per_task`
    stats/padded/[samples<n>/]<task>.safetensors  the official OSRM code's padded means (osrm-official)
    subspaces/<variant>/[samples<n>/]<task>.safetensors  OSRM subspaces (each from the other pool tasks)
    adapters/<init>/seed<s>/<task>/        PEFT adapters (with their task heads)
    eval/individual/<init>/seed<s>/<task>.json
    fisher/<init>/seed<s>/<task>.safetensors  diagonal Fisher of each fine-tuned model (Fisher merging)
    grams/<init>/seed<s>/<task>.safetensors   TaskStats of each fine-tuned model's inputs (RegMean)
    eval/merged/<method>/<init>/seed<s>/lambda<λ>.json
    interference/<init>/seed<s>.json
    diagnostics/<init>/seed<s>.json       per-adapter diagnostics (ΔW norms, A retention, captured energy, ...)
    results.json, report.md, table_*.csv, plots/*.png
    manifests/<stage>/<unit>.json         what each finished unit read and wrote (see `cache`)
"""

from __future__ import annotations

from pathlib import Path

from .keys import AdapterKey, MergeKey, RunKey, StatsKey, SubspaceKey, UnitKey


class Layout:
    """The paths of one experiment's outputs under `root`; a unit's files are named after its key."""

    def __init__(self, root: Path):
        self.root = root

    def file(self, folder: str, key: UnitKey, suffix: str) -> Path:
        """``<folder>/<key name><suffix>``: the one file of a unit (what a new per-unit stage writes)."""
        return self.root / folder / f"{key.name}{suffix}"

    @property
    def config(self) -> Path:
        return self.root / "experiment.json"

    def manifest(self, stage: str, unit: str) -> Path:
        return self.root / "manifests" / stage / f"{unit}.json"

    def stats(self, task: str, samples: int | None = None, padded: bool = False) -> Path:
        """A task's base-model statistics; `samples` None is the reference sample (see `StatsKey`)."""
        return self.file("stats", StatsKey(task, samples, padded), ".safetensors")

    def subspace(self, variant: str, task: str, samples: int | None = None) -> Path:
        return self.root / "subspaces" / SubspaceKey(variant, samples).name / f"{task}.safetensors"

    def adapter(self, key: AdapterKey) -> Path:
        """The adapter's PEFT folder."""
        return self.root / "adapters" / key.name

    def individual(self, key: AdapterKey) -> Path:
        return self.file("eval/individual", key, ".json")

    def fisher(self, key: AdapterKey) -> Path:
        return self.file("fisher", key, ".safetensors")

    def grams(self, key: AdapterKey) -> Path:
        return self.file("grams", key, ".safetensors")

    def merged(self, key: MergeKey) -> Path:
        return self.file("eval/merged", key, ".json")

    def interference(self, key: RunKey) -> Path:
        return self.file("interference", key, ".json")

    def diagnostics(self, key: RunKey) -> Path:
        return self.file("diagnostics", key, ".json")

    @property
    def results(self) -> Path:
        return self.root / "results.json"

    def report_files(self) -> list[Path]:
        """The report's outputs that its manifest records (the plots are rewritten along with them)."""
        return [
            self.results,
            self.root / "report.md",
            self.root / "table_selected_lambda.csv",
            self.root / "table_best_lambda.csv",
            self.root / "table_fixed_lambda.csv",
        ]
