"""How good a head's predictions on a test split are, and how sure we can be: numpy, scipy and
scikit-learn only (no torch, no h5py).

- :func:`evaluate_predictions`: accuracy overall, per city, macro (balanced) and top-3,
  the confusion matrix and predicted vs true shares, each accuracy with a 95% bootstrap
  interval over test photos.
- :func:`paired_comparison`: two heads on the same photos: McNemar's exact test on the
  photos where they disagree, and a paired bootstrap interval of the accuracy difference.
- :func:`rank_heads`: which head is best and whether its lead over the next is significant.

Intervals are percentile bootstrap intervals (``scipy.stats.bootstrap``, 2,000
resamples of the test photos, fixed seed), resampling photos with their true
city, so per-city and macro intervals include the noise of how many photos of
each city the test split happens to hold.
"""

from __future__ import annotations

import warnings

import numpy as np
from scipy import stats
from sklearn.metrics import balanced_accuracy_score, confusion_matrix

CONFIDENCE = 0.95
N_RESAMPLES = 2000
SEED = 0
METHOD = "percentile"


def _interval(statistic, data: tuple[np.ndarray, ...], *, vectorized: bool = False) -> tuple[float, float]:
    """The 95% percentile bootstrap interval of ``statistic(*data)`` over the rows (photos), resampled together."""
    n = len(data[0])
    if n < 2:
        v = float(statistic(*data)) if n else float("nan")
        return (v, v)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", stats.DegenerateDataWarning)  # all resamples equal: handled below
        res = stats.bootstrap(
            data, statistic, paired=True, vectorized=vectorized, n_resamples=N_RESAMPLES, confidence_level=CONFIDENCE,
            method=METHOD, random_state=np.random.default_rng(SEED),
        )
    lo, hi = res.confidence_interval
    if np.isnan(lo):  # every resample gave the same value (all right or all wrong)
        v = float(statistic(*data))
        return (v, v)
    return (float(lo), float(hi))


def accuracy_interval(correct: np.ndarray) -> tuple[float, float]:
    """95% bootstrap interval of the mean of a 0/1 vector (one entry per test photo)."""
    correct = np.asarray(correct, dtype=float)
    return _interval(lambda c, axis=-1: c.mean(axis=axis), (correct,), vectorized=True)


def evaluate_predictions(cities: list[str], y_true: np.ndarray, proba: np.ndarray, classes: np.ndarray) -> dict:
    """Accuracy overall, per city, macro and top-3 (each with ``<name>_ci``), the confusion matrix,
    and predicted vs true share.

    ``proba`` columns follow ``classes``; ``cities`` fixes the row/column order of
    the confusion matrix (true city in rows, predicted in columns).
    """
    classes = [str(c) for c in classes]
    col = {c: i for i, c in enumerate(classes)}
    proba = np.asarray(proba)[:, [col[c] for c in cities]]  # columns now follow ``cities``
    index = {c: i for i, c in enumerate(cities)}
    true_idx = np.array([index[str(c)] for c in y_true], dtype=np.int64)
    pred_idx = proba.argmax(axis=1)
    n = len(cities)
    confusion = confusion_matrix(true_idx, pred_idx, labels=np.arange(n))
    k = min(3, n)
    topk = np.argsort(-proba, axis=1, kind="stable")[:, :k]
    in_top3 = (topk == true_idx[:, None]).any(axis=1)
    correct = pred_idx == true_idx
    support = confusion.sum(axis=1)
    total = max(int(support.sum()), 1)
    per_city, per_city_ci = {}, {}
    for i, c in enumerate(cities):
        mine = correct[true_idx == i]
        per_city[c] = float(mine.mean()) if len(mine) else float("nan")
        per_city_ci[c] = accuracy_interval(mine) if len(mine) else (float("nan"), float("nan"))
    present = np.unique(true_idx)

    def macro(t, p):
        if len(np.unique(t)) < 2:
            return float((t == p).mean())
        with warnings.catch_warnings():  # a resample may lack a city that is still predicted: that is expected
            warnings.filterwarnings("ignore", message="y_pred contains classes not in y_true")
            return balanced_accuracy_score(t, p)

    return {
        "n": int(len(true_idx)),
        "accuracy": float(correct.mean()) if len(correct) else float("nan"),
        "accuracy_ci": accuracy_interval(correct),
        "macro_accuracy": float(np.mean([per_city[cities[i]] for i in present])) if len(present) else float("nan"),
        "macro_accuracy_ci": _interval(macro, (true_idx, pred_idx)),
        "top3": float(in_top3.mean()) if len(in_top3) else float("nan"),
        "top3_ci": accuracy_interval(in_top3),
        "per_city": per_city,
        "per_city_ci": per_city_ci,
        "confusion": confusion.tolist(),
        "true_share": {c: float(support[i] / total) for i, c in enumerate(cities)},
        "predicted_share": {c: float(confusion[:, i].sum() / total) for i, c in enumerate(cities)},
        "correct": correct.astype(int).tolist(),  # per test photo, for paired comparisons
    }


def paired_comparison(correct_a: np.ndarray, correct_b: np.ndarray, *, alpha: float = 1 - CONFIDENCE) -> dict:
    """Two heads judged on the same photos: is A's accuracy different from B's?

    McNemar's exact test: under "no difference", each photo that exactly one head
    gets right is equally likely to favour either, so the count favouring A is
    Binomial(discordant, 1/2) (``scipy.stats.binomtest``, two-sided). The interval
    of the difference (A - B) is a paired bootstrap over photos.
    """
    a = np.asarray(correct_a, dtype=bool)
    b = np.asarray(correct_b, dtype=bool)
    if a.shape != b.shape:
        raise ValueError("the two heads must be judged on the same photos")
    only_a, only_b = int((a & ~b).sum()), int((~a & b).sum())
    discordant = only_a + only_b
    p = float(stats.binomtest(only_a, discordant, 0.5).pvalue) if discordant else 1.0
    diff = float(a.mean() - b.mean()) if len(a) else 0.0
    ci = _interval(lambda x, y, axis=-1: x.mean(axis=axis) - y.mean(axis=axis), (a.astype(float), b.astype(float)), vectorized=True)
    return {
        "difference": diff,
        "difference_ci": ci,
        "only_a_right": only_a,
        "only_b_right": only_b,
        "p_value": p,
        "significant": bool(p < alpha),
        "test": "McNemar exact (binomial on discordant photos), two-sided",
    }


def rank_heads(correct: dict[str, np.ndarray]) -> dict:
    """Heads ranked by accuracy, every pair compared, and a plain-words verdict on the best."""
    names = sorted(correct, key=lambda h: (-float(np.mean(correct[h])), h))
    pairs = {}
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            pairs[f"{a} vs {b}"] = {"a": a, "b": b, **paired_comparison(correct[a], correct[b])}
    verdict = ""
    if len(names) == 1:
        verdict = f"{names[0]} is the only head."
    elif names:
        best, second = names[0], names[1]
        c = pairs[f"{best} vs {second}"]
        lead = f"{c['difference']:+.3f} ({c['difference_ci'][0]:+.3f} to {c['difference_ci'][1]:+.3f})"
        if c["significant"]:
            verdict = f"{best} is best; its lead over {second}, {lead}, is significant (McNemar p = {c['p_value']:.3g})."
        else:
            verdict = (
                f"{best} scores highest, but its lead over {second}, {lead}, is not significant "
                f"(McNemar p = {c['p_value']:.3g}): on these test photos the two are not distinguishable."
            )
    return {"ranking": names, "pairs": pairs, "verdict": verdict}
