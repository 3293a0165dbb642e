"""The heads' scikit-learn contract, streaming from blocks, and the helpers that keep memory flat."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.base import clone
from sklearn.datasets import make_blobs
from sklearn.utils.estimator_checks import parametrize_with_checks

from featkit.blocks import ArrayBlocks, shuffled_segments
from featkit.heads import LinearSVMHead, LogRegHead, MLPHead, column_moments, make_head, standardize
from featkit.errors import FeatkitError

SMALL = [
    MLPHead(hidden_layer_sizes=(16,), max_iter=30, learning_rate_init=0.01, batch_size=32, device="cpu", random_state=0),
    LogRegHead(Cs=(0.01, 1.0), random_state=0),
    LinearSVMHead(alphas=(1e-2, 1e-4), epochs=3, random_state=0),
]


@parametrize_with_checks(SMALL)
def test_sklearn_estimator_contract(estimator, check):
    check(estimator)


def _city_blobs(n=600, d=40, seed=0):
    X, y = make_blobs(n, n_features=d, centers=4, cluster_std=6.0, random_state=seed)
    X = np.maximum(X, 0).astype(np.float32)  # ReLU-like, as conv features are
    return X, np.array(["Paris", "Tokyo", "Venice", "London"])[y]


@pytest.mark.parametrize("name", ["mlp", "logreg", "svm"])
def test_heads_learn_city_labels_and_keep_strings(name):
    X, y = _city_blobs()
    params = {"hidden_layer_sizes": (32,), "device": "cpu"} if name == "mlp" else {}
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
    params = {"hidden_layer_sizes": (32,), "max_iter": 15, "device": "cpu"} if cls is MLPHead else {}
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
    y = np.random.default_rng(0).permutation(y)  # labels without signal: val loss rises soon
    h = MLPHead(hidden_layer_sizes=(64,), max_iter=200, n_iter_no_change=7, learning_rate_init=0.01, device="cpu", random_state=0).fit(X, y)
    assert h.n_iter_ < 200
    assert h.n_iter_ == h.best_epoch_ + 7
    assert h.best_validation_loss_ == min(h.validation_loss_curve_)


def test_logreg_in_place_standardisation_only_when_asked():
    X, y = _city_blobs()
    before = X.copy()
    LogRegHead(Cs=(0.1,), random_state=0).fit(X, y)
    assert np.array_equal(X, before)
    LogRegHead(Cs=(0.1,), copy=False, random_state=0).fit(X, y, X[:50], y[:50])
    assert not np.array_equal(X, before)


def test_moments_and_standardize_match_numpy():
    X = np.random.default_rng(0).gamma(2.0, 3.0, (5000, 7)).astype(np.float32)
    X[:, 3] = 1.5  # constant column
    mean, std = column_moments(X)
    assert np.allclose(mean, X.astype(np.float64).mean(0), rtol=1e-5)
    assert np.allclose(std[[0, 1, 2, 4, 5, 6]], X.astype(np.float64).std(0)[[0, 1, 2, 4, 5, 6]], rtol=1e-4)
    assert std[3] == 1.0
    Z = standardize(X, mean, std)
    assert Z.dtype == np.float32 and np.allclose(Z.mean(0), 0, atol=1e-3)


def test_shuffled_segments_cover_each_row_once():
    rng = np.random.default_rng(0)
    blocks = list(shuffled_segments(1000, 256, rng, segment_rows=64))
    rows = np.concatenate([np.arange(a, b) for runs in blocks for a, b in runs])
    assert sorted(rows.tolist()) == list(range(1000))
    assert rows[:64].tolist() != list(range(64)) or rows[64:128].tolist() != list(range(64, 128))


def test_unknown_head_lists_choices():
    with pytest.raises(FeatkitError, match="choose one of: logreg, mlp, svm"):
        make_head("xgb")
