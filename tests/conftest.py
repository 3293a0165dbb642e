"""Shared test data: tiny generated photos per city, a CLI runner, paths to ../shared."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from featkit.heads import LinearSVMHead, LogRegHead, MLPHead, head_name

# Heads by their class, never by a typed name (the registry, featkit.heads.HEADS, owns the names).
LOGREG = head_name(LogRegHead)  # the head a test fits when any will do: quick, numpy only
SVM = head_name(LinearSVMHead)
MLP = head_name(MLPHead)

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("FEATKIT_SHARED", REPO.parent / "shared"))
REAL_WEIGHTS = SHARED / "weights" / "vgg16_imagenet_features.pth"
REAL_PHOTOS = SHARED / "data" / "cityscapes5"

# One strong colour cast per city: easy for any head on random-weight features.
PALETTE = {"Paris": (200, 60, 60), "Tokyo": (60, 200, 60), "Venice": (60, 60, 200), "London": (200, 200, 60)}


def make_photos(root: Path, cities=("Paris", "Tokyo", "Venice"), n: int = 24, size=(64, 48), seed: int = 0) -> Path:
    """``root/<city>/<i>.jpg``: noisy images with a per-city colour cast."""
    rng = np.random.default_rng(seed)
    for city in cities:
        d = root / city
        d.mkdir(parents=True, exist_ok=True)
        colour = np.array(PALETTE[city], dtype=float)
        for i in range(n):
            img = colour + rng.normal(0, 45, (size[1], size[0], 3))
            Image.fromarray(img.clip(0, 255).astype(np.uint8)).save(d / f"{i:03d}.jpg", quality=90)
    return root


@pytest.fixture
def photos(tmp_path) -> Path:
    return make_photos(tmp_path / "photos")


@pytest.fixture
def runner() -> CliRunner:
    return CliRunner()


@pytest.fixture(autouse=True)
def _isolated_env(monkeypatch, tmp_path):
    """Tests never read a user's cache/report settings and never reach a network."""
    for var in ("FEATKIT_CACHE", "FEATKIT_REPORTS"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))


# Small, fast extraction settings used across tests: random weights on 32x32 inputs.
FAST = ["--weights", "random", "--image-size", "32", "--no-progress", "--workers", "0", "--batch-size", "8"]


def fitted_cache(root: Path, *extract_args: str, n: int) -> tuple[Path, Path]:
    """Generated photos under ``root/photos`` (``n`` a city), extracted with :data:`FAST` (plus ``extract_args``)
    into ``root/cache``, and a :data:`LOGREG` head fitted on it: ``(photos, cache)``."""
    from featkit.cli import app

    photos = make_photos(root / "photos", n=n)
    cache = root / "cache"
    runner = CliRunner()
    r = runner.invoke(app, ["extract", str(photos), "--cache", str(cache), *FAST, *extract_args])
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["fit", "--head", LOGREG, "--cache", str(cache), "--no-progress"])
    assert r.exit_code == 0, r.output
    return photos, cache
