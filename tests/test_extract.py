"""Extraction into the cache: odd images, resume after interruption, exactly-once rows."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import REPO, make_photos
from featkit.backbones import load_backbone
from featkit.extraction import extract_features
from featkit.images import UnreadableImage, load_image
from featkit.manifest import scan_photos
from featkit.options import ExtractOptions
from featkit.cache.store import FeatureStore


@pytest.fixture(scope="module")
def backbone():
    return load_backbone("random", image_size=32)


def _extract(photos_dir, cache, backbone, on_batch=None, **kw):
    net, spec = backbone
    kw = {"batch_size": 4, "workers": 0, "progress": False, **kw}
    return extract_features(scan_photos(photos_dir), net, spec, cache, ExtractOptions(**kw), on_batch=on_batch)


def _assert_exactly_once(cache: Path, photos_dir: Path):
    expected = {p.photo_id for p in scan_photos(photos_dir)}
    with FeatureStore.open(cache) as s:
        ids = list(s.column("photo_id"))
        assert len(ids) == len(set(ids)), "a photo is stored twice"
        assert set(ids) | {r["photo_id"] for r in s.failed()} == expected
        assert s.f["features"].shape[0] == s.n_rows == len(ids)
        assert np.isfinite(s.read_features(np.arange(s.n_rows))).all()


def test_odd_modes_convert_and_broken_files_are_recorded(tmp_path, backbone):
    root = make_photos(tmp_path / "photos", cities=("Paris", "Tokyo"), n=6)
    rng = np.random.default_rng(1)
    rgb = rng.integers(0, 255, (40, 50, 3), dtype=np.uint8)
    d = root / "Paris"
    Image.fromarray(rgb).convert("L").save(d / "gray.jpg")
    Image.fromarray(rgb).convert("RGBA").save(d / "rgba.png")
    Image.fromarray(rgb).convert("CMYK").save(d / "cmyk.jpg")
    Image.fromarray(rgb).convert("P").save(d / "palette.png")
    Image.fromarray((rng.integers(0, 65535, (30, 30))).astype(np.uint16)).save(d / "sixteen.png")
    Image.fromarray(rgb).convert("1").save(d / "bilevel.png")
    (d / "empty.jpg").write_bytes(b"")
    full = (d / "000.jpg").read_bytes()
    (d / "truncated.jpg").write_bytes(full[: len(full) // 2])
    (d / "text.jpg").write_text("this is not an image")
    cache = tmp_path / "cache" / "features.h5"
    s = _extract(root, cache, backbone)
    assert (s.n_extracted, s.n_skipped) == (12 + 6, 3)
    assert s.line().startswith("18 extracted, 3 skipped (see ")
    with FeatureStore.open(cache) as store:
        reasons = {Path(r["path"]).name: r["reason"] for r in store.failed()}
        stored = set(store.column("photo_id"))
    assert reasons["empty.jpg"] == "empty file (0 bytes)"
    assert reasons["truncated.jpg"].startswith("cannot decode")
    assert reasons["text.jpg"] == "not an image Pillow can identify"
    for name in ("gray.jpg", "rgba.png", "cmyk.jpg", "palette.png", "sixteen.png", "bilevel.png"):
        assert f"Paris/{name}" in stored
    assert "Paris/truncated.jpg" in (cache.parent / "failed.csv").read_text()
    # a rerun neither retries nor duplicates anything
    s2 = _extract(root, cache, backbone)
    assert (s2.n_extracted, s2.n_skipped, s2.n_already) == (0, 0, 21)
    _assert_exactly_once(cache, root)


def test_rgba_composited_on_white():
    import tempfile

    with tempfile.TemporaryDirectory() as t:
        p = Path(t) / "clear.png"
        Image.new("RGBA", (8, 8), (0, 0, 0, 0)).save(p)
        assert load_image(p, 32).min() == 255
        with pytest.raises(UnreadableImage, match="file not found"):
            load_image(Path(t) / "gone.jpg", 32)


def test_resume_after_interrupt_each_photo_once(tmp_path, backbone):
    root = make_photos(tmp_path / "photos", n=10)
    cache = tmp_path / "cache" / "features.h5"

    def stop_after_two_batches(n_done):
        if n_done >= 8:
            raise KeyboardInterrupt

    s = _extract(root, cache, backbone, on_batch=stop_after_two_batches)
    assert s.interrupted and s.n_total_rows == 8
    s = _extract(root, cache, backbone)
    assert (s.n_already, s.n_extracted, s.n_total_rows) == (8, 22, 30)
    _assert_exactly_once(cache, root)


def test_crash_between_write_and_commit_is_repaired(tmp_path, backbone, monkeypatch):
    root = make_photos(tmp_path / "photos", n=10)
    cache = tmp_path / "cache" / "features.h5"
    calls = {"n": 0}

    def crash_on_third_commit(self):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("power cut")

    monkeypatch.setattr(FeatureStore, "_before_commit", crash_on_third_commit)
    with pytest.raises(RuntimeError, match="power cut"):
        _extract(root, cache, backbone)
    with FeatureStore.open(cache) as s:  # 12 rows written, 8 committed
        assert s.n_rows == 8 and s.f["features"].shape[0] == 12
    monkeypatch.undo()
    s = _extract(root, cache, backbone)
    assert s.n_already == 8 and s.n_total_rows == 30
    _assert_exactly_once(cache, root)


KILLER = textwrap.dedent(
    """
    import os, signal, sys
    from featkit.backbones import load_backbone
    from featkit.extraction import extract_features
    from featkit.manifest import scan_photos
    from featkit.options import ExtractOptions
    from featkit.cache.store import FeatureStore

    root, cache, when, after = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    calls = {"n": 0}

    def kill(*_):
        calls["n"] += 1
        if calls["n"] >= after:
            os.kill(os.getpid(), signal.SIGKILL)

    if when == "before_commit":  # data written, count not yet bumped
        FeatureStore._before_commit = lambda self: kill()
        hook = None
    else:  # right after a commit
        hook = kill
    net, spec = load_backbone("random", image_size=32)
    extract_features(scan_photos(root), net, spec, cache, ExtractOptions(batch_size=4, workers=0, progress=False), on_batch=hook)
    """
)


@pytest.mark.parametrize("when,after", [("before_commit", 3), ("after_commit", 2), ("before_commit", 1)])
def test_sigkill_mid_run_resumes_exactly_once(tmp_path, backbone, when, after):
    root = make_photos(tmp_path / "photos", n=8)
    cache = tmp_path / "cache" / "features.h5"
    proc = subprocess.run([sys.executable, "-c", KILLER, str(root), str(cache), when, str(after)], cwd=REPO, capture_output=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-2000:]
    s = _extract(root, cache, backbone)
    assert s.n_total_rows == 24
    _assert_exactly_once(cache, root)


def test_float32_option_and_avg_pooling(tmp_path):
    root = make_photos(tmp_path / "photos", cities=("Paris", "Tokyo"), n=5)
    net, spec = load_backbone("random", image_size=64, pooling="avg")
    cache = tmp_path / "c.h5"
    extract_features(scan_photos(root), net, spec, cache, ExtractOptions(dtype="float32", workers=0, progress=False, test_size=1, val_size=1))
    with FeatureStore.open(cache) as s:
        assert s.f["features"].dtype == np.float32 and s.f["features"].shape == (10, 512)
        ident = s.identity
    assert ident["pooling"] == "avg" and ident["dtype"] == "float32" and ident["image_size"] == 64
