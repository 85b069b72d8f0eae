"""Step time of `osrm-reg` against plain LoRA training, side by side on the same model and data.

Two adapters on one PEFT model, both starting on the OSRM rows: `plain` trains on the task loss, `reg` on the
task loss plus μ·P, the interference penalty computed exactly from the factors (`osrm_lora.penalty`, O(r·d²)
per module and no d×d product per step). Same batches, alternating steps (and which goes first); the ratio is
that of the median step times, target ≤ 1.10 (the median of per-step ratios is recorded too). The penalty's
own forward + backward is timed alone as well: on a loaded machine the step ratio carries the load's noise,
the penalty's share of a plain step hardly does. Models and data: bench/speed_setup.py (MiniLM, d = 384, and a
random Llama-like model, d = 2048); Σ₋ᵢ comes from statistics of the same batches, which sets its shape (what
the cost depends on), not its values.

    python bench/reg_step_time.py            # CPU, 1 thread, MiniLM and a 2-layer d=2048 Llama
    python bench/reg_step_time.py --quick    # smoke run

Results go to bench/results/reg_step_time.json.
"""

from __future__ import annotations

import functools

import torch
from common import fmt, median, timed
from speed_setup import RANK, Setup, make_parser, markdown, parse, run

from osrm_lora.inits.osrm_tensors import _lora_layers, osrm_init
from osrm_lora.moments import task_moments
from osrm_lora.penalty import InterferencePenalty
from osrm_lora.settings import LoraSettings, TrainingSettings
from osrm_lora.stats import collect_stats
from osrm_lora.subspace import subspace_from_others

MU = 1.0
STEPS = 15  # per adapter: under load the per-step ratios scatter by ±10%, the median of 15 far less
ADAPTERS = ("plain", "reg")


def _peft_model(setup: Setup):
    """One PEFT model with the two adapters, both on the OSRM rows of the batches' own statistics; the penalty
    of `reg`."""
    from peft import LoraConfig, TaskType, get_peft_model

    stats = collect_stats(setup.model, setup.data.batches, setup.targets, task="others")
    subspace = subspace_from_others("bench", [stats], RANK)
    lora = LoraSettings(r=RANK)
    config = LoraConfig(task_type=TaskType.SEQ_CLS, r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                        target_modules=list(setup.targets))
    torch.manual_seed(0)
    peft_model = get_peft_model(setup.model, config, adapter_name="plain")
    peft_model.add_adapter("reg", config)
    for adapter in ADAPTERS:
        osrm_init(peft_model, subspace, adapter_name=adapter)
    penalty = InterferencePenalty(_lora_layers(peft_model, "reg"), task_moments("bench", [stats]), "reg")
    return peft_model, penalty, lora


def bench(setup: Setup, args) -> dict:
    """Median step time of each adapter (alternating) and their ratio; the penalty alone."""
    peft_model, penalty, lora = _peft_model(setup)
    data, lr = setup.data, TrainingSettings().lr
    optimizers = {}
    for adapter in ADAPTERS:
        peft_model.set_adapter(adapter)
        optimizers[adapter] = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=lr)
    peft_model.train()

    def step(adapter: str, i: int) -> None:
        peft_model.set_adapter(adapter)
        batch = data.batches[i % len(data.batches)]
        loss = peft_model(**batch, labels=data.labels[i % len(data.labels)]).loss
        if adapter == "reg":
            loss = loss + MU * penalty()
        loss.backward()
        optimizers[adapter].step()
        optimizers[adapter].zero_grad(set_to_none=True)

    for adapter in ADAPTERS:  # warm-up; B leaves zero, so the penalty's gradients are real from here on
        step(adapter, 0)
    seconds: dict[str, list[float]] = {adapter: [] for adapter in ADAPTERS}
    for i in range(args.steps):
        for adapter in ADAPTERS if i % 2 == 0 else ADAPTERS[::-1]:
            seconds[adapter].append(timed(functools.partial(step, adapter, i), setup.device)[0])
    penalty_s = [timed(lambda: penalty().backward(), setup.device)[0] for _ in range(args.steps)]
    peft_model.zero_grad(set_to_none=True)
    peft_model.eval()
    medians = {a: median(v) for a, v in seconds.items()}
    ratio = medians["reg"] / medians["plain"]
    share = median(penalty_s) / medians["plain"]
    print(f"[{setup.key}] step reg/plain {ratio:.3f}; penalty alone / plain step {share:.4f}", flush=True)
    return {"training": {
        "seconds": seconds, "median_s": medians, "ratio_reg/plain": ratio,
        "median_of_step_ratios": median([r / p for r, p in zip(seconds["reg"], seconds["plain"])]),
        "penalty_forward_backward_s": median(penalty_s), "penalty_share_of_plain_step": share, "mu": MU, "batch_size": len(data.batches[0]["input_ids"]),
        "optimizer": f"AdamW(lr={lr})", "lora": {"r": lora.r, "alpha": lora.alpha, "dropout": lora.dropout},
        "penalty_modules": len(penalty.modules), "shared_inputs": penalty.shared_inputs,
    }}


def table_rows(label: str, r: dict) -> list[str]:
    t = r["training"]
    return [
        (f"| {label} | train step, osrm-reg / plain LoRA | {fmt(t['ratio_reg/plain'])} "
         f"({fmt(t['median_s']['reg'])} s / {fmt(t['median_s']['plain'])} s) | ≤ 1.10 |"),
        (f"| {label} | penalty forward + backward alone / plain step | {fmt(t['penalty_share_of_plain_step'])} "
         f"({fmt(t['penalty_forward_backward_s'])} s) | |"),
    ]


def main() -> None:
    parser = make_parser(__doc__, "reg_step_time.json")
    parser.add_argument("--steps", type=int, default=STEPS, help=f"timed steps per adapter (default {STEPS})")
    args = parse(parser)
    run(args, bench, lambda results: markdown(results["models"], table_rows))


if __name__ == "__main__":
    main()
