"""The public Python API: the README's notebook example, on tiny generated photos."""

from __future__ import annotations

import pytest

import featkit
from conftest import LOGREG, MLP, make_photos


def test_extract_split_fit_compare_from_python(tmp_path):
    photos = make_photos(tmp_path / "photos", cities=("Paris", "Tokyo"), n=12)
    cache = tmp_path / "cache"
    s = featkit.extract(photos, cache, weights="random", image_size=32, batch_size=8, workers=0, progress=False, test_size=3, val_size=2)
    assert s.n_extracted == 24 and s.split_counts["test"] == {"Paris": 3, "Tokyo": 3}
    records = featkit.fit(cache, head=f"{LOGREG},{MLP}", params={MLP: {"max_iter": 5}}, progress=False, log=lambda m: None)
    # the head that scales the shared training matrix in place (logreg) runs last
    assert [r["head"] for r in records] == [MLP, LOGREG] and records[0]["params"]["max_iter"] == 5
    results, paths = featkit.compare(cache, tmp_path / "reports")
    assert set(results["heads"]) == {LOGREG, MLP} and paths["md"].exists()
    counts = featkit.split(cache, test_size=4, val_size=2)
    assert counts["test"] == {"Paris": 4, "Tokyo": 4}
    # the MLP's parameters as the exported MLPOptions: every field of it reaches the head
    mlp = featkit.MLPOptions(max_iter=3, hidden_layer_sizes=(16,), dropout=0.25)
    [record] = featkit.fit(cache, head=MLP, mlp=mlp, progress=False, log=lambda m: None)
    assert {k: record["params"][k] for k in ("max_iter", "dropout", "n_iter_no_change")} == {"max_iter": 3, "dropout": 0.25, "n_iter_no_change": 7}
    assert tuple(record["params"]["hidden_layer_sizes"]) == (16,)
    with pytest.raises(featkit.FeatkitError, match="not both") as e:
        featkit.fit(cache, head=MLP, mlp=mlp, params={MLP: {"max_iter": 4}})
    assert e.value.param == "mlp"  # the parameter of fit, not the head
    with pytest.raises(featkit.FeatkitError, match="MLPOptions") as e:
        featkit.fit(cache, head=MLP, mlp={"max_iter": 4})
    assert e.value.param == "mlp"  # the parameter of fit, not the head


def test_unknown_option_is_refused_with_the_choices(tmp_path):
    with pytest.raises(featkit.FeatkitError, match=r"unknown option\(s\) batchsize; choose from: .*batch_size"):
        featkit.extract(tmp_path, tmp_path / "cache", batchsize=3)
