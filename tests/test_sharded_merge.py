"""Merged full models written shard by shard from the base checkpoint's files, checked against the in-memory
merge (`apply_to_model` / `save_merged_model`) and an independent numpy sum, with the peak memory measured."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers_merge import dense_deltas, random_adapter, tiny_bert, trained_like_peft_bert
from huggingface_hub import split_torch_state_dict_into_shards
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    AutoModelForSequenceClassification,
    AutoTokenizer,
    BertConfig,
    BertModel,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)

from osrm_lora.errors import MergeError
from osrm_lora.io import OsrmFileError
from osrm_lora.merge import apply_to_model, merge_adapters, merge_checkpoint_sharded, save_merged_model
from osrm_lora.merge.sharded import _plan_shards, _read_header

PEAK_SCRIPT = Path(__file__).parent / "dist_scripts" / "sharded_peak.py"


def _tiny_tokenizer() -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.WordLevel({"<unk>": 0, "</s>": 1, "hello": 2}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="</s>")


def _llama(seed: int = 0, **sizes) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = {"vocab_size": 256, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 3,
              "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 32,
              "tie_word_embeddings": False}
    return LlamaForCausalLM(LlamaConfig(**{**config, **sizes})).eval()


def _llama_adapters(model: LlamaForCausalLM, count: int = 2, rank: int = 3) -> list:
    """Random LoRA factors on every q_proj and v_proj, named as in the plain model."""
    shapes = {name: tuple(module.weight.shape) for name, module in model.named_modules()
              if name.endswith(("q_proj", "v_proj"))}
    return [random_adapter(f"task{i}", seed=20 + i, rank=rank + i, shapes=shapes) for i in range(count)]


def _shard_bytes(folder: Path) -> dict[str, int]:
    """Tensor bytes per weight file, from the headers."""
    return {p.name: sum(e.nbytes for e in _read_header(p)) for p in sorted(folder.glob("*.safetensors"))}


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("llama-base")
    _llama().save_pretrained(path, max_shard_size="200KB")
    _tiny_tokenizer().save_pretrained(path)
    assert (path / "model.safetensors.index.json").is_file() and len(_shard_bytes(path)) >= 3
    return path


@pytest.mark.parametrize(("method", "hyper", "task"), [
    ("task_arithmetic", {"scaling": 0.8}, None), ("ties", {"density": 0.4}, None), ("emr", {}, "task1")])
def test_sharded_llama_merge_equals_the_in_memory_merge(llama_dir, tmp_path, method, hyper, task):
    adapters = _llama_adapters(_llama())
    result = merge_checkpoint_sharded(llama_dir, adapters, method, tmp_path / "merged", max_shard_size="150KB",
                                      task=task, **hyper)

    reference = LlamaForCausalLM.from_pretrained(llama_dir)
    apply_to_model(reference, merge_adapters(adapters, method, **hyper), task)
    merged = LlamaForCausalLM.from_pretrained(tmp_path / "merged")
    expected, got = reference.state_dict(), merged.state_dict()
    assert expected.keys() == got.keys()
    for key in expected:
        assert torch.equal(got[key], expected[key]), key

    out = tmp_path / "merged"
    index = json.loads((out / "model.safetensors.index.json").read_text())
    base_index = json.loads((llama_dir / "model.safetensors.index.json").read_text())
    assert index["weight_map"].keys() == base_index["weight_map"].keys()
    shards = _shard_bytes(out)
    assert set(index["weight_map"].values()) == set(shards) == set(result.files) and len(shards) > 3
    assert index["metadata"]["total_size"] == sum(shards.values()) == result.total_size
    assert max(shards.values()) <= 150_000
    assert sorted(result.modules) == sorted(adapters[0].modules)
    assert AutoTokenizer.from_pretrained(out)("hello")["input_ids"] == [2]
    assert json.loads((out / "merge_info.json").read_text())["method"] == method
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged"]  # no temporary folder left


def test_an_existing_materialized_merge_is_written_as_is(llama_dir, tmp_path):
    """A `Merged` computed beforehand (here materialized, per-task EMR) instead of adapters and a method."""
    adapters = _llama_adapters(_llama())
    merged = merge_adapters(adapters, "emr").materialize()
    with pytest.raises(ValueError, match="not with an existing Merged"):
        merge_checkpoint_sharded(llama_dir, merged, "emr", tmp_path / "out", task="task0")
    merge_checkpoint_sharded(llama_dir, merged, None, tmp_path / "out", task="task0")
    reference = LlamaForCausalLM.from_pretrained(llama_dir)
    apply_to_model(reference, merge_adapters(adapters, "emr"), "task0")
    got = LlamaForCausalLM.from_pretrained(tmp_path / "out").state_dict()
    for key, value in reference.state_dict().items():
        assert torch.equal(got[key], value), key


def test_untouched_tensors_are_copied_bit_for_bit(llama_dir, tmp_path):
    adapters = _llama_adapters(_llama())
    result = merge_checkpoint_sharded(llama_dir, adapters, "task_arithmetic", tmp_path / "m", max_shard_size="1MB")
    assert result.files == ["model.safetensors"]  # everything fits one shard: no index, as in save_pretrained
    assert not (tmp_path / "m" / "model.safetensors.index.json").exists()
    base_index = json.loads((llama_dir / "model.safetensors.index.json").read_text())["weight_map"]
    targeted = set(result.modules.values())
    with safe_open(str(tmp_path / "m" / "model.safetensors"), framework="pt") as merged:
        for key, file in base_index.items():
            with safe_open(str(llama_dir / file), framework="pt") as base:
                same = torch.equal(merged.get_tensor(key), base.get_tensor(key))
            assert same == (key not in targeted), key


def test_prefix_differences_and_a_single_file_checkpoint(tmp_path):
    """Adapters named on BertForSequenceClassification (`bert.encoder...`) merge into a BertModel checkpoint
    (`encoder...`) saved as one file without an index; checked against a float64 numpy sum."""
    torch.manual_seed(1)
    base = BertModel(BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                intermediate_size=40, max_position_embeddings=16)).eval()
    base.save_pretrained(tmp_path / "base")
    assert (tmp_path / "base" / "model.safetensors").is_file()
    shapes = {f"bert.encoder.layer.{i}.attention.self.{p}": (32, 32) for i in range(2) for p in ("query", "value")}
    adapters = [random_adapter(f"t{i}", seed=i, rank=2 + i, shapes=shapes) for i in range(3)]

    merge_checkpoint_sharded(tmp_path / "base", adapters, "task_arithmetic", tmp_path / "out", max_shard_size="20KB",
                             scaling=0.7)
    merged = BertModel.from_pretrained(tmp_path / "out")
    got, before = merged.state_dict(), base.state_dict()
    for module in shapes:
        key = module.removeprefix("bert.") + ".weight"
        expected = before[key].double().numpy() + 0.7 * sum(dense_deltas(adapters, module))
        np.testing.assert_allclose(got[key].double().numpy(), expected, rtol=1e-6, atol=1e-6)
    untouched = [k for k in before if not any(k == m.removeprefix("bert.") + ".weight" for m in shapes)]
    assert all(torch.equal(got[k], before[k]) for k in untouched)


def test_gpt2_conv1d_weights_stored_in_by_out(tmp_path):
    """c_attn (in×out, 32×96) and the square c_proj: the fan_in_fan_out flag decides the orientation."""
    torch.manual_seed(2)
    GPT2LMHeadModel(GPT2Config(vocab_size=60, n_embd=32, n_layer=2, n_head=2, n_positions=16)).save_pretrained(
        tmp_path / "base", max_shard_size="30KB")
    shapes = {**{f"transformer.h.{i}.attn.c_attn": (96, 32) for i in range(2)},
              **{f"transformer.h.{i}.attn.c_proj": (32, 32) for i in range(2)}}
    adapters = [random_adapter(f"t{i}", seed=5 + i, shapes=shapes) for i in range(2)]
    for a in adapters:
        a.config["fan_in_fan_out"] = True
    merge_checkpoint_sharded(tmp_path / "base", adapters, "ties", tmp_path / "out", density=0.5)

    reference = GPT2LMHeadModel.from_pretrained(tmp_path / "base")
    apply_to_model(reference, merge_adapters(adapters, "ties", density=0.5))
    got = GPT2LMHeadModel.from_pretrained(tmp_path / "out").state_dict()
    for key, value in reference.state_dict().items():
        assert torch.equal(got[key], value), key

    for a in adapters:
        a.config["fan_in_fan_out"] = False
    with pytest.raises(ValueError, match=r"module transformer\.h\.0\.attn\.c_attn: .*\(32, 96\)"):
        merge_checkpoint_sharded(tmp_path / "base", adapters, "ties", tmp_path / "wrong", density=0.5)
    assert not (tmp_path / "wrong").exists()


def test_heads_and_names_match_save_merged_model(tmp_path):
    """A classification checkpoint with a task head: same result as the in-memory save_merged_model."""
    paths = []
    for name, seed, rank in (("sst", 1, 4), ("rte", 2, 2)):
        trained_like_peft_bert(seed, rank=rank).save_pretrained(tmp_path / name)
        paths.append(tmp_path / name)
    tiny_bert(0).save_pretrained(tmp_path / "base", max_shard_size="40KB")
    result = merge_checkpoint_sharded(tmp_path / "base", paths, "average", tmp_path / "out", heads_from="sst",
                                      max_shard_size="40KB")
    save_merged_model(tiny_bert(0), merge_adapters(paths, "average"), tmp_path / "ref", heads_from="sst")
    got = AutoModelForSequenceClassification.from_pretrained(tmp_path / "out").state_dict()
    expected = AutoModelForSequenceClassification.from_pretrained(tmp_path / "ref").state_dict()
    for key, value in expected.items():
        assert torch.equal(got[key], value), key
    assert sorted(result.heads.values()) == ["classifier.bias", "classifier.weight"]
    assert not torch.equal(got["classifier.weight"], tiny_bert(0).state_dict()["classifier.weight"])


def test_missing_module_is_named_and_nothing_is_written(llama_dir, tmp_path):
    adapters = _llama_adapters(_llama())
    for a in adapters:
        a.modules["model.layers.7.self_attn.q_proj"] = a.modules["model.layers.0.self_attn.q_proj"]
    with pytest.raises(ValueError, match=r"module model\.layers\.7\.self_attn\.q_proj: no tensor"):
        merge_checkpoint_sharded(llama_dir, adapters, "task_arithmetic", tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_per_task_merge_needs_its_task(llama_dir, tmp_path):
    with pytest.raises(ValueError, match=r"'emr' keeps per-task updates: pass task= one of \['task0', 'task1'\]"):
        merge_checkpoint_sharded(llama_dir, _llama_adapters(_llama()), "emr", tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_non_safetensors_checkpoint_is_refused(tmp_path):
    (tmp_path / "base").mkdir()
    (tmp_path / "base" / "pytorch_model.bin").write_bytes(b"not read")
    with pytest.raises(OsrmFileError, match=r"only safetensors.*pytorch_model\.bin"):
        merge_checkpoint_sharded(tmp_path / "base", [random_adapter("a", 0)], "task_arithmetic", tmp_path / "out")


def test_headers_and_shard_plans_agree_with_the_files(tmp_path):
    """_read_header against the raw JSON header (offsets give the storage order) and the loaded tensors, for
    several dtypes and a 0-d tensor; _plan_shards (meta tensors) against huggingface_hub on the real ones."""
    g = torch.Generator().manual_seed(0)
    tensors = {"w": torch.randn(40, 30, generator=g), "half": torch.randn(7, 9, generator=g).bfloat16(),
               "fp8": torch.randn(16, 16, generator=g).to(torch.float8_e4m3fn), "ids": torch.arange(50),
               "mask": torch.ones(5, 3, dtype=torch.bool), "scale": torch.tensor(2.5, dtype=torch.float64)}
    path = tmp_path / "mixed.safetensors"
    save_file(tensors, str(path))
    raw = path.read_bytes()
    (size,) = struct.unpack("<Q", raw[:8])
    header = {k: v for k, v in json.loads(raw[8:8 + size]).items() if k != "__metadata__"}
    entries = _read_header(path)
    assert [e.name for e in entries] == sorted(header, key=lambda k: header[k]["data_offsets"][0])
    for e in entries:
        start, end = header[e.name]["data_offsets"]
        assert (e.file, e.shape, e.nbytes) == (path.name, tuple(header[e.name]["shape"]), end - start)
        assert e.dtype == tensors[e.name].dtype and e.nbytes == tensors[e.name].nbytes

    ordered = {e.name: load_file(str(path))[e.name] for e in entries}
    for limit in (1000, "3KB", 10**6):
        plan = _plan_shards(entries, limit)
        expected = split_torch_state_dict_into_shards(ordered, max_shard_size=limit)
        assert plan.filename_to_tensors == expected.filename_to_tensors
        assert plan.metadata == expected.metadata
    with pytest.raises(MergeError, match=r"max_shard_size='2GiB'"):
        _plan_shards(entries, "2GiB")
    with pytest.raises(MergeError, match="max_shard_size must be positive"):
        _plan_shards(entries, 0)
    (tmp_path / "cut.safetensors").write_bytes(raw[:size])
    with pytest.raises(OsrmFileError, match=r"cut\.safetensors: not a readable safetensors file"):
        _read_header(tmp_path / "cut.safetensors")


def test_peak_memory_stays_near_one_shard(tmp_path):
    """A ~130 MB checkpoint in 12 MB shards: the merging process's resident peak grows by about one input
    shard + one output shard + one module's updates, far below the whole checkpoint."""
    model = _llama(vocab_size=2048, hidden_size=512, intermediate_size=1024, num_hidden_layers=12,
                   num_attention_heads=8, num_key_value_heads=8)
    model.save_pretrained(tmp_path / "base", max_shard_size="12MB")
    adapter_dirs = []
    for adapter in _llama_adapters(model, count=2, rank=4):
        adapter.save(tmp_path / adapter.name)
        adapter_dirs.append(str(tmp_path / adapter.name))
    del model
    total = sum(_shard_bytes(tmp_path / "base").values())
    largest_input = max(_shard_bytes(tmp_path / "base").values())

    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "",
           "MALLOC_MMAP_THRESHOLD_": "65536"}  # large blocks are returned to the OS when freed
    done = subprocess.run([sys.executable, str(PEAK_SCRIPT), str(tmp_path / "base"), str(tmp_path / "out"), "12MB",
                           *adapter_dirs], capture_output=True, text=True, timeout=180, env=env, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    growth = report["hwm_after"] - report["rss_before"]

    largest_output = max(_shard_bytes(tmp_path / "out").values())
    module_updates = 2 * 4 * 512 * 512 * 4  # ties holds a few dense 512×512 float32 matrices per task
    bound = largest_input + largest_output + module_updates + 24 * 2**20
    assert total > 120 * 2**20
    assert growth < bound, (growth, bound)
    assert growth < total / 2, (growth, total)
