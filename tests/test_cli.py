"""The spine end to end through the CLI, and every bad input ending in one clean line."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from featkit.cli import app
from conftest import FAST, LOGREG, MLP, make_photos
from featkit.heads import HEAD_NAMES
from featkit.splits import split_counts
from featkit.cache.store import FeatureStore


def run(runner, *args):
    return runner.invoke(app, [str(a) for a in args])


def assert_clean_failure(result, *fragments):
    """Non-zero exit, no traceback, one line naming the problem."""
    assert result.exit_code != 0, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    out = result.output.strip()
    assert "Traceback" not in out
    errors = [line for line in out.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, out  # progress lines (e.g. a download attempt) may stand beside it
    for f in fragments:
        assert f in errors[0], out


@pytest.mark.parametrize("command", [[], ["download"], ["extract"], ["split"], ["fit"], ["compare"], ["predict"], ["demo"]])
def test_help(runner, command):
    result = run(runner, *command, "--help")
    assert result.exit_code == 0
    assert "Usage" in result.output


def test_extract_fit_compare_end_to_end(runner, photos, tmp_path):
    cache, reports = tmp_path / "cache", tmp_path / "reports"
    r = run(runner, "extract", photos, "--cache", cache, *FAST, "--test-size", "6", "--val-size", "4")
    assert r.exit_code == 0, r.output
    assert "72 extracted, 0 skipped" in r.output
    r = run(runner, "fit", "--head", "all", "--cache", cache, "--epochs", "30")
    assert r.exit_code == 0, r.output
    assert {p.name for p in (cache / "heads").iterdir()} == {f"{n}.joblib" for n in HEAD_NAMES} | {"manifest.json"}
    r = run(runner, "compare", "--cache", cache, "--reports", reports)
    assert r.exit_code == 0, r.output
    data = json.loads((reports / "compare.json").read_text())
    assert data["cities"] == ["Paris", "Tokyo", "Venice"]
    assert data["n_test"] == {"Paris": 6, "Tokyo": 6, "Venice": 6}
    for head in HEAD_NAMES:
        h = data["heads"][head]
        assert set(h["per_city"]) == set(data["cities"])
        assert h["accuracy"] > 0.6, (head, h["accuracy"])  # chance is 1/3
        assert sum(map(sum, h["confusion"])) == 18
        assert abs(sum(h["predicted_share"].values()) - 1) < 1e-9
        assert (reports / f"confusion_{head}.png").stat().st_size > 1000
    md = (reports / "compare.md").read_text()
    assert "| Paris | 6 |" in md and f"confusion_{MLP}.png" in md and "**top-3**" in md
    assert f"| city | n test | {' | '.join(sorted(HEAD_NAMES))} |" in md  # not the study's ten cities: no study column
    assert "**Verdict:**" in md and f"| {LOGREG} vs {MLP} |" in md
    assert data["ranking"]["ranking"][0] in HEAD_NAMES and len(data["ranking"]["pairs"]) == len(HEAD_NAMES) * (len(HEAD_NAMES) - 1) // 2
    lo, hi = data["heads"][MLP]["accuracy_ci"]
    assert lo <= data["heads"][MLP]["accuracy"] <= hi


def test_splits_change_without_re_extraction(runner, photos, tmp_path):
    cache = tmp_path / "cache"
    assert run(runner, "extract", photos, "--cache", cache, *FAST, "--test-size", "6", "--val-size", "4").exit_code == 0
    assert run(runner, "fit", "--head", LOGREG, "--cache", cache).exit_code == 0
    with FeatureStore.open(cache / "features.h5") as s:
        before = s.read_features(np.arange(s.n_rows))
    # another protocol on the same cache is refused, not silently ignored
    r = run(runner, "extract", photos, "--cache", cache, *FAST, "--test-size", "8", "--val-size", "4")
    assert_clean_failure(r, "test_size=6", "test_size=8", "featkit split")
    r = run(runner, "split", "--cache", cache, "--test-size", "8", "--val-size", "4")
    assert r.exit_code == 0 and "test 24" in r.output, r.output
    with FeatureStore.open(cache / "features.h5") as s:
        assert np.array_equal(s.read_features(np.arange(s.n_rows)), before)  # features untouched
        assert split_counts(list(s.column("city")), list(s.column("split")))["test"] == {"Paris": 8, "Tokyo": 8, "Venice": 8}
        assert s.split_protocol == {"seed": 0, "test_size": 8.0, "val_size": 4.0}
    # a head trained on the old splits is refused until refitted
    assert_clean_failure(run(runner, "compare", "--cache", cache, "--reports", tmp_path / "r"), "other splits", "featkit fit")
    assert run(runner, "fit", "--head", LOGREG, "--cache", cache).exit_code == 0
    assert run(runner, "compare", "--cache", cache, "--reports", tmp_path / "r").exit_code == 0
    # and photos added later follow the recorded protocol when it is repeated
    r = run(runner, "extract", photos, "--cache", cache, *FAST, "--test-size", "8", "--val-size", "4")
    assert r.exit_code == 0 and "0 extracted" in r.output, r.output


def test_env_vars_move_outputs(runner, photos, tmp_path, monkeypatch):
    monkeypatch.setenv("FEATKIT_CACHE", str(tmp_path / "elsewhere"))
    r = run(runner, "extract", photos, *FAST)
    assert r.exit_code == 0, r.output
    assert (tmp_path / "elsewhere" / "features.h5").exists()


def test_cache_built_with_another_backbone_is_refused(runner, photos, tmp_path):
    cache = tmp_path / "cache"
    assert run(runner, "extract", photos, "--cache", cache, *FAST).exit_code == 0
    r = run(runner, "extract", photos, "--cache", cache, *FAST[:-2], "--batch-size", "8", "--image-size", "64")
    assert_clean_failure(r, "image_size", "--overwrite")  # same backbone file, another input size
    r = run(runner, "extract", photos, "--cache", cache, *FAST, "--weights-seed", "1")  # other random weights
    assert_clean_failure(r, "weights_sha256")
    # another pooling is another backbone: its own file beside the first, the first untouched
    before = (cache / "features.h5").read_bytes()
    r = run(runner, "extract", photos, "--cache", cache, *FAST, "--pooling", "avg")
    assert r.exit_code == 0, r.output
    assert (cache / "features-vgg16-avg.h5").exists() and (cache / "features.h5").read_bytes() == before
    # --overwrite rebuilds a file at the new input size
    r = run(runner, "extract", photos, "--cache", cache, *FAST[:-2], "--batch-size", "8", "--image-size", "64", "--overwrite")
    assert r.exit_code == 0, r.output


def test_head_from_another_cache_is_refused(runner, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    make_photos(tmp_path / "p1", cities=("Paris", "Tokyo"), n=16)
    make_photos(tmp_path / "p2", cities=("Paris", "London"), n=16)
    assert run(runner, "extract", tmp_path / "p1", "--cache", a, *FAST).exit_code == 0
    assert run(runner, "extract", tmp_path / "p2", "--cache", b, *FAST).exit_code == 0
    assert run(runner, "fit", "--head", LOGREG, "--cache", a).exit_code == 0
    (b / "heads").mkdir()
    (a / "heads" / f"{LOGREG}.joblib").rename(b / "heads" / f"{LOGREG}.joblib")
    r = run(runner, "compare", "--cache", b, "--reports", tmp_path / "r")
    assert_clean_failure(r, "no fitted heads", "not featkit's own")  # a lone file: not trusted, never unpickled
    (a / "heads" / "manifest.json").rename(b / "heads" / "manifest.json")  # the whole heads folder moved over
    r = run(runner, "compare", "--cache", b, "--reports", tmp_path / "r")
    assert_clean_failure(r, "trained on cities", "refit")
    # same cities, same backbone, but a rebuilt cache: still refused
    assert run(runner, "fit", "--head", LOGREG, "--cache", a).exit_code == 0
    assert run(runner, "extract", tmp_path / "p1", "--cache", a, *FAST, "--overwrite").exit_code == 0
    assert_clean_failure(run(runner, "compare", "--cache", a, "--reports", tmp_path / "r"), "refit")


def test_bad_inputs_end_in_one_line(runner, tmp_path):
    one = make_photos(tmp_path / "one", cities=("Paris",), n=3)
    assert_clean_failure(run(runner, "extract", one, *FAST), "at least two cities")
    empty = tmp_path / "empty"
    (empty / "Paris").mkdir(parents=True)
    (empty / "Tokyo").mkdir()
    (empty / "Tokyo" / "notes.txt").write_text("no images here")
    assert_clean_failure(run(runner, "extract", empty, *FAST), "no images")
    assert_clean_failure(run(runner, "extract", tmp_path / "missing", *FAST), "does not exist")
    assert_clean_failure(run(runner, "fit", "--cache", tmp_path / "nocache"), "no feature cache", "featkit extract")
    assert_clean_failure(run(runner, "fit", "--head", "xgb", "--cache", tmp_path), "unknown head 'xgb'", ", ".join(HEAD_NAMES))
    assert_clean_failure(run(runner, "compare", "--cache", tmp_path / "nocache"), "no fitted heads")


def test_weights_that_do_not_fit_vgg16(runner, photos, tmp_path):
    bad = tmp_path / "resnet.pth"
    torch.save({"conv1.weight": torch.zeros(64, 3, 7, 7)}, bad)
    assert_clean_failure(run(runner, "extract", photos, "--weights", bad, "--image-size", "32"), "do not fit VGG16", "vgg16().features")
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a torch file")
    assert_clean_failure(run(runner, "extract", photos, "--weights", junk, "--image-size", "32"), "not a torch state_dict")
    assert_clean_failure(run(runner, "extract", photos, "--weights", tmp_path / "nope.pth"), "does not exist")


def test_default_weights_unavailable_names_weights_option(runner, photos, monkeypatch):
    # Any download goes to a closed loopback port: what a machine without internet sees.
    for var in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY"):
        monkeypatch.setenv(var, "http://127.0.0.1:9")
    monkeypatch.delenv("no_proxy", raising=False)
    monkeypatch.delenv("NO_PROXY", raising=False)
    r = run(runner, "extract", photos, "--image-size", "32", "--no-progress")
    assert_clean_failure(r, "--weights PATH")


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_cuda_without_gpu(runner, photos):
    assert_clean_failure(run(runner, "extract", photos, *FAST, "--device", "cuda"), "no CUDA GPU", "--device cpu")
    assert_clean_failure(run(runner, "fit", "--device", "cuda"), "no CUDA GPU")


def test_bad_test_size_for_small_city(runner, photos, tmp_path):
    r = run(runner, "extract", photos, "--cache", tmp_path / "c", *FAST, "--test-size", "500")
    assert_clean_failure(r, "leave none for training", "--test-size 0.2")


@pytest.mark.parametrize(
    "command,says",
    [
        ("extract", ("--split-seed", "--weights-seed", "Seed of --weights random")),
        ("split", ("--split-seed", "--seed", "Seed of the new splits")),
        ("fit", ("--seed", "Seed of the heads' training")),
        ("predict", ("--weights-seed", "Seed of 'random' weights")),
        ("demo", ("--seed", "Seed of everything the demo draws")),
    ],
)
def test_each_seed_says_what_it_seeds(runner, command, says):
    out = " ".join(runner.invoke(app, [command, "--help"], env={"COLUMNS": "200", "TERM": "dumb"}).output.split())
    out = out.replace("│", " ")
    out = " ".join(out.split())
    for text in says:
        assert text in out, (command, text)
