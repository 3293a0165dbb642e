"""How good a head's predictions on a test split are, and how sure we can be: numpy, scipy and
scikit-learn only (no torch, no h5py).

- :func:`evaluate_predictions`: accuracy overall, per city, macro (balanced) and top-3,
  the confusion matrix and predicted vs true shares, each accuracy with a 95% bootstrap
  interval over test photos.
- :func:`paired_comparison`: two heads on the same photos: McNemar's exact test on the
  photos where they disagree, and a paired bootstrap interval of the accuracy difference.
- :func:`rank_heads`: which head is best and whether its lead over the next is significant.
- :func:`calibration`: expected calibration error and the reliability diagram's bins.
- :func:`geographic_error`: great-circle km between predicted and true city centres.
- :func:`confused_pairs`: the city pairs most often mistaken for each other, both directions.

Intervals are percentile bootstrap intervals (``scipy.stats.bootstrap``, 2,000
resamples of the test photos, fixed seed), resampling photos with their true
city, so per-city and macro intervals include the noise of how many photos of
each city the test split happens to hold.
"""

from __future__ import annotations

import warnings

import numpy as np
from scipy import stats
from sklearn.metrics import confusion_matrix

from featkit.cities import great_circle_km

CONFIDENCE = 0.95
N_RESAMPLES = 2000
SEED = 0
METHOD = "percentile"
_BATCH_VALUES = 20_000_000  # resampled values held at once per array (160 MB of float64), whatever the test size


def _interval(statistic, data: tuple[np.ndarray, ...], *, vectorized: bool = False, method: str = METHOD) -> tuple[float, float]:
    """The 95% percentile bootstrap interval of ``statistic(*data)`` over the rows (photos), resampled together."""
    n = len(data[0])
    if n < 2:
        v = float(statistic(*data)) if n else float("nan")
        return (v, v)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", stats.DegenerateDataWarning)  # all resamples equal: handled below
        warnings.simplefilter("ignore", RuntimeWarning)  # BCa on a degenerate jackknife gives nan: handled below
        res = stats.bootstrap(
            data, statistic, paired=True, vectorized=vectorized, batch=max(1, min(N_RESAMPLES, _BATCH_VALUES // n)), n_resamples=N_RESAMPLES, confidence_level=CONFIDENCE,
            method=method, random_state=np.random.default_rng(SEED),
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


def balanced_accuracy(t: np.ndarray, p: np.ndarray, n_classes: int):
    """Balanced accuracy: the mean recall over the classes present in ``t`` (as scikit-learn's
    ``balanced_accuracy_score``), vectorised over leading axes, so 2,000 bootstrap resamples
    are one bincount instead of 2,000 calls. ``t`` and ``p`` hold class indices < ``n_classes``."""
    t, p = np.asarray(t, dtype=np.int64), np.asarray(p, dtype=np.int64)
    lead, m = t.shape[:-1], t.shape[-1]
    rows = int(np.prod(lead, dtype=np.int64))
    idx = (t.reshape(rows, m) + np.arange(rows)[:, None] * n_classes).ravel()
    total = np.bincount(idx, minlength=rows * n_classes).reshape(rows, n_classes)
    right = np.bincount(idx, weights=(t == p).reshape(-1).astype(float), minlength=rows * n_classes).reshape(rows, n_classes)
    present = total > 0
    recall = np.where(present, right / np.maximum(total, 1), 0.0)
    out = recall.sum(axis=1) / np.maximum(present.sum(axis=1), 1)
    return out.reshape(lead) if lead else float(out[0])


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

    return {
        "n": int(len(true_idx)),
        "accuracy": float(correct.mean()) if len(correct) else float("nan"),
        "accuracy_ci": accuracy_interval(correct),
        "macro_accuracy": float(np.mean([per_city[cities[i]] for i in present])) if len(present) else float("nan"),
        "macro_accuracy_ci": _interval(lambda t, p, axis=-1: balanced_accuracy(t, p, n), (true_idx, pred_idx), vectorized=True),
        "top3": float(in_top3.mean()) if len(in_top3) else float("nan"),
        "top3_ci": accuracy_interval(in_top3),
        "per_city": per_city,
        "per_city_ci": per_city_ci,
        "confusion": confusion.tolist(),
        "true_share": {c: float(support[i] / total) for i, c in enumerate(cities)},
        "predicted_share": {c: float(confusion[:, i].sum() / total) for i, c in enumerate(cities)},
        "correct": correct.astype(int).tolist(),  # per test photo, for paired comparisons
        "predicted": pred_idx.astype(int).tolist(),  # per test photo: index into ``cities``
        "confidence": [round(float(x), 5) for x in proba[np.arange(len(pred_idx)), pred_idx]],  # top-1 probability
        "calibration": calibration(proba[np.arange(len(pred_idx)), pred_idx], correct),
        "confused_pairs": confused_pairs(confusion, cities),
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


# --------------------------------------------------------------------------- calibration

BCA_MAX_PHOTOS = 6000
CALIBRATION_BINS = 15  # equal-width bins of top-1 confidence, the usual choice (Guo et al. 2017)


def calibration(confidence: np.ndarray, correct: np.ndarray, n_bins: int = CALIBRATION_BINS) -> dict:
    """How far a head's top-1 confidence is from how often it is right.

    Expected calibration error: photos binned by confidence into ``n_bins`` equal-width
    bins over [0, 1]; ECE = sum over bins of (share of photos) x |accuracy - mean confidence|.
    A perfectly calibrated head scores 0; one that says 0.9 and is right half the time, 0.4.
    ``bins`` holds each non-empty bin's range, count, mean confidence and accuracy (the
    reliability diagram), and ``ece_ci`` a 95% bootstrap interval over photos.
    """
    conf = np.asarray(confidence, dtype=float)
    right = np.asarray(correct, dtype=float)
    if conf.shape != right.shape:
        raise ValueError("one confidence and one right/wrong per photo")
    if n_bins < 1:
        raise ValueError("n_bins must be at least 1")

    def ece(c, r, axis=-1):  # vectorised over leading axes (bootstrap resamples): one bincount for all of them
        c, r = np.asarray(c, dtype=float), np.asarray(r, dtype=float)
        lead, n = c.shape[:-1], c.shape[-1]
        rows = int(np.prod(lead, dtype=np.int64))
        idx = np.minimum((c.reshape(rows, n) * n_bins).astype(np.int64), n_bins - 1) + np.arange(rows)[:, None] * n_bins
        sums_r = np.bincount(idx.ravel(), weights=r.ravel(), minlength=rows * n_bins)
        sums_c = np.bincount(idx.ravel(), weights=c.ravel(), minlength=rows * n_bins)
        # sum_b n_b/N |acc_b - conf_b| = sum_b |sum of right - sum of confidence in b| / N
        out = np.abs(sums_r - sums_c).reshape(rows, n_bins).sum(axis=1) / max(n, 1)
        return out.reshape(lead) if lead else float(out[0])

    idx = np.minimum((conf * n_bins).astype(np.int64), n_bins - 1)
    bins = []
    for b in range(n_bins):
        mine = idx == b
        if mine.any():
            bins.append({
                "lo": b / n_bins, "hi": (b + 1) / n_bins, "n": int(mine.sum()),
                "confidence": float(conf[mine].mean()), "accuracy": float(right[mine].mean()),
            })
    return {
        "ece": ece(conf, right) if len(conf) else float("nan"),
        # ECE is biased upwards on resamples, so a percentile interval can miss the estimate on a small test split;
        # BCa corrects that bias. Its jackknife costs n evaluations (and n x n booleans), so past
        # BCA_MAX_PHOTOS, where the bias is negligible anyway, the percentile interval is used.
        "ece_ci": _interval(ece, (conf, right), vectorized=True, method="BCa" if len(conf) <= BCA_MAX_PHOTOS else METHOD)
        if len(conf) else (float("nan"), float("nan")),
        "n_bins": n_bins,
        "mean_confidence": float(conf.mean()) if len(conf) else float("nan"),
        "bins": bins,
    }


# --------------------------------------------------------------------------- distances

DISTANCE_THRESHOLDS_KM = (500, 2500)


def geographic_error(true_idx: np.ndarray, pred_idx: np.ndarray, coords: np.ndarray) -> dict:
    """How far off the predictions are: the great-circle distance between the predicted and the
    true city's centre for every test photo (0 km when right).

    ``coords`` is (n_cities, 2) latitude, longitude in degrees, rows in the order the indices use.
    Returns the mean (with a 95% bootstrap interval) and median distance in km, and the share of
    photos placed within each of ``DISTANCE_THRESHOLDS_KM``.
    """
    coords = np.asarray(coords, dtype=float)
    t, p = np.asarray(true_idx, dtype=np.int64), np.asarray(pred_idx, dtype=np.int64)
    table = great_circle_km(coords[:, None, 0], coords[:, None, 1], coords[None, :, 0], coords[None, :, 1])
    d = table[t, p] if len(t) else np.zeros(0)
    out = {
        "n": int(len(d)),
        "mean_km": float(d.mean()) if len(d) else float("nan"),
        "mean_km_ci": _interval(lambda x, axis=-1: x.mean(axis=axis), (d,), vectorized=True),
        "median_km": float(np.median(d)) if len(d) else float("nan"),
        "distances_km": [round(float(x), 1) for x in d],
    }
    for km in DISTANCE_THRESHOLDS_KM:
        out[f"within_{km}_km"] = float((d <= km).mean()) if len(d) else float("nan")
        out[f"within_{km}_km_ci"] = accuracy_interval(d <= km)
    return out


def confused_pairs(confusion, cities: list[str], k: int = 5) -> list[dict]:
    """The ``k`` city pairs most often mistaken for each other, counting both directions
    (``a_as_b``: photos of a predicted as b, and its share of a's test photos)."""
    cm = np.asarray(confusion, dtype=np.int64)
    support = cm.sum(axis=1)
    pairs = []
    for i in range(len(cities)):
        for j in range(i + 1, len(cities)):
            total = int(cm[i, j] + cm[j, i])
            if total:
                pairs.append({
                    "a": cities[i], "b": cities[j], "total": total,
                    "a_as_b": int(cm[i, j]), "a_as_b_share": float(cm[i, j] / max(support[i], 1)),
                    "b_as_a": int(cm[j, i]), "b_as_a_share": float(cm[j, i] / max(support[j], 1)),
                })
    pairs.sort(key=lambda p: (-p["total"], p["a"], p["b"]))
    return pairs[:k]
