"""Heads are pickles, and unpickling runs code: only heads featkit's fit wrote (manifest + SHA-256) are loaded."""

from __future__ import annotations

import json
import pickle
import shutil

import pytest

import featkit
from conftest import LOGREG, MLP, make_photos
from featkit.cli import app
from featkit.errors import UntrustedHeadWarning
from featkit.cache.names import HEADS_MANIFEST
from featkit.cache.shelf import load_head, trusted_heads
from featkit.cache.names import heads_dir


class _Payload:
    """Unpickling this writes a marker file: what a planted head would do to the user."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    root = tmp_path_factory.mktemp("trust")
    photos = make_photos(root / "photos", cities=("Paris", "Tokyo"), n=10)
    cache = root / "cache"
    featkit.extract(photos, cache, weights="random", image_size=32, batch_size=8, workers=0, progress=False, test_size=3, val_size=2)
    featkit.fit(cache, head=LOGREG, progress=False, log=lambda m: None)
    return photos, cache


def _copy(cache, tmp_path):
    other = tmp_path / "cache"
    shutil.copytree(cache, other)
    return other


def test_fit_writes_a_manifest_of_its_heads_with_their_sha256(fitted):
    _, cache = fitted
    manifest = json.loads((heads_dir(cache) / HEADS_MANIFEST).read_text())
    assert set(manifest["heads"]) == {f"{LOGREG}.joblib"} and len(manifest["heads"][f"{LOGREG}.joblib"]["sha256"]) == 64
    trusted, ignored = trusted_heads(heads_dir(cache))
    assert [p.name for p in trusted] == [f"{LOGREG}.joblib"] and ignored == []


def test_a_planted_head_is_never_unpickled_and_a_stale_copy_never_replaces_the_real_one(fitted, tmp_path, runner):
    cache = _copy(fitted[1], tmp_path)
    marker = tmp_path / "PWNED"
    (heads_dir(cache) / "evil.joblib").write_bytes(pickle.dumps(_Payload(marker)))
    shutil.copy(heads_dir(cache) / f"{LOGREG}.joblib", heads_dir(cache) / f"{MLP}_backup.joblib")
    r = runner.invoke(app, ["compare", "--cache", str(cache), "--reports", str(tmp_path / "r"), "--no-leaks"])
    assert r.exit_code == 0, r.output
    assert "warning: ignored 2 head file(s)" in r.output and "evil.joblib" in r.output and "pickle" in r.output
    assert not marker.exists()
    data = json.loads((tmp_path / "r" / "compare.json").read_text())
    assert set(data["heads"]) == {LOGREG}
    with pytest.warns(UntrustedHeadWarning):
        preds = featkit.predict([str(p) for p in sorted((fitted[0] / "Paris").glob("*.jpg"))[:1]], cache)
    assert preds[0].error is None and not marker.exists()
    with pytest.raises(featkit.FeatkitError, match="not one featkit's fit wrote"):
        load_head(heads_dir(cache) / "evil.joblib")
    assert not marker.exists()


def test_an_edited_head_is_refused_and_with_none_left_compare_says_why(fitted, tmp_path, runner):
    cache = _copy(fitted[1], tmp_path)
    head = heads_dir(cache) / f"{LOGREG}.joblib"
    data = bytearray(head.read_bytes())
    data[len(data) // 2] ^= 0xFF
    head.write_bytes(bytes(data))
    with pytest.raises(featkit.FeatkitError, match="changed since"):
        load_head(head)
    r = runner.invoke(app, ["compare", "--cache", str(cache), "--reports", str(tmp_path / "r"), "--no-leaks"])
    assert r.exit_code == 2
    assert "error: no fitted heads" in r.output and "1 file(s) there are not featkit's own" in r.output
    # refitting trusts the new file again
    r = runner.invoke(app, ["fit", "--head", LOGREG, "--cache", str(cache), "--no-progress"])
    assert r.exit_code == 0, r.output
    assert [p.name for p in trusted_heads(heads_dir(cache))[0]] == [f"{LOGREG}.joblib"]


def test_concurrent_saves_keep_every_manifest_entry(tmp_path):
    """Many processes saving heads into one folder at once: the manifest lists every one (it used to keep
    only the last writer's view of it)."""
    import subprocess
    import sys

    from conftest import REPO

    code = (
        "import sys; from sklearn.dummy import DummyClassifier; from featkit.cache.shelf import save_head\n"
        "i = int(sys.argv[1]); folder = sys.argv[2]\n"
        "for k in range(5): save_head(f'{folder}/h{i}_{k}.joblib', DummyClassifier(), {'head': f'h{i}_{k}'})\n"
    )
    env = {**__import__("os").environ, "PYTHONPATH": str(REPO)}
    procs = [subprocess.Popen([sys.executable, "-c", code, str(i), str(tmp_path)], env=env) for i in range(6)]
    assert all(p.wait(timeout=300) == 0 for p in procs)
    manifest = json.loads((tmp_path / HEADS_MANIFEST).read_text())
    assert len(manifest["heads"]) == 30
    trusted, ignored = trusted_heads(tmp_path)
    assert len(trusted) == 30 and not ignored


def test_predict_refuses_heads_copied_in_from_another_cache_naming_the_file(fitted, tmp_path, runner):
    """The whole heads folder (manifest included) copied from another cache with other places: each head is
    trusted as featkit's own, but it was not fitted on this cache, and predict refuses it instead of
    answering with places this cache does not hold."""
    photos, cache = fitted
    other = tmp_path / "other"
    featkit.extract(make_photos(tmp_path / "p2", cities=("Venice", "London"), n=10), other, weights="random", image_size=32,
                    batch_size=8, workers=0, progress=False, test_size=3, val_size=2)
    shutil.rmtree(heads_dir(other), ignore_errors=True)
    shutil.copytree(heads_dir(cache), heads_dir(other))
    r = runner.invoke(app, ["predict", str(photos / "Paris" / "000.jpg"), "--cache", str(other), "--workers", "0"])
    assert r.exit_code != 0, r.output
    errors = [line for line in r.output.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and str(heads_dir(other) / f"{LOGREG}.joblib") in errors[0] and "not fitted on this cache" in errors[0], r.output
    assert "Paris" not in r.output.replace(str(photos / "Paris"), "")
