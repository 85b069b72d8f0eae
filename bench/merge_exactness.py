"""How far each merge lands from the merge it names: ours vs PEFT's `add_weighted_adapter`, on the same adapters.

The reference for every method is its definition applied to the dense updates ΔW_i = s_i B_i A_i, computed here
with PEFT's own pure functions (`merge_utils.task_arithmetic`; for TIES a kthvalue trim, then
`merge_utils.calculate_majority_sign_mask` and `disjoint_merge`). For each module the error is
‖ΔW_merged − ΔW_reference‖_F / ‖ΔW_reference‖_F, and the table gives the largest over modules. PEFT's `ties`
trims and elects signs on A and B separately; `svd` and `ties_svd` truncate the exact result to rank r; `cat` is
exact. Ours: task arithmetic as rank-Σr factors, TIES on the dense updates.

    python bench/merge_exactness.py                  # d = 1024, T = 4, r = 8, 2 layers
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from common import RESULTS, write_results
from merge_speed import module_names, peft_model, random_adapters
from peft.utils import merge_utils

from osrm_lora.merge import merge_adapters

DENSITY = 0.2
PEFT_TO_REFERENCE = {"cat": "task_arithmetic", "svd": "task_arithmetic", "ties": "ties", "ties_svd": "ties"}


def trim_keeping_ties(delta: torch.Tensor) -> torch.Tensor:
    """Top-k magnitude trim with every entry tied at the cut kept (PEFT's topk keeps exactly k, an arbitrary
    subset of a tie: float32 updates do have exact ties at the cut, and the choice is not what is measured)."""
    keep = int(DENSITY * delta.numel())
    threshold = torch.kthvalue(delta.abs().flatten(), delta.numel() - keep + 1).values
    return delta * (delta.abs() >= threshold)


def reference(deltas: list[torch.Tensor], method: str) -> torch.Tensor:
    if method == "ties":
        trimmed = torch.stack([trim_keeping_ties(d) for d in deltas])
        return merge_utils.disjoint_merge(trimmed, merge_utils.calculate_majority_sign_mask(trimmed, "total"))
    return merge_utils.task_arithmetic(deltas, torch.ones(len(deltas)))


def relative_error(merged: torch.Tensor, expected: torch.Tensor) -> float:
    return float(torch.linalg.norm(merged - expected) / torch.linalg.norm(expected))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dim", type=int, default=1024)
    parser.add_argument("--tasks", type=int, default=4)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--output", type=Path, default=RESULTS / "merge_exactness.json")
    args = parser.parse_args()

    adapters = random_adapters(args.dim, args.layers, args.tasks, args.rank)
    names = module_names(args.layers)
    references = {
        method: {m: reference([a.modules[m].delta() for a in adapters], method) for m in names}
        for method in ("task_arithmetic", "ties")
    }
    errors: dict[str, dict[str, float]] = {"ours": {}, "peft": {}}
    for method, kwargs in (("task_arithmetic", {}), ("ties", {"density": DENSITY})):
        errors["ours"][method] = max(
            relative_error(m.dense(), references[method][m.name]) for m in merge_adapters(adapters, method, **kwargs)
        )
    model = peft_model(adapters, args.dim, args.layers, args.rank)
    for ctype, method in PEFT_TO_REFERENCE.items():
        extra = {"density": DENSITY} if method == "ties" else {}
        model.add_weighted_adapter([a.name for a in adapters], [1.0] * args.tasks, "merged",
                                   combination_type=ctype, **extra)
        errors["peft"][ctype] = max(
            relative_error(model.base_model.model.get_submodule(m).get_delta_weight("merged"), references[method][m])
            for m in names
        )
        model.delete_adapter("merged")
    for side, by_method in errors.items():
        for name, error in by_method.items():
            print(f"{side:5s} {name:16s} max relative error {error:.2e}")
    write_results(args.output, {"density": DENSITY, "reference": PEFT_TO_REFERENCE, "max_relative_error": errors},
                  vars(args))


if __name__ == "__main__":
    main()
