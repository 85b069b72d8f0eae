"""The sweep that chose `osrm-reg`'s default μ (docs/modes.md): a grid on a tiny setting, then its trade-off point
carried to MiniLM by one measurement.

1. Tiny setting (the pipeline tests'): a random 2-layer BERT (hidden 32) and two synthetic tasks whose label is a
   cue word (tests/pipeline_helpers.py), trained through `osrm-lora run` with osrm-reg at each μ of the grid
   (μ = 0 is plain OSRM-init training), two seeds. Per μ: individual and merged (task arithmetic, λ = 1)
   average accuracy, mean off-diagonal interference, final penalty P. The chosen point is the μ with the best
   merged average among those whose individual average stays within 3 points of μ = 0's.
2. P is a ratio of output energies, so its size depends on the model (a random BERT's small W₀ makes it
   huge): what transfers is the penalty's weight against the task loss, μ·P₀, with P₀ the penalty a plain run
   ends with. MiniLM's P₀ is measured on one short run (sms_spam, the other task trec), and the default is
   the tiny setting's μ·P₀ divided by it; a run at that μ checks that it acts without costing the task.

About five CPU minutes on a quiet 2-core machine.

    python bench/reg_mu_sweep.py           # writes bench/results/reg_mu_sweep.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from common import RESULTS, Stopwatch, fmt, write_results

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from pipeline_helpers import write_experiment, write_tiny_model

from osrm_lora.pipeline import run_experiment
from osrm_lora.settings import load_experiment

GRID = (0.0, 3e-5, 1e-4, 3e-4, 1e-3)
SEEDS = (0, 1)
TOLERANCE = 0.03  # the individual average may lose at most this much accuracy to the penalty


def run_sweep(folder: Path, grid: tuple[float, ...], seeds: tuple[int, ...]) -> dict:
    """One pipeline run with an osrm-reg entry per μ; its results.json and each adapter's final penalty."""
    inits = [{"name": "osrm-reg", "label": f"mu{mu:g}", "mu": mu} for mu in grid]
    training = {"max_steps": 24, "batch_size": 16, "lr": 0.05, "warmup_ratio": 0.0, "logging_steps": 8,
                "eval_each_epoch": False, "progress": False}
    path = write_experiment(folder, write_tiny_model(folder / "model"), inits=inits, seeds=list(seeds),
                            training=training, interference=True,
                            merge=[{"method": "task_arithmetic", "lambdas": [1.0]}])
    config = load_experiment(path)
    run_experiment(config, progress=False)
    results = json.loads((config.output_dir / "results.json").read_text())
    penalties = {}
    for meta_file in (config.output_dir / "adapters").glob("*/seed*/*/osrm_lora.json"):
        meta = json.loads(meta_file.read_text())
        penalties.setdefault(meta_file.parts[-4], []).append(meta["mode"]["penalty_final"])
    return {"results": results, "penalties": penalties}


def summarise(raw: dict, grid: tuple[float, ...]) -> dict:
    """Per μ: mean individual and merged accuracy, mean off-diagonal interference, mean final penalty."""
    rows = {}
    res = raw["results"]
    for mu in grid:
        label = f"mu{mu:g}"
        individual = [r["score"] for r in res["individual"] if r["init"] == label]
        merged = [r["score"] for r in res["merged"] if r["init"] == label]
        off = [float(np.mean(np.array(r["matrix"])[~np.eye(len(r["matrix"]), dtype=bool)]))
               for r in res["interference"] if r["init"] == label]
        rows[label] = {"mu": mu, "individual": statistics.fmean(individual), "merged": statistics.fmean(merged),
                       "interference_off_diagonal": statistics.fmean(off),
                       "penalty_final": statistics.fmean(raw["penalties"][label])}
    base = rows[f"mu{grid[0]:g}"]["individual"]
    kept = [row for row in rows.values() if row["individual"] >= base - TOLERANCE]
    chosen = max(kept, key=lambda row: (row["merged"], row["mu"]))
    return {"rows": rows, "chosen_mu": chosen["mu"], "weight": chosen["mu"] * rows[f"mu{grid[0]:g}"]["penalty_final"],
            "rule": f"best merged average among μ with individual ≥ μ=0's − {TOLERANCE}"}


def minilm_run(folder: Path, mu: float) -> dict:
    """One short osrm-reg run of MiniLM on sms_spam with trec as the other task: final P, dev score, losses."""
    from osrm_lora.distributed import collect_task_stats
    from osrm_lora.tasks import get_task
    from osrm_lora.train import finetune

    stats = {t: collect_task_stats(get_task(t), "builtin:minilm", samples=32, batch_size=16, max_length=32)
             for t in ("sms_spam", "trec")}
    result = finetune(get_task("sms_spam"), "builtin:minilm", folder / f"mu{mu:g}", init="osrm-reg",
                      init_options={"mu": mu}, other_stats=[stats["trec"]], lora={"r": 8, "alpha": 16, "dropout": 0.0},
                      training={"max_steps": 30, "batch_size": 16, "lr": 0.01, "warmup_ratio": 0.1, "max_length": 32,
                                "max_train_examples": 480, "max_eval_examples": 64, "eval_each_epoch": False,
                                "logging_steps": 10, "progress": False})
    logged = [h for h in result.history if "penalty" in h]
    return {"mu": mu, "penalty_final": result.metadata["mode"]["penalty_final"], "dev": result.metrics,
            "task_loss": [h["task_loss"] for h in logged], "penalty": [h["penalty"] for h in logged]}


def table(summary: dict) -> str:
    lines = ["| μ | individual | merged (TA, λ=1) | interference off-diag. | final P |", "|---:|---:|---:|---:|---:|"]
    for row in summary["rows"].values():
        lines.append(f"| {row['mu']:g} | {fmt(100 * row['individual'])} | {fmt(100 * row['merged'])} | "
                     f"{fmt(row['interference_off_diagonal'])} | {fmt(row['penalty_final'])} |")
    lines.append(f"\ntiny setting: μ = {summary['chosen_mu']:g} ({summary['rule']}), μ·P₀ = {fmt(summary['weight'])}")
    if "minilm" in summary:
        runs = summary["minilm"]["runs"]
        lines.append(f"MiniLM: P₀ = {fmt(runs[0]['penalty_final'])} → default μ = {fmt(summary['minilm']['mu'])}; "
                     + "; ".join(f"μ={fmt(r['mu'])}: final P {fmt(r['penalty_final'])}, dev "
                                 f"{fmt(100 * r['dev'].get('f1', float('nan')))} F1" for r in runs))
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", type=Path, default=RESULTS / "reg_mu_sweep.json")
    parser.add_argument("--grid", type=float, nargs="+", default=list(GRID), help="μ values, 0 first")
    parser.add_argument("--tiny-only", action="store_true", help="skip the MiniLM measurement")
    args = parser.parse_args()
    grid = tuple(args.grid)
    torch.set_num_threads(1)
    stopwatch = Stopwatch()
    with tempfile.TemporaryDirectory() as tmp:
        raw = run_sweep(Path(tmp), grid, SEEDS)
        summary = summarise(raw, grid)
        if not args.tiny_only:
            plain = minilm_run(Path(tmp), 0.0)
            mu = float(f"{summary['weight'] / plain['penalty_final']:.1g}")
            summary["minilm"] = {"mu": mu, "runs": [plain, minilm_run(Path(tmp), mu)]}
    summary["table"] = table(summary)
    print(summary["table"])
    write_results(args.output, summary, {"grid": grid, "seeds": SEEDS, "output": str(args.output)},
                  stopwatch=stopwatch)


if __name__ == "__main__":
    main()
