"""PEFT folders in and out: merged adapters of `finetune`'s own adapters load in PEFT, and adapters are read
through PEFT's loaders (local folders, Hub ids, safe `.bin`).

The adapters come from `finetune` on a tiny random BERT (task_type SEQ_CLS, head saved as modules_to_save),
trained once for the module. Every merge method is exported on every path (exact low rank, truncated
`rank=`, full rank), with no head, one task's head, or every head as side files; the logits of
`PeftModel.from_pretrained` must equal the project's own evaluation (`EvaluationModel.apply` with the
merge's updates and the task's head).
"""

from __future__ import annotations

import copy
import json
import os
import pickle

import pytest
import torch
from helpers_core import stats_from_inputs
from peft import LoraConfig, PeftModel
from pipeline_helpers import write_tasks, write_tiny_model
from safetensors.torch import load_file

from osrm_lora import adapters as adapters_module
from osrm_lora.adapters import LoraAdapter, _split_hub_id
from osrm_lora.errors import MergeError
from osrm_lora.evaluate import EvaluationModel
from osrm_lora.io import OsrmFileError
from osrm_lora.merge import list_methods, merge_adapters, save_adapter
from osrm_lora.runtime.models import load_model_and_tokenizer
from osrm_lora.runtime.weights import task_head
from osrm_lora.tasks.files import load_file_task
from osrm_lora.train import finetune

TASKS = ("sentiment", "topic")
HIDDEN = 32
PATHS = {"exact": None, "truncated": 2, "full": HIDDEN}  # export path -> rank=
OPTIONS = {"ties": {"density": 0.5}, "dare": {"drop_rate": 0.3, "seed": 1}, "knots": {"density": 0.5}}
TEXTS = ["w1 good w3", "cat w2 w5 w7 w0", "bad w4", "dog dog w9 w11 w2 w3"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Two adapters of `finetune` (r=2, a few steps), the base it starts from and the merge inputs."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("roundtrip")
    model_dir = str(write_tiny_model(root / "model"))
    paths = {}
    for seed, entry in enumerate(write_tasks(root / "data", n_train=32, n_dev=8)):
        files = {"train": root / entry["files"]["train"]}
        task = load_file_task(**{**entry, "files": files})
        paths[task.spec.name] = finetune(
            task, model_dir, root / task.spec.name, lora={"r": 2}, seed=seed,
            training={"max_steps": 3, "batch_size": 16, "lr": 0.05, "warmup_ratio": 0.0, "progress": False,
                      "eval_each_epoch": False},
        ).path
    loaded = [LoraAdapter.load(paths[t]) for t in TASKS]
    g = torch.Generator().manual_seed(0)
    base_hash = loaded[0].identity().config_hash  # synthetic statistics, recorded on the adapters' base model
    inputs = {"stats": [stats_from_inputs(t, {m: torch.randn(64, HIDDEN, generator=g) for m in loaded[0].modules},
                                          config_hash=base_hash) for t in TASKS],
              "fisher": [{m: torch.rand(HIDDEN, HIDDEN, generator=g) + 0.1 for m in loaded[0].modules}
                         for _ in TASKS]}
    torch.manual_seed(5)  # the base's (untrained) classifier, the same in every copy
    base, tokenizer = load_model_and_tokenizer(model_dir, task.spec)
    yield {"paths": paths, "adapters": loaded, "inputs": inputs, "base": base.eval(), "tokenizer": tokenizer}
    torch.set_num_threads(threads)


def _merged(trained, method: str):
    spec = next(m for m in list_methods() if m["name"] == method)
    inputs = {k: trained["inputs"][k] for k in spec["requires"]}
    return merge_adapters(trained["adapters"], method, **inputs, **OPTIONS.get(method, {}))


def _logits(model, trained) -> torch.Tensor:
    batch = trained["tokenizer"](TEXTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        return model.eval()(**batch).logits


def _reference(trained, deltas, head) -> torch.Tensor:
    evaluation = EvaluationModel(copy.deepcopy(trained["base"]), trained["tokenizer"], "tiny")
    return _logits(evaluation.apply(deltas, head), trained)


def test_finetune_saves_a_sequence_classification_adapter_with_its_head(trained):
    config = json.loads((trained["paths"]["topic"] / "adapter_config.json").read_text())
    assert config["task_type"] == "SEQ_CLS" and "classifier" in config["modules_to_save"]
    assert sorted(task_head(trained["adapters"][1])) == ["classifier.bias", "classifier.weight"]


@pytest.mark.parametrize("heads", [None, "topic", "all"])
@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("method", [m["name"] for m in list_methods()])
def test_merged_adapter_loads_in_peft_with_the_projects_logits(trained, tmp_path, method, path, heads):
    merged = _merged(trained, method)
    task = "topic" if merged.per_task else None
    out = tmp_path / "merged"
    if path == "exact" and any(m.factors is None or m.per_task for m in merged):
        with pytest.raises(MergeError, match="pass rank="):
            save_adapter(merged, out, PATHS[path], task=task, heads_from=heads)
        assert not out.exists()
        return
    export = save_adapter(merged, out, PATHS[path], task=task, heads_from=heads)
    config = json.loads((out / "adapter_config.json").read_text())
    if path == "truncated":
        assert not export.exact
        deltas = export.adapter.deltas()
    else:
        deltas = {m.name: m.for_task("topic") for m in merged}
    head = task_head(merged.adapters["topic"])

    loaded = PeftModel.from_pretrained(copy.deepcopy(trained["base"]), str(out))
    if heads == "topic":
        assert config["task_type"] == "SEQ_CLS" and "classifier" in config["modules_to_save"]
        torch.testing.assert_close(_logits(loaded, trained), _reference(trained, deltas, head), atol=1e-5, rtol=1e-5)
        return
    assert config["task_type"] is None and config["modules_to_save"] is None
    torch.testing.assert_close(_logits(loaded, trained), _reference(trained, deltas, {}), atol=1e-5, rtol=1e-5)
    if heads == "all":  # the README's recipe: one task's head from heads/<task>.safetensors
        assert sorted(p.name for p in (out / "heads").iterdir()) == [f"{t}.safetensors" for t in TASKS]
        for name in TASKS:
            result = loaded.get_base_model().load_state_dict(load_file(out / "heads" / f"{name}.safetensors"),
                                                             strict=False)
            assert not result.unexpected_keys
            expected = _reference(trained, deltas, task_head(merged.adapters[name]))
            torch.testing.assert_close(_logits(loaded, trained), expected, atol=1e-5, rtol=1e-5)
    else:
        assert not (out / "heads").exists()


def test_head_choices_are_checked(trained, tmp_path):
    merged = _merged(trained, "task_arithmetic")
    with pytest.raises(MergeError, match=r"heads_from='nope' is not one of the merged adapters"):
        save_adapter(merged, tmp_path / "a", heads_from="nope")
    headless = LoraAdapter(trained["adapters"][0].modules, trained["adapters"][0].config, name="plain")
    merged = merge_adapters([headless, trained["adapters"][1]], "task_arithmetic")
    with pytest.raises(MergeError, match=r"heads_from='plain': that adapter saved no head"):
        save_adapter(merged, tmp_path / "b", heads_from="plain")
    assert not any(tmp_path.iterdir())


def test_a_merged_adapter_with_a_head_reloads_as_an_adapter(trained, tmp_path):
    save_adapter(_merged(trained, "average"), tmp_path / "avg", heads_from="sentiment")
    again = LoraAdapter.load(tmp_path / "avg")
    assert again.name == "avg" and again.config["task_type"] == "SEQ_CLS"
    for key, value in task_head(trained["adapters"][0]).items():
        torch.testing.assert_close(task_head(again)[key], value)


def test_hub_ids_split_off_their_revision():
    assert _split_hub_id("user/repo") == ("user/repo", None)
    assert _split_hub_id("user/repo@v1.0") == ("user/repo", "v1.0")
    assert _split_hub_id("user/repo@refs/pr/3") == ("user/repo", "refs/pr/3")
    for bad in ("repo", "a/b/c", "user/repo@", "/no/such/folder", "user/re po"):
        with pytest.raises(OsrmFileError, match="no such adapter folder, and not a Hub id"):
            _split_hub_id(bad)


def test_hub_ids_go_through_peft_with_their_revision(trained, monkeypatch):
    """No network here: PEFT's two loading calls are redirected to a local folder, recording their arguments."""
    folder = str(trained["paths"]["topic"])
    calls = []
    read_config = LoraConfig.from_pretrained
    read_weights = adapters_module.load_peft_weights

    def fake_config(cls, repo, **kwargs):
        calls.append(("config", repo, kwargs))
        return read_config(folder)

    def fake_weights(repo, **kwargs):
        calls.append(("weights", repo, kwargs))
        return read_weights(folder, device="cpu")

    monkeypatch.setattr(LoraConfig, "from_pretrained", classmethod(fake_config))
    monkeypatch.setattr(adapters_module, "load_peft_weights", fake_weights)
    adapter = LoraAdapter.load("someone/topic-lora@abc123")
    assert calls == [("config", "someone/topic-lora", {"revision": "abc123"}),
                     ("weights", "someone/topic-lora", {"device": "cpu", "revision": "abc123"})]
    assert adapter.name == "topic-lora"
    for m, f in trained["adapters"][1].modules.items():
        torch.testing.assert_close(adapter.modules[m].delta(), f.delta())

    def unreachable(repo, **kwargs):
        raise OSError("no network")

    monkeypatch.setattr(adapters_module, "load_peft_weights", unreachable)
    with pytest.raises(OsrmFileError, match=r"someone/x: cannot load the adapter from the Hugging Face Hub \(no net"):
        LoraAdapter.load("someone/x")


def _copy_config(trained, folder) -> None:
    folder.mkdir()
    (folder / "adapter_config.json").write_text((trained["paths"]["topic"] / "adapter_config.json").read_text())


def test_bin_weights_load_with_weights_only_and_code_in_a_pickle_is_refused(trained, tmp_path):
    state = load_file(trained["paths"]["topic"] / "adapter_model.safetensors")
    _copy_config(trained, tmp_path / "bin")
    torch.save(state, tmp_path / "bin" / "adapter_model.bin")
    adapter = LoraAdapter.load(tmp_path / "bin")
    for m, f in trained["adapters"][1].modules.items():
        torch.testing.assert_close(adapter.modules[m].delta(), f.delta())

    class Payload:
        def __reduce__(self):
            return os.mkdir, (str(tmp_path / "pwned"),)

    _copy_config(trained, tmp_path / "evil")
    with open(tmp_path / "evil" / "adapter_model.bin", "wb") as f:
        pickle.dump({"x": Payload()}, f)
    with pytest.raises(OsrmFileError, match=r"evil/adapter_model\.bin: not a readable weights file"):
        LoraAdapter.load(tmp_path / "evil")
    assert not (tmp_path / "pwned").exists()


def test_missing_and_malformed_files_are_named(trained, tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(OsrmFileError, match=r"empty: not a PEFT adapter folder \(adapter_config.json missing\)"):
        LoraAdapter.load(tmp_path / "empty")
    _copy_config(trained, tmp_path / "noweights")
    with pytest.raises(OsrmFileError, match=r"noweights/adapter_model\.safetensors: file not found"):
        LoraAdapter.load(tmp_path / "noweights")
    for name, text, message in (("json", "{not json", "not valid JSON"),
                                ("type", '{"peft_type": "NOPE"}', "not a PEFT adapter config"),
                                ("ia3", '{"peft_type": "IA3", "target_modules": ["query"]}', "'IA3' is not LORA")):
        (tmp_path / name).mkdir()
        (tmp_path / name / "adapter_config.json").write_text(text)
        with pytest.raises(OsrmFileError, match=f"{name}/adapter_config.json: .*{message}") as info:
            LoraAdapter.load(tmp_path / name)
        assert "\n" not in str(info.value)
    _copy_config(trained, tmp_path / "cut")
    data = (trained["paths"]["topic"] / "adapter_model.safetensors").read_bytes()
    (tmp_path / "cut" / "adapter_model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(OsrmFileError, match=r"cut/adapter_model\.safetensors: not a readable weights file"):
        LoraAdapter.load(tmp_path / "cut")
