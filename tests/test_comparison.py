"""The typed comparison result: compare.json keeps exactly the keys it had when results were a plain dict."""

from __future__ import annotations

import json

import numpy as np

from conftest import fitted_cache
from featkit.cli import app
from featkit.comparison import Comparison, HeadResult

# compare.json's keys as the untyped dict of featkit.evaluate wrote them (before the result had a type)
TOP_KEYS = ["cities", "heads", "test_photos", "geo", "leaks", "ranking", "n_test", "split_counts", "cache_path", "cache_id",
            "backbone", "backbones", "featkit", "generated", "provenance"]
METRIC_KEYS = ["n", "accuracy", "accuracy_ci", "macro_accuracy", "macro_accuracy_ci", "top3", "top3_ci", "per_city", "per_city_ci",
               "confusion", "true_share", "predicted_share", "correct", "predicted", "confidence", "calibration", "confused_pairs"]
RECORD_KEYS = ["backbone", "head", "val_score", "fit_seconds", "chosen", "seed", "validation_curve", "at_grid_edge"]
HEAD_KEYS = METRIC_KEYS + RECORD_KEYS + ["geo"]  # geo: only when every city has coordinates
RANKING_KEYS = ["ranking", "pairs", "verdict"]


def test_compare_json_keeps_its_keys_and_the_api_returns_the_typed_result(tmp_path, runner):
    import featkit

    _, cache = fitted_cache(tmp_path, n=12)
    r = runner.invoke(app, ["compare", "--cache", str(cache), "--reports", str(tmp_path / "reports"), "--no-leaks"])
    assert r.exit_code == 0, r.output
    data = json.loads((tmp_path / "reports" / "compare.json").read_text())
    assert list(data) == TOP_KEYS + ["backbone_names", "run_id"] and list(data["ranking"]) == RANKING_KEYS  # run_id: an addition
    for h in data["heads"].values():
        assert list(h) == HEAD_KEYS + ["name", "backbone_name"]  # additions: the user's spelling
    results, _ = featkit.compare(cache, tmp_path / "again", leaks=False)
    assert isinstance(results, Comparison) and all(isinstance(h, HeadResult) for h in results.heads.values())
    assert results.best == data["ranking"]["ranking"][0] and results.heads[results.best].accuracy == data["heads"][results.best]["accuracy"]
    assert results["cities"] == results.cities  # still reads like compare.json


def test_head_result_keeps_figures_it_does_not_know_and_leaves_out_unknown_geo():
    metrics = {k: 0 for k in METRIC_KEYS} | {"brier": 0.1}
    h = HeadResult.from_metrics(metrics, head="x", backbone="vgg16")
    assert h.extra == {"brier": 0.1} and list(h.to_dict()) == METRIC_KEYS + ["brier"] + RECORD_KEYS + ["name", "backbone_name"]
    h.geo = {"mean_km": np.float64(1.0)}
    assert list(h.to_dict())[-3] == "geo"


def test_the_result_type_is_light():
    import subprocess
    import sys

    code = "import sys, featkit.comparison; print(' '.join(m for m in ('numpy', 'torch', 'h5py', 'sklearn') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "", out.stdout + out.stderr
