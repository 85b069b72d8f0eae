"""Speed of OSRM's extra work, each figure a ratio measured in one run on the same model and data: everything
that bench/stats_speed.py and bench/train_speed.py measure, per model, in one report.

Models and data (bench/speed_setup.py): the built-in MiniLM (d = 384) and a random Llama-like model (d = 2048,
2 layers by default, `--full` 22), on batches of the built-in `movie_valence` task; targets are the q/v
projections of every layer.

1. Statistics collection throughput of `collect_stats` against a plain forward, PEFT's CorDA and EVA and the
   official OSRM code's collection (bench/stats_speed.py, the `collection` record).
2. Subspace computation as a fraction of one training epoch, and 3. training step time of the OSRM against the
   kaiming init (bench/train_speed.py, the `subspace` and `training` records).
4. Our statistics over the whole train split at the measured throughput, as a fraction of an epoch
   (`stats_over_train_split`), which needs both.
5. Merge times: a summary of `bench/results/merge_speed.json` (written by `bench/merge_speed.py`), not rerun.

    python bench/speed.py                  # CPU, 1 thread, MiniLM and a 2-layer d=2048 Llama
    python bench/speed.py --quick          # smoke run: tiny data, 1 repeat, 2 subspace tasks, 1 Llama layer
    python bench/speed.py --device cuda    # on a GPU (threads left at torch's default unless given)
    python bench/speed.py --full           # 22 Llama layers, more data and train steps

Results go to bench/results/speed.json (with the machine and its load average at start and end); a markdown
table is printed. bench/stats_speed.py and bench/train_speed.py write their parts of it alone, with the same
keys, to bench/results/stats_speed.json and bench/results/train_speed.json.
"""

from __future__ import annotations

import json
from pathlib import Path

import stats_speed
import train_speed
from common import RESULTS, fmt
from speed_setup import Setup, make_parser, markdown, parse, run


def bench(setup: Setup, args) -> dict:
    """The statistics, subspace and training figures, and the statistics over the train split, which need
    both the collection throughput and the epoch."""
    collected = stats_speed.bench(setup, args)
    trained = train_speed.bench(setup, args)
    data = setup.data
    epoch = trained["subspace"]["epoch_estimate"]
    tokens_per_example = data.tokens / len(data.singles)
    stats_s = epoch["train_examples"] * tokens_per_example / collected["collection"]["tokens_per_s"]["ours"]
    return {
        **collected,
        **trained,
        "stats_over_train_split": {"seconds_est": stats_s, "fraction_of_epoch": stats_s / epoch["epoch_s"]},
    }


def merge_summary(path: Path) -> dict | None:
    """Per configuration of `bench/merge_speed.py`'s results: seconds of each of our methods and of PEFT's."""
    if not path.is_file():
        return None
    saved = json.loads(path.read_text())
    rows = [
        {
            "d": r["d"],
            "layers": r["layers"],
            "tasks": r["tasks"],
            "rank": r["rank"],
            "ours_s": {m: v["seconds"] for m, v in r["ours"].items()},
            "peft_s": {c: v["seconds"] for c, v in r["peft"].items()},
        }
        for r in saved["results"]
    ]
    return {"source": str(path), "machine": saved.get("machine"), "args": saved.get("args"), "rows": rows}


def merge_table(merge: dict | None) -> list[str]:
    if not merge:
        return []
    methods = sorted({m for row in merge["rows"] for m in row["ours_s"]})
    peft = sorted({c for row in merge["rows"] for c in row["peft_s"]})
    lines = [
        "",
        f"Merge seconds (from {Path(merge['source']).name}, not rerun):",
        "",
        "| d | layers | T | r | "
        + " | ".join(methods)
        + " | "
        + " | ".join(f"peft {c}" for c in peft)
        + " |",
        "|---" * (4 + len(methods) + len(peft)) + "|",
    ]
    for row in merge["rows"]:
        lines.append(
            f"| {row['d']} | {row['layers']} | {row['tasks']} | {row['rank']} | "
            + " | ".join(fmt(row["ours_s"].get(m), 3) for m in methods)
            + " | "
            + " | ".join(fmt(row["peft_s"].get(c), 3) for c in peft)
            + " |"
        )
    return lines


def table(results: dict) -> str:
    models = results["models"]
    tail = stats_speed.rate_table(models) + merge_table(results.get("merge"))
    return markdown(models, stats_speed.table_rows, train_speed.table_rows, tail=tail)


def main() -> None:
    parser = make_parser(__doc__, "speed.json", repeats=True, subspace_tasks=True)
    parser.add_argument("--merge-results", type=Path, default=RESULTS / "merge_speed.json")
    args = parse(parser)
    run(args, bench, table, extra={"merge": merge_summary(args.merge_results)})


if __name__ == "__main__":
    main()
