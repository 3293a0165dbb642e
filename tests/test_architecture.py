"""The shape of the library, checked from its source: one-way imports, no private names across modules,
light modules that stay light, and CLI defaults that are the library's."""

from __future__ import annotations

import ast
import inspect
import subprocess
import sys
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "featkit"


def _name(p: Path) -> str:
    """``featkit/cache/lock.py`` -> ``featkit.cache.lock``; a package's ``__init__.py`` is the package."""
    parts = p.relative_to(PKG.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, ast.Module]:
    """Every module of the package, subpackages included (not the top-level ``featkit/__init__.py``)."""
    return {_name(p): ast.parse(p.read_text(), str(p)) for p in sorted(PKG.rglob("*.py")) if p != PKG / "__init__.py"}


def _is_module(name: str) -> bool:
    path = PKG.parent.joinpath(*name.split("."))
    return path.with_suffix(".py").exists() or (path / "__init__.py").exists()


def _imports(tree: ast.Module) -> list[tuple[str, list[str]]]:
    """``(module, names)`` for every ``import featkit.x`` / ``from featkit.x import a, b`` anywhere in the file."""
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("featkit"):
            if node.module == "featkit" or _is_module(node.module) and any(_is_module(f"{node.module}.{a.name}") for a in node.names):
                for a in node.names:  # from featkit import api, __version__; from featkit.cache import lock
                    sub = f"{node.module}.{a.name}"
                    out.append((sub, []) if _is_module(sub) else (node.module, [a.name]))
            else:
                out.append((node.module, [a.name for a in node.names]))
        elif isinstance(node, ast.Import):
            out += [(a.name, []) for a in node.names if a.name.startswith("featkit.")]
    return out


def _graph() -> dict[str, set[str]]:
    mods = _modules()
    return {m: {dep for dep, _ in _imports(t) if dep in mods and dep != m} for m, t in mods.items()}


def test_no_import_cycle_in_featkit():
    graph = _graph()
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m):
        state[m] = 1
        stack.append(m)
        for d in sorted(graph[m]):
            if state.get(d) == 1:
                cycle = stack[stack.index(d):] + [d]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if d not in state:
                visit(d)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)


def test_no_private_name_is_imported_across_modules():
    bad = [f"{m} imports {n} from {dep}" for m, t in _modules().items() for dep, names in _imports(t) for n in names if n.startswith("_") and n != "__version__"]
    assert not bad, bad


def test_only_main_imports_the_cli():
    users = sorted(m for m, deps in _graph().items() if "featkit.cli" in deps)
    assert users == ["featkit.__main__"]


@pytest.mark.parametrize(
    "module,forbidden",
    [
        ("featkit", ("torch", "sklearn", "h5py")),
        ("featkit.cli", ("torch", "sklearn", "h5py")),
        ("featkit.options", ("torch", "sklearn", "h5py", "numpy")),
        ("featkit.blocks", ("torch", "h5py", "sklearn")),
        ("featkit.metrics", ("torch", "torchvision", "h5py", "flickrapi")),
        ("featkit.heads", ("torchvision", "h5py", "flickrapi")),
        ("featkit.report", ("torch", "torchvision", "h5py", "flickrapi", "matplotlib", "jinja2")),
        ("featkit.figures", ("torch", "torchvision", "h5py", "sklearn", "matplotlib")),
        ("featkit.leaks", ("torch", "torchvision", "h5py", "sklearn")),
        ("featkit.collect", ("torch", "torchvision", "h5py", "sklearn")),
        ("featkit.backbone_spec", ("torch", "torchvision", "timm", "h5py", "sklearn")),
    ],
)
def test_light_modules_stay_light(module, forbidden):
    code = f"import sys, {module}; print(' '.join(m for m in {forbidden!r} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "", f"importing {module} imported {out.stdout.strip()}"


MAX_MODULE_LINES = 500  # past this a module usually holds several concepts: give it a package (STYLE.md)


def test_no_module_is_over_500_lines():
    sizes = {_name(p): len(p.read_text().splitlines()) for p in sorted(PKG.rglob("*.py"))}
    over = {m: n for m, n in sizes.items() if n > MAX_MODULE_LINES}
    assert not over, f"modules over {MAX_MODULE_LINES} lines: {over}"


def _cli_defaults(command) -> dict[str, object]:
    return {name: p.default.default for name, p in inspect.signature(command).parameters.items() if hasattr(p.default, "default")}


def test_cli_defaults_are_the_librarys():
    from featkit import cli
    from featkit.backbones import load_backbone
    from featkit.heads import MLPHead
    from featkit.options import BackboneOptions, ExtractOptions, defaults

    ext = _cli_defaults(cli.extract.__wrapped__)
    for name, value in {**defaults(ExtractOptions), **defaults(BackboneOptions)}.items():
        assert ext[name] == value, name
    sig = inspect.signature(load_backbone).parameters
    assert sig["pooling"].default == ext["pooling"] and sig["image_size"].default == ext["image_size"]
    assert sig["seed"].default == ext["weights_seed"]  # load_backbone's seed is the random weights'
    fit = _cli_defaults(cli.fit.__wrapped__)
    head = MLPHead().get_params()
    for name in ("max_iter", "n_iter_no_change", "dropout", "alpha", "learning_rate_init", "batch_size"):
        assert fit[name] == head[name], name
    assert (fit["hidden_layer_sizes"],) == tuple(head["hidden_layer_sizes"])


def test_cli_option_names_mirror_python_names():
    from featkit import cli

    for command in (cli.download, cli.extract, cli.split, cli.fit, cli.compare, cli.predict, cli.demo):
        for name, p in inspect.signature(command.__wrapped__).parameters.items():
            decls = getattr(p.default, "param_decls", None)
            if decls and any(d.startswith("--") for d in decls):
                first = [d for d in decls if d.startswith("--")][0].split("/")[0]
                assert first == "--" + name.replace("_", "-"), (command.__name__, name, decls)


# What featkit's code uses, and the first release that has it. A floor in pyproject.toml below
# one of these would let pip install a version that cannot run featkit.
NEEDS = {
    "python": ("3.11", "tomllib (cities and credentials files)"),
    "numpy": ("2.0", "np.bitwise_count (near-duplicate search)"),
    "torch": ("2.4", "torch.optim.Adam(fused=True) on CPU (the MLP head)"),
    "torchvision": ("0.19", "the release paired with torch 2.4"),
    "scikit-learn": ("1.6", "sklearn.frozen.FrozenEstimator, sklearn.utils.validation.validate_data"),
}


def _floors() -> dict[str, str]:
    import re
    import tomllib

    project = tomllib.loads((PKG.parent / "pyproject.toml").read_text())["project"]
    floors = {"python": project["requires-python"].removeprefix(">=")}
    for dep in project["dependencies"]:
        m = re.match(r"([A-Za-z0-9_.-]+)\s*>=\s*([0-9.]+)", dep)
        if m:
            floors[m.group(1).lower()] = m.group(2)
    return floors


def test_declared_floors_are_what_the_code_needs():
    def v(s):
        return tuple(int(x) for x in s.split("."))

    floors = _floors()
    for name, (need, why) in NEEDS.items():
        assert name in floors, f"{name} has no floor in pyproject.toml"
        assert v(floors[name]) >= v(need), f"{name}>={floors[name]} is declared, but featkit uses {why} (needs {need})"


def test_every_imported_third_party_package_is_declared():
    """A module featkit imports must be a declared dependency (not something another package happens to bring)."""
    import sys as _sys

    declared = set(_floors())
    dist_of = {"PIL": "pillow", "sklearn": "scikit-learn", "yaml": "pyyaml"}
    stdlib = set(_sys.stdlib_module_names)
    used = set()
    for m, tree in _modules().items():
        for node in ast.walk(tree):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module] if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module else []
            for n in names:
                top = n.split(".")[0]
                if top not in stdlib and top != "featkit":
                    used.add(dist_of.get(top, top).lower())
    assert used - declared == set(), f"imported but not declared in pyproject.toml: {sorted(used - declared)}"


def test_predict_defaults_are_the_librarys():
    from featkit import api, cli
    from featkit.options import PredictOptions, defaults
    from featkit.prediction import Predictor

    cli_defaults = _cli_defaults(cli.predict.__wrapped__)
    lib = {**inspect.signature(Predictor).parameters, **inspect.signature(api.predict).parameters}
    for name, value in defaults(PredictOptions).items():
        assert cli_defaults[name] == value == lib[name].default, name


def test_download_defaults_are_the_librarys():
    from featkit import cli
    from featkit.collect import download_photos
    from featkit.options import DownloadOptions, defaults

    cli_defaults = _cli_defaults(cli.download.__wrapped__)
    lib = inspect.signature(download_photos).parameters
    for name, value in defaults(DownloadOptions).items():
        assert cli_defaults[name] == value == lib[name].default, name


def _cache_names() -> set[str]:
    """The file and folder names featkit.cache.names defines (module-level string constants)."""
    tree = _modules()["featkit.cache.names"]
    names = set()
    for node in tree.body:
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str):
            if all(isinstance(t, ast.Name) and t.id.isupper() and not t.id.startswith("_") for t in node.targets):
                names.add(node.value.value)
    return names - {"vgg16"}  # DEFAULT_KEY is a backbone's key, not a file name


def _docstrings(tree: ast.Module) -> set[int]:
    return {id(n.body[0].value) for n in ast.walk(tree)
            if isinstance(n, (ast.Module, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and n.body
            and isinstance(n.body[0], ast.Expr) and isinstance(n.body[0].value, ast.Constant)}


def test_the_cache_folder_has_one_owner():
    """h5py and fcntl are imported, and a file name under the cache folder is spelt, only in featkit/cache/
    (docstrings and help text may mention them; code may not build a path from its own spelling)."""
    names = _cache_names()
    assert {"features.h5", "failed.csv", "heads", "manifest.json", "dhash.json", ".download.lock"} <= names, names
    bad = []
    for m, tree in _modules().items():
        if m.startswith("featkit.cache"):
            continue
        docs = _docstrings(tree)
        joined = {id(n.right) for n in ast.walk(tree) if isinstance(n, ast.BinOp) and isinstance(n.op, ast.Div)}
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                bad += [f"{m} imports {a.name}" for a in node.names if a.name.split(".")[0] in ("h5py", "fcntl")]
            elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] in ("h5py", "fcntl"):
                bad.append(f"{m} imports from {node.module}")
            elif isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docs:
                # a folder name ("heads", "images") is also a word: flagged where it builds a path (x / "heads")
                named = node.value in names and ("." in node.value or id(node) in joined)
                if named or any(node.value.endswith("/" + n) for n in names):
                    bad.append(f"{m} spells {node.value!r} (line {node.lineno})")
            elif isinstance(node, ast.JoinedStr):
                parts = [v.value for v in node.values if isinstance(v, ast.Constant)]
                if any(p.endswith((".h5", ".joblib")) or p.startswith("features-") for p in parts):
                    bad.append(f"{m} builds a cache file name (line {node.lineno})")
    assert not bad, bad


def _lib_defaults(*functions) -> dict[str, object]:
    out = {}
    for fn in functions:
        out.update({n: p.default for n, p in inspect.signature(fn).parameters.items() if p.default is not inspect.Parameter.empty})
    return out


def test_split_defaults_are_the_librarys():
    from featkit import api, cli
    from featkit.options import ExtractOptions, SplitOptions, defaults
    from featkit.splits import assign_splits

    cli_split, cli_extract = _cli_defaults(cli.split.__wrapped__), _cli_defaults(cli.extract.__wrapped__)
    lib, ext = inspect.signature(api.split).parameters, defaults(ExtractOptions)
    splits = inspect.signature(assign_splits).parameters
    for name, value in defaults(SplitOptions).items():
        assert cli_split[name] == cli_extract[name] == ext[name] == lib[name].default == value, name
        assert splits["seed" if name == "split_seed" else name].default == value, name


def test_fit_defaults_are_the_librarys():
    from featkit import api, cli
    from featkit.options import FitOptions, MLPOptions, defaults
    from featkit.training import fit_heads

    cli_defaults = _cli_defaults(cli.fit.__wrapped__)
    lib, training = inspect.signature(api.fit).parameters, inspect.signature(fit_heads).parameters
    for name, value in defaults(FitOptions).items():
        assert lib[name].default == training[name].default == value, name
        if name != "block_rows":  # the library's only
            assert cli_defaults[name] == value, name
    for name, value in defaults(MLPOptions).items():  # the command's MLP options are MLPOptions'
        if name not in cli_defaults:  # (early_stopping, validation_fraction, device, verbose: the library's only)
            continue
        assert (cli_defaults[name],) == value if name == "hidden_layer_sizes" else cli_defaults[name] == value, name


def test_fetch_defaults_are_the_librarys():
    from featkit.collect import download_photos
    from featkit.flickr import FlickrClient
    from featkit.options import DOWNLOAD, FetchOptions, defaults

    lib, client = _lib_defaults(download_photos), _lib_defaults(FlickrClient)
    for name, value in defaults(FetchOptions).items():
        assert lib[name] == value, name
        if name in client:
            assert client[name] == value, name
    assert client["min_interval_s"] == DOWNLOAD.min_interval_s


def test_demo_defaults_are_the_librarys():
    from featkit import cli
    from featkit.demo import run_demo
    from featkit.options import DemoOptions, defaults

    cli_defaults, lib = _cli_defaults(cli.demo.__wrapped__), _lib_defaults(run_demo)
    for name, value in defaults(DemoOptions).items():
        assert cli_defaults[name] == lib[name] == value, name


def test_no_library_signature_types_a_default_of_its_own():
    """The defaults of the public functions are read from featkit.options, never typed again: the options
    classes hold every literal these signatures default to (None and booleans aside)."""
    from featkit import api
    from featkit.collect import download_photos
    from featkit.demo import run_demo
    from featkit.options import BackboneOptions, DemoOptions, DownloadOptions, ExtractOptions, FetchOptions, FitOptions, PredictOptions, SplitOptions, defaults
    from featkit.splits import assign_splits
    from featkit.training import fit_heads

    known = set()
    for cls in (BackboneOptions, DemoOptions, DownloadOptions, ExtractOptions, FetchOptions, FitOptions, PredictOptions, SplitOptions):
        known |= {repr(v) for v in defaults(cls).values()}
    for fn in (api.split, api.fit, api.predict, fit_heads, assign_splits, download_photos, run_demo):
        for name, value in _lib_defaults(fn).items():
            if value is None or isinstance(value, bool) or callable(value) or name in ("cache_dir", "reports_dir", "unreadable", "fixed", "failed_csv"):
                continue
            assert repr(value) in known, f"{fn.__qualname__}({name}={value!r}) is not an options default"
