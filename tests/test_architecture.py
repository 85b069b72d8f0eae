"""Layering: what runs before any model (settings, registries, report rebuilding) imports no torch.

Each check runs in a fresh interpreter, since this test process has long imported torch, and then reads
`sys.modules`.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

NO_TORCH = """
import sys
loaded = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "peft", "transformers"))
assert not loaded, f"imported {loaded[:5]}"
"""


def assert_torch_free(code: str, cwd: Path = REPO) -> None:
    """Run `code` in a new interpreter; it must succeed without importing torch, peft or transformers."""
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(code) + NO_TORCH], check=False,
                          capture_output=True, text=True, cwd=cwd)
    assert done.returncode == 0, done.stderr[-3000:]


IMPORTS = {
    "settings": "import osrm_lora.settings",
    "public-api": "import osrm_lora; assert dir(osrm_lora) == sorted(osrm_lora.__all__)",
    "inits": """
        from osrm_lora.inits import get_init, list_inits
        assert [i["name"] for i in list_inits()][:2] == ["kaiming", "gaussian"] and get_init("osrm").needs_stats
        assert get_init("osrm").parse({"scale": "kaiming"}).scale == "kaiming"
    """,
    "merge-methods": """
        from osrm_lora.merge.registry import get_method, list_methods
        assert len(list_methods()) >= 8 and get_method("ties").parse({"density": 0.3}).density == 0.3
    """,
}


@pytest.mark.parametrize("code", IMPORTS.values(), ids=IMPORTS.keys())
def test_import_without_torch(code):
    assert_torch_free(code)


def test_experiment_validation_without_torch():
    """The demo experiment, then with every init and merge entries with hyper-parameters and extra inputs."""
    assert_torch_free("""
        import yaml
        from osrm_lora.settings import load_experiment, parse_experiment
        config = load_experiment("examples/demo.yaml")
        assert config.merge[1].params == {"density": 0.2}
        data = yaml.safe_load(open("examples/demo.yaml"))
        data["merge"] += [{"method": "dare", "name": "dare-ties", "params": {"drop_rate": 0.5, "combine": "ties"}},
                          {"method": "regmean", "params": {"alpha": 0.5}}, {"method": "fisher"}, {"method": "emr"}]
        data["inits"] = ["kaiming", "gaussian", "osrm", "osrm-mean", "osrm-official", "random-orthonormal",
                         "task-orthogonal", "pissa", "olora", {"name": "osrm", "scale": "gaussian", "label": "osrm-g"}]
        config = parse_experiment(data, "demo+merges")
        assert [m.label for m in config.merge][2:] == ["dare-ties", "regmean", "fisher", "emr"]
        assert config.init_labels[-1] == "osrm-g" and config.inits[-1].options == {"scale": "gaussian"}
    """)


def test_report_rebuilds_without_torch(tmp_path):
    tasks, inits = ["a", "b"], ["kaiming", "osrm"]
    results = {
        "format": "osrm-lora/results/1", "experiment": "layering", "model": "tiny", "tasks": tasks,
        "inits": inits, "methods": ["ties"], "seeds": [0], "primary_metrics": dict.fromkeys(tasks, "accuracy"),
        "fixed_lambda": {"ties": 1.0},
        "individual": [{"init": i, "seed": 0, "task": t, "score": 0.9, "metrics": {}} for i in inits for t in tasks],
        "merged": [{"init": i, "method": "ties", "lambda": lam, "seed": 0, "task": t, "score": 0.7 + 0.1 * lam,
                    "metrics": {}} for i in inits for lam in (0.5, 1.0) for t in tasks],
        "interference": [{"init": i, "seed": 0, "tasks": tasks, "matrix": [[0.0, 0.1], [0.2, 0.0]]} for i in inits],
    }
    (tmp_path / "results.json").write_text(json.dumps(results))
    assert_torch_free("""
        import json
        from osrm_lora.report import RESULTS_FORMAT, write_report
        results = json.load(open("results.json"))
        assert results["format"] == RESULTS_FORMAT
        written = write_report(results, "report")
        assert written and all(path.exists() for path in written.values())
    """, cwd=tmp_path)


def test_cli_help_and_validation_without_torch():
    """The app's help, every command's help, `run --validate-only` and the registry listings, in process."""
    assert_torch_free("""
        from typer.testing import CliRunner
        from osrm_lora.cli import app
        commands = ["run", "demo", "report", "stats", "init", "train", "merge", "eval", "interference", "data",
                    "data list", "data fetch"]
        calls = [["--help"], *([*c.split(), "--help"] for c in commands), ["train", "--list-inits"],
                 ["merge", "--list"], ["run", "--validate-only", "examples/demo.yaml"]]
        for args in calls:
            result = CliRunner().invoke(app, args)
            assert result.exit_code == 0, (args, result.output)
        assert result.stdout.strip() == "examples/demo.yaml: OK"
    """)


def test_public_api_names_resolve_to_their_home_modules():
    """Every exported name is the object its module defines (no copies), and no private name is exported."""
    import importlib

    import osrm_lora

    homes = {"finetune": "train", "merge_adapters": "merge.engine", "save_adapter": "merge.export",
             "collect_stats": "stats", "compute_subspaces": "subspace", "osrm_init": "inits.osrm_tensors",
             "interference_matrix": "interference", "run_experiment": "pipeline.runner",
             "get_init": "inits.registry", "get_method": "merge.registry"}
    for name, module in homes.items():
        assert getattr(osrm_lora, name) is getattr(importlib.import_module(f"osrm_lora.{module}"), name), name
    assert all(not name.startswith("_") or name == "__version__" for name in osrm_lora.__all__)
    for name in osrm_lora.__all__:
        assert getattr(osrm_lora, name) is not None
    with pytest.raises(AttributeError):
        osrm_lora.not_a_public_name  # noqa: B018


def test_registries_import_every_public_module_of_their_package(tmp_path, monkeypatch):
    """A new init or merge method is one new module: `import_entries` finds it without any list to edit."""
    from osrm_lora._registry import import_entries

    package = tmp_path / "plugins_pkg"
    package.mkdir()
    (package / "__init__.py").write_text("LOADED = []\n")
    for name in ("alpha", "beta", "_private"):
        (package / f"{name}.py").write_text(f"from . import LOADED\nLOADED.append({name!r})\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    import_entries("plugins_pkg")
    import plugins_pkg

    assert sorted(plugins_pkg.LOADED) == ["alpha", "beta"]
