"""Issue 14 §2: NaN and ±inf are refused in every float option: at the command line (exit 2, nothing written),
in experiment and settings files (naming the key), and in the library (a λ sweep, a rescaled merge).

Non-finite tensors in adapters, statistics, subspaces and Fisher files are tested in test_reliability.py.
"""

from __future__ import annotations

import math
import re

import pytest
import yaml
from cli_helpers import refused, tiny_world, topic_args
from helpers_merge import random_adapter
from pipeline_helpers import experiment_dict

from osrm_lora.errors import RegistryError
from osrm_lora.inits import get_init, list_inits
from osrm_lora.merge import merge_adapters, merge_sweep
from osrm_lora.settings import ConfigError, load_experiment

NON_FINITE = ["nan", "inf", "-inf"]


def _adapter(name: str, seed: int):
    return random_adapter(name, seed, rank=2, base="toy")


@pytest.fixture
def pair(tmp_path):
    for i, t in enumerate("ab"):
        _adapter(t, i).save(tmp_path / t)
    return tmp_path


# ------------------------------------------------------------------------------------------ the command line


@pytest.mark.parametrize("value", NON_FINITE)
def test_merge_lambda_nan_or_inf_exits_2_and_writes_nothing(pair, value):
    line = refused("merge", pair / "a", pair / "b", "--method", "task_arithmetic", "--lambda", value,
                   "--out", pair / "m")
    assert "--lambda" in line and "is not a finite number" in line
    assert not (pair / "m").exists()


@pytest.mark.parametrize("param", ["density=.nan", "density=.inf", "scaling=-.inf", "weights=[1.0, .nan]"])
def test_merge_params_that_are_not_finite_exit_2_and_write_nothing(pair, param):
    line = refused("merge", pair / "a", pair / "b", "--method", "ties", "--param", param, "--rank", "2",
                   "--out", pair / "m")
    assert f"--param '{param}': not a finite number" in line
    assert not (pair / "m").exists()


def test_a_nan_in_lora_a_is_refused_on_merge_and_nothing_is_written(pair):
    nan = _adapter("c", 3)
    nan.modules["layer.0.q"].A[1, 2] = float("nan")
    nan.save(pair / "c")
    line = refused("merge", pair / "a", pair / "c", "--method", "task_arithmetic", "--out", pair / "m")
    assert str(pair / "c") in line and "layer.0.q.lora_A" in line and "non-finite" in line
    assert not (pair / "m").exists()


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return tiny_world(tmp_path_factory.mktemp("finite"))


def _train(world, *extra):
    return ("train", "--model", world / "model", *topic_args(world / "data"), "--max-steps", "1", "--out",
            world / "out", *extra)


@pytest.mark.parametrize(("option", "value"), [("--lr", "nan"), ("--lr", "inf"), ("--epochs", "nan")])
def test_train_float_options_must_be_finite(world, option, value):
    line = refused(*_train(world, option, value))
    assert option in line and "is not a finite number" in line
    assert not (world / "out").exists() and not (world / "out.partial").exists()


def test_train_settings_file_with_an_infinite_number_names_the_file_and_key(world, tmp_path):
    settings = tmp_path / "settings.yaml"
    settings.write_text("training:\n  lr: .inf\n")
    line = refused(*_train(world, "--settings", settings))
    assert str(settings) in line and "lr" in line and "finite number" in line


# ------------------------------------------------------------------------------------------ experiment files


def _experiment(tmp_path, edit) -> str:
    data = experiment_dict("/nonexistent/model", [{"name": "a"}, {"name": "b"}])
    edit(data)
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(data))  # NaN and inf as YAML writes them: .nan, .inf
    return path


@pytest.mark.parametrize(("edit", "key"), [
    (lambda d: d["merge"][0].update(lambdas=[math.nan, 1.0]), "merge[0].lambdas"),
    (lambda d: d["merge"][0].update(fixed_lambda=math.inf), "merge[0].fixed_lambda"),
    (lambda d: d["training"].update(lr=math.nan), "training.lr"),
    (lambda d: d["lora"].update(alpha=math.inf), "lora.alpha"),
])
def test_an_experiment_with_a_non_finite_number_is_refused_naming_the_key(tmp_path, edit, key):
    path = _experiment(tmp_path, edit)
    with pytest.raises(ConfigError, match=rf"{re.escape(key)}.*finite number"):
        load_experiment(path)
    line = refused("run", "--validate-only", path)
    assert key in line and "finite number" in line


def test_an_init_option_that_is_not_finite_is_refused():
    name, option = next((i["name"], o["name"]) for i in list_inits() for o in i["options"] if o["type"] == "float")
    with pytest.raises(RegistryError, match=rf"{option}.*finite number"):
        get_init(name).parse({option: math.nan})


# ------------------------------------------------------------------------------------------ the library


@pytest.mark.parametrize("lam", [math.nan, math.inf, -math.inf])
def test_a_lambda_sweep_and_a_rescaled_merge_refuse_non_finite_lambdas(lam):
    adapters = [_adapter("a", 1), _adapter("b", 2)]
    with pytest.raises(RegistryError, match="scaling.*finite number"):
        list(merge_sweep(adapters, "task_arithmetic", [1.0, lam]))
    merged = merge_adapters(adapters, "task_arithmetic").materialize()
    with pytest.raises(RegistryError, match="scaling.*finite number"):
        merged.rescaled(lam)
    assert merged.rescaled(0.5).params.scaling == 0.5
