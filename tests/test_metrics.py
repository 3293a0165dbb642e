"""Statistics with known answers: intervals, paired tests, the verdict."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from featkit.metrics import accuracy_interval, evaluate_predictions, paired_comparison, rank_heads


def _onehot_predictions(cities, y, right):
    """Probabilities that put the true city first on the photos in ``right``, the next city otherwise."""
    idx = {c: i for i, c in enumerate(cities)}
    p = np.full((len(y), len(cities)), 0.01)
    for r, (city, ok) in enumerate(zip(y, right)):
        j = idx[city] if ok else (idx[city] + 1) % len(cities)
        p[r, j] = 0.9
    return p / p.sum(1, keepdims=True)


def test_a_head_right_on_exactly_k_of_n_photos():
    cities = ["A", "B", "C", "D"]
    y = np.array(cities * 25)  # 100 photos, 25 per city
    right = np.zeros(100, dtype=bool)
    right[:37] = True  # 37 right
    m = evaluate_predictions(cities, y, _onehot_predictions(cities, y, right), np.array(cities))
    assert m["n"] == 100 and m["accuracy"] == pytest.approx(0.37)
    lo, hi = m["accuracy_ci"]
    assert lo < 0.37 < hi
    # the normal approximation of a binomial proportion's interval: +-1.96 sqrt(p(1-p)/n) = +-0.095
    assert (hi - lo) == pytest.approx(2 * 1.96 * np.sqrt(0.37 * 0.63 / 100), abs=0.03)
    assert m["per_city"]["A"] == pytest.approx(10 / 25)  # photos 0, 4, ..., 36 are A: 10 of them right
    assert sum(m["correct"]) == 37
    for c in cities:
        lo, hi = m["per_city_ci"][c]
        assert lo <= m["per_city"][c] <= hi


def test_perfect_and_hopeless_heads_have_degenerate_intervals():
    assert accuracy_interval(np.ones(50)) == (1.0, 1.0)
    assert accuracy_interval(np.zeros(50)) == (0.0, 0.0)


def test_two_heads_that_differ_on_a_known_set_of_photos():
    n = 200
    a = np.zeros(n, dtype=bool)
    b = np.zeros(n, dtype=bool)
    a[:120] = b[:120] = True  # both right on 120
    a[120:140] = True  # only A right on 20
    b[140:145] = True  # only B right on 5
    c = paired_comparison(a, b)
    assert (c["only_a_right"], c["only_b_right"]) == (20, 5)
    assert c["difference"] == pytest.approx(15 / 200)
    assert c["p_value"] == pytest.approx(stats.binomtest(20, 25, 0.5).pvalue)
    assert c["p_value"] < 0.01 and c["significant"]
    lo, hi = c["difference_ci"]
    assert 0 < lo < 15 / 200 < hi
    same = paired_comparison(a, a)
    assert same["p_value"] == 1.0 and not same["significant"] and same["difference"] == 0.0


def test_a_lead_that_is_noise_is_called_not_significant():
    a = np.zeros(100, dtype=bool)
    b = np.zeros(100, dtype=bool)
    a[:50] = b[:48] = True  # A right on 2 more photos
    r = rank_heads({"b": b, "a": a, "c": np.zeros(100, dtype=bool)})
    assert r["ranking"] == ["a", "b", "c"]
    assert "not significant" in r["verdict"] and r["verdict"].startswith("a scores highest")
    assert set(r["pairs"]) == {"a vs b", "a vs c", "b vs c"}
    assert r["pairs"]["a vs c"]["significant"]


def test_interval_covers_the_truth_at_about_the_stated_rate():
    """Simulated test sets of 200 photos from a head whose true accuracy is 0.6: the 95% interval
    should contain 0.6 in about 95% of them (percentile bootstrap runs a little under nominal)."""
    rng = np.random.default_rng(1)
    trials = 300
    hits = sum(lo <= 0.6 <= hi for lo, hi in (accuracy_interval(rng.random(200) < 0.6) for _ in range(trials)))
    assert 0.90 <= hits / trials <= 0.99, hits / trials
