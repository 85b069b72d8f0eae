"""The models, data and command line that the speed benchmarks share (stats_speed.py, train_speed.py and
speed.py, which runs both), so that their figures are measured on the same inputs.

Two models: the built-in MiniLM (`builtin:minilm`, d = 384) and a Llama-like random model built from
`LlamaConfig` (d = 2048, GQA, 2 layers by default so it fits a small CPU; `--full` builds all 22 layers of a
TinyLlama-sized model). Both read the same batches of the built-in `movie_valence` task, tokenised by
MiniLM's tokenizer; the target modules are the q/v projections of every layer. One CPU thread is the default
on CPU: on a shared, loaded machine it is both faster and far steadier than several threads competing for the
same cores.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from common import RESULTS, Stopwatch, write_results

from osrm_lora import tasks
from osrm_lora.modules import default_target_modules, find_target_modules, in_out_features
from osrm_lora.runtime.models import load_model_and_tokenizer

BENCH_TASK = "movie_valence"
RANK = 8
LLAMA_FULL_LAYERS = 22  # TinyLlama-1.1B: d = 2048, 22 layers, 32 heads, 4 key/value heads


@dataclasses.dataclass
class Data:
    """The same examples in the three layouts the contestants need, already on the device."""

    batches: list[dict]  # dynamically padded batches, no labels
    labels: list[torch.Tensor]  # per batch, for the training steps
    singles: list[dict]  # one example per batch, unpadded
    padded: list[dict]  # one example per batch, padded to max_length (the official OSRM code's input)
    tokens: int  # real tokens (attention mask) over all examples

    def head(self, n_batches: int) -> Data:
        """The first batches and their examples: a cheap warm-up with every code path."""
        batches = self.batches[:n_batches]
        n = sum(len(b["input_ids"]) for b in batches)
        return Data(
            batches,
            self.labels[:n_batches],
            self.singles[:n],
            self.padded[:n],
            sum(int(b["attention_mask"].sum()) for b in batches),
        )

    def positions(self) -> dict[str, int]:
        return {
            layout: sum(b["input_ids"].numel() for b in getattr(self, layout))
            for layout in ("batches", "singles", "padded")
        }


def model_inputs(model) -> set[str]:
    return set(inspect.signature(model.forward).parameters)


def build_data(task, tokenizer, model, examples: int, batch_size: int, max_length: int, device) -> Data:
    spec = task.spec
    rows = tasks.tokenize(task.split("train", max_examples=examples, seed=0), tokenizer, spec, max_length)
    accepted = model_inputs(model)
    batches, labels, singles, padded = [], [], [], []
    for batch in tasks.make_dataloader(rows, tokenizer, spec, batch_size, max_length):
        inputs = {k: v.to(device) for k, v in batch.items() if k != "labels" and k in accepted}
        batches.append(inputs)
        labels.append(batch["labels"].to(device))
        for i, length in enumerate(batch["attention_mask"].sum(1).tolist()):
            single = {k: v[i : i + 1, :length] for k, v in inputs.items()}  # right padding: real tokens first
            singles.append(single)
            pad = max_length - length
            padded.append(
                {
                    k: torch.nn.functional.pad(
                        v, (0, pad), value=tokenizer.pad_token_id if k == "input_ids" else 0
                    )
                    for k, v in single.items()
                }
            )
    return Data(batches, labels, singles, padded, sum(int(b["attention_mask"].sum()) for b in batches))


def load_minilm(spec, device):
    model, tokenizer = load_model_and_tokenizer("builtin:minilm", spec)
    return model.to(device).eval(), tokenizer


def build_llama(spec, tokenizer, layers: int, device):
    """A random Llama-like classifier with TinyLlama's widths; it reads MiniLM's token ids."""
    from transformers import LlamaConfig, LlamaForSequenceClassification

    config = LlamaConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=2048,
        intermediate_size=5632,
        num_hidden_layers=layers,
        num_attention_heads=32,
        num_key_value_heads=4,
        max_position_embeddings=512,
        pad_token_id=tokenizer.pad_token_id,
        num_labels=1 if spec.is_regression else len(spec.label_names),
    )
    torch.manual_seed(0)
    return LlamaForSequenceClassification(config).to(device).eval()


def describe_model(model, targets) -> dict:
    layers = find_target_modules(model, targets)
    return {
        "type": model.config.model_type,
        "hidden_size": model.config.hidden_size,
        "layers": model.config.num_hidden_layers,
        "parameters": sum(p.numel() for p in model.parameters()),
        "target_modules": list(targets),
        "n_target_modules": len(layers),
        "target_in_dims": sorted({in_out_features(layer)[0] for layer in layers.values()}),
    }


@dataclasses.dataclass(frozen=True)
class Sizes:
    """Work per model: examples timed, batch size, examples per subspace task, repeats, train steps."""

    examples: int
    batch_size: int
    subspace_examples: int
    subspace_repeats: int
    train_steps: int


SIZES = {  # (default, --quick, --full) per model
    "minilm": (Sizes(48, 16, 32, 3, 7), Sizes(8, 4, 4, 1, 1), Sizes(256, 32, 128, 3, 9)),
    "llama": (Sizes(16, 8, 8, 1, 5), Sizes(4, 2, 2, 1, 1), Sizes(64, 16, 32, 2, 7)),
}


@dataclasses.dataclass
class Setup:
    """One model ready to be measured: its target modules, its description and the timed data."""

    key: str
    model: torch.nn.Module
    tokenizer: object
    targets: list[str]
    described: dict
    data: Data
    size: Sizes
    device: torch.device


def make_parser(doc: str, output: str, repeats: bool = False, subspace_tasks: bool = False):
    """The flags of every speed script, plus `--repeats` (statistics) and `--subspace-tasks` (subspaces)."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    add = parser.add_argument
    add("--device", choices=["cpu", "cuda"], default="cpu")
    add(
        "--threads",
        type=int,
        default=None,
        help="torch intra-op threads (default: 1 on CPU, torch's default on CUDA)",
    )
    add(
        "--quick",
        action="store_true",
        help="smoke run: tiny data, one repeat, 2 subspace tasks, 1 Llama layer",
    )
    add("--full", action="store_true", help=f"{LLAMA_FULL_LAYERS}-layer Llama, more data and repeats")
    add("--models", nargs="+", choices=["minilm", "llama"], default=["minilm", "llama"])
    add("--llama-layers", type=int, default=None, help="layers of the d=2048 model (default 2)")
    if repeats:
        add("--repeats", type=int, default=None, help="timed rounds per collector (default 5)")
    add("--max-length", type=int, default=64, help="tokens per example (official code pads to it)")
    if subspace_tasks:
        add("--subspace-tasks", type=int, default=None, help="built-in tasks for subspaces (default 8)")
    add("--output", type=Path, default=RESULTS / output)
    return parser


def parse(parser: argparse.ArgumentParser) -> argparse.Namespace:
    """Parse and fill in the defaults that depend on --quick/--full; sets torch's thread count."""
    args = parser.parse_args()
    if args.quick and args.full:
        parser.error("--quick and --full exclude each other")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")
    device = torch.device(args.device)
    torch.set_num_threads(args.threads or (1 if device.type == "cpu" else torch.get_num_threads()))
    if "repeats" in vars(args):
        args.repeats = args.repeats or (1 if args.quick else 5)
    args.llama_layers = args.llama_layers or (LLAMA_FULL_LAYERS if args.full else 1 if args.quick else 2)
    if "subspace_tasks" in vars(args):
        n_tasks = args.subspace_tasks or (2 if args.quick else 8)
        names = [BENCH_TASK] + [t for t in tasks.BUILTIN_TASKS if t != BENCH_TASK]
        if not 2 <= n_tasks <= len(names):
            parser.error(f"--subspace-tasks must be between 2 and {len(names)}")
        args.subspace_task_names = names[:n_tasks]
    args.sizes = {key: SIZES[key][1 if args.quick else 2 if args.full else 0] for key in SIZES}
    return args


def data_record(setup: Setup, args: argparse.Namespace) -> dict:
    data = setup.data
    record = {
        "task": BENCH_TASK,
        "split": "train",
        "examples": len(data.singles),
        "tokens": data.tokens,
        "positions": data.positions(),
        "batch_size": setup.size.batch_size,
        "max_length": args.max_length,
    }
    if "repeats" in vars(args):
        record["repeats"] = args.repeats
    return record


def setups(args: argparse.Namespace):
    """Each model of --models with its data; the Llama is built when its turn comes."""
    device = torch.device(args.device)
    task = tasks.get_task(BENCH_TASK)
    minilm, tokenizer = load_minilm(task.spec, device)
    for key in args.models:
        model = minilm if key == "minilm" else build_llama(task.spec, tokenizer, args.llama_layers, device)
        targets = default_target_modules(model.config.model_type)
        size = args.sizes[key]
        described = describe_model(model, targets)  # before training wraps its layers in LoRA
        data = build_data(task, tokenizer, model, size.examples, size.batch_size, args.max_length, device)
        print(
            f"[{key}] {len(data.singles)} examples, {data.tokens} tokens, positions {data.positions()}",
            flush=True,
        )
        yield Setup(key, model, tokenizer, targets, described, data, size, device)


def markdown(models: dict, *row_makers: Callable[[str, dict], list[str]], tail: Sequence[str] = ()) -> str:
    """The figures table: for each model, the rows each maker gives for its record; then `tail`."""
    lines = ["| model | figure | value | target |", "|---|---|---|---|"]
    for key, r in models.items():
        m = r["model"]
        label = f"{key} (d={m['hidden_size']}, {m['layers']} layers)"
        for rows in row_makers:
            lines += rows(label, r)
    return "\n".join(lines + list(tail))


def run(
    args: argparse.Namespace,
    bench: Callable[[Setup, argparse.Namespace], dict],
    table: Callable[[dict], str],
    extra: dict | None = None,
) -> None:
    """Measure every model, print the table and write it all to --output with the machine and load."""
    stopwatch = Stopwatch()
    results: dict = {"models": {}}
    for setup in setups(args):
        results["models"][setup.key] = {
            "model": setup.described,
            "data": data_record(setup, args),
            **bench(setup, args),
        }
    results.update(extra or {})
    results["table"] = table(results)
    recorded_args = {
        **vars(args),
        "sizes": {key: dataclasses.asdict(size) for key, size in args.sizes.items()},
    }
    print(results["table"])
    write_results(args.output, results, recorded_args, args.device, stopwatch)
