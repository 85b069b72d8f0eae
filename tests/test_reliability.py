"""Issue 14 in the library: writers never replace what they did not write, non-finite numbers are refused.

The output rules themselves are tested in test_io.py and the second-moment checks in test_stats.py; here each
library writer and loader is shown to apply them.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from helpers_core import anisotropic_inputs, stats_from_inputs
from helpers_merge import random_adapter, random_adapters, tiny_bert
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import LlamaConfig, LlamaForCausalLM

from osrm_lora.adapters import LoraAdapter
from osrm_lora.errors import RegistryError
from osrm_lora.io import NonFiniteError, OutputError, recorded_kind
from osrm_lora.merge import get_method, merge_adapters, merge_checkpoint_sharded, save_merged_model
from osrm_lora.runtime.fisher import load_fisher, save_fisher
from osrm_lora.subspace import Subspace, compute_subspaces


def _corrupt(path: Path, key_part: str, value: float) -> str:
    """Rewrite a safetensors file with one entry of the first tensor whose key holds `key_part` set to
    `value`, keeping its metadata; returns that key."""
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open has no __iter__
    key = next(k for k in sorted(tensors) if key_part in k)
    tensors[key].view(-1)[0] = value
    save_file(tensors, str(path), metadata=metadata)
    return key


def _precious(path: Path) -> Path:
    path.mkdir(parents=True)
    (path / "thesis.tex").write_text("years of work")
    return path


# --- non-finite numbers are refused on load (§2) ----------------------------------------------------------


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_an_adapter_with_a_nan_or_inf_factor_is_refused_naming_file_and_module(tmp_path, value):
    random_adapter("a", seed=1).save(tmp_path / "a")
    key = _corrupt(tmp_path / "a" / "adapter_model.safetensors", "layer.1.q.lora_A", value)
    with pytest.raises(NonFiniteError, match=rf"{tmp_path / 'a'}.*tensor {key} holds 1 non-finite"):
        LoraAdapter.load(tmp_path / "a")


def _subspace_file(tmp_path: Path) -> Path:
    pool = [stats_from_inputs(t, {"layer.0.q": anisotropic_inputs(60, 10, seed=i)}) for i, t in enumerate("ab")]
    path = tmp_path / "a.safetensors"
    compute_subspaces(pool, 2)["a"].save(path)
    return path


def test_a_subspace_with_nan_is_refused_naming_file_and_module(tmp_path):
    path = _subspace_file(tmp_path)
    Subspace.load(path)
    _corrupt(path, "A.layer.0.q", float("nan"))
    with pytest.raises(NonFiniteError, match=r"a\.safetensors: tensor A\.layer\.0\.q holds 1 non-finite"):
        Subspace.load(path)


def test_a_fisher_file_with_inf_is_refused_naming_file_and_module(tmp_path):
    path = tmp_path / "fisher.safetensors"
    save_fisher(path, {"layer.0.q": torch.ones(3, 4)}, task="a")
    _corrupt(path, "layer.0.q", float("inf"))
    with pytest.raises(NonFiniteError, match=r"fisher\.safetensors: tensor layer\.0\.q holds 1 non-finite"):
        load_fisher(path)


@pytest.mark.parametrize(("method", "options"), [
    ("task_arithmetic", {"scaling": float("nan")}),
    ("task_arithmetic", {"scaling": float("inf")}),
    ("task_arithmetic", {"weights": [1.0, float("nan")]}),
    ("ties", {"density": float("nan")}),
    ("dare", {"drop_rate": float("nan")}),
    ("regmean", {"alpha": float("-inf")}),
])
def test_non_finite_merge_hyper_parameters_are_refused(method, options):
    name = next(iter(options))
    with pytest.raises(RegistryError, match=rf"merge method '{method}': {name}.*finite number"):
        get_method(method).parse(options)
    if method == "task_arithmetic":
        with pytest.raises(RegistryError, match="finite number"):
            merge_adapters(random_adapters(2), method, **options)


# --- library writers follow io's output rules (§1) ---------------------------------------------------------


def test_adapter_save_never_replaces_an_unrelated_folder_or_its_input(tmp_path):
    adapter = random_adapter("a", seed=1)
    precious = _precious(tmp_path / "precious")
    with pytest.raises(OutputError, match="precious: exists and is no osrm-lora 'adapter' output"):
        adapter.save(precious)
    assert sorted(os.listdir(precious)) == ["thesis.tex"]
    adapter.save(tmp_path / "a")
    adapter.save(tmp_path / "a")  # its own earlier output: replaced
    assert recorded_kind(tmp_path / "a") == "adapter"
    with pytest.raises(OutputError, match="an input of this command"):
        adapter.save(tmp_path / "a", overwrite=True, inputs=[tmp_path / "a"])
    with pytest.raises(OutputError, match="'adapter' output, not 'merged-adapter'"):
        adapter.save(tmp_path / "a", kind="merged-adapter")
    adapter.save(precious, overwrite=True)
    assert LoraAdapter.load(precious).modules.keys() == adapter.modules.keys()


def test_saved_adapters_are_readable_by_the_group_and_others(tmp_path):
    old = os.umask(0o022)
    try:
        random_adapter("a", seed=1).save(tmp_path / "a")
    finally:
        os.umask(old)
    modes = {p.name: p.stat().st_mode & 0o777 for p in (tmp_path / "a").iterdir()}
    assert (tmp_path / "a").stat().st_mode & 0o777 == 0o755
    assert modes["adapter_model.safetensors"] == modes["adapter_config.json"] == 0o644


def test_statistics_never_replace_a_foreign_file_or_a_folder(tmp_path):
    stats = stats_from_inputs("a", {"layer.0.q": anisotropic_inputs(30, 6, seed=0)})
    weights = tmp_path / "model.safetensors"
    save_file({"w": torch.zeros(2)}, str(weights), metadata={"format": "pt"})
    with pytest.raises(OutputError, match="'pt' output, not 'osrm-lora/task-stats/1'.*--overwrite"):
        stats.save(weights)
    assert recorded_kind(weights) == "pt"
    stats.save(tmp_path / "a.safetensors")
    stats.save(tmp_path / "a.safetensors")
    with pytest.raises(OutputError, match="is a folder; a file output never replaces it"):
        stats.save(_precious(tmp_path / "stats"), overwrite=True)


def _hf_adapter(name: str, model: torch.nn.Module, seed: int) -> LoraAdapter:
    """Random factors on a BERT's query and value layers, named as in the plain model."""
    shapes = {n: tuple(m.weight.shape) for n, m in model.named_modules() if n.endswith(("query", "value"))}
    return random_adapter(name, seed, shapes=shapes)


def test_a_merged_model_never_replaces_an_input_nor_a_foreign_folder(tmp_path):
    model = tiny_bert(0)
    adapters = [_hf_adapter(n, model, i) for i, n in enumerate("ab")]
    for a in adapters:
        a.save(tmp_path / a.name)
    merged = merge_adapters(adapters, "average")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(OutputError, match=r"b: is .*b, an input of this command"):
        save_merged_model(model, merged, tmp_path / "b", overwrite=True, inputs=[tmp_path / "a", tmp_path / "b"])
    with pytest.raises(OutputError, match="precious: exists and is no osrm-lora 'merged-model' output"):
        save_merged_model(model, merged, _precious(tmp_path / "precious"))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # refused before applying
    save_merged_model(model, merged, tmp_path / "merged")
    save_merged_model(tiny_bert(0), merged, tmp_path / "merged")
    assert recorded_kind(tmp_path / "merged") == "merged-model"


def test_a_sharded_merge_never_writes_into_its_base_checkpoint(tmp_path):
    config = LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=24, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=16)
    base = tmp_path / "base"
    LlamaForCausalLM(config).save_pretrained(base)
    model = LlamaForCausalLM(config)
    shapes = {n: tuple(m.weight.shape) for n, m in model.named_modules() if n.endswith("q_proj")}
    adapters = [random_adapter(f"t{i}", i, shapes=shapes) for i in range(2)]
    with pytest.raises(OutputError, match=r"is inside .*base, an input of this command"):
        merge_checkpoint_sharded(base, adapters, "task_arithmetic", base / "merged")
    merge_checkpoint_sharded(base, adapters, "task_arithmetic", tmp_path / "merged")
    assert recorded_kind(tmp_path / "merged") == "merged-model"
    assert sorted(p.name for p in base.iterdir()) == ["config.json", "generation_config.json", "model.safetensors"]

