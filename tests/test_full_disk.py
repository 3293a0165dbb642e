"""A disk that fills up while a cache is written: nothing is committed that did not reach the disk.

HDF5 writes a cached chunk back when its dataset handle is freed, and there a failed write is only
printed: on a full disk an earlier featkit recorded batches as committed that never landed (the checksums
caught it later). Each test mounts a small tmpfs, so it runs only where mounting is allowed (root on Linux)
and skips elsewhere, saying why.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import numpy as np
import pytest

from conftest import FAST, make_photos
from featkit.cache.names import cache_file
from featkit.cache.store import FeatureStore
from featkit.cli import app


@pytest.fixture
def small_disk(tmp_path):
    mnt = tmp_path / "disk"
    mnt.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mnt)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {r.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def fill(folder: Path) -> Path:
    """A file that takes every byte left on ``folder``'s filesystem."""
    ballast = folder / "ballast"
    fd = os.open(ballast, os.O_WRONLY | os.O_CREAT)
    try:
        while True:
            os.write(fd, b"\0" * 4096)
    except OSError:
        pass
    finally:
        os.close(fd)
    return ballast


def rows(start: int, k: int) -> dict[str, list[str]]:
    return {"photo_id": [f"p{start + i}" for i in range(k)], "city": ["Paris"] * k, "split": ["train"] * k,
            "path": [f"/photos/{start + i}.jpg" for i in range(k)], "owner": [""] * k}


def test_appends_until_the_disk_is_full_commit_only_what_landed(small_disk):
    path = small_disk / "features.h5"
    identity = {"arch": "test", "feature_dim": 512, "dtype": "float16"}
    rng = np.random.default_rng(0)
    written = []
    store = FeatureStore.open_for_append(path, identity)
    with pytest.raises(Exception) as e:
        for b in range(10_000):  # 4 MB hold far fewer than 10,000 batches of 16 x 512 float16
            X = rng.normal(size=(16, 512)).astype(np.float16)
            store.append(rows(16 * b, 16), X)
            written.append(X)
    assert "cannot write to feature cache" in str(e.value) and "No space left" in str(e.value), e.value
    assert f"the {16 * len(written)} photos committed before are kept" in str(e.value)
    try:
        store.close()
    except Exception:
        pass  # HDF5 may fail to write its own metadata on close; what matters is what was committed
    assert len(written) > 5  # the disk filled mid-run, after batches that landed
    with FeatureStore.open(path) as s:
        assert s.n_rows == 16 * len(written)
        d = s.verify()
        assert d.ok, d.line()
        assert np.array_equal(s.read_features(np.arange(s.n_rows), dtype=np.float16), np.concatenate(written))
        assert s.column("photo_id").tolist() == [f"p{i}" for i in range(s.n_rows)]


def test_extract_on_a_full_disk_is_one_line_and_resumes_once_there_is_room(runner, tmp_path, small_disk):
    """Room for the cache file but not for its first 1 MB chunk of features: the run ends in one line with
    nothing committed, and once there is room the same command stores every photo once."""
    photos = make_photos(tmp_path / "photos", n=12)
    cache = small_disk / "cache"
    args = ["extract", str(photos), "--cache", str(cache), *FAST, "--test-size", "2", "--val-size", "2"]
    ballast = fill(small_disk)
    os.truncate(ballast, ballast.stat().st_size - 300_000)
    r = runner.invoke(app, args)
    assert r.exit_code != 0, r.output
    errors = [line for line in r.output.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in r.output, r.output
    assert "No space left" in errors[0] and "rerun the same command to resume" in errors[0], r.output
    ballast.unlink()
    r = runner.invoke(app, args)
    assert r.exit_code == 0, r.output
    with FeatureStore.open(cache_file(cache)) as s:
        ids = s.column("photo_id").tolist()
        assert s.verify().ok and len(ids) == len(set(ids)) == 36
