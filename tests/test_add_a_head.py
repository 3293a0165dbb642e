"""ARCHITECTURE.md's "Adding a head", done exactly as it says (its options dataclass, one class on
:class:`featkit.heads.Head`, one registry line), then ``featkit fit --head toy`` and ``featkit compare``
through the CLI; and no head is named outside the registry."""

from __future__ import annotations

import ast
import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy.special import softmax

from conftest import LOGREG, fitted_cache
from featkit.cli import app
from featkit.heads import HEAD_NAMES, HEADS
from featkit.heads.base import Head

REPO = Path(__file__).resolve().parents[1]


# featkit/options.py: the head's defaults, written once (here in the test, which cannot edit options.py)
@dataclass(frozen=True)
class ToyOptions:
    temperatures: tuple[float, ...] = (0.1, 1.0, 10.0)


TOY = ToyOptions()


# featkit/heads/toy.py: a nearest-centroid head whose softmax temperature is chosen on the validation split
class ToyHead(Head):
    def __init__(self, temperatures=TOY.temperatures, random_state=None):
        self.temperatures, self.random_state = temperatures, random_state

    def fit(self, X, y, X_val=None, y_val=None):
        X, y = np.asarray(X, dtype=np.float64), np.asarray(y)
        self.classes_ = np.unique(y)
        self.centroids_ = np.stack([X[y == c].mean(0) for c in self.classes_])
        self.scale_ = float(np.sqrt(np.mean(X**2))) or 1.0
        self.temperature_ = sorted(self.temperatures)[len(self.temperatures) // 2]
        if X_val is not None and y_val is not None:  # the lowest validation log-loss, never the test split
            losses = {}
            for t in self.temperatures:
                self.temperature_ = t
                p = self.predict_proba(X_val)[np.arange(len(y_val)), np.searchsorted(self.classes_, y_val)]
                losses[t] = float(-np.log(np.clip(p, 1e-12, 1)).mean())
            self.temperature_ = min(losses, key=losses.get)
        self.chosen_ = {"temperature": self.temperature_}
        return self

    def predict_proba(self, X):
        d = ((np.asarray(X, dtype=np.float64)[:, None, :] - self.centroids_[None]) ** 2).sum(-1) / self.scale_**2
        return softmax(-d / self.temperature_, axis=1)


def test_a_head_added_as_the_recipe_says_is_fitted_and_compared(tmp_path, monkeypatch, runner):
    monkeypatch.setitem(HEADS, "toy", ToyHead)  # the one registry line
    _, cache = fitted_cache(tmp_path, n=24)  # a cache with a built-in head already fitted beside it
    r = runner.invoke(app, ["fit", "--head", "toy", "--cache", str(cache), "--no-progress"])
    assert r.exit_code == 0, r.output
    assert "toy: val accuracy" in r.output and "(temperature=" in r.output
    r = runner.invoke(app, ["compare", "--cache", str(cache), "--reports", str(tmp_path / "reports"), "--no-leaks"])
    assert r.exit_code == 0, r.output
    assert "toy " in r.output.split("test accuracy:")[1]
    data = json.loads((tmp_path / "reports" / "compare.json").read_text())
    assert set(data["heads"]) == {LOGREG, "toy"} and set(data["ranking"]["ranking"]) == {LOGREG, "toy"}
    toy = data["heads"]["toy"]
    assert toy["n"] == sum(data["n_test"].values()) and sum(map(sum, toy["confusion"])) == toy["n"]
    assert toy["accuracy"] > 0.6  # chance is 1/3: the colour casts are easy
    lo, hi = toy["accuracy_ci"]
    assert lo <= toy["accuracy"] <= hi and 0 <= toy["val_score"] <= 1
    assert toy["chosen"]["temperature"] in TOY.temperatures
    assert toy["validation_curve"] is None and toy["at_grid_edge"] is None  # optional capabilities it does not have
    md = (tmp_path / "reports" / "compare.md").read_text()
    assert "| toy |" in md and (tmp_path / "reports" / "confusion_toy.png").exists()


# --------------------------------------------------------------------------- no head named outside the registry
def _docstrings(tree: ast.Module) -> set[int]:
    ids = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(first.value.value, str):
                ids.add(id(first.value))
    return ids


def _help_texts(tree: ast.Module) -> set[int]:
    return {id(k.value) for node in ast.walk(tree) if isinstance(node, ast.Call) for k in node.keywords
            if k.arg == "help" and isinstance(k.value, ast.Constant)}


def named_heads(path: Path, root: Path = REPO) -> list[str]:
    """``file:line: text`` of every string in ``path`` that names a registered head, docstrings and CLI help
    texts aside (they document; the code never relies on them)."""
    tree = ast.parse(path.read_text(), str(path))
    # a Python parameter's name is not a head's, though `fit`'s mlp= is spelt like one: the `param=` of an
    # error and a name in backquotes (how featkit's messages name a parameter) are parameters
    params = {id(k.value) for n in ast.walk(tree) if isinstance(n, ast.Call) for k in n.keywords if k.arg == "param"}
    params |= {id(n.comparators[0]) for n in ast.walk(tree) if isinstance(n, ast.Compare) and isinstance(n.left, ast.Attribute)
               and n.left.attr == "param" and n.comparators}
    allowed = _docstrings(tree) | _help_texts(tree) | params
    word = re.compile(r"\b(" + "|".join(map(re.escape, HEAD_NAMES)) + r")\b")
    return [f"{path.relative_to(root)}:{node.lineno}: {node.value!r}" for node in ast.walk(tree)
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in allowed
            and word.search(re.sub(r"`[^`]*`", "", node.value))]


def test_no_head_is_named_outside_the_registry():
    """Only featkit/heads/ (the registry and the heads) and featkit/options.py (their defaults) may spell a head's
    name; everything else, tests included, takes names from HEADS (or a class's name there)."""
    files = [p for p in sorted((REPO / "featkit").rglob("*.py")) if "heads" not in p.relative_to(REPO / "featkit").parts[:1]
             and p != REPO / "featkit" / "options.py"] + sorted((REPO / "tests").glob("*.py"))
    found = [hit for p in files for hit in named_heads(p)]
    assert not found, "\n".join(found)


def test_the_check_finds_a_named_head(tmp_path):
    p = tmp_path / "probe.py"
    p.write_text(f'"""{HEAD_NAMES[0]} in a docstring is fine."""\nx = {{{HEAD_NAMES[0]!r}: 1}}\n')
    assert named_heads(p, tmp_path) == [f"probe.py:2: {HEAD_NAMES[0]!r}"]
