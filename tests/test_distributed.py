"""Extraction under torchrun: two CPU ranks on gloo give the cache one process gives; joins resume."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch.distributed as dist

from featkit.cli import app
from conftest import FAST, make_photos
from featkit.backbones import load_backbone
from featkit.distributed import Ranks, extract_distributed, join_shards
from featkit.options import ExtractOptions
from featkit.cache.names import shard_files, shard_path
from featkit.errors import FeatkitError
from featkit.extraction import extract_features
from featkit.manifest import scan_photos
from featkit.cache.store import FeatureStore

TORCHRUN = Path(sys.executable).parent / "torchrun"
ONE_RANK = Ranks(rank=0, local_rank=0, world_size=1)


@pytest.fixture(scope="module")
def backbone():
    return load_backbone("random", image_size=32)


def _torchrun(photos: Path, cache: Path, cwd: Path) -> str:
    """``torchrun --nproc-per-node 2 --no-python featkit extract ...`` on CPU; its stdout."""
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"  # where the featkit command lives
    env["CUDA_VISIBLE_DEVICES"] = ""  # gloo on CPU, as in CI
    cmd = [str(TORCHRUN), "--standalone", "--nproc-per-node", "2", "--no-python", "featkit", "extract", str(photos), "--cache", str(cache), *FAST]
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def _contents(cache_file: Path):
    """photo_id -> (city, split, feature vector), photo_id -> (path, reason), and the identity."""
    with FeatureStore.open(cache_file) as s:
        X = s.read_features(np.arange(s.n_rows))
        rows = {pid: (city, split, X[i]) for i, (pid, city, split) in enumerate(zip(s.column("photo_id"), s.column("city"), s.column("split")))}
        assert len(rows) == s.n_rows, "a photo is stored twice"
        failed = {r["photo_id"]: (r["path"], r["reason"]) for r in s.failed()}
        return rows, failed, s.identity


def _assert_same(a, b):
    rows_a, failed_a, ident_a = a
    rows_b, failed_b, ident_b = b
    assert ident_a == ident_b
    assert failed_a == failed_b
    assert rows_a.keys() == rows_b.keys()
    for pid, (city, split, x) in rows_a.items():
        assert (city, split) == rows_b[pid][:2], pid
        # float16 storage; other batch compositions may round the last bit differently on CPU
        np.testing.assert_allclose(x, rows_b[pid][2], rtol=2e-3, atol=1e-3, err_msg=pid)


def test_torchrun_two_ranks_equal_one_process_and_rerun_does_nothing(tmp_path, runner):
    photos = make_photos(tmp_path / "photos", n=8)
    (photos / "Paris" / "empty.jpg").write_bytes(b"")
    (photos / "Tokyo" / "text.jpg").write_text("not an image")
    multi = tmp_path / "multi"

    out = _torchrun(photos, multi, tmp_path)
    assert "24 extracted, 2 skipped" in out, out  # rank 0 reports the whole run
    assert sorted(p.name for p in multi.iterdir()) == ["failed.csv", "features.h5", "features.h5.lock"], "shard files left behind"

    r = runner.invoke(app, ["extract", str(photos), "--cache", str(tmp_path / "single"), *FAST])
    assert r.exit_code == 0, r.output
    joined = _contents(multi / "features.h5")
    assert len(joined[0]) == 24 and set(joined[1]) == {"Paris/empty.jpg", "Tokyo/text.jpg"}
    _assert_same(joined, _contents(tmp_path / "single" / "features.h5"))
    assert (multi / "failed.csv").read_text() == (tmp_path / "single" / "failed.csv").read_text()

    out = _torchrun(photos, multi, tmp_path)
    assert "0 extracted, 0 skipped" in out and "26 already cached; cache holds 24 photos" in out, out
    assert sorted(p.name for p in multi.iterdir()) == ["failed.csv", "features.h5", "features.h5.lock"]
    _assert_same(_contents(multi / "features.h5"), joined)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def one_rank_group(monkeypatch):
    """The environment for a one-process gloo group in this process (the group is made by the code under test)."""
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(_free_port()))
    yield
    assert not dist.is_initialized(), "the process group outlived the extraction"


def _killed_run(root: Path, cache: Path, backbone):
    """What a killed two-rank run leaves: a cache holding 4 photos, two shards (overlapping by 2, one failure)."""
    net, spec = backbone
    photos = scan_photos(root)
    good = [p for p in photos if p.photo_id != "Paris/empty.jpg"]
    broken = [p for p in photos if p.photo_id == "Paris/empty.jpg"]
    kw = ExtractOptions(batch_size=4, workers=0, progress=False, test_size=0, val_size=0)  # all train: tiny subsets
    extract_features(good[:4], net, spec, cache, kw)
    extract_features(good[4:10], net, spec, shard_path(cache, 0, 2), kw)
    extract_features(good[8:12] + broken, net, spec, shard_path(cache, 1, 2), kw)
    return photos, good


def test_next_run_joins_a_killed_runs_shards_first(tmp_path, backbone, one_rank_group):
    root = make_photos(tmp_path / "photos", n=6)
    (root / "Paris" / "empty.jpg").write_bytes(b"")
    cache = tmp_path / "cache" / "features.h5"
    photos, _ = _killed_run(root, cache, backbone)
    shard0 = _contents(shard_path(cache, 0, 2))[0]

    net, spec = backbone
    s = extract_distributed(photos, net, spec, cache, ExtractOptions(batch_size=4, workers=0, progress=False, test_size=0, val_size=0), ONE_RANK)
    assert (s.n_already, s.n_extracted, s.n_skipped) == (4 + 8 + 1, 6, 0)
    assert (s.n_total_rows, s.n_total_failed) == (18, 1) and s.reporter
    assert shard_files(cache) == []
    rows, failed, _ = _contents(cache)
    assert set(rows) | set(failed) == {p.photo_id for p in photos}
    assert failed["Paris/empty.jpg"][1] == "empty file (0 bytes)"
    for pid, (city, split, x) in shard0.items():  # copied as stored, split and all
        assert rows[pid][:2] == (city, split) and np.array_equal(rows[pid][2], x)


def test_join_killed_midway_resumes_exactly_once(tmp_path, backbone, monkeypatch):
    root = make_photos(tmp_path / "photos", n=6)
    (root / "Paris" / "empty.jpg").write_bytes(b"")
    cache = tmp_path / "cache" / "features.h5"
    _, good = _killed_run(root, cache, backbone)
    identity = FeatureStore.open(cache).identity
    calls = {"n": 0}

    def crash_on_second_commit(self):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("power cut")

    monkeypatch.setattr(FeatureStore, "_before_commit", crash_on_second_commit)
    with FeatureStore.open_for_append(cache, identity) as store:
        with pytest.raises(RuntimeError, match="power cut"):
            join_shards(store, shard_files(cache), block_rows=3)
    assert len(shard_files(cache)) == 2  # shard 0's block 1 joined, block 2 written but not committed
    monkeypatch.undo()
    with FeatureStore.open_for_append(cache, identity) as store:
        assert store.n_rows == 4 + 3
        assert join_shards(store, shard_files(cache), block_rows=3) == 8 - 3
    assert shard_files(cache) == []
    rows, failed, _ = _contents(cache)
    assert len(rows) == 12 and set(failed) == {"Paris/empty.jpg"}
    assert set(rows) == {p.photo_id for p in good[:12]}


def test_shard_of_another_backbone_refused(tmp_path, backbone):
    root = make_photos(tmp_path / "photos", cities=("Paris", "Tokyo"), n=3)
    net, spec = backbone
    photos = scan_photos(root)
    cache = tmp_path / "features.h5"
    kw = ExtractOptions(workers=0, progress=False, test_size=0, val_size=0)
    extract_features(photos[:2], net, spec, cache, kw)
    extract_features(photos[2:], net, spec, shard_path(cache, 1, 2), replace(kw, dtype="float32"))
    with FeatureStore.open_for_append(cache, FeatureStore.open(cache).identity) as store:
        with pytest.raises(FeatkitError, match=r"shard file .*rank1-of-2\.h5 was built with .*differs in: dtype.*--overwrite"):
            join_shards(store, shard_files(cache))


def test_rank0_error_reaches_every_rank_as_one_line(tmp_path, backbone, one_rank_group):
    root = make_photos(tmp_path / "photos", cities=("Paris", "Tokyo"), n=3)
    net, spec = backbone
    cache = tmp_path / "features.h5"
    extract_features(scan_photos(root), net, spec, cache, ExtractOptions(dtype="float32", workers=0, progress=False, test_size=1, val_size=1))
    with pytest.raises(FeatkitError, match=r"^feature cache .* was built with .*differs in: dtype.*--overwrite") as e:
        extract_distributed(scan_photos(root), net, spec, cache, ExtractOptions(workers=0, progress=False, test_size=1, val_size=1), ONE_RANK)
    assert "\n" not in str(e.value)
    s = extract_distributed(scan_photos(root), net, spec, cache, ExtractOptions(workers=0, progress=False, test_size=1, val_size=1, overwrite=True), ONE_RANK)
    assert s.n_extracted == 6 and FeatureStore.open(cache).identity["dtype"] == "float16"


def test_a_failing_rank_fails_the_run_in_one_line(tmp_path, backbone, one_rank_group, monkeypatch):
    import featkit.distributed

    root = make_photos(tmp_path / "photos", cities=("Paris", "Tokyo"), n=3)
    net, spec = backbone

    def disk_full(*args, **kwargs):
        raise FeatkitError("disk full")

    monkeypatch.setattr(featkit.distributed, "write_batches", disk_full)
    with pytest.raises(FeatkitError, match=r"^rank 0 of 1 failed: disk full \(.*rerun the same command to resume\)$"):
        extract_distributed(scan_photos(root), net, spec, tmp_path / "features.h5", ExtractOptions(workers=0, progress=False, test_size=1, val_size=1), ONE_RANK)
