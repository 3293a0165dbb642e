"""Metrics and the report's tables."""

from __future__ import annotations

import numpy as np

from conftest import MLP
from featkit.metrics import evaluate_predictions
from featkit.report import render_markdown, study_accuracy, write_report


def test_metrics_confusion_top3_and_shares():
    cities = ["A", "B", "C", "D"]
    y = np.array(["A", "A", "B", "C", "D", "D"])
    # columns in classes order (D, C, B, A) to check the reordering
    classes = np.array(["D", "C", "B", "A"])
    p = np.array([
        [0.1, 0.2, 0.3, 0.4],  # A -> A
        [0.1, 0.1, 0.6, 0.2],  # A -> B (A second)
        [0.1, 0.1, 0.7, 0.1],  # B -> B
        [0.5, 0.1, 0.2, 0.2],  # C -> D (C last: outside top 3)
        [0.7, 0.1, 0.1, 0.1],  # D -> D
        [0.15, 0.05, 0.5, 0.3],  # D -> B (D third)
    ])
    m = evaluate_predictions(cities, y, p, classes)
    assert m["confusion"] == [[1, 1, 0, 0], [0, 1, 0, 0], [0, 0, 0, 1], [0, 1, 0, 1]]
    assert m["accuracy"] == 3 / 6
    assert m["per_city"] == {"A": 0.5, "B": 1.0, "C": 0.0, "D": 0.5}
    assert m["macro_accuracy"] == 0.5
    assert m["top3"] == 5 / 6
    assert m["predicted_share"]["B"] == 3 / 6 and m["true_share"]["B"] == 1 / 6


def test_study_column_only_with_the_studys_ten_cities(tmp_path):
    cities = sorted(study_accuracy())
    n = len(cities)
    y = np.repeat(cities, 3)
    p = np.eye(n)[np.repeat(np.arange(n), 3)]
    head = evaluate_predictions(cities, y, p, np.array(cities))
    results = {"cities": cities, "heads": {MLP: {**head, "val_score": 0.5, "fit_seconds": 1.0, "chosen": {}}},
               "n_test": {c: 3 for c in cities}}
    md = render_markdown(results)
    assert "| study |" in md or f"| {MLP} | study |" in md
    assert "| New York | 3 | 1.000 (1.000-1.000) | 0.857 |" in md and "| **overall** | 30 | 1.000 (1.000-1.000) | 0.610 |" in md
    paths = write_report(results, tmp_path)
    assert paths[f"png_{MLP}"].exists() and paths["json"].exists()
    results["cities"] = cities[:3]
    results["n_test"] = {c: 3 for c in cities[:3]}
    assert "study" not in render_markdown({**results, "heads": {MLP: {**evaluate_predictions(cities[:3], y[:9], p[:9, :3], np.array(cities[:3])), "val_score": 1, "fit_seconds": 1, "chosen": {}}}}).split("## Predicted")[0].lower().replace("study's", "")
