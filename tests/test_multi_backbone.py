"""Several backbones in one cache folder: one shared split, heads per backbone, one comparison."""

from __future__ import annotations

import hashlib
import json
import shutil

import numpy as np
import pytest

import featkit
from conftest import FAST, LOGREG, make_photos
from featkit.cli import app
from featkit.errors import UntrustedHeadWarning
from featkit.cache.names import backbone_keys, cache_file, heads_dir
from featkit.cache.store import FeatureStore

SECOND = "timm:tf_efficientnet_lite0"  # mean = std = 0.5 in its config: a family unlike VGG16
SECOND_KEY = "timm-tf_efficientnet_lite0"
QUICK = dict(weights="random", batch_size=8, workers=0, progress=False, test_size=3, val_size=2)


def _splits(path):
    with FeatureStore.open(path) as store:
        return dict(zip(store.column("photo_id"), store.column("split")))


def _sha(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def two_backbones(tmp_path_factory):
    root = tmp_path_factory.mktemp("multi")
    photos = make_photos(root / "photos", cities=("Paris", "Tokyo", "Venice"), n=10)
    cache = root / "cache"
    featkit.extract(photos, cache, image_size=32, **QUICK)
    first = _sha(cache_file(cache))
    featkit.extract(photos, cache, backbone=SECOND, image_size=64, **QUICK)
    return photos, cache, first


def test_second_backbone_gets_its_own_file_the_same_split_and_leaves_the_first_alone(two_backbones):
    photos, cache, first_sha = two_backbones
    keys = backbone_keys(cache)
    assert keys == ["vgg16", SECOND_KEY]
    second = cache_file(cache, keys[1])
    assert cache_file(cache).name == "features.h5" and second.name == "features-timm-tf_efficientnet_lite0.h5"
    assert _sha(cache_file(cache)) == first_sha  # not one byte of the first backbone's file changed
    assert _splits(cache_file(cache)) == _splits(second) and len(_splits(second)) == 30
    with FeatureStore.open(second) as store:
        assert store.identity["arch"] == SECOND and store.identity["mean"] == [0.5, 0.5, 0.5]


def test_heads_per_backbone_and_one_comparison_of_every_pair(two_backbones, tmp_path):
    photos, cache, _ = two_backbones
    keys = backbone_keys(cache)
    records = featkit.fit(cache, head=LOGREG, progress=False, log=lambda m: None)
    assert [r["backbone"] for r in records] == keys
    assert (heads_dir(cache) / f"{LOGREG}.joblib").exists() and (heads_dir(cache, keys[1]) / f"{LOGREG}.joblib").exists()
    results, paths = featkit.compare(cache, tmp_path / "reports", leaks=False)
    names = [f"{k}/{LOGREG}" for k in keys]
    assert set(results["heads"]) == set(names)
    pair = results["ranking"]["pairs"]
    assert len(pair) == 1 and {next(iter(pair.values()))["a"], next(iter(pair.values()))["b"]} == set(names)
    assert results["heads"][names[0]]["n"] == results["heads"][names[1]]["n"] == 9  # the same 9 test photos
    md = paths["md"].read_text()
    assert "## Backbone x head" in md and "Backbone × head" in paths["html"].read_text()
    # a head of one backbone put among the other's heads is refused, naming both backbones
    stray = heads_dir(cache, keys[1]) / "stray.joblib"
    manifest = heads_dir(cache, keys[1]) / "manifest.json"
    saved = manifest.read_text()
    shutil.copy(heads_dir(cache) / f"{LOGREG}.joblib", stray)
    try:
        with pytest.warns(UntrustedHeadWarning, match="stray.joblib"):  # not in this folder's manifest: never loaded
            featkit.compare(cache, tmp_path / "reports", leaks=False)
        entries = json.loads(saved)
        entries["heads"]["stray.joblib"] = json.loads((heads_dir(cache) / "manifest.json").read_text())["heads"][f"{LOGREG}.joblib"]
        manifest.write_text(json.dumps(entries))  # heads folders mixed up, manifests and all: the identity still tells
        with pytest.raises(featkit.FeatkitError, match=r"arch=vgg16.*arch=timm:tf_efficientnet_lite0"):
            featkit.compare(cache, tmp_path / "reports", leaks=False)
    finally:
        stray.unlink()
        manifest.write_text(saved)
    # predict uses the named backbone's head and rebuilds that backbone
    files = sorted((photos / "Tokyo").glob("*.jpg"))[:3]
    preds = featkit.predict(files, cache, head=f"{keys[1]}/{LOGREG}", top=3)
    assert len(preds) == 3 and all(p.error is None and len(p.top) == 3 for p in preds)
    # the same numbers the head saw in the cache (this backbone resizes bicubic, as its config says)
    from featkit.cache.shelf import load_head

    est, _ = load_head(heads_dir(cache, keys[1]) / f"{LOGREG}.joblib")
    with FeatureStore.open(cache_file(cache, keys[1])) as store:
        ids = list(store.column("path"))
        X = store.read_features(np.array([ids.index(str(f)) for f in files]))
    want = est.predict_proba(X)
    for p, row in zip(preds, want):
        assert p.probabilities[p.city] == pytest.approx(row.max(), abs=1e-4)


def test_a_second_backbone_under_another_split_protocol_is_refused(two_backbones, tmp_path):
    photos, cache, _ = two_backbones
    other = tmp_path / "cache"
    shutil.copytree(cache, other)
    with pytest.raises(featkit.FeatkitError, match="shares one split"):
        featkit.extract(photos, other, backbone="resnet18", image_size=32, **{**QUICK, "test_size": 4})
    assert len(backbone_keys(other)) == 2  # nothing written for the refused backbone


def test_split_redraws_every_backbone_alike_and_fit_can_take_one_backbone(two_backbones, tmp_path, runner):
    photos, cache, _ = two_backbones
    other = tmp_path / "cache"
    shutil.copytree(cache, other)
    keys = backbone_keys(other)
    counts = featkit.split(other, test_size=4, val_size=1)
    assert counts["test"] == {"Paris": 4, "Tokyo": 4, "Venice": 4}
    assert _splits(cache_file(other, keys[0])) == _splits(cache_file(other, keys[1]))
    r = runner.invoke(app, ["fit", "--head", LOGREG, "--backbone", keys[1], "--cache", str(other), "--no-progress"])
    assert r.exit_code == 0, r.output
    assert "1 head(s) fitted" in r.output
    r = runner.invoke(app, ["fit", "--backbone", "resnet50", "--cache", str(other)])
    assert r.exit_code == 2 and "holds no features of backbone 'resnet50'" in r.output
    r = runner.invoke(app, ["extract", str(photos), "--cache", str(other), "--backbone", "resnet18", *FAST, "--test-size", "4", "--val-size", "1"])
    assert r.exit_code == 0, r.output
    assert len(backbone_keys(other)) == 3
    assert _splits(cache_file(other, "resnet18")) == _splits(cache_file(other, keys[0]))


def test_backbone_keys_list_the_default_once_and_ignore_shards_and_strays(tmp_path):
    assert backbone_keys(tmp_path) == []
    for name in ("features.h5", "features-resnet50.h5", "features-vgg16.h5", "features-resnet50.h5.rank0-of-2.h5", "features-x.h5.creating"):
        (tmp_path / name).write_bytes(b"")
    assert backbone_keys(tmp_path) == ["vgg16", "resnet50"]
    assert cache_file(tmp_path, "vgg16").name == "features.h5" and heads_dir(tmp_path, "resnet50") == tmp_path / "heads" / "resnet50"


def test_one_extract_reads_the_sibling_caches_once_and_resolves_the_device_once(two_backbones, tmp_path, monkeypatch):
    import featkit.devices
    import featkit.extraction

    photos, cache, _ = two_backbones
    copy = tmp_path / "cache"
    shutil.copytree(cache, copy)
    calls = {"shared_splits": 0, "resolve_device": 0}

    def counted(name, f):
        def wrapper(*a, **k):
            calls[name] += 1
            return f(*a, **k)
        return wrapper

    monkeypatch.setattr(featkit.extraction, "shared_splits", counted("shared_splits", featkit.extraction.shared_splits))
    device = counted("resolve_device", featkit.devices.resolve_device)
    monkeypatch.setattr(featkit.devices, "resolve_device", device)  # what api.extract imports when called
    monkeypatch.setattr(featkit.extraction, "resolve_device", device)
    s = featkit.extract(photos, copy, pooling="avg", image_size=32, device="cpu", **QUICK)  # a third backbone: vgg16-avg
    assert s.n_extracted == 30
    assert calls == {"shared_splits": 1, "resolve_device": 1}
    assert _splits(cache_file(copy, "vgg16-avg")) == _splits(cache_file(copy))  # and the read split was the one used


def test_a_backbone_is_spelt_as_extract_takes_it_everywhere(two_backbones, tmp_path, runner):
    photos, cache, _ = two_backbones
    other = tmp_path / "cache"
    shutil.copytree(cache, other)

    def cli(*args):
        return runner.invoke(app, [*map(str, args), "--cache", str(other)])

    r = cli("fit", "--head", LOGREG, "--backbone", SECOND, "--no-progress")  # the spelling extract takes
    assert r.exit_code == 0 and "1 head(s) fitted" in r.output, r.output
    r = cli("fit", "--head", LOGREG, "--no-progress")
    assert r.exit_code == 0 and f"\n{SECOND}/{LOGREG}: val accuracy" in r.output and f"{SECOND_KEY}/{LOGREG}:" not in r.output, r.output
    r = cli("fit", "--backbone", "resnet50")
    assert r.exit_code == 2 and f"it holds: vgg16, {SECOND}" in r.output, r.output
    assert cli("verify", "--backbone", SECOND).exit_code == 0
    assert cli("verify", "--backbone", SECOND_KEY).exit_code == 0  # the old spelling still works
    photo = sorted((photos / "Paris").glob("*.jpg"))[0]
    r = runner.invoke(app, ["predict", str(photo), "--head", f"{SECOND}/{LOGREG}", "--cache", str(other)])
    assert r.exit_code == 0 and f"head {SECOND}/{LOGREG}" in r.output, r.output
    old = runner.invoke(app, ["predict", str(photo), "--head", f"{SECOND_KEY}/{LOGREG}", "--cache", str(other)])
    assert old.exit_code == 0 and old.stdout == r.stdout, old.output
    r = runner.invoke(app, ["predict", str(photo), "--head", f"resnet50/{LOGREG}", "--cache", str(other)])
    assert r.exit_code == 2 and f"fitted: vgg16/{LOGREG}, {SECOND}/{LOGREG}" in r.output, r.output
    r = runner.invoke(app, ["compare", "--cache", str(other), "--reports", str(tmp_path / "r"), "--no-leaks"])
    assert r.exit_code == 0 and f"{SECOND}/{LOGREG} " in r.output and f"{SECOND_KEY}/{LOGREG}" not in r.output, r.output
    data = json.loads((tmp_path / "r" / "compare.json").read_text())
    assert set(data["heads"]) == {f"vgg16/{LOGREG}", f"{SECOND_KEY}/{LOGREG}"}  # compare.json's keys stay the file keys
    assert data["heads"][f"{SECOND_KEY}/{LOGREG}"]["name"] == f"{SECOND}/{LOGREG}"
    assert data["heads"][f"{SECOND_KEY}/{LOGREG}"]["backbone_name"] == SECOND
    assert data["backbone_names"] == {"vgg16": "vgg16", SECOND_KEY: SECOND}


def test_weights_seed_and_split_seed_block_neither(two_backbones, tmp_path):
    """Another random-weights backbone with its own weights seed joins the cache's split; a re-split with a new
    split seed leaves every backbone's weights as they were, and later extractions follow the new split seed."""
    photos, cache, _ = two_backbones
    other = tmp_path / "cache"
    shutil.copytree(cache, other)
    third = dict(backbone="resnet18", image_size=32, **QUICK)
    s = featkit.extract(photos, other, weights_seed=5, **third)  # split seed 0, as recorded: not refused
    assert s.n_extracted == 30
    with FeatureStore.open(cache_file(other, "resnet18")) as store:
        assert store.provenance["weights_seed"] == 5 and store.split_protocol["seed"] == 0
    assert _splits(cache_file(other, "resnet18")) == _splits(cache_file(other))
    before = _splits(cache_file(other))
    featkit.split(other, split_seed=7, test_size=3, val_size=2)
    for key in backbone_keys(other):
        with FeatureStore.open(cache_file(other, key)) as store:
            assert store.split_protocol == {"seed": 7, "test_size": 3, "val_size": 2}
    assert _splits(cache_file(other)) != before and _splits(cache_file(other, "resnet18")) == _splits(cache_file(other))
    assert featkit.extract(photos, other, weights_seed=5, split_seed=7, **third).n_extracted == 0  # same weights, new split
    with pytest.raises(featkit.FeatkitError, match=r"split_seed=7 .*--split-seed"):
        featkit.extract(photos, other, weights_seed=5, **third)
    # the head on those weights predicts with them, rebuilt from the recorded weights seed (not the split's)
    featkit.fit(other, head=LOGREG, progress=False, log=lambda m: None)
    preds = featkit.predict(sorted((photos / "Tokyo").glob("*.jpg"))[:2], other, head=f"resnet18/{LOGREG}")
    assert all(p.error is None for p in preds)


def test_a_cache_recording_one_seed_is_read_as_its_split_seed(tmp_path):
    """A cache from before the seeds were separate recorded ``seed`` in its split protocol: that is its split seed."""
    photos = make_photos(tmp_path / "photos", cities=("Paris", "Tokyo"), n=8)
    cache = tmp_path / "cache"
    featkit.extract(photos, cache, image_size=32, **QUICK)
    with FeatureStore.open(cache_file(cache), writable=True) as store:
        store.record_split_protocol({"seed": 4, "test_size": 3, "val_size": 2})  # what a cache made with --seed 4 holds
    with pytest.raises(featkit.FeatkitError, match=r"split_seed=4"):
        featkit.extract(photos, cache, image_size=32, **QUICK)
    assert featkit.extract(photos, cache, image_size=32, split_seed=4, **QUICK).n_extracted == 0
    featkit.extract(photos, cache, backbone="resnet18", image_size=32, split_seed=4, weights_seed=9, **QUICK)  # beside it
    assert backbone_keys(cache) == ["vgg16", "resnet18"]
