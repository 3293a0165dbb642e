"""Fault injection: SIGKILL at random moments, then rerun; nothing committed is ever lost, duplicated or unreadable.

Three drivers, each killed again and again at random moments:

- the store, written exactly as ``extract`` writes it (batches of rows, failures, commits), killed
  mid-batch, mid-HDF5-write and mid-commit (many kills a second: the cheapest way to hit the narrow windows);
- ``featkit extract`` itself, killed and rerun in a chain; the final cache is compared bit for bit with an
  uninterrupted run's;
- ``featkit fit``, killed while it trains and saves heads; no half-written head is ever listed or loaded.

The default run tries a few dozen kills; ``pytest -m slow`` runs the long version (hundreds), which the
closing note of the robustness work reports. ``FEATKIT_KILLS`` scales the counts.
"""

from __future__ import annotations

import inspect
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import FAST, LOGREG, MLP, REPO, SVM, make_photos

SCALE = float(os.environ.get("FEATKIT_KILLS", "1"))

def expected(i: int) -> tuple[dict[str, str], "np.ndarray"]:
    """Photo ``i`` as the store writer below stores it: its row and its features (the writer runs this very
    function's source, so what is written and what is checked cannot drift apart)."""
    import numpy as np

    row = {
        "photo_id": f"p{i:06d}",
        "city": ("Paris", "Tōkyō", "New York|x")[i % 3],
        "split": ("train", "val", "test")[i % 3],
        "path": f"/photos/{'é' * (i % 7)}/{i}.jpg",
        "owner": f"owner{i % 13}" if i % 5 else "",
    }
    return row, (np.arange(96, dtype=np.float32) * (i % 97) / 97.0 + i % 5).astype(np.float16)


# A child that appends deterministic batches to a store as extract does, forever (until killed);
# photo i is failed when i % 11 == 0, else stored as expected(i).
STORE_WRITER = inspect.getsource(expected) + textwrap.dedent(
    """
    import sys, numpy as np
    from featkit.cache.format import ROW_FIELDS
    from featkit.cache.store import FeatureStore
    path, seed = sys.argv[1], int(sys.argv[2])
    ident = {"arch": "test", "feature_dim": 96, "dtype": "float16", "image_size": 32, "pooling": "flatten", "weights_sha256": "x"}
    rng = np.random.default_rng(seed)
    with FeatureStore.open_for_append(path, ident) as store:
        n = store.n_rows + store.n_failed
        print("open", flush=True)
        while True:
            k = int(rng.integers(1, 40))
            ids = list(range(n, n + k))
            good = [expected(i) for i in ids if i % 11]
            bad = [i for i in ids if not i % 11]
            rows = {name: [row[name] for row, _ in good] for name in ROW_FIELDS}
            X = np.stack([x for _, x in good]) if good else np.zeros((0, 96), np.float16)
            store.append(rows, X, [(f"p{i:06d}", f"/photos/{i}.jpg", f"reason {i}") for i in bad])
            n += k
    """
)


def _check_store(path: Path) -> int:
    """The committed part of a killed store: readable, checksums intact, every row as written, each photo once."""
    from featkit.cache.format import ROW_FIELDS
    from featkit.cache.store import FeatureStore

    with FeatureStore.open(path) as store:
        d = store.verify()
        assert d.ok, d.line()
        ids = store.column("photo_id")
        assert len(set(ids)) == len(ids) == store.n_rows
        idx = np.array([int(p[1:]) for p in ids], dtype=np.int64)
        assert np.array_equal(idx, np.sort(idx))
        want = [expected(i) for i in idx]
        X = store.read_features(np.arange(store.n_rows), dtype=np.float16)
        assert np.array_equal(X, np.stack([x for _, x in want]) if want else X)
        for name in ROW_FIELDS:
            assert list(store.column(name)) == [row[name] for row, _ in want], name
        failed = [int(r["photo_id"][1:]) for r in store.failed()]
        assert all(i % 11 == 0 for i in failed) and not set(failed) & set(idx.tolist())
        # every photo below the highest one handled is either stored or failed: none lost
        top = max([*idx.tolist(), *failed], default=-1)
        assert set(idx.tolist()) | set(failed) == set(range(top + 1))
        return store.n_rows


def _kill_store_writer(path: Path, kills: int, seed: int) -> dict:
    rnd = random.Random(seed)
    script = path.with_name("writer.py")
    script.write_text(STORE_WRITER)
    survived = 0
    for k in range(kills):
        proc = subprocess.Popen([sys.executable, str(script), str(path), str(k)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=ENV)
        assert proc.stdout.readline().strip() == b"open", proc.stderr.read().decode()
        time.sleep(rnd.uniform(0.0, 0.25))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        _check_store(path)
        survived += 1
    return {"kills": kills, "survived": survived}


@pytest.mark.parametrize("kills", [max(1, int(25 * SCALE))])
def test_store_survives_sigkill_mid_write(tmp_path, kills):
    r = _kill_store_writer(tmp_path / "features.h5", kills, seed=1)
    assert r["survived"] == kills
    assert _check_store(tmp_path / "features.h5") > 0


@pytest.mark.slow
def test_store_survives_hundreds_of_sigkills(tmp_path):
    kills = int(300 * SCALE)
    r = _kill_store_writer(tmp_path / "features.h5", kills, seed=2)
    assert r["survived"] == kills
    print(f"\nstore kill loop: {kills} SIGKILLs, all survived; {_check_store(tmp_path / 'features.h5')} rows committed")


# --------------------------------------------------------------------------- featkit extract, killed in a chain

ENV = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}  # the checkout's featkit, one thread
FIT = ["fit", "--head", f"{LOGREG},{SVM},{MLP}", "--epochs", "3", "--no-progress"]


def _featkit(*args) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "featkit", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=ENV)


def _extract_args(photos: Path, cache: Path) -> list[str]:
    return ["extract", str(photos), "--cache", str(cache), *FAST, "--batch-size", "4"]


def _run(args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "featkit", *args], capture_output=True, text=True, env=ENV, timeout=600)


def _cache_state(cache: Path):
    from featkit.cache.names import cache_file
    from featkit.cache.store import FeatureStore

    with FeatureStore.open(cache_file(cache)) as s:
        assert s.verify().ok
        order = np.argsort(s.column("photo_id"))
        cols = {k: s.column(k)[order].tolist() for k in ("photo_id", "city", "split", "path")}
        return cols, s.read_features(np.arange(s.n_rows), dtype=np.float32)[order], sorted(r["photo_id"] for r in s.failed())


def _kill_extract_chain(tmp_path: Path, kills: int, seed: int) -> dict:
    photos = make_photos(tmp_path / "photos", n=16)
    (photos / "Paris" / "broken.jpg").write_bytes(b"not a jpeg")
    ref = tmp_path / "ref"
    r = _run(_extract_args(photos, ref))
    assert r.returncode == 0, r.stderr
    cache = tmp_path / "cache"
    rnd = random.Random(seed)
    started = landed = 0
    for _ in range(kills):
        proc = _featkit(*_extract_args(photos, cache))
        # kill once the run is under way: after the cache exists, at a random moment of its writes
        t0 = time.time()
        while not (cache / "features.h5").exists() and proc.poll() is None and time.time() - t0 < 120:
            time.sleep(0.01)
        time.sleep(rnd.uniform(0.0, 1.5))
        landed += proc.poll() is None  # still running: the kill cut it short
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        started += 1
        if (cache / "features.h5").exists():
            _cache_state(cache)  # committed rows readable after every kill
    r = _run(_extract_args(photos, cache))
    assert r.returncode == 0, r.stderr
    got, want = _cache_state(cache), _cache_state(ref)
    assert got[0] == want[0] and got[2] == want[2] == ["Paris/broken.jpg"]
    assert np.array_equal(got[1], want[1])  # bit-equal features (CPU)
    return {"kills": started, "landed": landed}


def test_extract_survives_a_kill_chain(tmp_path):
    r = _kill_extract_chain(tmp_path, max(1, int(4 * SCALE)), seed=3)
    assert r["landed"] >= 1, r


@pytest.mark.slow
def test_extract_survives_a_long_kill_chain(tmp_path):
    kills = int(40 * SCALE)
    r = _kill_extract_chain(tmp_path, kills, seed=4)
    assert r["kills"] == kills and r["landed"] >= kills // 2, r
    print(f"\nextract kill chain: {kills} SIGKILLs ({r['landed']} mid-run), final cache bit-equal to an uninterrupted run")


# --------------------------------------------------------------------------- featkit fit, killed while saving heads

def _kill_fit(tmp_path: Path, kills: int, seed: int) -> dict:
    from featkit.cache.shelf import fitted_head_files
    from featkit.cache.shelf import load_head

    photos = make_photos(tmp_path / "photos", n=16)
    cache = tmp_path / "cache"
    assert _run(_extract_args(photos, cache)).returncode == 0
    rnd = random.Random(seed)
    loaded = landed = 0
    for _ in range(kills):
        proc = _featkit(*FIT, "--cache", str(cache))
        time.sleep(rnd.uniform(0.5, 6.0))
        landed += proc.poll() is None
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        fitted, _ = fitted_head_files(cache)
        for paths in fitted.values():
            for p in paths:  # every listed head is whole: it loads
                load_head(p)
                loaded += 1
        leftovers = [p.name for p in (cache / "heads").glob("*") if p.suffix == ".joblib" and p not in [q for v in fitted.values() for q in v]]
        assert not leftovers, leftovers
    r = _run([*FIT, "--cache", str(cache)])
    assert r.returncode == 0, r.stderr
    assert "warning" not in r.stderr
    return {"kills": kills, "landed": landed, "heads_loaded": loaded}


def test_fit_survives_kills_while_saving(tmp_path):
    r = _kill_fit(tmp_path, max(1, int(3 * SCALE)), seed=5)
    assert r["landed"] >= 1, r


@pytest.mark.slow
def test_fit_survives_many_kills(tmp_path):
    kills = int(25 * SCALE)
    r = _kill_fit(tmp_path, kills, seed=6)
    assert r["landed"] >= kills // 2, r
    print(f"\nfit kill loop: {kills} SIGKILLs ({r['landed']} mid-run); {r['heads_loaded']} listed heads loaded whole, none half-written")
