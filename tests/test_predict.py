"""`featkit predict` and `featkit.predict`: the head's own numbers on new photos, every input kind,
unreadable photos reported and skipped, a backbone other than the head's refused, the README example."""

from __future__ import annotations

import csv
import json
import re
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from PIL import Image

import featkit
from conftest import LOGREG, REPO, SVM, make_photos
from featkit.backbone_spec import BackboneSpec
from featkit.backbones import load_backbone
from featkit.cli import app
from featkit.errors import FeatkitError
from featkit.extraction import extraction_provenance
from featkit.cache.shelf import load_head
from featkit.options import ExtractOptions
from featkit.photogen import render_array, render_jpeg, write_photos
from featkit.prediction import Prediction, Predictor
from featkit.cache.names import cache_file, heads_dir
from featkit.cache.store import FeatureStore

SIZE = 32
CITIES = ("Paris", "Tokyo", "Venice")


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """A tiny cache (3 cities x 10 photos, 32 px, random weights of seed 0), logreg and svm fitted on it.
    (A cache extracted with a weights file: the README example's test.)"""
    root = tmp_path_factory.mktemp("built")
    photos = make_photos(root / "photos", cities=CITIES, n=10)
    cache = root / "cache"
    featkit.extract(photos, cache, weights="random", image_size=SIZE, batch_size=8, workers=0, progress=False, test_size=2, val_size=2)
    featkit.fit(cache, head=f"{LOGREG},{SVM}", progress=False, log=lambda m: None)
    return {"root": root, "photos": photos, "cache": cache}


@pytest.fixture(scope="module")
def predictor(built):
    """No ``weights``: the ones the cache's provenance records (random, seed 0)."""
    return Predictor(built["cache"], LOGREG, workers=0)


def _png(path: Path, mode: str = "RGB") -> Path:
    Image.fromarray(render_array("Tokyo", 7, size=(48, 40))).convert(mode).save(path)
    return path


# -- the numbers --------------------------------------------------------------------------------
def test_predictions_are_the_heads_own_on_the_cached_features(built, predictor):
    """Photos of the cache, predicted from their files, get what the head gives their cached features:
    the same preprocessing, the same backbone, the same float16 round trip."""
    with FeatureStore.open(cache_file(built["cache"])) as store:
        paths = list(store.column("path"))
        X = store.read_features(np.arange(store.n_rows))
    head, _ = load_head(heads_dir(built["cache"]) / f"{LOGREG}.joblib")
    want = head.predict_proba(X)
    got = predictor.predict(paths, top=3)
    assert [p.source for p in got] == paths and all(isinstance(p, Prediction) and p.error is None for p in got)
    cities = [str(c) for c in head.classes_]
    assert [p.city for p in got] == [cities[j] for j in want.argmax(1)]
    probs = np.array([[p.probabilities[c] for c in cities] for p in got])
    np.testing.assert_allclose(probs, want, atol=1e-5)
    top = got[0].top
    assert len(top) == 3 and [c for c, _ in top] == [cities[j] for j in np.argsort(-want[0])]
    assert top[0][1] >= top[1][1] >= top[2][1] and abs(sum(p for _, p in top) - 1) < 1e-5


# -- inputs -------------------------------------------------------------------------------------
def test_folders_are_walked_and_lists_keep_their_order(tmp_path, built, predictor):
    d = tmp_path / "new"
    (d / "deeper").mkdir(parents=True)
    src = built["photos"]
    shutil.copy(src / "Paris" / "001.jpg", d / "b.jpg")
    shutil.copy(src / "Tokyo" / "001.jpg", d / "deeper" / "a.JPG")
    shutil.copy(src / "Venice" / "001.jpg", d / ".hidden.jpg")
    (d / "notes.txt").write_text("not a photo")
    got = predictor.predict(d)
    assert [p.source for p in got] == [str(d / "b.jpg"), str(d / "deeper" / "a.JPG")]
    assert [p.city for p in got] == ["Paris", "Tokyo"]
    one = src / "Venice" / "002.jpg"
    mixed = predictor.predict([one, str(d), d / "b.jpg"])
    assert [p.source for p in mixed] == [str(one), str(d / "b.jpg"), str(d / "deeper" / "a.JPG"), str(d / "b.jpg")]
    assert mixed[0].city == "Venice" and mixed[1].probabilities == mixed[3].probabilities == got[0].probabilities


def test_in_memory_pictures_match_their_png_file(tmp_path, predictor):
    rgb, gray = _png(tmp_path / "rgb.png"), _png(tmp_path / "gray.png", "L")
    with Image.open(rgb) as im:
        im.load()
        got = predictor.predict([rgb, im, np.asarray(im), gray, np.asarray(Image.open(gray))])
    assert [p.source for p in got] == [str(rgb), "<image 1>", "<image 2>", str(gray), "<image 4>"]
    assert all(p.error is None for p in got)
    assert got[0].probabilities == got[1].probabilities == got[2].probabilities
    assert got[3].probabilities == got[4].probabilities  # an HxW array is a grayscale photo
    [alone] = predictor.predict(np.asarray(Image.open(rgb)))  # in a batch of its own: equal up to float rounding
    assert alone.source == "<image 0>" and alone.city == got[0].city
    np.testing.assert_allclose(list(alone.probabilities.values()), list(got[0].probabilities.values()), atol=1e-4)


def test_unreadable_and_missing_photos_are_reported_and_the_rest_predicted(tmp_path, built, predictor):
    (tmp_path / "empty.jpg").write_bytes(b"")
    (tmp_path / "text.jpg").write_text("this is not an image")
    (tmp_path / "nothing").mkdir()
    good = built["photos"] / "Tokyo" / "003.jpg"
    inputs = [tmp_path / "empty.jpg", good, tmp_path / "gone.jpg", tmp_path / "text.jpg", np.zeros((4, 4), np.float32), tmp_path / "nothing"]
    got = predictor.predict(inputs)
    errors = [p.error for p in got]
    assert errors[0] == "empty file (0 bytes)" and errors[1] is None and errors[2] == "file not found"
    assert errors[3] == "not an image Pillow can identify" and "uint8" in errors[4] and "no image files" in errors[5]
    assert got[1].city == "Tokyo" and all(p.top == [] for p in got if p.error)
    assert got[1].to_dict()["top"][0]["city"] == "Tokyo" and got[0].to_dict() == {"source": str(inputs[0]), "top": [], "error": "empty file (0 bytes)"}


def test_bad_arguments_are_refused(tmp_path, built, predictor):
    with pytest.raises(FeatkitError, match="`top` must be .* at least 1; got 0") as e:
        predictor.predict(built["photos"], top=0)
    assert e.value.param == "top"
    with pytest.raises(FeatkitError, match="`batch_size` must be at least 1"):
        Predictor(built["cache"], batch_size=0)
    with pytest.raises(FeatkitError, match="input 1 is a int"):
        predictor.predict([built["photos"], 3])
    with pytest.raises(FeatkitError, match="nothing to predict"):
        predictor.predict([])
    with pytest.raises(FeatkitError, match=rf"no fitted head 'xgb' in .*heads; fitted: {', '.join(sorted((LOGREG, SVM)))}") as e:
        Predictor(built["cache"], "xgb")
    assert e.value.param == "head"
    (tmp_path / "heads").mkdir()
    with pytest.raises(FeatkitError, match="no fitted heads in .*run `featkit fit`"):
        Predictor(tmp_path)


# -- which backbone -----------------------------------------------------------------------------
def test_weights_of_another_backbone_are_refused_naming_both(tmp_path, built):
    net, _ = load_backbone("random", image_size=SIZE, seed=1)
    other = tmp_path / "other.pth"
    torch.save(net.features.state_dict(), other)
    with pytest.raises(FeatkitError) as e:
        Predictor(built["cache"], LOGREG, weights=str(other))
    msg = str(e.value)
    assert e.value.param == "weights" and "\n" not in msg
    assert re.search(rf"head '{LOGREG}' .* was built with \[.*weights_sha256=\w{{12}}.*\] but this run uses \[.*weights_sha256=\w{{12}}", msg), msg
    assert re.search(r"differs in: weights_sha256\).*random:seed=0.*`weights` given are file:other\.pth", msg), msg


def test_extraction_records_where_its_weights_are():
    spec = BackboneSpec("vgg16", "random:seed=3", "0" * 64, SIZE, (0.5,) * 3, (0.2,) * 3, "avg", 512)
    prov = extraction_provenance(torch.device("cpu"), spec, ExtractOptions())
    assert (prov["weights_source"], prov["weights_seed"]) == ("random", 3)
    prov = extraction_provenance(torch.device("cpu"), spec, ExtractOptions(), weights_source="/w/vgg.pth")
    assert prov["weights_source"] == "/w/vgg.pth"


def _with_provenance(tmp_path: Path, built, **changes) -> Path:
    """A copy of the built cache (and heads) whose provenance has ``changes`` (None: the key removed)."""
    cache = tmp_path / "cache"
    shutil.copytree(built["cache"], cache)
    with h5py.File(cache_file(cache), "a") as f:
        prov = json.loads(f.attrs["provenance"])
        for k, v in changes.items():
            prov.pop(k, None) if v is None else prov.__setitem__(k, v)
        f.attrs["provenance"] = json.dumps(prov)
    return cache


def test_default_weights_come_from_the_caches_provenance(tmp_path, built, predictor):
    with FeatureStore.open(cache_file(built["cache"])) as store:
        assert (store.provenance["weights_source"], store.provenance["weights_seed"]) == ("random", 0)
    assert predictor.spec.weights == "random:seed=0"  # built without `weights`
    old = _with_provenance(tmp_path / "old", built, weights_source=None, weights_seed=None)  # a cache from before
    with pytest.raises(FeatkitError, match=r"does not record where its backbone's weights are .*random:seed=0.*pass `weights` PATH"):
        Predictor(old, SVM)
    moved = _with_provenance(tmp_path / "moved", built, weights_source=str(tmp_path / "gone.pth"))
    with pytest.raises(FeatkitError, match=r"weights file .*gone\.pth, which is not there any more; pass `weights` PATH"):
        Predictor(moved, SVM)
    # given weights win, and pass the identity check when they are the head's: the same tensors from a file
    same = tmp_path / "same.pth"
    torch.save(predictor.net.features.state_dict(), same)
    again = Predictor(moved, SVM, weights=str(same), workers=0)
    assert again.spec.weights == "file:same.pth" and again.predict(built["photos"] / "Paris" / "000.jpg")[0].city == "Paris"


# -- the command --------------------------------------------------------------------------------
def run(runner, *args):
    return runner.invoke(app, ["predict", *map(str, args)])


def test_cli_table_json_csv_and_exit_codes(runner, tmp_path, built):
    cache, photos = built["cache"], built["photos"]
    (tmp_path / "broken.jpg").write_text("not an image")
    paris, tokyo = photos / "Paris" / "004.jpg", photos / "Tokyo" / "004.jpg"
    out_csv = tmp_path / "out" / "pred.csv"
    r = run(runner, paris, tmp_path / "broken.jpg", tokyo, "--cache", cache, "--head", LOGREG, "--top", "2", "--csv", out_csv)
    assert r.exit_code == 0, r.output
    lines = r.stdout.splitlines()
    assert len(lines) == 2 and lines[0].startswith(f"{paris}  Paris 0.") and lines[1].startswith(f"{tokyo}  Tokyo 0.")
    assert re.fullmatch(r"\S+  Paris 0\.\d\d  \w+ 0\.\d\d", lines[0]), lines[0]
    assert f"{tmp_path / 'broken.jpg'}: unreadable (not an image Pillow can identify)" in r.stderr
    assert re.search(rf"2 predicted, 1 unreadable; head {LOGREG} \(val accuracy [\d.]+\), backbone vgg16 weights=random:seed=0", r.stderr)
    rows = list(csv.DictReader(out_csv.open()))
    assert list(rows[0]) == ["source", "rank", "city", "probability", "error"]
    assert [(r_["source"], r_["rank"], r_["city"]) for r_ in rows if r_["rank"] == "1"] == [(str(paris), "1", "Paris"), (str(tokyo), "1", "Tokyo")]
    assert len(rows) == 5 and rows[2]["error"] == "not an image Pillow can identify" and rows[2]["city"] == ""

    # no --head: the best on validation (the first by name on a tie); --top past the cities: all of them
    records = {n: load_head(heads_dir(cache) / f"{n}.joblib")[1] for n in (LOGREG, SVM)}
    best = max(sorted(records), key=lambda n: records[n]["val_score"])
    r = run(runner, photos / "Venice", "--cache", cache, "--json", "--top", "10")
    assert r.exit_code == 0, r.output
    objs = [json.loads(line) for line in r.stdout.splitlines()]
    assert len(objs) == 10 and all(o["error"] is None and o["top"][0]["city"] == "Venice" for o in objs)
    assert len(objs[0]["top"]) == 3 and set(objs[0]["top"][0]) == {"city", "probability"}
    assert objs[0]["source"] == str(photos / "Venice" / "000.jpg")
    assert f"10 predicted, 0 unreadable; head {best} (val accuracy" in r.stderr


def test_cli_failures(runner, tmp_path, built):
    cache = built["cache"]
    (tmp_path / "empty.jpg").write_bytes(b"")
    r = run(runner, tmp_path / "empty.jpg", tmp_path / "gone.jpg", "--cache", cache, "--json")
    assert r.exit_code == 1, r.output
    assert r.stderr.strip().splitlines()[-1] == "error: none of the 2 photo(s) could be read"
    assert [json.loads(line)["error"] for line in r.stdout.splitlines()] == ["empty file (0 bytes)", "file not found"]
    for args, fragment in (
        (["--top", "0"], "--top must be a whole number of cities, at least 1"),
        (["--head", "xgb"], f"fitted: {', '.join(sorted((LOGREG, SVM)))}"),
        (["--weights", "random", "--seed", "1"], "--weights given are random:seed=1"),
        (["--batch-size", "0"], "--batch-size must be at least 1"),
    ):
        r = run(runner, built["photos"] / "Paris" / "000.jpg", "--cache", cache, *args)
        assert r.exit_code == 2 and "Traceback" not in r.output, r.output
        [err] = [line for line in r.output.splitlines() if line.startswith("error: ")]
        assert fragment in err, err
    r = run(runner, tmp_path, "--cache", tmp_path / "nocache")
    assert r.exit_code == 2 and "run `featkit fit`" in r.output


# -- the README ---------------------------------------------------------------------------------
MARKER = "<!-- readme-predict-example: tests/test_predict.py runs this block -->"


def readme_example() -> str:
    text = (REPO / "README.md").read_text()
    after = text.split(MARKER, 1)[1]
    m = re.match(r"\s*```python\n(.*?)```", after, re.S)
    assert m, "the README's predict example must follow its marker as a ```python block"
    return m.group(1)


def test_readme_predict_example_runs_verbatim(tmp_path, monkeypatch, capsys):
    """Full-size VGG16 (random weights saved as the user's weights file) at 224 px, 2 cities x 8 photos
    (logreg's L-BFGS on 25,088 features takes a few seconds for two cities, ten times that for three)."""
    import torchvision

    cities = ["Paris", "Tokyo"]
    write_photos(tmp_path / "photos", cities, 8, size=(160, 120))
    torch.save(torchvision.models.vgg16().features.state_dict(), tmp_path / "vgg16_features.pth")
    (tmp_path / "new").mkdir()
    (tmp_path / "new" / "cafe.jpg").write_bytes(render_jpeg("Paris", 100, size=(160, 120)))
    (tmp_path / "new" / "station.jpg").write_bytes(render_jpeg("Tokyo", 100, size=(160, 120)))
    monkeypatch.chdir(tmp_path)
    exec(compile(readme_example(), "README.md", "exec"), {"__name__": "__main__"})
    printed = [line for line in capsys.readouterr().out.splitlines() if line.startswith("new/")]
    assert len(printed) == 2, printed
    for line, name in zip(printed, ("new/cafe.jpg", "new/station.jpg")):
        assert re.fullmatch(rf"{name} (Paris|Tokyo) \d\.\d\d  (Paris|Tokyo) \d\.\d\d", line), line
    assert (tmp_path / "reports" / "compare.md").exists()
    with FeatureStore.open(cache_file(tmp_path / "cache")) as store:  # where predict found the weights
        assert store.provenance["weights_source"] == str(tmp_path / "vgg16_features.pth")
