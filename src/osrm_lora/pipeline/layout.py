"""Where every output of an experiment lives.

Output folder layout::

    experiment.json                       the validated config
    stats/<task>.safetensors              TaskStats of the base model's inputs
    subspaces/<variant>/<task>.safetensors  OSRM subspaces (leave-one-out)
    adapters/<init>/seed<s>/<task>/        PEFT adapters (with their task heads)
    eval/individual/<init>/seed<s>/<task>.json
    fisher/<init>/seed<s>/<task>.safetensors  diagonal Fisher of each fine-tuned model (Fisher merging)
    grams/<init>/seed<s>/<task>.safetensors   TaskStats of each fine-tuned model's inputs (RegMean)
    eval/merged/<method>/<init>/seed<s>/lambda<λ>.json
    interference/<init>/seed<s>.json
    results.json, report.md, table_*.csv, plots/*.png
    manifests/<stage>/<unit>.json         what each finished unit read and wrote (see `cache`)
"""

from __future__ import annotations

from pathlib import Path

from .keys import AdapterKey, MergeKey, RunKey, UnitKey


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

    def stats(self, task: str) -> Path:
        return self.root / "stats" / f"{task}.safetensors"

    def subspace(self, variant: str, task: str) -> Path:
        return self.root / "subspaces" / variant / f"{task}.safetensors"

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

    @property
    def results(self) -> Path:
        return self.root / "results.json"

    def report_files(self) -> list[Path]:
        """The report's outputs that its manifest records (the plots are rewritten along with them)."""
        return [
            self.results,
            self.root / "report.md",
            self.root / "table_best_lambda.csv",
            self.root / "table_fixed_lambda.csv",
        ]
