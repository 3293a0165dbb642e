"""The heads' scikit-learn contract, streaming from blocks, and the helpers that keep memory flat."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.base import clone
from sklearn.datasets import make_blobs
from sklearn.utils.estimator_checks import parametrize_with_checks

from featkit.blocks import ArrayBlocks, shuffled_segments
from featkit.heads import HEAD_NAMES, HEADS, LinearSVMHead, LogRegHead, MLPHead, array_rms, make_head, scale_rows
from featkit.errors import FeatkitError

SMALL = [
    MLPHead(hidden_layer_sizes=(16,), max_iter=30, learning_rate_init=0.01, batch_size=32, device="cpu", random_state=0),
    LogRegHead(Cs=(0.01, 1.0), random_state=0),
    LinearSVMHead(alphas=(1e-2, 1e-4), max_iter=30, random_state=0),
]


@parametrize_with_checks(SMALL)
def test_sklearn_estimator_contract(estimator, check):
    check(estimator)


def _city_blobs(n=600, d=40, seed=0):
    X, y = make_blobs(n, n_features=d, centers=4, cluster_std=6.0, random_state=seed)
    X = np.maximum(X, 0).astype(np.float32)  # ReLU-like, as conv features are
    return X, np.array(["Paris", "Tokyo", "Venice", "London"])[y]


@pytest.mark.parametrize("name", HEAD_NAMES)
def test_heads_learn_city_labels_and_keep_strings(name):
    X, y = _city_blobs()
    params = {"hidden_layer_sizes": (32,), "device": "cpu"} if HEADS[name] is MLPHead else {}
    head = make_head(name, random_state=0, **params).fit(X[:400], y[:400], X[400:500], y[400:500])
    assert list(head.classes_) == ["London", "Paris", "Tokyo", "Venice"]
    assert head.score(X[500:], y[500:]) > 0.8
    proba = head.predict_proba(X[500:])
    assert np.allclose(proba.sum(1), 1) and proba.shape == (100, 4)
    assert head.n_passes_ >= 2


@pytest.mark.parametrize("cls", [MLPHead, LinearSVMHead])
def test_streamed_fit_matches_in_memory_quality(cls):
    X, y = _city_blobs(1200)
    order = np.argsort(y[:1000], kind="stable")  # rows sorted by city, as in a cache
    Xt, yt = X[:1000][order], y[:1000][order]
    params = {"hidden_layer_sizes": (32,), "max_iter": 15, "learning_rate_init": 1e-2, "device": "cpu"} if cls is MLPHead else {}
    streamed = cls(random_state=0, **params).fit_blocks(ArrayBlocks(Xt, yt, block_rows=128), X[1000:1100], y[1000:1100])
    in_memory = cls(random_state=0, **params).fit(Xt, yt, X[1000:1100], y[1000:1100])
    s_acc, m_acc = streamed.score(X[1100:], y[1100:]), in_memory.score(X[1100:], y[1100:])
    assert s_acc > 0.8 and abs(s_acc - m_acc) < 0.1


def test_same_seed_same_model():
    X, y = _city_blobs()
    a = MLPHead(hidden_layer_sizes=(16,), max_iter=5, device="cpu", random_state=3).fit(X, y)
    b = clone(a).fit(X, y)
    assert np.array_equal(a.predict_proba(X), b.predict_proba(X))


def test_mlp_early_stopping_restores_best_epoch():
    X, y = _city_blobs(300)
    y = np.random.default_rng(0).permutation(y)  # labels without signal: no epoch stays best for long
    h = MLPHead(hidden_layer_sizes=(64,), max_iter=200, n_iter_no_change=7, learning_rate_init=0.01, device="cpu", random_state=0).fit(X, y)
    assert h.n_iter_ < 200
    assert h.n_iter_ == h.best_epoch_ + 7
    # the best epoch is the most accurate on validation, ties going to the lower validation loss
    best = max(range(h.n_iter_), key=lambda i: (h.validation_scores_[i], -h.validation_loss_curve_[i]))
    assert h.best_epoch_ == best + 1 and h.best_validation_score_ == max(h.validation_scores_)
    assert h.validation_curve_ == h.validation_scores_ and h.chosen_ == {"epochs": h.n_iter_, "best_epoch": h.best_epoch_}
    # the restored weights are the best epoch's: they score its validation accuracy again
    assert h.score(*_validation_split(X, y)) == pytest.approx(h.best_validation_score_)


def _validation_split(X, y):
    from featkit.heads.base import int_seed  # the same carve-out the head made
    from sklearn.model_selection import train_test_split

    seed = int_seed(0)
    _, Xv, _, yv = train_test_split(X, y, test_size=int(round(0.1 * len(y))), random_state=seed, stratify=y)
    return Xv, yv


def test_logreg_in_place_standardisation_only_when_asked():
    X, y = _city_blobs()
    before = X.copy()
    LogRegHead(Cs=(0.1,), random_state=0).fit(X, y)
    assert np.array_equal(X, before)
    LogRegHead(Cs=(0.1,), copy=False, random_state=0).fit(X, y, X[:50], y[:50])
    assert not np.array_equal(X, before)


def test_rms_and_scaling_match_numpy():
    X = np.random.default_rng(0).gamma(2.0, 3.0, (5000, 7)).astype(np.float32)
    X[:, 3] = 0.0  # a dead ReLU
    rms = array_rms(X)
    assert rms == pytest.approx(np.sqrt(np.mean(X.astype(np.float64) ** 2)), rel=1e-9)
    Z = scale_rows(X, rms)
    assert Z.dtype == np.float32 and np.sqrt(np.mean(Z.astype(np.float64) ** 2)) == pytest.approx(1.0, rel=1e-5)
    assert np.all(Z[:, 3] == 0)  # zeros stay zeros: no centring
    assert array_rms(np.zeros((4, 3), np.float32)) == 1.0


def test_svm_keeps_a_small_city():
    """A city with few training photos must still be predicted (balanced class weights)."""
    X, y = _city_blobs(1600, seed=2)
    keep = (y != "Venice") | (np.arange(len(y)) % 8 == 0)  # Venice: 1 in 8 of its photos
    X, y = X[keep], y[keep]
    h = LinearSVMHead(random_state=0).fit(X[:-300], y[:-300], X[-300:-150], y[-300:-150])
    pred = h.predict(X[-150:])
    venice = y[-150:] == "Venice"
    assert venice.sum() >= 5 and (pred[venice] == "Venice").mean() > 0.5
    assert h.temperature_ > 0 and np.allclose(h.predict_proba(X[:10]).sum(1), 1)
    assert set(h.validation_curve_) == set(h.alphas) and h.chosen_["alpha"] == h.alpha_


def test_choices_at_the_edge_of_a_grid_are_flagged():
    X, y = _city_blobs()
    edge = LogRegHead(Cs=(1e-6, 1e-5), random_state=0).fit(X[:400], y[:400], X[400:], y[400:])
    assert edge.C_ == 1e-5 and edge.at_grid_edge_  # the data wants weaker regularisation than the grid has
    inside = LogRegHead(Cs=(1e-8, 1e-7, 1e-6), random_state=0).fit(X[:400], y[:400], X[400:], y[400:])
    assert inside.validation_curve_.keys() == {1e-8, 1e-7, 1e-6}
    assert inside.at_grid_edge_ == (inside.C_ in (1e-8, 1e-6))


def test_progress_is_reported_per_epoch_and_candidate():
    X, y = _city_blobs()
    calls = []
    MLPHead(hidden_layer_sizes=(8,), max_iter=3, early_stopping=False, device="cpu", random_state=0).fit(
        X[:400], y[:400], X[400:], y[400:], progress=lambda step, total, **f: calls.append((step, total, sorted(f))))
    assert calls == [(i, 3, ["train_loss", "val_acc", "val_loss"]) for i in (1, 2, 3)]
    calls.clear()
    LogRegHead(Cs=(0.01, 0.1), random_state=0).fit(X[:400], y[:400], X[400:], y[400:], progress=lambda step, total, **f: calls.append((step, total)))
    assert calls == [(1, 2), (2, 2)]


def test_shuffled_segments_cover_each_row_once():
    rng = np.random.default_rng(0)
    blocks = list(shuffled_segments(1000, 256, rng, segment_rows=64))
    rows = np.concatenate([np.arange(a, b) for runs in blocks for a, b in runs])
    assert sorted(rows.tolist()) == list(range(1000))
    assert rows[:64].tolist() != list(range(64)) or rows[64:128].tolist() != list(range(64, 128))


def test_unknown_head_lists_choices():
    with pytest.raises(FeatkitError, match="choose one of: " + ", ".join(HEAD_NAMES)):
        make_head("xgb")


def test_an_mlp_pickled_before_heads_became_a_package_still_loads(monkeypatch):
    """Heads saved by the earlier featkit name their torch network ``featkit.heads._MLP``; they still load."""
    import io
    import pickle

    import featkit.heads.mlp as mlp

    X, y = make_blobs(n_samples=60, centers=3, n_features=8, random_state=0)
    labels = np.array(["Paris", "Tokyo", "Venice"])[y]
    head = MLPHead(max_iter=3, hidden_layer_sizes=(8,), random_state=0).fit(X, labels)
    monkeypatch.setattr(mlp._MLP, "__module__", "featkit.heads")  # pickled as the old module laid it out
    data = pickle.dumps(head)
    monkeypatch.undo()
    import featkit.heads

    with monkeypatch.context() as m:  # without the package's shim the old name does not resolve: the pickle uses it
        m.delattr(featkit.heads, "__getattr__")
        with pytest.raises(AttributeError):
            pickle.load(io.BytesIO(data))
    again = pickle.load(io.BytesIO(data))
    assert np.allclose(again.predict_proba(X), head.predict_proba(X))
