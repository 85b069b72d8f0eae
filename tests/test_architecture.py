"""Layering: what runs before any model (settings, registries, report rebuilding) imports no torch.

Each check runs in a fresh interpreter, since this test process has long imported torch, and then reads
`sys.modules`.
"""

from __future__ import annotations

import ast
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


# --- Names: a public name is API or cross-module internal; a single-module helper is underscored ----------

SRC = REPO / "src" / "osrm_lora"
DEFINITIONS = (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)


def _module_name(path: Path) -> str:
    return ".".join(("osrm_lora", *path.relative_to(SRC).with_suffix("").parts)).removesuffix(".__init__")


def _strings(node: ast.AST) -> set[str]:
    return {n.value for n in ast.walk(node) if isinstance(n, ast.Constant) and isinstance(n.value, str)}


def _names(node: ast.AST) -> set[str]:
    return {n.id for n in ast.walk(node) if isinstance(n, ast.Name)} | _strings(node)


def _calls(tree: ast.AST, *names: str) -> list[ast.Call]:
    def called(call: ast.Call) -> str:
        return call.func.id if isinstance(call.func, ast.Name) else getattr(call.func, "attr", "")

    return [n for n in ast.walk(tree) if isinstance(n, ast.Call) and called(n).startswith(names)]


def _all_lists(tree: ast.Module) -> set[str]:
    return set().union(*(_strings(n.value) for n in tree.body if isinstance(n, ast.Assign)
                         and any(getattr(t, "id", "") == "__all__" for t in n.targets)))


def _taken_from_elsewhere(tree: ast.Module) -> set[str]:
    """Names a module reads from others: imports, attributes (`module.name`), `__all__` and `lazy_exports`."""
    taken = _all_lists(tree).union(*(_strings(call) for call in _calls(tree, "lazy_exports")))
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            taken |= {alias.name for alias in node.names}
        elif isinstance(node, ast.Attribute):
            taken.add(node.attr)
    return taken


def _registered(tree: ast.Module) -> set[str]:
    """What `register(...)` (inits, merge methods, merge inputs) and typer's `app.command(...)` receive, as a
    decorator or as arguments: their names are reached through the registry or the command line."""
    registered = set().union(*(_names(call) for call in _calls(tree, "register", "command")))
    return registered | {node.name for node in tree.body if isinstance(node, DEFINITIONS)
                         and any(_calls(decorator, "register", "command") for decorator in node.decorator_list)}


def _annotations(node: ast.AST) -> set[str]:
    found = set()
    for n in ast.walk(node):
        if isinstance(n, ast.AnnAssign):
            found |= _names(n.annotation)
        elif isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)):
            args = [*n.args.posonlyargs, *n.args.args, *n.args.kwonlyargs, n.args.vararg, n.args.kwarg]
            found |= set().union(*(_names(a.annotation) for a in args if a is not None and a.annotation))
            found |= _names(n.returns) if n.returns is not None else set()
    return found


def single_module_helpers(sources: dict[Path, str], api: set[tuple[str, str]]) -> list[str]:
    """Module-level functions and classes of src/osrm_lora with a public name that nothing outside their
    module needs. A name is needed outside its module when it is
    - in `osrm_lora.__all__` (`api`: the (module, name) each exported object comes from) or its module's
      own `__all__`;
    - read by another module of src/osrm_lora, bench/ or examples/ (the package's internal API);
    - registered (`register(...)`, `app.command(...)`): reached by its registry or CLI name;
    - a type callers handle: an experiment-file schema (settings.py), an exception or warning (caught or
      filtered by name), or a class named in the annotations of a name kept public (what it returns,
      takes or holds).
    Modules whose own name starts with "_" are private as a whole."""
    trees = {path: ast.parse(text) for path, text in sources.items()}
    taken = {path: _taken_from_elsewhere(tree) for path, tree in trees.items()}
    helpers = []
    for path, tree in trees.items():
        if path.is_relative_to(SRC) and (path.name == "__init__.py" or not path.stem.startswith("_")):
            module = _module_name(path)
            needed = set().union(_all_lists(tree), _registered(tree), *(t for p, t in taken.items() if p != path))
            public = {n.name: n for n in tree.body if isinstance(n, DEFINITIONS) and not n.name.startswith("_")}
            kept = {name for name, node in public.items() if name in needed or (module, name) in api
                    or path.name == "settings.py" and isinstance(node, ast.ClassDef)
                    or isinstance(node, ast.ClassDef)
                    and any(ast.unparse(b).endswith(("Error", "Warning")) for b in node.bases)}
            while grown := set(public) & set().union(*(_annotations(public[name]) for name in kept)) - kept:
                kept |= grown
            helpers += [f"{module}.{name}" for name in public if name not in kept]
    return helpers


def _sources() -> dict[Path, str]:
    paths = [*SRC.rglob("*.py"), *(REPO / "bench").rglob("*.py"), *(REPO / "examples").rglob("*.py")]
    return {path: path.read_text() for path in sorted(paths)}


def _api() -> set[tuple[str, str]]:
    import osrm_lora

    exported = [getattr(osrm_lora, name) for name in osrm_lora.__all__ if name != "__version__"]
    return {(obj.__module__, obj.__name__) for obj in exported}


def test_single_module_helpers_have_a_leading_underscore():
    """docs/architecture.md, 'The public API': a public name is the API or the package's cross-module
    internal API; a helper used only in its own module starts with "_"."""
    assert single_module_helpers(_sources(), _api()) == []


def test_the_helper_check_finds_a_new_public_helper():
    sources = _sources()
    path = SRC / "io.py"
    sources[path] += "\n\ndef unused_helper():\n    pass\n\n\nclass HelperResult:\n    pass\n"
    assert single_module_helpers(sources, _api()) == ["osrm_lora.io.unused_helper", "osrm_lora.io.HelperResult"]


# --- Long functions say why --------------------------------------------------------------------------------

MAX_FUNCTION_LINES = 60


def long_functions_without_reason(sources: dict[Path, str]) -> list[str]:
    """Functions and methods over `MAX_FUNCTION_LINES` lines (def to last line) whose docstring does not say
    "Long because". A typer command puts the reason after a "\\f" line, which --help does not show."""
    found = []
    for path, text in sources.items():
        for node in ast.walk(ast.parse(text)):
            if (isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
                    and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES
                    and "Long because" not in (ast.get_docstring(node) or "")):
                found.append(f"{path.relative_to(REPO)}:{node.lineno} {node.name}")
    return found


def test_long_functions_state_why_in_their_docstring():
    sources = {path: path.read_text() for path in sorted(SRC.rglob("*.py"))}
    assert long_functions_without_reason(sources) == []
    long_body = "".join(f"    x{i} = {i}\n" for i in range(MAX_FUNCTION_LINES))
    sources[SRC / "io.py"] += f"\n\ndef long_function():\n{long_body}"
    assert [found.split()[-1] for found in long_functions_without_reason(sources)] == ["long_function"]
