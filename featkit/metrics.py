"""Per-city metrics of a head's predictions on a test split. numpy only: no torch, no h5py."""

from __future__ import annotations

import numpy as np


def evaluate_predictions(cities: list[str], y_true: np.ndarray, proba: np.ndarray, classes: np.ndarray) -> dict:
    """Accuracy overall, per city, macro and top-3, the confusion matrix, and predicted vs true share.

    ``proba`` columns follow ``classes``; ``cities`` fixes the row/column order of
    the confusion matrix (true city in rows, predicted in columns).
    """
    classes = [str(c) for c in classes]
    col = {c: i for i, c in enumerate(classes)}
    order = [col[c] for c in cities]
    proba = np.asarray(proba)[:, order]  # columns now follow ``cities``
    true_idx = np.array([cities.index(c) for c in y_true])
    pred_idx = proba.argmax(axis=1)
    n = len(cities)
    confusion = np.zeros((n, n), dtype=np.int64)
    np.add.at(confusion, (true_idx, pred_idx), 1)
    k = min(3, n)
    topk = np.argsort(-proba, axis=1)[:, :k]
    top3 = float((topk == true_idx[:, None]).any(axis=1).mean()) if len(true_idx) else float("nan")
    support = confusion.sum(axis=1)
    per_city = {c: (float(confusion[i, i] / support[i]) if support[i] else float("nan")) for i, c in enumerate(cities)}
    total = max(int(support.sum()), 1)
    return {
        "accuracy": float(np.trace(confusion) / total),
        "macro_accuracy": float(np.nanmean(list(per_city.values()))),
        "top3": top3,
        "per_city": per_city,
        "confusion": confusion.tolist(),
        "true_share": {c: float(support[i] / total) for i, c in enumerate(cities)},
        "predicted_share": {c: float(confusion[:, i].sum() / total) for i, c in enumerate(cities)},
    }
