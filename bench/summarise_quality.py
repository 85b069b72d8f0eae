"""Summarise a finished quality run (``osrm-lora run bench/glue_minilm.yaml``) into bench/results/.

Writes ``<out>.json`` (machine, run settings, compute minutes per stage, OSRM − kaiming gaps, the full results)
and ``<out>.md`` (the gaps, then the report's tables), plus the report's CSVs and plots under ``<out>/``.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from common import machine

from osrm_lora.io import write_json, write_text
from osrm_lora.report import best_lambda_table, fixed_lambda_table, table_markdown, write_report


def stage_minutes(run_dir: Path, window: tuple[float, float] | None = None) -> dict[str, float]:
    """Compute minutes per pipeline stage, summed from the cache manifests (robust to a resumed run); with a
    (start, end) `window`, only the units whose manifest was written in it (a chunk's: cached ones cost 0)."""
    seconds: dict[str, float] = {}
    for manifest in (run_dir / "manifests").rglob("*.json"):
        if window is not None and not window[0] <= manifest.stat().st_mtime <= window[1]:
            continue
        entry = json.loads(manifest.read_text())
        seconds[entry["stage"]] = seconds.get(entry["stage"], 0.0) + entry.get("seconds", 0.0)
    minutes = {stage: round(s / 60, 1) for stage, s in sorted(seconds.items())}
    return {**minutes, "total": round(sum(seconds.values()) / 60, 1)}


def gaps(table) -> dict:
    """OSRM minus kaiming, in points, for every method present with both inits."""
    rows = {(r.init, r.method): r for r in table.rows}
    out = {}
    for (init, method), row in rows.items():
        base = rows.get(("kaiming", method))
        if init == "osrm" and base is not None:
            out[method] = {"average": 100 * (row.average - base.average),
                           "normalised_average": 100 * (row.normalised_average - base.normalised_average),
                           "osrm_lambda": row.lam, "kaiming_lambda": base.lam}
    return out


def one_seed(results: dict, seed: int) -> dict:
    """The results of one seed only, in the same layout."""
    return {**results, "seeds": [seed],
            **{key: [r for r in results[key] if r["seed"] == seed] for key in ("individual", "merged")}}


def per_seed_lines(per_seed: dict[int, dict], title: str) -> list[str]:
    """A markdown table of each seed's OSRM − kaiming average gap, with their mean and sample s.d."""
    seeds = sorted(per_seed)
    lines = [f"## {title}\n", "| method | " + " | ".join(f"seed {s}" for s in seeds) + " | mean | s.d. |",
             "|---|" + "---:|" * (len(seeds) + 2)]
    for method in per_seed[seeds[0]]:
        values = [per_seed[s][method]["average"] for s in seeds]
        lines.append(f"| {method} | " + " | ".join(f"{v:+.2f}" for v in values)
                     + f" | {statistics.fmean(values):+.2f} | {statistics.stdev(values):.2f} |")
    return lines + [""]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("run_dir", nargs="?", default="runs/glue_minilm")
    parser.add_argument("--out", default="bench/results/glue_minilm")
    args = parser.parse_args()
    run_dir, out = Path(args.run_dir), Path(args.out)
    results = json.loads((run_dir / "results.json").read_text())
    experiment = json.loads((run_dir / "experiment.json").read_text())
    best, fixed = best_lambda_table(results), fixed_lambda_table(results)
    summary = {"machine": machine(), "experiment": experiment, "compute_minutes": stage_minutes(run_dir),
               "gap_best_lambda": gaps(best), "gap_fixed_lambda": gaps(fixed), "results": results}
    seeds = results["seeds"]
    if len(seeds) > 1:
        summary["gap_best_lambda_per_seed"] = {s: gaps(best_lambda_table(one_seed(results, s))) for s in seeds}
        summary["gap_fixed_lambda_per_seed"] = {s: gaps(fixed_lambda_table(one_seed(results, s))) for s in seeds}
    write_json(out.with_suffix(".json"), summary)
    write_report(results, out)
    lines = [f"# {results['experiment']} ({results['model']}): kaiming vs OSRM init\n",
             (f"Machine: {summary['machine']['cpu']}, {summary['machine']['cores']} cores, torch "
              f"{summary['machine']['torch']}; compute minutes per stage: {summary['compute_minutes']}.\n"),
             "## OSRM − kaiming (points of average score / normalised average)\n",
             "| method | best λ: avg | best λ: norm. avg | fixed λ: avg | fixed λ: norm. avg |",
             "|---|---:|---:|---:|---:|"]
    for method, g in summary["gap_best_lambda"].items():
        f = summary["gap_fixed_lambda"].get(method, {})
        lines.append(f"| {method} | {g['average']:+.2f} | {g['normalised_average']:+.2f} | "
                     f"{f.get('average', float('nan')):+.2f} | {f.get('normalised_average', float('nan')):+.2f} |")
    lines.append("")
    if len(seeds) > 1:
        lines += per_seed_lines(summary["gap_best_lambda_per_seed"], "OSRM − kaiming per seed, best λ of each seed")
        lines += per_seed_lines(summary["gap_fixed_lambda_per_seed"], "OSRM − kaiming per seed, fixed λ")
    lines += [f"## {best.title}\n", table_markdown(best), f"## {fixed.title}\n", table_markdown(fixed),
              f"Plots: `{out.name}/plots/`.\n"]
    write_text(out.with_suffix(".md"), "\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
