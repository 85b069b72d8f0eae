"""The mergekit-style merge file (`osrm-lora merge --config`): how mergekit's methods and parameters map onto
the registered methods, strict errors naming the key, and the merge the CLI writes from a file checked
against the same merge from options and against the dense formulas."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from test_cli import _adapter, _error_line, invoke

from osrm_lora.adapters import LoraAdapter
from osrm_lora.merge import merge_adapters, save_adapter
from osrm_lora.settings import ConfigError, _parse_merge_file


def _file(method: str, *models: dict, **extra) -> dict:
    return {"merge_method": method, "models": list(models), **extra}


def _entry(model: str, **parameters) -> dict:
    return {"model": model, "parameters": parameters} if parameters else {"model": model}


@pytest.mark.parametrize(
    ("method", "parameters", "want_method", "want_params"),
    [
        ("linear", {}, "task_arithmetic", {"weights": [0.75, 0.25]}),  # Σ w_i θ_i / Σ w_i
        ("task_arithmetic", {"lambda": 0.5}, "task_arithmetic", {"weights": [3.0, 1.0], "scaling": 0.5}),
        ("task_arithmetic", {"normalize": True}, "task_arithmetic", {"weights": [0.75, 0.25]}),
        # the disjoint mean already divides by the agreeing adapters: weights / their mean
        ("ties", {"density": 0.3, "lambda": 0.8}, "ties", {"weights": [1.5, 0.5], "density": 0.3, "scaling": 0.8}),
        ("dare_ties", {"density": 0.4, "int8_mask": True}, "dare",
         {"weights": [1.5, 0.5], "drop_rate": 0.6, "combine": "ties"}),
        ("dare_linear", {"density": 0.4, "scaling": 2.0}, "dare",
         {"weights": [3.0, 1.0], "drop_rate": 0.6, "combine": "linear", "scaling": 2.0}),
        ("knots", {"density": 0.5}, "knots", {"weights": [3.0, 1.0], "density": 0.5}),  # our own names too
    ],
)
def test_mergekit_methods_and_parameters_map_onto_registered_methods(method, parameters, want_method,
                                                                     want_params):
    recipe = _parse_merge_file(_file(method, _entry("a", weight=3.0), _entry("b", weight=1.0),
                                    parameters=parameters))
    assert (recipe.method, recipe.written_method, recipe.adapters) == (want_method, method, ["a", "b"])
    assert recipe.params.keys() == want_params.keys()
    for key, value in want_params.items():
        assert recipe.params[key] == pytest.approx(value), key


def test_weights_default_globally_and_the_base_model_entry_is_skipped():
    data = _file("task_arithmetic", _entry("base"), _entry("a"), _entry("b", weight=2.0), base_model="base",
                 parameters={"weight": 0.5})
    recipe = _parse_merge_file(data)
    assert recipe.adapters == ["a", "b"] and recipe.params == {"weights": [0.5, 2.0]}
    assert recipe.base_model == "base"


@pytest.mark.parametrize(
    ("data", "key", "words"),
    [
        (_file("ties", _entry("a", density=0.5), _entry("b")), "models[0].parameters.density", "only globally"),
        (_file("regmean", _entry("a", weight=1.0), _entry("b")), "models[0].parameters.weight", "no per-adapter"),
        (_file("ties", _entry("a", epsilon=0.1), _entry("b")), "models[0].parameters.epsilon", "unknown"),
        (_file("slerp", _entry("a"), _entry("b")), "merge_method", "no LoRA counterpart"),
        (_file("tie", _entry("a"), _entry("b")), "merge_method", "did you mean ties"),
        (_file("ties", _entry("a"), _entry("b"), parameters={"densty": 0.2}), "parameters", "densty"),
        (_file("ties", _entry("a"), _entry("b"), parameters={"density": [0.1, 0.5]}), "parameters.density",
         "gradient"),
        (_file("emr", _entry("a"), _entry("b"), parameters={"lambda": 1.0}), "parameters.lambda", "no global λ"),
        (_file("ties", _entry("a"), _entry("b"), parameters={"lambda": 1.0, "scaling": 1.0}), "parameters.lambda",
         "once"),
        (_file("ties", _entry("a"), _entry("b"), parameters={"normalize": False}), "parameters.normalize",
         "agreeing"),
        (_file("linear", _entry("a"), _entry("b"), parameters={"normalize": False}), "parameters.normalize",
         "sum to 1"),
        (_file("dare_ties", _entry("a"), _entry("b"), parameters={"density": 0.0}), "parameters.density",
         "(0, 1]"),
        (_file("dare_linear", _entry("a"), _entry("b"), parameters={"combine": "ties"}), "parameters.combine",
         "combine='linear'"),
        (_file("task_arithmetic", _entry("a", weight=float("nan")), _entry("b")), "models[0].parameters.weight",
         "finite"),
        (_file("ties", _entry("a"), _entry("b"), parameters={"lambda": float("inf")}), "parameters.lambda",
         "finite"),
        (_file("ties", _entry("a"), _entry("b"), dtype="bfloat16"), "dtype", "remove it"),
        (_file("ties", {"model": "a", "paramters": {}}, _entry("b")), "models[0].paramters", "unknown key"),
        (_file("ties", _entry("base"), base_model="base"), "models", "no adapter besides the base model"),
        ({"merge_method": "ties"}, "models", "Field required"),
        (_file("regmean", {"model": "a", "stats": "a.safetensors"}, _entry("b")), "models[1].stats", "missing"),
    ],
)
def test_bad_merge_files_are_refused_naming_the_key(data, key, words):
    with pytest.raises(ConfigError) as caught:
        _parse_merge_file(data, "merge.yaml")
    message = str(caught.value)
    assert message.startswith(f"merge.yaml: {key}"), message
    assert words in message, message


def _write_adapters(folder) -> list[LoraAdapter]:
    adapters = [_adapter("a", 0), _adapter("b", 1)]
    for adapter in adapters:
        adapter.save(folder / "adapters" / adapter.name)
    return adapters


def test_merge_config_writes_the_merge_its_options_would(tmp_path):
    """dare_ties from a file (relative paths, per-adapter weights, λ) equals `--method dare` with the mapped
    hyper-parameters, module by module."""
    _write_adapters(tmp_path)
    (tmp_path / "merge.yaml").write_text(yaml.safe_dump(_file(
        "dare_ties", _entry("adapters/a", weight=0.6), _entry("adapters/b", weight=0.2), base_model="toy",
        parameters={"density": 0.5, "lambda": 0.8},
    )))
    result = invoke("merge", "--config", str(tmp_path / "merge.yaml"), "--rank", "5", "--out", str(tmp_path / "m"),
                    "--json", "--quiet")
    assert result.exit_code == 0, result.output
    info = json.loads(result.stdout)
    assert info["method"] == "dare" and info["tasks"] == ["a", "b"]
    expected = merge_adapters([tmp_path / "adapters" / n for n in "ab"], "dare", combine="ties", drop_rate=0.5,
                              weights=[1.5, 0.5], scaling=0.8)
    save_adapter(expected, tmp_path / "expected", rank=5)
    got, want = LoraAdapter.load(tmp_path / "m"), LoraAdapter.load(tmp_path / "expected")
    for module in want.modules:
        torch.testing.assert_close(got.modules[module].delta(), want.modules[module].delta(), rtol=0, atol=1e-6)


def test_mergekit_linear_is_the_weighted_average_of_the_models(tmp_path):
    """linear with weights 3 and 1: W0 + (3ΔW_a + ΔW_b)/4, an exact low-rank adapter."""
    a, b = _write_adapters(tmp_path)
    (tmp_path / "merge.yaml").write_text(yaml.safe_dump(_file(
        "linear", _entry("adapters/a", weight=3.0), _entry("adapters/b", weight=1.0))))
    result = invoke("merge", "--config", str(tmp_path / "merge.yaml"), "--out", str(tmp_path / "m"), "--quiet")
    assert result.exit_code == 0, result.output
    assert "(exact)" in result.stdout
    merged = LoraAdapter.load(tmp_path / "m")
    for m in a.modules:
        want = (3 * a.modules[m].delta() + b.modules[m].delta()) / 4
        torch.testing.assert_close(merged.modules[m].delta(), want, rtol=1e-5, atol=1e-6)


def test_the_base_model_is_checked_against_the_adapters(tmp_path):
    _write_adapters(tmp_path)
    path = tmp_path / "merge.yaml"
    path.write_text(yaml.safe_dump(_file("ties", _entry("adapters/a"), _entry("adapters/b"), base_model="llama")))
    line = _error_line(invoke("merge", "--config", str(path), "--out", str(tmp_path / "m")))
    assert f"{path}: base_model: 'llama', but adapter 'a' records base 'toy'" in line
    assert not (tmp_path / "m").exists()


def test_config_and_merge_options_are_not_mixed(tmp_path):
    _write_adapters(tmp_path)
    path = tmp_path / "merge.yaml"
    path.write_text(yaml.safe_dump(_file("ties", _entry("adapters/a"), _entry("adapters/b"))))
    line = _error_line(invoke("merge", "--config", str(path), "--method", "ties", "--lambda", "1",
                              "--out", str(tmp_path / "m")))
    assert "drop --method, --lambda" in line
    missing = tmp_path / "nope" / "merge.yaml"
    assert f"{missing}: merge file not found" in _error_line(invoke("merge", "--config", str(missing), "--out", "m"))
