"""The report's pictures: matplotlib figures (PNG bytes) and photo thumbnails (JPEG bytes).

Labels that come from outside (city and head names) are passed through
:func:`plain`, so a ``$`` is drawn as a dollar sign instead of starting
matplotlib's maths mode (an unbalanced one would abort the whole report).
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import numpy as np

THUMB_PX = 128  # long side of a gallery thumbnail: a 10-city report stays a few MB
THUMB_QUALITY = 70


LABEL_CHARS = 32  # longer labels are cut, so a long folder name cannot squeeze the plot away
# Figures that scale with the number of places are capped, so a report on 1,000 places stays small and fast:
CELL_TEXT_PLACES = 25  # counts written in the confusion matrix's cells up to this many places
TICK_LABEL_PLACES = 60  # place names on its axes up to this many
MAX_FIGURE_INCHES = 14.0  # at 100 dpi: 1,400 px a side, whatever the number of places
BAR_PLACES = 40  # one bar per place and head up to this many; past it, each head's accuracies sorted


def plain(text: str, limit: int | None = None) -> str:
    """Text matplotlib draws literally (no maths mode), cut to ``limit`` characters."""
    text = str(text)
    if limit and len(text) > limit:
        text = text[: limit - 1] + "\u2026"
    return text.replace("\\", "\\\\").replace("$", r"\$")


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _png(fig) -> bytes:
    with warnings.catch_warnings():  # "tight layout not applied" for very long labels: the figure is still drawn
        warnings.simplefilter("ignore", UserWarning)
        fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    _pyplot().close(fig)
    return buf.getvalue()


def confusion_png(confusion, cities: list[str], title: str) -> bytes:
    """Row-normalised shading, counts written in the cells; true city in rows."""
    plt = _pyplot()
    cm = np.asarray(confusion, dtype=float)
    norm = cm / np.maximum(cm.sum(axis=1, keepdims=True), 1)
    n = len(cities)
    labels = [plain(c, LABEL_CHARS) for c in cities]
    fig, ax = plt.subplots(figsize=(min(1.0 + 0.7 * n, MAX_FIGURE_INCHES), min(0.8 + 0.6 * n, MAX_FIGURE_INCHES)), dpi=100)
    ax.imshow(norm, cmap="Blues", vmin=0, vmax=1, interpolation="nearest")
    if n <= TICK_LABEL_PLACES:
        ax.set_xticks(range(n), labels, rotation=45, ha="right")
        ax.set_yticks(range(n), labels)
    ax.set_xlabel("predicted city" + ("" if n <= TICK_LABEL_PLACES else f" ({n} places, in the report's order)"))
    ax.set_ylabel("true city")
    ax.set_title(plain(title))
    if n <= CELL_TEXT_PLACES:
        for i in range(n):
            for j in range(n):
                ax.text(j, i, int(cm[i, j]), ha="center", va="center", fontsize=8, color="white" if norm[i, j] > 0.5 else "black")
    return _png(fig)


def accuracy_bars_png(cities: list[str], heads: dict, study: dict[str, float] | None = None) -> bytes:
    """Per-city accuracy, one bar per head, with the 95% interval as an error bar (and the study's figure as a tick)."""
    plt = _pyplot()
    names = list(heads)
    n, k = len(cities), max(len(names), 1)
    if n > BAR_PLACES:
        return _sorted_accuracy_png(cities, heads)
    width = 0.8 / k
    fig, ax = plt.subplots(figsize=(max(6.0, 0.9 * n + 2), 3.6), dpi=100)
    x = np.arange(n)
    for i, h in enumerate(names):
        acc = np.array([heads[h]["per_city"][c] for c in cities], dtype=float)
        ci = np.array([heads[h]["per_city_ci"][c] for c in cities], dtype=float)
        err = np.vstack([np.clip(acc - ci[:, 0], 0, None), np.clip(ci[:, 1] - acc, 0, None)])
        ax.bar(x - 0.4 + width * (i + 0.5), acc, width, yerr=err, capsize=2, label=plain(h))
    if study:
        xs = [j for j, c in enumerate(cities) if c in study]
        ax.scatter(xs, [study[cities[j]] for j in xs], marker="_", s=400, color="black", zorder=3, label="study")
    ax.set_xticks(x, [plain(c, LABEL_CHARS) for c in cities], rotation=30, ha="right")
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("test accuracy (95% CI)")
    ax.legend(fontsize=8, ncol=min(k + 1, 4))
    ax.grid(axis="y", alpha=0.3)
    return _png(fig)


def _sorted_accuracy_png(cities: list[str], heads: dict) -> bytes:
    """Many places: each head's per-place accuracies, sorted, as one line (a bar per place would not fit)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8.0, 3.6), dpi=100)
    for h in heads:
        acc = np.sort(np.array([heads[h]["per_city"][c] for c in cities], dtype=float))[::-1]
        ax.plot(np.arange(1, len(acc) + 1), acc, drawstyle="steps-post", label=plain(h))
    ax.set_xlabel(f"places, from best to worst ({len(cities)}; the tables give each)")
    ax.set_ylabel("test accuracy")
    ax.set_ylim(0, 1.05)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return _png(fig)


def reliability_png(heads: dict) -> bytes:
    """One reliability diagram per head: accuracy against mean confidence per bin, bar area ~ photos."""
    plt = _pyplot()
    names = list(heads)
    fig, axes = plt.subplots(1, len(names), figsize=(3.2 * len(names), 3.3), dpi=100, squeeze=False)
    for ax, h in zip(axes[0], names):
        cal = heads[h]["calibration"]
        nb = cal["n_bins"]
        most = max([b["n"] for b in cal["bins"]], default=1)
        for b in cal["bins"]:
            ax.bar(b["lo"], b["accuracy"], width=1 / nb, align="edge", color="tab:blue", alpha=0.35 + 0.65 * b["n"] / most, edgecolor="white")
            ax.plot(b["confidence"], b["accuracy"], "o", color="tab:blue", ms=3)
        ax.plot([0, 1], [0, 1], "--", color="grey", lw=1)
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.set_xlabel("confidence (top-1 probability)")
        ax.set_ylabel("accuracy")
        ax.set_title(plain(f"{h}: ECE {cal['ece']:.3f} ({nb} bins)"), fontsize=9)
    return _png(fig)


def distance_png(heads: dict, thresholds=(500, 2500)) -> bytes:
    """Share of test photos placed within d km of their true city, per head (a cumulative curve)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 3.3), dpi=100)
    top = 1.0
    for h, m in heads.items():
        d = np.sort(np.asarray(m["geo"]["distances_km"], dtype=float))
        if not len(d):
            continue
        top = max(top, float(d[-1]))
        ax.step(np.concatenate([[0], d]), np.concatenate([[0], np.arange(1, len(d) + 1) / len(d)]), where="post", label=plain(h))
    for km in thresholds:
        ax.axvline(km, color="grey", lw=0.8, ls=":")
    ax.set_xlim(0, top * 1.02)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("distance from the true city's centre (km)")
    ax.set_ylabel("share of test photos")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return _png(fig)


def thumbnail_jpeg(path: str | Path, px: int = THUMB_PX) -> bytes | None:
    """A small JPEG of the photo (long side ``px``), or None if it cannot be read now."""
    from PIL import Image, ImageOps

    try:
        with Image.open(path) as im:
            if im.format == "JPEG":
                im.draft("RGB", (px * 2, px * 2))  # decode at a reduced scale: fast for large photos
            im = ImageOps.exif_transpose(im).convert("RGB")
            im.thumbnail((px, px), Image.BILINEAR)
            buf = io.BytesIO()
            im.save(buf, format="JPEG", quality=THUMB_QUALITY)
            return buf.getvalue()
    except Exception:  # moved, damaged, or a bomb: the gallery shows a placeholder instead
        return None
