"""A warning from any library, in any command, is shown once after the command, which then ends normally.

The CLI's wrapper once replayed caught warnings while still recording them: each replay was recorded
again, so the first third-party warning hung the command with memory growing without end. Every test
here runs under an alarm, so a hang fails the test instead of the suite.
"""

from __future__ import annotations

import contextlib
import functools
import signal
import warnings

import numpy as np
import pytest
from PIL import Image

from conftest import FAST, LOGREG, fitted_cache, make_photos
from fakeflickr import FakeFlickr, make_catalog
from featkit.cli import app

THIRD_PARTY = "third-party library says: this is only a warning"


@contextlib.contextmanager
def deadline(seconds: int):
    def hung(signum, frame):
        raise TimeoutError(f"the command did not end within {seconds} s (a warning loop?)")

    old = signal.signal(signal.SIGALRM, hung)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def warning_first(fn):
    """``fn``, which first warns the way a third-party library does: twice from one place, once from another."""

    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        for _ in range(2):
            warnings.warn(THIRD_PARTY, UserWarning, stacklevel=1)
        warnings.warn(THIRD_PARTY + " (elsewhere)", DeprecationWarning, stacklevel=2)
        return fn(*args, **kwargs)

    return wrapped


def invoke(runner, *args):
    with deadline(120):
        return runner.invoke(app, [str(a) for a in args])


def assert_shown_once(result, exit_code=0):
    assert result.exit_code == exit_code, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    lines = result.output.splitlines()
    assert sum(THIRD_PARTY in line and "elsewhere" not in line for line in lines) == 1, result.output
    assert sum(f"{THIRD_PARTY} (elsewhere)" in line for line in lines) == 1, result.output
    assert "Traceback" not in result.output


@pytest.fixture(scope="module")
def cache_with_head(tmp_path_factory):
    return fitted_cache(tmp_path_factory.mktemp("warn"), "--test-size", "4", "--val-size", "4", n=16)


@pytest.mark.parametrize("command, target", [
    ("extract", "featkit.api.extract"),
    ("split", "featkit.api.split"),
    ("verify", "featkit.api.verify"),
    ("fit", "featkit.api.fit"),
    ("compare", "featkit.api.compare"),
    ("predict", "featkit.prediction.Predictor.predict"),
])
def test_a_third_party_warning_ends_each_cache_command_normally(runner, monkeypatch, tmp_path, cache_with_head, command, target):
    photos, cache = cache_with_head
    module, _, name = target.rpartition(".")
    if module.endswith("Predictor"):
        from featkit.prediction import Predictor as owner
    else:
        import importlib

        owner = importlib.import_module(module)
    monkeypatch.setattr(owner, name, warning_first(getattr(owner, name)))
    args = {
        "extract": ["extract", photos, "--cache", cache, *FAST, "--test-size", "4", "--val-size", "4"],
        "split": ["split", "--cache", cache, "--test-size", "4", "--val-size", "4"],
        "verify": ["verify", "--cache", cache],
        "fit": ["fit", "--head", LOGREG, "--cache", cache, "--no-progress"],
        "compare": ["compare", "--cache", cache, "--reports", tmp_path / "reports"],
        "predict": ["predict", photos / "Paris" / "000.jpg", "--cache", cache, "--workers", "0"],
    }[command]
    assert_shown_once(invoke(runner, *args))


def test_a_third_party_warning_ends_download_normally(runner, monkeypatch, tmp_path):
    import featkit.collect

    monkeypatch.setattr(featkit.collect, "download_photos", warning_first(featkit.collect.download_photos))
    key, secret = "k" * 32, "s" * 16
    monkeypatch.setenv("FLICKR_API_KEY", key)
    monkeypatch.setenv("FLICKR_API_SECRET", secret)
    with FakeFlickr(make_catalog(["Paris", "Tokyo"], 6), api_key=key, api_secret=secret) as fake:
        r = invoke(runner, "download", "--cities", "Paris,Tokyo", "--per-city", "3", "--cache", tmp_path / "c",
                   "--endpoint", fake.endpoint, "--min-interval-s", "0", "--workers", "1", "--no-progress")
    assert_shown_once(r)


def test_a_third_party_warning_ends_demo_normally(runner, monkeypatch, tmp_path):
    import featkit.demo

    monkeypatch.setattr(featkit.demo, "run_demo", warning_first(featkit.demo.run_demo))
    r = invoke(runner, "demo", "--cache", tmp_path / "c", "--reports", tmp_path / "r", "--cities", "Paris,Tokyo",
               "--per-city", "8", "--image-size", "32", "--no-progress")
    assert_shown_once(r)


def test_a_warning_before_an_error_is_shown_and_the_error_is_one_line(runner, monkeypatch, tmp_path):
    import featkit.api

    monkeypatch.setattr(featkit.api, "verify", warning_first(featkit.api.verify))
    r = invoke(runner, "verify", "--cache", tmp_path / "nothing-here")
    assert_shown_once(r, exit_code=r.exit_code)
    assert r.exit_code != 0
    assert sum(line.startswith("error: ") for line in r.output.splitlines()) == 1, r.output


def test_pillows_own_warning_on_a_palette_png_with_transparency(runner, cache_with_head, tmp_path):
    """The probe's photo: an ordinary palette PNG with byte transparency, on which Pillow warns that it should
    be converted to RGBA; predict printed its answer and then hung."""
    _, cache = cache_with_head
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 255, (40, 40), dtype=np.uint8), mode="L").convert("P")
    path = tmp_path / "palette.png"
    img.save(path, transparency=b"\x00" * 16)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        Image.open(path).convert("RGB")
    assert any("RGBA" in str(x.message) for x in w), "this Pillow no longer warns on such a PNG"
    r = invoke(runner, "predict", path, "--cache", cache, "--workers", "0")
    assert r.exit_code == 0, r.output
    assert "1 predicted, 0 unreadable" in r.output
    assert sum("RGBA" in line for line in r.output.splitlines()) <= 1, r.output
    folder = make_photos(tmp_path / "photos", cities=("Paris", "Tokyo"), n=6)
    path.rename(folder / "Paris" / "palette.png")
    r = invoke(runner, "extract", folder, "--cache", tmp_path / "c2", *FAST, "--test-size", "2", "--val-size", "2")
    assert r.exit_code == 0, r.output
    assert "13 extracted" in r.output, r.output
