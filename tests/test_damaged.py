"""A damaged-cache table: every kind of damage gives one `error:` line naming the file and the fix, from every
command that reads the cache, never wrong numbers and never a traceback; `featkit verify` finds the same
damage, and `extract --repair` mends what can be mended row by row (bit-equal to the undamaged cache)."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
from typer.testing import CliRunner

from conftest import FAST, LOGREG, fitted_cache, make_photos
from featkit.cli import app
from featkit.cache.names import cache_file
from featkit.cache.store import FeatureStore


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("damaged")
    photos, cache = fitted_cache(root, n=12)
    return {"root": root, "photos": photos, "cache": cache}


@pytest.fixture
def cache(built, tmp_path) -> Path:
    dst = tmp_path / "cache"
    shutil.copytree(built["cache"], dst)
    return dst


def _features_in_test_split(path: Path) -> int:
    with FeatureStore.open(path) as s:
        return int(s.split_rows("test")[0])


# -- the damage, each a function of the cache file -------------------------------------------------------

def truncate(p: Path):
    data = p.read_bytes()
    p.write_bytes(data[: len(data) // 3])


def zero_bytes(p: Path):
    p.write_bytes(b"")


def not_hdf5(p: Path):
    p.write_bytes(b"PK\x03\x04 this is a zip, not a cache" * 100)


def overwrite_feature_bytes(p: Path):
    row = _features_in_test_split(p)
    with h5py.File(p, "r") as f:
        ds = f["features"]
        offset = ds.id.get_chunk_info(0).byte_offset + row * ds.shape[1] * ds.dtype.itemsize
    with open(p, "r+b") as fh:  # scribble over one test photo's features, as a bad sector or a stray write would
        fh.seek(offset)
        fh.write(b"\x7b" * 64)


def delete_dataset(p: Path):
    with h5py.File(p, "a") as f:
        del f["text/city"]


def identity_not_json(p: Path):
    with h5py.File(p, "a") as f:
        f.attrs["identity"] = "{arch: vgg16"


def more_rows_than_data(p: Path):
    with h5py.File(p, "a") as f:
        c = f.attrs["commit"].copy()
        c[0] = 10_000
        f.attrs["commit"] = c


def bogus_split(p: Path):
    with h5py.File(p, "a") as f:
        f["split"][0] = 7


def nan_features(p: Path):
    """NaN written into a committed row and its batch checksum forged to match: only the finiteness check can tell."""
    from featkit.cache.format import crc, TEXT_FIELDS, TextColumn

    row = _features_in_test_split(p)
    with h5py.File(p, "a") as f:
        ends = f["batches/end"][:]
        b = int(np.searchsorted(ends, row, side="right"))
        lo, hi = (int(ends[b - 1]) if b else 0), int(ends[b])
        x = f["features"][row]
        x[:5] = np.nan
        f["features"][row] = x
        raw = [TextColumn(f["text"][name]).read_raw(lo, hi)[0] for name in TEXT_FIELDS]
        f["batches/crc"][b] = crc(f["features"][lo:hi], raw)


def unknown_format(p: Path):
    with h5py.File(p, "a") as f:
        f.attrs["format"] = 99


def commit_garbled(p: Path):
    with h5py.File(p, "a") as f:
        f.attrs["commit"] = np.array([-1, 3], dtype=np.int64)


def deleted(p: Path):
    p.unlink()


# (damage, what the line must say, the fix it must name, whether extract --repair mends it)
TABLE = [
    (truncate, "damaged", "--overwrite", False),
    (zero_bytes, "damaged", "--overwrite", False),
    (not_hdf5, "damaged", "--overwrite", False),
    (overwrite_feature_bytes, "checksum", "--repair", True),
    (delete_dataset, "text/city", "--overwrite", False),
    (identity_not_json, "identity attribute is not JSON", "--overwrite", False),
    (more_rows_than_data, "records 10000 rows", "--overwrite", False),
    (bogus_split, "split", "--repair", True),
    (nan_features, "non-finite", "--repair", True),
    (unknown_format, "layout format 99", "upgrade featkit", False),
    (commit_garbled, "commit attribute", "--overwrite", False),
    (deleted, "no feature cache", "featkit extract", False),
]


def _one_error_line(r, path: Path, *must: str):
    lines = [ln for ln in r.stderr.splitlines() if ln.strip() and not ln.startswith("warning:")]
    assert r.exit_code != 0, r.output
    assert "Traceback" not in r.output and r.exception is None or isinstance(r.exception, SystemExit), r.output
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    assert str(path) in lines[0] or str(path.parent) in lines[0], lines[0]
    for m in must:
        assert m in lines[0], lines[0]


def _digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("damage,says,fix,repairable", TABLE, ids=[t[0].__name__ for t in TABLE])
def test_damaged_cache_gives_one_line_never_numbers(cache, tmp_path, damage, says, fix, repairable):
    path = cache_file(cache)
    damage(path)
    runner = CliRunner()
    heads = _digest(cache / "heads")
    reports = tmp_path / "reports"

    r = runner.invoke(app, ["compare", "--cache", str(cache), "--reports", str(reports), "--no-leaks"])
    _one_error_line(r, path, says, fix)
    assert not (reports / "compare.json").exists(), "numbers were reported from a damaged cache"

    r = runner.invoke(app, ["fit", "--head", LOGREG, "--cache", str(cache), "--no-progress"])
    _one_error_line(r, path, says, fix)
    assert _digest(cache / "heads") == heads, "a fit on a damaged cache replaced a good head"

    r = runner.invoke(app, ["verify", "--cache", str(cache)])
    # damage is verify's finding: exit 1, whether rows or the whole file; a file that is not there is an error (2)
    assert r.exit_code == (2 if damage is deleted else 1) and "Traceback" not in r.output, r.output
    assert says in r.stderr and fix in r.stderr, r.stderr
    if repairable is False and damage is not deleted:
        r = runner.invoke(app, ["verify", "--cache", str(cache), "--repair"])
        assert r.exit_code == 1 and "Traceback" not in r.output and fix in r.stderr, r.output


@pytest.mark.parametrize("damage", [t[0] for t in TABLE if t[3]], ids=[t[0].__name__ for t in TABLE if t[3]])
def test_repair_drops_and_re_extracts_only_the_damaged_rows(built, cache, damage):
    path = cache_file(cache)
    damage(path)
    runner = CliRunner()
    r = runner.invoke(app, ["extract", str(built["photos"]), "--cache", str(cache), *FAST, "--repair"])
    assert r.exit_code == 0, r.output
    assert "damaged rows were dropped and extracted again" in r.stdout
    n_again = int(r.stdout.split(" extracted")[0])
    assert 1 <= n_again < 36  # only the damaged batch's rows, not the whole cache
    r = runner.invoke(app, ["verify", "--cache", str(cache)])
    assert r.exit_code == 0 and "ok" in r.stdout, r.output

    def rows(p):
        with FeatureStore.open(p) as s:
            order = np.argsort(s.column("photo_id"))
            return [s.column(k)[order].tolist() for k in ("photo_id", "city", "split")], s.read_features(np.arange(s.n_rows))[order]

    (ids, X), (ids0, X0) = rows(path), rows(cache_file(built["cache"]))
    assert ids == ids0  # every photo once, in its old split
    # the same features as the undamaged cache; a batch of another size may round the last float16 bit otherwise on CPU
    np.testing.assert_allclose(X, X0, rtol=2e-3, atol=1e-3)
    r = runner.invoke(app, ["fit", "--head", LOGREG, "--cache", str(cache), "--no-progress"])
    assert r.exit_code == 0, r.output


def test_verify_repair_alone_drops_rows_and_says_how_to_extract_them(cache):
    path = cache_file(cache)
    overwrite_feature_bytes(path)
    r = CliRunner().invoke(app, ["verify", "--cache", str(cache), "--repair"])
    assert r.exit_code == 0, r.output
    assert "dropped" in r.stdout and "featkit extract" in r.stdout
    with FeatureStore.open(path) as s:
        assert s.verify().ok and s.n_rows < 36


def test_uncommitted_leftovers_are_not_read(cache):
    """Rows past the commit (a batch being written when the process died) are invisible to readers and cut on append."""
    path = cache_file(cache)
    with h5py.File(path, "a") as f:
        n = f["features"].shape[0]
        f["features"].resize(n + 5, axis=0)
        f["features"][n:] = np.nan
    r = CliRunner().invoke(app, ["verify", "--cache", str(cache)])
    assert r.exit_code == 0, r.output
    with FeatureStore.open(path, writable=True) as s:
        assert s.f["features"].shape[0] == s.n_rows == n


def test_first_layout_cache_is_read_and_upgraded(cache):
    """A cache written by an older featkit (variable-length strings, no checksums) still reads; appending (or
    verify --repair) rewrites it in the current layout with every row kept."""
    path = cache_file(cache)
    with FeatureStore.open(path) as s:
        cols = {k: s.column(k).tolist() for k in ("photo_id", "city", "split", "path", "owner")}
        X, attrs = s.read_features(np.arange(s.n_rows), dtype=np.float16), {k: s.f.attrs[k] for k in ("identity", "cache_id", "provenance", "split_protocol")}
    path.unlink()
    with h5py.File(path, "w") as f:  # the first layout, as featkit 0.1 wrote it
        f["features"] = X
        for k, v in cols.items():
            f.create_dataset(k, data=v, dtype=h5py.string_dtype("utf-8"))
        g = f.create_group("failed")
        for k in ("photo_id", "path", "reason"):
            g.create_dataset(k, shape=(0,), dtype=h5py.string_dtype("utf-8"))
        for k, v in attrs.items():
            f.attrs[k] = v
        f.attrs["n_rows"], f.attrs["n_failed"] = len(X), 0
    runner = CliRunner()
    r = runner.invoke(app, ["compare", "--cache", str(cache), "--reports", str(cache.parent / "reports"), "--no-leaks"])
    assert r.exit_code == 0, r.output  # read as it is: same split id, so the heads fitted on it still load
    r = runner.invoke(app, ["verify", "--cache", str(cache)])
    assert r.exit_code == 1 and "no checksums" in r.stderr
    r = runner.invoke(app, ["verify", "--cache", str(cache), "--repair"])
    assert r.exit_code == 0 and "ok" in r.stdout, r.output
    with FeatureStore.open(path) as s:
        assert not s.legacy and s.verify().ok
        assert {k: s.column(k).tolist() for k in cols} == cols
        assert np.array_equal(s.read_features(np.arange(s.n_rows), dtype=np.float16), X)


def test_overwrite_waits_for_no_one_it_refuses_while_another_process_writes(built, cache):
    """`extract --overwrite` while another extract holds the cache: refused, the cache untouched (it used to
    delete the file under the other process, which went on writing into a deleted file and exited 0)."""
    from featkit.cache.store import writer_lock

    path = cache_file(cache)
    before = hashlib.sha256(path.read_bytes()).hexdigest()
    lock = writer_lock(path)  # what a running extract holds
    try:
        r = CliRunner().invoke(app, ["extract", str(built["photos"]), "--cache", str(cache), *FAST, "--overwrite"])
        _one_error_line(r, path, "being written by another process")
        r = CliRunner().invoke(app, ["split", "--cache", str(cache), "--seed", "3"])
        _one_error_line(r, path, "being written by another process")
    finally:
        lock.release()
    assert hashlib.sha256(path.read_bytes()).hexdigest() == before


@pytest.mark.parametrize("damage", [overwrite_feature_bytes, bogus_split, nan_features], ids=lambda f: f.__name__)
def test_a_plain_extract_on_a_damaged_cache_does_not_report_success(built, cache, damage):
    """Row-level damage the extract did not cause: its new photos are kept, and it ends in one line saying
    the cache is damaged and how to mend it (it used to report success)."""
    path = cache_file(cache)
    damage(path)
    make_photos(built["photos"], cities=("London",), n=12, seed=3)
    r = CliRunner().invoke(app, ["extract", str(built["photos"]), "--cache", str(cache), *FAST])
    try:
        _one_error_line(r, path, "damaged", "--repair")
        if "extracted and committed" in r.stderr:  # found after the run (a bad split code is found before it)
            with FeatureStore.open(path) as s:
                assert "London" in s.cities()  # the run's work is kept
        else:
            assert damage is bogus_split, r.stderr
    finally:
        shutil.rmtree(built["photos"] / "London")


def test_a_refused_extract_leaves_no_cache_file(tmp_path):
    photos = make_photos(tmp_path / "photos", n=4)
    cache = tmp_path / "cache"
    r = CliRunner().invoke(app, ["extract", str(photos), "--cache", str(cache), *FAST, "--test-size", "10"])
    assert r.exit_code == 2 and "leave none for training" in r.output, r.output
    assert not cache_file(cache).exists()
