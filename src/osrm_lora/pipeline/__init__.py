"""Running an experiment: statistics → subspaces → training → evaluation → merging → interference → report.

This package only orchestrates and caches; the maths lives in `stats`, `subspace`, `train`, `merge`,
`interference` and `evaluate`. Each stage (`stages`) is a class listing its units of work (one task's
statistics, one adapter, one merged model at one λ, ...), each named by a typed key (`keys`); `runner`
runs the stages in dependency order, and `cache` skips every unit whose manifest matches its inputs, so
a second run does nothing, an interrupted run resumes after the last finished unit, and ``force`` redoes
a stage (what depends on it is redone only if its outputs actually changed). The base model is
identified by its name (hub id or path): after changing the weights in a local folder, force `stats`.
`layout` describes the output folder.
"""

from .runner import RunSummary, run_experiment

__all__ = ["RunSummary", "run_experiment"]
