"""Evaluation throughput (examples/s): batches sorted by length under `torch.inference_mode` (what
`evaluate.predict` does now) against the batching before it (rows in dataset order, each batch padded to its
longest row, under `torch.no_grad`), side by side in one run on GLUE MNLI (matched) and QNLI dev.

Both read the same seeded sample of each dev set with the built-in MiniLM and the pipeline's evaluation
defaults (batch size 64, 128 tokens); the predictions must be identical. The two run round-robin (order
rotating each round), `--repeats` times after a warm-up batch; examples/s are medians over rounds and the
speed-up is the median of each round's ratio, so load drifting between rounds cancels out. The padded
positions each computes are recorded beside, since they are what sorting saves.

    python bench/eval_speed.py                      # ../shared/data/glue, 400 examples per task, 1 thread
    python bench/eval_speed.py --examples 64 --repeats 1   # smoke run

Results go to bench/results/eval_speed.json.
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import torch
from common import RESULTS, Stopwatch, fmt, median, timed, write_results

from osrm_lora.evaluate import predict, predictions_from_logits
from osrm_lora.runtime.models import load_model_and_tokenizer
from osrm_lora.tasks import get_task, make_dataloader

TASKS = ("mnli", "qnli")
CONTESTANTS = ("before", "sorted")


@torch.no_grad()
def predict_before(model, batches) -> list:
    """The evaluation loop as it was: batches in row order, `no_grad`."""
    predictions = []
    for batch in batches:
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        predictions.extend(predictions_from_logits(model(**inputs).logits, False).tolist())
    return predictions


def positions(batches) -> int:
    return sum(b["input_ids"].numel() for b in batches)


def bench_task(name: str, args) -> dict:
    task = get_task(name, glue_dir=args.glue_dir)
    model, tokenizer = load_model_and_tokenizer("builtin:minilm", task.spec)
    model.eval()
    data = task.split("dev", max_examples=args.examples, seed=0)
    loaders = {
        "before": make_dataloader(data, tokenizer, task.spec, args.batch_size, args.max_length),
        "sorted": make_dataloader(data, tokenizer, task.spec, args.batch_size, args.max_length, by_length=True),
    }
    run = {
        "before": lambda: predict_before(model, loaders["before"]),
        "sorted": lambda: predict(model, loaders["sorted"], regression=False)[0],
    }
    warm = next(iter(loaders["before"]))
    with torch.no_grad():
        model(**{k: v for k, v in warm.items() if k != "labels"})
    seconds: dict[str, list[float]] = {c: [] for c in CONTESTANTS}
    outputs = {}
    for r in range(args.repeats):
        for c in CONTESTANTS[r % 2:] + CONTESTANTS[:r % 2]:
            took, outputs[c] = timed(lambda c=c: run[c]())
            seconds[c].append(took)
    ratios = [b / s for b, s in zip(seconds["before"], seconds["sorted"])]
    n = len(data)
    tokens = sum(int(b["attention_mask"].sum()) for b in loaders["before"])
    result = {
        "examples": n,
        "real_tokens": tokens,
        "positions": {c: positions(loaders[c]) for c in CONTESTANTS},
        "examples_per_s": {c: n / median(seconds[c]) for c in CONTESTANTS},
        "seconds": seconds,
        "speedup": statistics.median(ratios),
        "speedup_per_round": ratios,
        "identical_predictions": outputs["before"] == outputs["sorted"],
    }
    print(f"{name}: {n} examples, before {fmt(result['examples_per_s']['before'])} ex/s, sorted "
          f"{fmt(result['examples_per_s']['sorted'])} ex/s, speed-up {result['speedup']:.2f}× "
          f"(positions {result['positions']['before']} → {result['positions']['sorted']}, real tokens {tokens}); "
          f"identical predictions: {result['identical_predictions']}")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--glue-dir", default=str(Path(__file__).resolve().parents[2] / "shared" / "data" / "glue"))
    parser.add_argument("--examples", type=int, default=400, help="dev examples per task (seeded sample)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: steadiest on a shared CPU)")
    parser.add_argument("--out", type=Path, default=RESULTS / "eval_speed.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    stopwatch = Stopwatch()
    results = {"tasks": {name: bench_task(name, args) for name in TASKS}}
    results["target"] = "sorted ≥ 1.5× before"
    write_results(args.out, results, {k: str(v) for k, v in vars(args).items()}, stopwatch=stopwatch)


if __name__ == "__main__":
    main()
