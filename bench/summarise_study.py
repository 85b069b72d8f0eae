"""The issue-18 study (bench/study.yaml): keep each chunk's compact results, and rebuild every table, plot and
verdict from the committed files alone.

    python bench/summarise_study.py chunk --seed 0 --group A1 --time-log /path/to/time.log  # after a chunk
    python bench/summarise_study.py                                                        # the summary

`chunk` copies one (seed, group)'s score rows, λ choices, interference, diagnostics and forecasts out of the run's
results.json (no per-example predictions), with the machine, the chunk's wall and CPU minutes (from
`/usr/bin/time -v`) and its compute minutes per stage (the cache manifests written during the chunk), into
bench/results/study/seed<N>_<group>.json. The groups (`GROUPS`): A1 and A2 are the issue's group A (the paper's claim), B is beyond the paper.
Where a whole group does not fit a session (about 90 minutes per group and seed on a slow 2-core machine), a chunk
may be part of one, `--inits osrm-reg` (run with the same `--inits`): seed<N>_<group>_<init>[+<init>…].json.

`summary` (the default) reads bench/results/study/*.json only and writes bench/results/study.md and
bench/results/study/plots/. It needs no torch and no runs/ folder.

The decision rule, fixed before any result (bench/study.yaml states it in words). Per candidate X (osrm,
osrm-official and each group-B mode) and merge method, over the n seeds every needed init has, with 95 %
t-intervals of the per-seed paired differences of the report average at each seed's select-chosen λ:

- "OSRM's gain is real" if the interval of X − random-orthonormal lies above 0 with a mean of at least 2
  points, the interval of X − kaiming lies above 0, and the mean single-task (unmerged) difference X − kaiming
  is ≥ −1 point;
- "an artefact of scale" if the interval of X − random-orthonormal lies within ±2 points and
  random-orthonormal − kaiming accounts for X − kaiming: its interval excludes 0 on the side of X − kaiming's
  mean (the scale change alone moves the score the way X does);
- otherwise "undecided at n", with the n at which the measured mean and s.d. of X − random-orthonormal would
  reach one of the two (`seeds_to_decide`); none where the mean sits near a threshold, or where X trails
  random-orthonormal by more than 2 points (a loss, which neither verdict covers).

The rule decides at n = 5 (`RULE_SEEDS`); a "real" or "scale artefact" reading on fewer seeds is labelled
interim, as stopping at the first favourable n would inflate the chance of a false verdict.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import statistics
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from scipy import stats

from osrm_lora import study
from osrm_lora.adapters import METADATA_NAME
from osrm_lora.io import write_json, write_text
from osrm_lora.paired import t_interval
from osrm_lora.pipeline.keys import AdapterKey
from osrm_lora.pipeline.layout import Layout
from osrm_lora.report import (
    FORECAST_NOTE,
    RESULTS_FORMAT,
    diagnostics_markdown,
    forecast_markdown,
    modes_markdown,
    paired_markdown,
    selected_lambda_table,
    table_markdown,
)
from osrm_lora.study import INDIVIDUAL, paired_differences

HERE = Path(__file__).parent
RESULTS_DIR = HERE / "results" / "study"
CHUNK_FORMAT = "osrm-lora/study-chunk/1"
REFERENCE, CONTROL = "kaiming", "random-orthonormal"
# Each chunk's inits. At 600 steps the group A (the paper's claim) takes about 2.5 hours per seed here, so it
# runs as A1 (the reference, osrm and its scale control: all the osrm verdict needs) and A2; group B is beyond the
# paper. A2 and B do not retrain kaiming: the reference rows of every paired difference are A1's, paired by seed
# (each seed fixes the data order and head init of every init), as the runs/ cache need not outlive a session.
GROUPS = {
    "A1": [REFERENCE, "osrm", CONTROL],
    "A2": ["gaussian", "osrm-official", "task-orthogonal"],
    "B": ["osrm-reg", "osrm-contrast", "osrm-project"],
}
CANDIDATES = ["osrm", "osrm-official", "osrm-reg", "osrm-contrast", "osrm-project"]
OFFICIAL, OFFICIAL_BASELINE = "osrm-official", "gaussian"  # the official code's own comparison
LAGGING = 0.05  # a single-task adapter this far below its task's median over every adapter is flagged
KAIMING_FLOORS = {"sst2": 0.85, "qnli": 0.75, "mnli": 0.60, "qqp": 0.75}  # the seed-0 training check
REAL_GAIN, SCALE_BAND, SINGLE_TASK_FLOOR, LEVEL = 0.02, 0.02, -0.01, 0.95
RULE_SEEDS = 5  # the n at which the rule decides (module docstring)
ROW_KINDS = ("individual", "merged", "selection", "interference", "diagnostics", "modes")


# ---------------------------------------------------------------------------------------------- chunk export


def parse_time_log(path: Path) -> dict[str, float]:
    """Wall and CPU minutes and peak memory from the report `/usr/bin/time -v` prints."""
    text = path.read_text()

    def field(label: str) -> str:
        match = re.search(rf"{re.escape(label)}: ([^\n]+)", text)
        if match is None:
            sys.exit(f"error: {path}: no '{label}' line (is it /usr/bin/time -v output?)")
        return match.group(1).strip()

    wall = [float(p) for p in field("Elapsed (wall clock) time (h:mm:ss or m:ss)").split(":")]
    wall_s = sum(v * 60 ** i for i, v in enumerate(reversed(wall)))
    cpu_s = float(field("User time (seconds)")) + float(field("System time (seconds)"))
    return {"wall_minutes": round(wall_s / 60, 1), "cpu_minutes": round(cpu_s / 60, 1),
            "max_rss_gb": round(float(field("Maximum resident set size (kbytes)")) / 2**20, 2)}


def training_device(run_dir: Path, seed: int, inits: Sequence[str], tasks: Sequence[str]) -> tuple[str, str]:
    """The device and precision that trained the chunk's adapters, from their records; one of each per chunk.

    Records written before adapters named their device were all trained on this project's CPUs."""
    records = [json.loads((Layout(run_dir).adapter(AdapterKey(i, seed, t)) / METADATA_NAME).read_text())
               for i in inits for t in tasks]
    found = {(r.get("device", "cpu"), r["precision"]) for r in records}
    if len(found) != 1:
        sys.exit(f"error: {run_dir}: seed {seed}'s adapters were trained on mixed devices/precisions {sorted(found)}")
    return found.pop()


def chunk_inits(group: str, part: Sequence[str] | None = None) -> list[str]:
    """A chunk's inits in the group's order: the whole group, or the part of it named by `--inits`."""
    if not part:
        return list(GROUPS[group])
    strangers = sorted(set(part) - set(GROUPS[group]))
    if strangers:
        sys.exit(f"error: --inits: {strangers} are not in group {group} ({', '.join(GROUPS[group])})")
    return [i for i in GROUPS[group] if i in part]


def chunk_path(out_dir: Path, seed: int, group: str, inits: Sequence[str]) -> Path:
    """seed<N>_<group>.json for a whole group, seed<N>_<group>_<init>+<init>.json for a part of one."""
    part = "" if list(inits) == GROUPS[group] else "_" + "+".join(inits)
    return out_dir / f"seed{seed}_{group}{part}.json"


def export_chunk(run_dir: Path, seed: int, group: str, time_log: Path, out_dir: Path,
                 part: Sequence[str] | None = None) -> Path:
    """Write the chunk's file (`chunk_path`): its rows from the run's results.json, with its cost and machine."""
    from common import machine  # torch; only the export needs it
    from summarise_quality import stage_minutes

    results = json.loads((run_dir / "results.json").read_text())
    inits = chunk_inits(group, part)
    missing = [i for i in inits if i not in results["inits"]]
    if missing:
        sys.exit(f"error: {run_dir / 'results.json'}: inits {missing} are not in the experiment")
    mine = {kind: [r for r in results.get(kind) or [] if r["seed"] == seed and r["init"] in inits]
            for kind in ROW_KINDS}
    if not mine["selection"] or {r["init"] for r in mine["individual"]} != set(inits):
        sys.exit(f"error: {run_dir}: seed {seed}, group {group} is not finished (run its chunk first)")
    device, precision = training_device(run_dir, seed, inits, results["tasks"])
    cost = parse_time_log(time_log)
    finished = time_log.stat().st_mtime
    cost["stage_minutes"] = stage_minutes(run_dir, (finished - 60 * cost["wall_minutes"] - 60, finished))
    record = {
        "format": CHUNK_FORMAT, "seed": seed, "group": group, "inits": inits,
        "command": f"osrm-lora run bench/study.yaml --seeds {seed} --inits {','.join(inits)}",
        "machine": machine(), "device": device, "precision": precision, "compute": cost,
        "experiment": json.loads((run_dir / "experiment.json").read_text()),
        **{k: results[k] for k in ("tasks", "methods", "fixed_lambda", "evaluation", "primary_metrics")},
        "forecast": {i: f for i, f in (results.get("forecast") or {}).items() if i in inits},
        **mine,
    }
    path = chunk_path(out_dir, seed, group, inits)
    write_json(path, record)
    return path


# ---------------------------------------------------------------------------------------------- summary


def load_chunks(folder: Path) -> tuple[list[dict], dict[str, Any]]:
    """The committed chunks and one results dict (results.json's layout) of all of them together."""
    files = {p: json.loads(p.read_text()) for p in sorted(folder.glob("seed*_*.json"))}
    if not files:
        sys.exit(f"error: {folder}: no seed<N>_<group>.json chunk files")
    seen: dict[tuple[int, str], Path] = {}
    for path, chunk in files.items():
        if chunk.get("format") != CHUNK_FORMAT:
            sys.exit(f"error: {path}: not {CHUNK_FORMAT}")
        twice = sorted(i for i in chunk["inits"] if (chunk["seed"], i) in seen)
        if twice:
            sys.exit(f"error: {path}: seed {chunk['seed']}'s {twice} are also in {seen[chunk['seed'], twice[0]].name}")
        seen |= {(chunk["seed"], i): path for i in chunk["inits"]}
    chunks = list(files.values())
    first, config = chunks[0], chunks[0]["experiment"]["config"]  # experiment.json: the validated study file
    present = {i for c in chunks for i in c["inits"]}
    order = [i for inits in GROUPS.values() for i in inits if i in present]
    results = {
        "format": RESULTS_FORMAT, "experiment": config["name"], "model": config["model"]["name"],
        "tasks": first["tasks"], "inits": order, "methods": first["methods"],
        "seeds": sorted({c["seed"] for c in chunks}), "reference_init": REFERENCE,
        "evaluation": first["evaluation"], "fixed_lambda": first["fixed_lambda"],
        "primary_metrics": first["primary_metrics"],
        "forecast": {i: f for c in chunks for i, f in c["forecast"].items()},
        **{kind: [r for c in chunks for r in c[kind]] for kind in ROW_KINDS},
    }
    results["paired"] = paired_differences(results, REFERENCE, None, level=LEVEL)
    return chunks, results


def per_seed_scores(results: Mapping[str, Any]) -> dict[tuple[str, str], dict[int, float]]:
    """(init, method) -> seed -> report average at the select-chosen λ; INDIVIDUAL: the unmerged adapters."""
    chosen = study.per_seed_scores(results["selection"], results["individual"], results["tasks"])
    return {key: {seed: score for seed, (score, _) in by_seed.items()} for key, by_seed in chosen.items()}


def paired_seeds(scores: Mapping, keys: Sequence[tuple[str, str]]) -> list[int]:
    """The seeds every (init, method) of `keys` has a score for; none if one of them has no scores at all."""
    if any(key not in scores for key in keys):
        return []
    return sorted(set.intersection(*(set(scores[key]) for key in keys)))


def difference(scores: Mapping, a: str, b: str, method: str, seeds: Sequence[int]) -> dict[str, Any]:
    """a − b over `seeds`: per-seed values, mean, s.d. and the t-interval (fractions of 1)."""
    values = [scores[(a, method)][s] - scores[(b, method)][s] for s in seeds]
    low, high = t_interval(values, LEVEL)
    return {"values": values, "mean": statistics.fmean(values),
            "sd": statistics.stdev(values) if len(values) > 1 else math.nan, "low": low, "high": high}


def seeds_to_decide(mean: float, sd: float) -> int | None:
    """The smallest n whose t-interval, at this mean and s.d., would lie above 0 with a mean ≥ 2 points or
    within ±2 points; None past 10,000 (a mean on a threshold) or without an s.d. (one seed)."""
    if not math.isfinite(sd):
        return None
    for n in range(2, 10001):
        half = stats.t.ppf((1 + LEVEL) / 2, n - 1) * sd / math.sqrt(n)
        if (mean >= REAL_GAIN and mean - half > 0) or abs(mean) + half <= SCALE_BAND:
            return n
    return None


def decide(scores: Mapping, candidate: str, method: str) -> dict[str, Any] | None:
    """The decision rule (module docstring) for one candidate and merge method, or None without paired data."""
    seeds = paired_seeds(scores, [(candidate, method), (CONTROL, method), (REFERENCE, method),
                                  (candidate, INDIVIDUAL), (REFERENCE, INDIVIDUAL)])
    if not seeds:
        return None
    vs_control = difference(scores, candidate, CONTROL, method, seeds)
    vs_reference = difference(scores, candidate, REFERENCE, method, seeds)
    control_vs_reference = difference(scores, CONTROL, REFERENCE, method, seeds)
    single = difference(scores, candidate, REFERENCE, INDIVIDUAL, seeds)
    defined = len(seeds) > 1
    real = defined and (vs_control["low"] > 0 and vs_control["mean"] >= REAL_GAIN and vs_reference["low"] > 0
                        and single["mean"] >= SINGLE_TASK_FLOOR)
    side = math.copysign(1.0, vs_reference["mean"])
    scale_moves = (control_vs_reference["low"] > 0) if side > 0 else (control_vs_reference["high"] < 0)
    scale = defined and (-SCALE_BAND <= vs_control["low"] and vs_control["high"] <= SCALE_BAND and scale_moves)
    verdict = "real" if real else "scale artefact" if scale else f"undecided at n = {len(seeds)}"
    if (real or scale) and len(seeds) < RULE_SEEDS:
        verdict += f" so far (interim, n = {len(seeds)} of {RULE_SEEDS})"
    return {"candidate": candidate, "method": method, "seeds": seeds, "verdict": verdict,
            "vs_control": vs_control, "vs_reference": vs_reference, "control_vs_reference": control_vs_reference,
            "single_task": single, "n_to_decide": seeds_to_decide(vs_control["mean"], vs_control["sd"])}


def points(d: Mapping[str, float]) -> str:
    """A difference as 'mean [low, high]' in points."""
    if not math.isfinite(d["low"]):
        return f"{100 * d['mean']:+.2f} (n = 1)"
    return f"{100 * d['mean']:+.2f} [{100 * d['low']:+.2f}, {100 * d['high']:+.2f}]"


def verdict_words(d: Mapping[str, Any]) -> str:
    """One decision in plain words."""
    head = f"{d['candidate']}, {d['method']}: "
    if "interim" in d["verdict"]:
        head += f"interim, n = {len(d['seeds'])} of the rule's {RULE_SEEDS} seeds, so not a verdict yet: "
    if d["verdict"].startswith("real"):
        return head + (f"the gain is real — {points(d['vs_control'])} points over random-orthonormal and "
                       f"{points(d['vs_reference'])} over kaiming, single-task {100 * d['single_task']['mean']:+.2f}.")
    if d["verdict"].startswith("scale artefact"):
        return head + (f"an artefact of scale — within ±2 points of random-orthonormal "
                       f"({points(d['vs_control'])}), whose own difference from kaiming "
                       f"({points(d['control_vs_reference'])}) accounts for the candidate's ({points(d['vs_reference'])}).")
    n = d["n_to_decide"]
    if len(d["seeds"]) < 2:
        more = "one seed has no interval: the number of seeds that decides it needs a second seed's spread"
    elif n is not None:
        more = f"about n = {n} seeds would decide it if the mean and s.d. stay as measured"
    elif d["vs_control"]["mean"] <= -SCALE_BAND:
        more = (f"no number of seeds would reach a verdict: it trails random-orthonormal by more than "
                f"{100 * SCALE_BAND:.0f} points, a loss the rule has no verdict for")
    else:
        more = "no affordable number of seeds would decide it (its mean sits near a threshold)"
    return head + (f"{d['verdict']} — vs random-orthonormal {points(d['vs_control'])}, vs kaiming "
                   f"{points(d['vs_reference'])}, random-orthonormal vs kaiming {points(d['control_vs_reference'])}, "
                   f"single-task {100 * d['single_task']['mean']:+.2f}; {more}.")


def decision_markdown(decisions: Sequence[Mapping[str, Any]]) -> str:
    lines = [("| candidate X | method | n | X − random-orthonormal | X − kaiming | random-orthonormal − kaiming | "
             "single-task X − kaiming | verdict | n to decide |"), "|---|---|---:|---:|---:|---:|---:|---|---:|"]
    for d in decisions:
        lines.append(f"| {d['candidate']} | {d['method']} | {len(d['seeds'])} | {points(d['vs_control'])} | "
                     f"{points(d['vs_reference'])} | {points(d['control_vs_reference'])} | "
                     f"{points(d['single_task'])} | {d['verdict']} | {d['n_to_decide'] or '–'} |")
    return "\n".join(lines) + "\n"


def official_markdown(scores: Mapping, methods: Sequence[str]) -> str:
    """osrm-official − gaussian, the comparison the official code reports (outside the rule), per method."""
    lines = ["| method | n | osrm-official − gaussian |", "|---|---:|---:|"]
    for method in [INDIVIDUAL, *methods]:
        seeds = paired_seeds(scores, [(OFFICIAL, method), (OFFICIAL_BASELINE, method)])
        if seeds:
            d = difference(scores, OFFICIAL, OFFICIAL_BASELINE, method, seeds)
            lines.append(f"| {method} | {len(seeds)} | {points(d)} |")
    return "\n".join(lines) + "\n" if len(lines) > 2 else "No paired seeds of both inits yet.\n"


def single_task_grid_markdown(results: Mapping[str, Any]) -> str:
    """Every single-task adapter's report score by seed; * marks one LAGGING or more below its task's median over
    all adapters (one that barely learned moves its init's merges on that seed far more than the effects studied)."""
    scores = {(r["init"], r["task"], r["seed"]): r["score"] for r in results["individual"]}
    medians = {t: statistics.median(s for (_, task, _), s in scores.items() if task == t) for t in results["tasks"]}
    seeds = sorted({seed for _, _, seed in scores})
    lines = ["| init | task | " + " | ".join(f"seed {s}" for s in seeds) + " |", "|---|---|" + "---:|" * len(seeds)]
    for init in results["inits"]:
        for task in results["tasks"]:
            cells = []
            for seed in seeds:
                score = scores.get((init, task, seed))
                lagging = score is not None and score <= medians[task] - LAGGING
                cells.append("–" if score is None else f"{100 * score:.1f}{' *' if lagging else ''}")
            lines.append(f"| {init} | {task} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def training_check_markdown(results: Mapping[str, Any]) -> str:
    """The issue's check of the kaiming adapters (accuracy on report) against the floors, per seed."""
    lines = ["| seed | " + " | ".join(f"{t} (≥ {100 * f:g})" for t, f in KAIMING_FLOORS.items()) + " | all met |",
             "|---:|" + "---:|" * len(KAIMING_FLOORS) + "---|"]
    by_seed: dict[int, dict[str, float]] = {}
    for r in results["individual"]:
        if r["init"] == REFERENCE:
            by_seed.setdefault(r["seed"], {})[r["task"]] = r["metrics"].get("accuracy", r["score"])
    for seed, acc in sorted(by_seed.items()):
        met = all(acc.get(t, 0.0) >= f for t, f in KAIMING_FLOORS.items())
        lines.append(f"| {seed} | " + " | ".join(f"{100 * acc[t]:.2f}" if t in acc else "–" for t in KAIMING_FLOORS)
                     + f" | {'yes' if met else 'no'} |")
    return "\n".join(lines) + "\n"


def lambda_bands(results: Mapping[str, Any]) -> dict[tuple[str, str], dict[float, list[float]]]:
    """(init, method) -> λ -> per-seed report averages over tasks, from each seed's recorded λ curve."""
    out: dict[tuple[str, str], dict[float, list[float]]] = {}
    for entry in results["selection"]:
        for point in entry["curve"]:
            if point["lambda"] is not None:
                out.setdefault((entry["init"], entry["method"]), {}).setdefault(point["lambda"], []).append(
                    point["report_average"])
    return out


def plot_lambda_bands(results: Mapping[str, Any], inits: Sequence[str], path: Path) -> bool:
    """Report average vs λ per method, one line per init: the mean over seeds and its 95 % t-band."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    bands = lambda_bands(results)
    methods = [m for m in results["methods"] if any(len(bands.get((i, m), {})) > 1 for i in inits)]
    if not methods:
        return False
    fig, axes = plt.subplots(1, len(methods), figsize=(4.4 * len(methods), 3.6), squeeze=False)
    for ax, method in zip(axes[0], methods, strict=True):
        for j, init in enumerate(inits):
            by_lam = bands.get((init, method))
            if not by_lam:
                continue
            lams = sorted(by_lam)
            means = [100 * statistics.fmean(by_lam[lam]) for lam in lams]
            ax.plot(lams, means, marker="o", color=f"C{j}", label=init)
            if all(len(by_lam[lam]) > 1 for lam in lams):
                halves = [100 * (t_interval(by_lam[lam], LEVEL)[1] - statistics.fmean(by_lam[lam])) for lam in lams]
                ax.fill_between(lams, [m - h for m, h in zip(means, halves, strict=True)],
                                [m + h for m, h in zip(means, halves, strict=True)], color=f"C{j}", alpha=0.15)
        ax.set(title=method, xlabel="λ", ylabel="report average (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return True


def finished_seeds(chunks: Sequence[Mapping[str, Any]]) -> str:
    """Per group, the seeds whose chunks cover every init of it, and the seeds begun (with the inits done)."""
    words = []
    for group, inits in GROUPS.items():
        done: dict[int, set[str]] = {}
        for c in chunks:
            if c["group"] == group:
                done.setdefault(c["seed"], set()).update(c["inits"])
        whole = sorted(seed for seed, have in done.items() if have == set(inits))
        begun = [f"seed {seed}: {', '.join(i for i in inits if i in have)}"
                 for seed, have in sorted(done.items()) if have != set(inits)]
        words.append(f"{group} {whole or 'none'}" + (f" (begun: {'; '.join(begun)})" if begun else ""))
    return "; ".join(words)


def chunks_markdown(chunks: Sequence[Mapping[str, Any]]) -> str:
    lines = ["| seed | group | inits | device | wall min | CPU min | peak RSS GB | machine |",
             "|---:|---|---|---|---:|---:|---:|---|"]
    for c in sorted(chunks, key=lambda c: (c["group"], c["seed"])):
        m, cost = c["machine"], c["compute"]
        lines.append(f"| {c['seed']} | {c['group']} | {', '.join(c['inits'])} | {c['device']} ({c['precision']}) | "
                     f"{cost['wall_minutes']} | {cost['cpu_minutes']} | {cost['max_rss_gb']} | "
                     f"{m['cpu']}, {m['cores']} cores, torch {m['torch']} |")
    return "\n".join(lines) + "\n"


def summarise(folder: Path, out: Path) -> str:
    """Write `out` (markdown) and `folder`/plots/ from the chunk files; returns the markdown."""
    chunks, results = load_chunks(folder)
    scores = per_seed_scores(results)
    decisions = [d for c in CANDIDATES for m in results["methods"] if (d := decide(scores, c, m)) is not None]
    plots = folder / "plots"
    drawn = {name: plot_lambda_bands(results, inits, plots / f"lambda_{name}.png")
             for name, inits in (("group_a", GROUPS["A1"] + GROUPS["A2"]), ("group_b", [REFERENCE, CONTROL, *GROUPS["B"]]))}
    finished = finished_seeds(chunks)
    parts = [
        "# The five-seed study (issue 18): is OSRM's gain real, and which mode keeps merged adapters best?\n",
        (f"Setting: bench/study.yaml — {', '.join(results['tasks'])} with `{results['model']}`, LoRA r = 8 on "
         "query/value, λ chosen per seed on 200 held-out *select* rows per task, scores on 1,000 disjoint *report* "
         f"rows. Seeds finished (of 0–4): {finished}. Rebuilt by "
         "`python bench/summarise_study.py` from bench/results/study/*.json alone.\n"),
        "## Verdicts\n",
        ("The rule, fixed before the run, is in bench/summarise_study.py's docstring and bench/study.yaml. "
        "Differences in points of the report average at each seed's selected λ, mean [95 % t-interval] over "
        "paired seeds.\n"),
        "\n".join(f"- {verdict_words(d)}" for d in decisions) + "\n" if decisions else "No paired data yet.\n",
        "## The decision table\n", decision_markdown(decisions) if decisions else "No paired data yet.\n",
        "## Paired differences from kaiming, every init and method\n",
        "t-intervals over seeds (per-example bootstrap: n/a here, the chunk files keep no predictions).\n",
        paired_markdown(results),
        "## Scores: single-task adapters and merges at the selected λ (report rows, mean ± s.d. over seeds)\n",
        table_markdown(selected_lambda_table(results)),
        "## The official code's comparison (outside the rule)\n",
        ("The official code reports OSRM against PEFT's gaussian init; the same paired seeds, mean [95 % "
         "t-interval] in points.\n"),
        official_markdown(scores, results["methods"]),
        "## Training check: kaiming adapters' accuracy on report against the issue's floors\n",
        training_check_markdown(results),
        "## Every single-task adapter by seed (report score, %)\n",
        (f"\\* {100 * LAGGING:g} points or more below the task's median over every adapter of the study: an adapter "
         "that barely learned, which moves its init's merges on that seed by far more than the effects studied.\n"),
        single_task_grid_markdown(results),
        "## λ curves (report rows; band: 95 % t-interval over seeds)\n",
        *[f"![{name}](study/plots/lambda_{name}.png)\n" for name, ok in drawn.items() if ok],
        "## Diagnostics (‖ΔW‖, A retention, absolute interference)\n", diagnostics_markdown(results),
        "## Forecast from the statistics against the outcome\n", FORECAST_NOTE, forecast_markdown(results),
    ]
    modes = modes_markdown(results)
    if modes:
        parts += ["## Training modes (last logged task loss and penalty)\n", modes]
    parts += ["## Chunks and their cost\n", chunks_markdown(chunks)]
    text = "\n".join(parts)
    write_text(out, text)
    write_json(folder / "decisions.json", {"rule": __doc__.split("The decision rule")[1].strip(), "decisions": decisions})
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command")
    chunk = sub.add_parser("chunk", help="keep one finished (seed, group) chunk's compact results, or a part of one's")
    chunk.add_argument("--seed", type=int, required=True)
    chunk.add_argument("--group", choices=sorted(GROUPS), required=True)
    chunk.add_argument("--inits", type=lambda text: text.split(","), default=None,
                       help="a part of the group, comma-separated, as the chunk's run was given (default: all of it)")
    chunk.add_argument("--time-log", type=Path, required=True, help="the chunk's `/usr/bin/time -v` output")
    chunk.add_argument("--run-dir", type=Path, default=Path("runs/study"))
    parser.add_argument("--results", type=Path, default=RESULTS_DIR, help="the chunk files' folder")
    args = parser.parse_args()
    if args.command == "chunk":
        print(f"wrote {export_chunk(args.run_dir, args.seed, args.group, args.time_log, args.results, args.inits)}")
    else:
        summarise(args.results, args.results.parent / "study.md")
        print(f"wrote {args.results.parent / 'study.md'}")


if __name__ == "__main__":
    main()
