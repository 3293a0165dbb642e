"""A report on many places is bounded: figures capped in pixels, galleries for a bounded number of places.
(With 1,000 places the confusion figure was once 70,100 x 60,080 px and compare ran out of time and memory;
bench/bench_places.py measures compare itself.)"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from featkit.figures import MAX_FIGURE_INCHES, accuracy_bars_png, confusion_png
from featkit.report import GALLERY_PLACES, galleries


def size(png: bytes) -> tuple[int, int]:
    return Image.open(io.BytesIO(png)).size


def test_the_confusion_figure_and_the_accuracy_figure_are_capped_in_pixels():
    n = 300
    rng = np.random.default_rng(0)
    cities = [f"Place {i:03d}" for i in range(n)]
    cm = rng.integers(0, 3, (n, n))
    w, h = size(confusion_png(cm.tolist(), cities, "many"))
    assert w <= MAX_FIGURE_INCHES * 100 + 1 and h <= MAX_FIGURE_INCHES * 100 + 1, (w, h)
    heads = {"a": {"per_city": {c: float(rng.random()) for c in cities}, "per_city_ci": {c: (0.0, 1.0) for c in cities}}}
    w, h = size(accuracy_bars_png(cities, heads))
    assert w <= 1000 and h <= 500, (w, h)
    few = cities[:5]
    w5, _ = size(confusion_png(cm[:5, :5].tolist(), few, "few"))
    assert w5 < w or w5 < 800  # a small matrix is drawn at its own size, with its counts


def test_galleries_cover_a_bounded_number_of_places_the_worst_first():
    n = GALLERY_PLACES * 3
    cities = [f"P{i:03d}" for i in range(n)]
    photos = [{"photo_id": f"{c}/{j}", "city": c, "path": f"/nowhere/{c}/{j}.jpg", "owner": ""} for c in cities for j in range(2)]
    per_city = {c: (i % 7) / 7 for i, c in enumerate(cities)}
    m = {"per_city": per_city, "confidence": [0.5] * len(photos), "correct": [j % 2 for j in range(len(photos))],
         "predicted": [0] * len(photos)}
    out = galleries({"cities": cities, "heads": {"h": m}, "test_photos": photos}, "h")
    assert len(out) == GALLERY_PLACES
    worst = sorted(cities, key=lambda c: (per_city[c], c))[:GALLERY_PLACES]
    assert [g["city"] for g in out] == worst
