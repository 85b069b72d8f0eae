"""collect_stats against brute-force sums of explicitly captured activations; the TaskStats file format."""

from __future__ import annotations

from datetime import timedelta

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import save_file
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    BertModel,
    GPT2Config,
    GPT2Model,
    LlamaConfig,
    LlamaModel,
)

from osrm_lora.errors import StatsError
from osrm_lora.io import NonFiniteError, OsrmFileError
from osrm_lora.modules import find_target_modules
from osrm_lora.stats import StatsMismatchError, TaskStats, collect_stats, model_identity

VOCAB = 64
BERT_QKV = ["query", "key", "value"]


def tiny_bert(hidden: int = 16, seed: int = 0) -> BertModel:
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=VOCAB, hidden_size=hidden, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=24, max_position_embeddings=32,
        hidden_dropout_prob=0.3, attention_probs_dropout_prob=0.3,
    )
    return BertModel(config, add_pooling_layer=False)


def tiny_llama(seed: int = 0) -> LlamaModel:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=16, intermediate_size=24, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=32,
    )
    return LlamaModel(config)


def tiny_gpt2(seed: int = 0) -> GPT2Model:
    torch.manual_seed(seed)
    return GPT2Model(GPT2Config(vocab_size=VOCAB, n_embd=16, n_layer=2, n_head=2, n_positions=32))


MODELS = {
    "bert": (tiny_bert, BERT_QKV + ["attention.output.dense", "intermediate.dense", "output.dense"]),
    "llama": (tiny_llama, ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]),
    "gpt2": (tiny_gpt2, ["c_attn", "c_fc", "c_proj"]),  # Conv1D layers, input dim = weight.shape[0]
}


def make_batches(batch_size: int, pad_to: int | None = None, n: int = 7, seed: int = 0) -> list[dict]:
    """The same n right-padded token sequences of random lengths, split into batches of `batch_size`."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(2, 12, (n,), generator=g).tolist()
    texts = [torch.randint(1, VOCAB, (length,), generator=g) for length in lengths]
    batches = []
    for start in range(0, n, batch_size):
        chunk = texts[start : start + batch_size]
        width = pad_to or max(len(t) for t in chunk)
        ids = torch.zeros(len(chunk), width, dtype=torch.long)
        mask = torch.zeros(len(chunk), width, dtype=torch.long)
        for row, t in enumerate(chunk):
            ids[row, : len(t)], mask[row, : len(t)] = t, 1
        batches.append({"input_ids": ids, "attention_mask": mask})
    return batches


def brute_force(model, batches, targets, mask_padding=True):
    """Σ x xᵀ, Σ x and token count in float64 numpy from inputs captured by a plain hook, minus padding."""
    layers = find_target_modules(model, targets)
    captured: dict[str, list[torch.Tensor]] = {name: [] for name in layers}
    handles = [
        layer.register_forward_pre_hook(lambda mod, args, name=name: captured[name].append(args[0].clone()))
        for name, layer in layers.items()
    ]
    model.eval()
    with torch.no_grad():
        for batch in batches:
            model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    for handle in handles:
        handle.remove()
    keep = [b["attention_mask"].numpy().astype(bool) if mask_padding else np.ones(b["input_ids"].shape, bool)
            for b in batches]
    second, first = {}, {}
    for name, inputs in captured.items():
        rows = np.concatenate([x.double().numpy()[k] for x, k in zip(inputs, keep)])
        second[name], first[name] = rows.T @ rows, rows.sum(0)
    return second, first, int(sum(k.sum() for k in keep))


def assert_same_sums(stats: TaskStats, second, first, tokens, rtol):
    assert stats.tokens == tokens
    assert sorted(second) == stats.modules
    for m in stats.modules:
        scale = np.abs(second[m]).max()
        np.testing.assert_allclose(stats.second[m].double().numpy(), second[m], rtol=rtol, atol=rtol * scale)
        np.testing.assert_allclose(stats.first[m].double().numpy(), first[m], rtol=rtol, atol=rtol * scale)


@pytest.mark.parametrize("kind", sorted(MODELS))
def test_sums_equal_brute_force_over_non_padding_tokens(kind):
    build, targets = MODELS[kind]
    model, batches = build(), make_batches(batch_size=3)
    model.train()  # dropout is active unless collect_stats switches to eval mode
    second, first, tokens = brute_force(model, batches, targets)
    model.train()
    stats = collect_stats(model, batches, targets, task="t", dtype=torch.float64)
    assert model.training
    assert_same_sums(stats, second, first, tokens, rtol=1e-10)
    assert tokens < sum(b["input_ids"].numel() for b in batches)  # padding present and excluded
    single = collect_stats(model, batches, targets, task="t")  # default float32 accumulation
    assert single.second[stats.modules[0]].dtype == torch.float32
    assert_same_sums(single, second, first, tokens, rtol=1e-5)

    second, first, tokens = brute_force(model, batches, targets, mask_padding=False)
    unmasked = collect_stats(model, batches, targets, task="t", dtype=torch.float64, mask_padding=False)
    assert_same_sums(unmasked, second, first, tokens, rtol=1e-10)


@pytest.mark.parametrize("kind", sorted(MODELS))
def test_invariant_to_batch_size_and_padding_length(kind):
    build, targets = MODELS[kind]
    model = build().double()
    reference = collect_stats(model, make_batches(batch_size=7), targets, dtype=torch.float64)
    for batch_size, pad_to in [(1, None), (3, None), (2, 20), (7, 16)]:
        stats = collect_stats(model, make_batches(batch_size, pad_to), targets, dtype=torch.float64)
        assert stats.tokens == reference.tokens
        for m in reference.modules:
            torch.testing.assert_close(stats.second[m], reference.second[m], rtol=1e-10, atol=1e-10)
            torch.testing.assert_close(stats.first[m], reference.first[m], rtol=1e-10, atol=1e-10)


def test_modules_fed_one_tensor_share_one_sum():
    bert = collect_stats(tiny_bert(), make_batches(3), BERT_QKV)
    for layer in range(2):
        prefix = f"encoder.layer.{layer}.attention.self."
        q, k, v = (prefix + n for n in BERT_QKV)
        assert bert.second[q] is bert.second[k] is bert.second[v]
        assert bert.first[q] is bert.first[k] is bert.first[v]
    assert len({id(t) for t in bert.second.values()}) == 2
    alone = collect_stats(tiny_bert(), make_batches(3), ["key"])  # same numbers when collected unshared
    torch.testing.assert_close(alone.second["encoder.layer.1.attention.self.key"],
                               bert.second["encoder.layer.1.attention.self.query"], rtol=0, atol=0)

    llama = collect_stats(tiny_llama(), make_batches(3), MODELS["llama"][1])
    mlp = "layers.0.mlp."
    assert llama.second[mlp + "gate_proj"] is llama.second[mlp + "up_proj"]
    assert llama.second[mlp + "down_proj"] is not llama.second[mlp + "up_proj"]
    assert len({id(t) for t in llama.second.values()}) == 2 * 4  # qkv, o, gate/up, down per layer


def _shard_worker(rank: int, world_size: int, init_method: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=world_size,
                            timeout=timedelta(seconds=60))
    try:
        model, batches = tiny_bert().double(), make_batches(batch_size=2)
        half = collect_stats(model, batches[rank::world_size], BERT_QKV, task="t", dtype=torch.float64)
        q, k = "encoder.layer.0.attention.self.query", "encoder.layer.0.attention.self.key"
        assert half.second[q] is half.second[k]
        half.save(f"{out_dir}/half-{rank}.safetensors")
        lopsided = batches if rank == 0 else []  # a rank with an empty shard must still take part
        collect_stats(model, lopsided, BERT_QKV, task="t", dtype=torch.float64).save(
            f"{out_dir}/lopsided-{rank}.safetensors"
        )
    finally:
        dist.destroy_process_group()


def test_two_processes_with_half_the_batches_each_match_one_process(tmp_path):
    mp.spawn(_shard_worker, args=(2, f"file://{tmp_path / 'rendezvous'}", str(tmp_path)), nprocs=2, join=True)
    model = tiny_bert().double()
    everything = collect_stats(model, make_batches(batch_size=2), BERT_QKV, task="t", dtype=torch.float64)
    for name in ["half-0", "half-1", "lopsided-0", "lopsided-1"]:
        merged = TaskStats.load(tmp_path / f"{name}.safetensors")
        assert merged.tokens == everything.tokens
        assert merged.modules == everything.modules
        for m in everything.modules:
            torch.testing.assert_close(merged.second[m], everything.second[m], rtol=1e-12, atol=1e-12)
            torch.testing.assert_close(merged.first[m], everything.first[m], rtol=1e-12, atol=1e-12)


def test_save_load_round_trip_and_bad_files(tmp_path):
    stats = collect_stats(tiny_bert(), make_batches(3), BERT_QKV + ["intermediate.dense"], task="sst2",
                          dtype=torch.float64)
    path = tmp_path / "sst2.safetensors"
    stats.save(path)
    loaded = TaskStats.load(path)
    assert (loaded.task, loaded.model, loaded.config_hash, loaded.tokens, loaded.dtype) == (
        stats.task, stats.model, stats.config_hash, stats.tokens, torch.float64)
    assert loaded.modules == stats.modules
    for m in stats.modules:
        assert torch.equal(loaded.second[m], stats.second[m]) and torch.equal(loaded.first[m], stats.first[m])
    q, v = "encoder.layer.0.attention.self.query", "encoder.layer.0.attention.self.value"
    assert loaded.second[q] is loaded.second[v]

    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(OsrmFileError, match="truncated.safetensors"):
        TaskStats.load(truncated)
    foreign = tmp_path / "foreign.safetensors"
    save_file({"weight": torch.zeros(2, 2)}, str(foreign))
    with pytest.raises(OsrmFileError, match="foreign.safetensors"):
        TaskStats.load(foreign)


def test_check_matches_names_the_mismatched_field():
    model = tiny_bert()
    stats = collect_stats(model, make_batches(3), ["query"], task="sst2")
    dims = {m: 16 for m in stats.modules}
    stats.check_matches(model=model_identity(model), modules=dims)
    with pytest.raises(StatsMismatchError, match="config_hash"):
        stats.check_matches(model=model_identity(tiny_bert(hidden=32)))
    missing = r"no statistics for modules \['encoder\.layer\.0\.output\.dense'\]"
    with pytest.raises(StatsMismatchError, match=missing):
        stats.check_matches(modules={**dims, "encoder.layer.0.output.dense": 24})
    wrong_dim = r"encoder\.layer\.1\.attention\.self\.query: input dim 16 != expected 8"
    with pytest.raises(StatsMismatchError, match=wrong_dim):
        stats.check_matches(modules={**dims, "encoder.layer.1.attention.self.query": 8})


def test_nan_activation_names_module_and_task_and_removes_hooks():
    model = tiny_bert()
    with torch.no_grad():
        model.encoder.layer[0].attention.output.LayerNorm.weight[3] = float("nan")
    targets = ["query", "value", "intermediate.dense"]
    with pytest.raises(FloatingPointError, match=r"'sst2'.*encoder\.layer\.0\.intermediate\.dense"):
        collect_stats(model, make_batches(3), targets, task="sst2")
    assert all(not layer._forward_pre_hooks for layer in find_target_modules(model, targets).values())


def test_failing_forward_removes_hooks_and_restores_training_flags():
    model = tiny_bert()
    model.train()
    model.encoder.layer[0].eval()  # mixed flags must come back exactly as they were
    flags = {name: module.training for name, module in model.named_modules()}
    dropout_modes: list[bool] = []
    model.embeddings.dropout.register_forward_pre_hook(lambda mod, args: dropout_modes.append(mod.training))

    def boom(module, args):
        raise RuntimeError("boom")

    failing = model.encoder.layer[1].register_forward_pre_hook(boom)
    with pytest.raises(RuntimeError, match="boom"):
        collect_stats(model, make_batches(3), BERT_QKV)
    layers = find_target_modules(model, BERT_QKV)
    assert all(not layer._forward_pre_hooks for layer in layers.values())
    assert {name: module.training for name, module in model.named_modules()} == flags
    failing.remove()
    collect_stats(model, make_batches(3), BERT_QKV)
    assert dropout_modes == [False] * 4  # the failing batch and three more, all in eval mode
    assert {name: module.training for name, module in model.named_modules()} == flags


def test_peft_wrapped_model_gives_the_base_model_statistics():
    from peft import LoraConfig, get_peft_model

    base = collect_stats(tiny_bert(), make_batches(3), BERT_QKV, task="t")
    wrapped = get_peft_model(tiny_bert(), LoraConfig(r=2, target_modules=["query", "value"]))
    stats = collect_stats(wrapped, make_batches(3), BERT_QKV, task="t")
    assert (stats.model, stats.config_hash, stats.modules) == (base.model, base.config_hash, base.modules)
    q, k = "encoder.layer.0.attention.self.query", "encoder.layer.0.attention.self.key"
    assert stats.second[q] is stats.second[k]
    for m in base.modules:
        torch.testing.assert_close(stats.second[m], base.second[m], rtol=0, atol=0)


def test_labels_are_dropped_and_offload_and_progress_keep_the_sums():
    torch.manual_seed(0)
    model = BertForSequenceClassification(BertConfig(
        vocab_size=VOCAB, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=24,
        max_position_embeddings=32, num_labels=2,
    ))
    batches = make_batches(3)
    plain = collect_stats(model, batches, BERT_QKV)
    with_labels = [{**b, "labels": torch.full((len(b["input_ids"]),), 99)} for b in batches]  # out of range
    offloaded = collect_stats(model, with_labels, BERT_QKV, offload_to_cpu=True, progress=True)
    assert offloaded.tokens == plain.tokens
    for m in plain.modules:
        assert offloaded.second[m].device.type == "cpu"
        torch.testing.assert_close(offloaded.second[m], plain.second[m], rtol=0, atol=0)


def test_inputs_that_are_not_per_token_or_no_batches_are_refused():
    torch.manual_seed(0)
    config = BertConfig(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=24, max_position_embeddings=32)
    with_pooler = BertModel(config)
    with pytest.raises(ValueError, match=r"'cls'.*module pooler\.dense.*per-token"):
        collect_stats(with_pooler, make_batches(3), ["pooler.dense"], task="cls")
    with pytest.raises(ValueError, match="no batches"):
        collect_stats(tiny_bert(), [], BERT_QKV)


# --- sums that no inputs could give (issue 14 §2) ---------------------------------------------------------


def _saved(tmp_path, second: torch.Tensor, first: torch.Tensor | None = None, name: str = "bad"):
    """A statistics file whose q and v (one shared input) hold `second`; returns its path."""
    first = torch.zeros(second.shape[0]) if first is None else first
    stats = TaskStats("sst2", "toy", "toy-hash", {"layer.q": second, "layer.v": second},
                      {"layer.q": first, "layer.v": first}, tokens=10)
    path = tmp_path / f"{name}.safetensors"
    stats.save(path)
    return path


def _gram(n: int, d: int, seed: int = 0) -> torch.Tensor:
    x = torch.randn(n, d, generator=torch.Generator().manual_seed(seed))
    return x.T @ x


def test_a_negated_second_moment_is_refused_on_load_naming_file_and_modules(tmp_path):
    path = _saved(tmp_path, -_gram(40, 6))
    with pytest.raises(StatsError, match=r"bad\.safetensors, modules layer\.q, layer\.v: Σ x xᵀ is negative"):
        TaskStats.load(path)


def test_an_indefinite_sum_with_a_positive_diagonal_is_refused(tmp_path):
    gram = _gram(40, 6)
    eigenvalues, vectors = torch.linalg.eigh(gram.double())
    eigenvalues[0] = -0.5 * eigenvalues[-1]  # one strongly negative direction; the diagonal stays positive
    flipped = (vectors * eigenvalues) @ vectors.T
    assert bool((flipped.diagonal() > 0).all())
    with pytest.raises(StatsError, match=r"not positive semi-definite \(eigenvalue -"):
        TaskStats.load(_saved(tmp_path, flipped.float()))


def test_an_asymmetric_sum_is_refused(tmp_path):
    gram = _gram(40, 6)
    gram[0, 1] += 0.5 * gram.diagonal().max()
    with pytest.raises(StatsError, match="not symmetric"):
        TaskStats.load(_saved(tmp_path, gram))


def test_rank_deficient_float32_sums_pass_despite_rounding(tmp_path):
    gram = _gram(3, 64)  # 3 tokens, d = 64: 61 zero eigenvalues, computed as tiny ± values
    assert float(torch.linalg.eigvalsh(gram.double()).min()) < 1e-6 * float(gram.trace())
    loaded = TaskStats.load(_saved(tmp_path, gram, name="few"))
    assert torch.equal(loaded.second["layer.q"], gram)


@pytest.mark.parametrize("where", ["second", "first"])
def test_non_finite_statistics_are_refused_on_load_naming_the_modules(tmp_path, where):
    gram, first = _gram(40, 6), torch.ones(6)
    (gram if where == "second" else first)[2] = float("nan")
    with pytest.raises(NonFiniteError, match=r"bad\.safetensors, modules layer\.q, layer\.v: tensor Σ x"):
        TaskStats.load(_saved(tmp_path, gram, first))


def test_collected_sums_that_are_no_second_moment_are_refused(monkeypatch):
    import osrm_lora.stats as stats_module

    def subtract(second, first, inputs, rows):  # a broken accumulation: Σ of -x xᵀ
        x = inputs.reshape(-1, inputs.shape[-1]).to(second.dtype)
        x = x if rows is None else x.index_select(0, rows)
        second.sub_(x.T @ x)
        first.add_(x.sum(0))

    monkeypatch.setattr(stats_module, "_add_input_sums_", subtract)
    with pytest.raises(StatsError, match=r"statistics of task 'sst2', modules .*query.*: Σ x xᵀ is negative"):
        collect_stats(tiny_bert(), make_batches(3), ["query", "key"], task="sst2")
