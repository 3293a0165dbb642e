"""Every bad value of every command's options ends in one `error:` line naming the option, exit 2, no
traceback, and nothing already saved touched; the library refuses the same values with a FeatkitError
naming the parameter."""

from __future__ import annotations

import hashlib
import math
import os
from pathlib import Path

import pytest

import featkit
from conftest import FAST, LOGREG, MLP, fitted_cache
from featkit.cli import app
from featkit.errors import FeatkitError
from featkit.options import DownloadOptions, ExtractOptions, FetchOptions, FitOptions, MLPOptions, PredictOptions, SplitOptions
from featkit.validate import ensure_writable_dir, max_workers


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """One small cache with a fitted logreg head, shared by the module (every command here fails, so nothing changes it)."""
    root = tmp_path_factory.mktemp("args")
    photos, cache = fitted_cache(root, "--test-size", "2", "--val-size", "2", n=8)
    (root / "afile").write_text("not a folder")
    return {"root": root, "photos": photos, "cache": cache, "file": root / "afile"}


def snapshot(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()}


PHOTO = "{photos}/Paris/000.jpg"
NEW = "{root}/{new}"  # a folder that must not come into being

# (command line, the option the error line must name). {cache}: the built cache (must stay byte-identical);
# {new}: a fresh path (must not be created); {file}: a regular file; {photos}: the photo folder.
CASES = [
    # download: every check runs before the Flickr key is looked for or a folder is made
    (["download", "--cache", NEW, "--per-city", "0"], "--per-city"),
    (["download", "--cache", NEW, "--per-city", "-5"], "--per-city"),
    (["download", "--cache", NEW, "--workers", "0"], "--workers"),
    (["download", "--cache", NEW, "--workers", "1000"], "--workers"),
    (["download", "--cache", NEW, "--min-size", "-1"], "--min-size"),
    (["download", "--cache", NEW, "--min-interval-s", "nan"], "--min-interval-s"),
    (["download", "--cache", NEW, "--min-interval-s", "-1"], "--min-interval-s"),
    (["download", "--cache", NEW, "--license", "xx"], "--license"),
    (["download", "--cache", NEW, "--query", "streets"], "--query"),
    (["download", "--cache", NEW, "--endpoint", "ftp://example.org"], "--endpoint"),
    (["download", "--cache", NEW, "--cities", "Atlantis"], "--cities"),
    (["download", "--cache", "{file}"], "--cache"),
    # extract: nothing is created or changed
    (["extract", "{photos}", "--cache", "{cache}", *FAST, "--workers", "-1"], "--workers"),
    (["extract", "{photos}", "--cache", "{cache}", *FAST, "--workers", "500"], "--workers"),
    (["extract", "{photos}", "--cache", "{cache}", *FAST, "--workers", "abc"], "--workers"),
    (["extract", "{photos}", "--cache", "{cache}", *FAST, "--batch-size", "0"], "--batch-size"),
    (["extract", "{photos}", "--cache", "{cache}", *FAST, "--test-size", "nan"], "--test-size"),
    (["extract", "{photos}", "--cache", "{cache}", *FAST, "--test-size", "inf"], "--test-size"),
    (["extract", "{photos}", "--cache", "{cache}", *FAST, "--test-size", "-1"], "--test-size"),
    (["extract", "{photos}", "--cache", "{cache}", *FAST, "--test-size", "2.5"], "--test-size"),
    (["extract", "{photos}", "--cache", "{cache}", *FAST, "--val-size", "nan"], "--val-size"),
    (["extract", "{photos}", "--cache", "{cache}", *FAST, "--image-size", "100000"], "--image-size"),
    (["extract", "{photos}", "--cache", "{cache}", *FAST, "--image-size", "abc"], "--image-size"),
    (["extract", "{photos}", "--cache", "{cache}", *FAST, "--image-size", "0"], "--image-size"),
    (["extract", "{photos}", "--cache", "{cache}", *FAST, "--image-size", "16"], "--image-size"),
    (["extract", "{photos}", "--cache", "{cache}", *FAST, "--image-size", "4096"], "--image-size"),  # 16.8 M pixels
    (["extract", "{photos}", "--cache", "{cache}", *FAST, "--image-size", "100"], "--image-size"),  # VGG16: multiples of 32
    (["extract", "{photos}", "--cache", "{cache}", *FAST, "--split-seed", "-1"], "--split-seed"),
    (["extract", "{photos}", "--cache", "{cache}", *FAST, "--weights-seed", "-1"], "--weights-seed"),
    (["extract", "{photos}", "--cache", "{cache}", *FAST, "--dtype", "float8"], "--dtype"),
    (["extract", "{photos}", "--cache", "{cache}", *FAST, "--decode", "sometimes"], "--decode"),
    (["extract", "{photos}", "--cache", "{cache}", *FAST, "--device", "tpu"], "--device"),
    (["extract", "{photos}", "--cache", "{cache}", *FAST, "--device", "cuda:99"], "--device"),
    (["extract", "{photos}", "--cache", "{cache}", *FAST, "--pooling", "max"], "--pooling"),
    (["extract", "{photos}", "--cache", "{cache}", *FAST, "--backbone", "nonsense_net"], "--backbone"),
    (["extract", "{photos}", "--cache", "{cache}", *FAST[2:], "--weights", "{root}/missing.pth"], "--weights"),
    (["extract", "{photos}", "--cache", NEW, *FAST, "--workers", "500"], "--workers"),
    (["extract", "{photos}", "--cache", "{file}", *FAST], "--cache"),
    (["extract", "{photos}", "--cache", "{file}/sub", *FAST], "--cache"),
    (["extract", "{photos}", "--cache", "/proc/featkit-cache", *FAST], "--cache"),
    # split
    (["split", "--cache", "{cache}", "--test-size", "nan"], "--test-size"),
    (["split", "--cache", "{cache}", "--val-size", "-0.5"], "--val-size"),
    (["split", "--cache", "{cache}", "--seed", "-1"], "--seed"),  # the old name of --split-seed
    (["split", "--cache", "{cache}", "--split-seed", "-1"], "--split-seed"),
    (["split", "--cache", NEW], "--cache"),
    # fit: a failed or nonsensical fit never replaces a good head
    (["fit", "--cache", "{cache}", "--lr", "nan"], "--lr"),
    (["fit", "--cache", "{cache}", "--lr", "0"], "--lr"),
    (["fit", "--cache", "{cache}", "--learning-rate-init", "-1"], "--learning-rate-init"),
    (["fit", "--cache", "{cache}", "--dropout", "1.5"], "--dropout"),
    (["fit", "--cache", "{cache}", "--dropout", "-0.1"], "--dropout"),
    (["fit", "--cache", "{cache}", "--dropout", "nan"], "--dropout"),
    (["fit", "--cache", "{cache}", "--epochs", "0"], "--epochs"),
    (["fit", "--cache", "{cache}", "--max-iter", "0"], "--max-iter"),
    (["fit", "--cache", "{cache}", "--patience", "0"], "--patience"),
    (["fit", "--cache", "{cache}", "--n-iter-no-change", "-2"], "--n-iter-no-change"),
    (["fit", "--cache", "{cache}", "--hidden", "0"], "--hidden"),
    (["fit", "--cache", "{cache}", "--alpha", "-1"], "--alpha"),
    (["fit", "--cache", "{cache}", "--alpha", "nan"], "--alpha"),
    (["fit", "--cache", "{cache}", "--head", LOGREG, "--batch-size", "-3"], "--batch-size"),  # checked whichever heads run
    (["fit", "--cache", "{cache}", "--batch-size", "0"], "--batch-size"),
    (["fit", "--cache", "{cache}", "--head", LOGREG, "--stream", "maybe"], "--stream"),
    (["fit", "--cache", "{cache}", "--head", "nonsense"], "--head"),
    (["fit", "--cache", "{cache}", "--head", LOGREG, "--device", "cuda:99"], "--device"),
    (["fit", "--cache", "{cache}", "--head", LOGREG, "--device", "tpu"], "--device"),
    (["fit", "--cache", "{cache}", "--head", LOGREG, "--seed", "-1"], "--seed"),
    (["fit", "--cache", "{cache}", "--head", LOGREG, "--backbone", "resnet50"], "--backbone"),
    (["fit", "--cache", "{cache}", "--head", LOGREG, "--lr", "abc"], "--lr"),
    (["fit", "--cache", NEW, "--head", LOGREG], "--cache"),
    (["fit", "--cache", "{file}", "--head", LOGREG], "--cache"),
    # compare: refused before any head is evaluated
    (["compare", "--cache", "{cache}", "--reports", "{file}"], "--reports"),
    (["compare", "--cache", "{cache}", "--reports", "{file}/sub"], "--reports"),
    (["compare", "--cache", "{cache}", "--reports", "/proc/featkit-reports"], "--reports"),
    (["compare", "--cache", "{cache}", "--reports", NEW, "--cities", "{root}/nowhere.toml"], "--cities"),
    (["compare", "--cache", NEW, "--reports", "{root}/r"], "--cache"),
    # predict
    (["predict", PHOTO, "--cache", "{cache}", "--top", "0"], "--top"),
    (["predict", PHOTO, "--cache", "{cache}", "--batch-size", "0"], "--batch-size"),
    (["predict", PHOTO, "--cache", "{cache}", "--workers", "999"], "--workers"),
    (["predict", PHOTO, "--cache", "{cache}", "--seed", "-5"], "--seed"),
    (["predict", PHOTO, "--cache", "{cache}", "--device", "tpu"], "--device"),
    (["predict", PHOTO, "--cache", "{cache}", "--head", "nonsense"], "--head"),
    (["predict", PHOTO, "--cache", "{cache}", "--csv", "{root}"], "--csv"),
    (["predict", PHOTO, "--cache", NEW], "--cache"),
    # demo: nothing is generated before every value is checked
    (["demo", "--cache", NEW, "--per-city", "1"], "--per-city"),
    (["demo", "--cache", NEW, "--per-city", "0"], "--per-city"),
    (["demo", "--cache", NEW, "--image-size", "100"], "--image-size"),
    (["demo", "--cache", NEW, "--cities", "Atlantis"], "--cities"),
    (["demo", "--cache", NEW, "--seed", "-1"], "--seed"),
    (["demo", "--cache", NEW, "--device", "tpu"], "--device"),
    (["demo", "--cache", NEW, "--weights", "{root}/missing.pth"], "--weights"),
    (["demo", "--cache", NEW, "--reports", "{file}"], "--reports"),
]


def _id(case) -> str:
    argv, _ = case
    return " ".join([argv[0], *(a for a in argv[-2:] if "{" not in a)])


def assert_one_error_line(result, option: str) -> str:
    everything = result.output + result.stderr
    assert "Traceback" not in everything, everything
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert result.exit_code == 2, everything
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert option in lines[0], lines[0]
    return lines[0]


@pytest.mark.parametrize("case", CASES, ids=[f"{i:02d}-{_id(c)}" for i, c in enumerate(CASES)])
def test_bad_value_ends_in_one_line_and_touches_nothing(runner, built, case, tmp_path):
    argv, option = case
    new = tmp_path / "new"
    values = {"cache": built["cache"], "photos": built["photos"], "file": built["file"], "root": built["root"], "new": new}
    args = [a.replace("{root}/{new}", str(new)).format(**values) for a in argv]
    before = snapshot(built["cache"])
    result = runner.invoke(app, args)
    assert_one_error_line(result, option)
    assert snapshot(built["cache"]) == before  # the cache and its heads byte for byte
    assert not new.exists()  # nor anything created where a bad command pointed


def test_the_table_covers_every_command():
    assert len(CASES) >= 35
    assert {argv[0] for argv, _ in CASES} == {"download", "extract", "split", "fit", "compare", "predict", "demo"}


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes through permission bits")
def test_unwritable_folder_is_refused(runner, built, tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        r = runner.invoke(app, ["extract", str(built["photos"]), "--cache", str(locked / "cache"), *FAST])
        assert "not writable" in assert_one_error_line(r, "--cache")
        r = runner.invoke(app, ["compare", "--cache", str(built["cache"]), "--reports", str(locked)])
        assert "not writable" in assert_one_error_line(r, "--reports")
        assert list(locked.iterdir()) == []
    finally:
        locked.chmod(0o700)


# -- the library API: the same checks, the parameter named -----------------------------------
def _raises(param: str, fn, *args, **kwargs) -> FeatkitError:
    with pytest.raises(FeatkitError) as info:
        fn(*args, **kwargs)
    assert info.value.param == param, (info.value.param, str(info.value))
    assert f"`{param}`" in str(info.value) or param in str(info.value)
    return info.value


@pytest.mark.parametrize(
    "cls,kwargs,param",
    [
        (ExtractOptions, {"batch_size": 0}, "batch_size"),
        (ExtractOptions, {"workers": 10**6}, "workers"),
        (ExtractOptions, {"split_seed": -1}, "split_seed"),
        (ExtractOptions, {"weights_seed": 2**40}, "weights_seed"),
        (SplitOptions, {"split_seed": -1}, "split_seed"),
        (SplitOptions, {"test_size": math.inf}, "test_size"),
        (FitOptions, {"stream": "maybe"}, "stream"),
        (FitOptions, {"block_rows": 0}, "block_rows"),
        (FitOptions, {"seed": -1}, "seed"),
        (FetchOptions, {"max_retries": -1}, "max_retries"),
        (FetchOptions, {"timeout_s": 0}, "timeout_s"),
        (FetchOptions, {"per_page": 501}, "per_page"),
        (FetchOptions, {"result_cap": 10}, "result_cap"),
        (ExtractOptions, {"test_size": math.nan}, "test_size"),
        (ExtractOptions, {"val_size": -0.1}, "val_size"),
        (MLPOptions, {"dropout": 1.0}, "dropout"),
        (MLPOptions, {"learning_rate_init": 0.0}, "learning_rate_init"),
        (MLPOptions, {"hidden_layer_sizes": (0,)}, "hidden_layer_sizes"),
        (MLPOptions, {"max_iter": 0}, "max_iter"),
        (MLPOptions, {"n_iter_no_change": 0}, "n_iter_no_change"),
        (MLPOptions, {"alpha": math.inf}, "alpha"),
        (MLPOptions, {"batch_size": 2.5}, "batch_size"),
        (PredictOptions, {"top": 0}, "top"),
        (PredictOptions, {"seed": -1}, "seed"),
        (DownloadOptions, {"per_city": 0}, "per_city"),
        (DownloadOptions, {"min_interval_s": math.nan}, "min_interval_s"),
        (DownloadOptions, {"workers": 0}, "workers"),
        (DownloadOptions, {"query_template": "streets"}, "query_template"),
    ],
)
def test_options_refuse_bad_values(cls, kwargs, param):
    _raises(param, cls, **kwargs)


def test_api_refuses_before_touching_anything(built, tmp_path):
    cache, photos = built["cache"], built["photos"]
    before = snapshot(cache)
    _raises("batch_size", featkit.extract, photos, cache, weights="random", image_size=32, batch_size=0)
    _raises("cache_dir", featkit.extract, photos, built["file"], weights="random", image_size=32)
    _raises("workers", featkit.extract, photos, tmp_path / "new", weights="random", image_size=32, workers=max_workers() + 1)
    _raises("image_size", featkit.extract, photos, cache, weights="random", image_size=(10_000, 10_000))
    _raises("dropout", featkit.fit, cache, LOGREG, params={MLP: {"dropout": 1.5}})
    _raises("params", featkit.fit, cache, LOGREG, params={MLP: {"epochs": 3}})  # scikit-learn's name is max_iter
    _raises("params", featkit.fit, cache, LOGREG, params={"xgb": {}})
    _raises("head", featkit.fit, cache, "xgb")
    _raises("seed", featkit.fit, cache, LOGREG, seed=-1)
    _raises("stream", featkit.fit, cache, LOGREG, stream="maybe")
    _raises("cache_dir", featkit.fit, tmp_path / "new", LOGREG)
    _raises("test_size", featkit.split, cache, test_size=math.inf)
    _raises("reports_dir", featkit.compare, cache, built["file"])
    _raises("cache_dir", featkit.compare, tmp_path / "new", tmp_path / "reports")
    _raises("top", featkit.predict, [str(photos / "Paris" / "000.jpg")], cache, top=0)
    _raises("batch_size", featkit.predict, [str(photos / "Paris" / "000.jpg")], cache, batch_size=0)
    _raises("device", featkit.predict, [str(photos / "Paris" / "000.jpg")], cache, device="tpu")
    assert snapshot(cache) == before
    assert not (tmp_path / "new").exists() and not (tmp_path / "reports").exists()


def test_writable_dir_helper(tmp_path):
    assert ensure_writable_dir(tmp_path / "a" / "b", "cache_dir") == tmp_path / "a" / "b"
    assert not (tmp_path / "a").exists() and list(tmp_path.iterdir()) == []  # the probe leaves nothing
    (tmp_path / "f").write_text("x")
    _raises("cache_dir", ensure_writable_dir, tmp_path / "f", "cache_dir")
    _raises("reports_dir", ensure_writable_dir, tmp_path / "f" / "sub", "reports_dir")


@pytest.mark.parametrize(
    "kw,param",
    [({"min_interval_s": math.nan}, "min_interval_s"), ({"per_city": 0}, "per_city"), ({"workers": 100}, "workers"),
     ({"timeout_s": 0}, "timeout_s"), ({"max_retries": -1}, "max_retries"), ({"per_page": 501}, "per_page")],
)
def test_download_photos_called_directly_checks_the_same_bounds(tmp_path, kw, param):
    from featkit.cities import load_cities
    from featkit.collect import download_photos

    with pytest.raises(FeatkitError) as e:
        download_photos(load_cities("Paris,London"), tmp_path / "dl", api_key="k", api_secret="s", **kw)
    assert e.value.param == param
    assert not (tmp_path / "dl").exists()  # refused before any folder is made
