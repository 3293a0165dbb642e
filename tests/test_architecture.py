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


def _modules() -> dict[str, ast.Module]:
    return {f"featkit.{p.stem}": ast.parse(p.read_text(), str(p)) for p in sorted(PKG.glob("*.py")) if p.stem != "__init__"}


def _imports(tree: ast.Module) -> list[tuple[str, list[str]]]:
    """``(module, names)`` for every ``import featkit.x`` / ``from featkit.x import a, b`` anywhere in the file."""
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("featkit"):
            if node.module == "featkit":  # from featkit import api, __version__
                for a in node.names:
                    out.append((f"featkit.{a.name}" if (PKG / f"{a.name}.py").exists() else "featkit", [] if (PKG / f"{a.name}.py").exists() else [a.name]))
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
        ("featkit.report", ("torch", "torchvision", "h5py", "flickrapi")),
    ],
)
def test_light_modules_stay_light(module, forbidden):
    code = f"import sys, {module}; print(' '.join(m for m in {forbidden!r} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "", f"importing {module} imported {out.stdout.strip()}"


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
    fit = _cli_defaults(cli.fit.__wrapped__)
    head = MLPHead().get_params()
    for name in ("max_iter", "n_iter_no_change", "dropout", "alpha", "learning_rate_init", "batch_size"):
        assert fit[name] == head[name], name
    assert (fit["hidden_layer_sizes"],) == tuple(head["hidden_layer_sizes"])


def test_cli_option_names_mirror_python_names():
    from featkit import cli

    for command in (cli.extract, cli.fit, cli.compare, cli.demo):
        for name, p in inspect.signature(command.__wrapped__).parameters.items():
            decls = getattr(p.default, "param_decls", None)
            if decls and any(d.startswith("--") for d in decls):
                first = [d for d in decls if d.startswith("--")][0].split("/")[0]
                assert first == "--" + name.replace("_", "-"), (command.__name__, name, decls)
