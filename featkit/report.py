"""The comparison report: compare.md (tables), compare.json (the same numbers), confusion-matrix PNGs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from featkit.atomic import atomic_path, atomic_write

# The seed study's overall test accuracy (VGG16 conv base + 1024-unit dense head, 500 test photos
# per city); its per-city figures are the ``study_accuracy`` fields of the default cities file.
STUDY_OVERALL = 0.610


def _fmt(x) -> str:
    return "" if x is None or (isinstance(x, float) and np.isnan(x)) else f"{x:.3f}"


def study_accuracy() -> dict[str, float]:
    """The seed study's per-city test accuracy, from the default cities file."""
    from featkit.cities import load_cities

    return {c.name: c.study_accuracy for c in load_cities() if c.study_accuracy is not None}


def _ci(value, ci) -> str:
    """``0.506 (0.467-0.545)``: a figure with its 95% interval."""
    if ci is None or value is None or (isinstance(value, float) and np.isnan(value)):
        return _fmt(value)
    return f"{_fmt(value)} ({_fmt(ci[0])}-{_fmt(ci[1])})"


def _curve(curve) -> str:
    if not curve:
        return ""
    if isinstance(curve, dict):
        return ", ".join(f"{k}: {_fmt(v)}" for k, v in curve.items())
    return " ".join(_fmt(v) for v in curve)


def render_markdown(results: dict) -> str:
    cities, heads = results["cities"], results["heads"]
    names = list(heads)
    study_acc = study_accuracy()
    study = set(study_acc) <= set(cities)
    header = ["city", "n test"] + names + (["study"] if study else [])
    lines = [
        "# featkit: per-city comparison of heads",
        "",
        f"Test split: {sum(results['n_test'].values())} photos; every head is evaluated on the same photos. "
        f"Cache: `{results.get('cache_path', '')}` ({results.get('backbone', '')}).",
        "",
    ]
    ranking = results.get("ranking")
    if ranking:
        lines += ["**Verdict:** " + ranking["verdict"], ""]
    lines += [
        "## Accuracy per city",
        "",
        "Each figure is test accuracy with its 95% interval (percentile bootstrap over test photos, "
        "2,000 resamples, fixed seed).",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|",
    ]
    for c in cities:
        row = [c, str(results["n_test"][c])] + [_ci(heads[h]["per_city"][c], heads[h].get("per_city_ci", {}).get(c)) for h in names]
        if study:
            row.append(_fmt(study_acc.get(c)))
        lines.append("| " + " | ".join(row) + " |")
    for label, key, study_value in (("**overall**", "accuracy", STUDY_OVERALL), ("**macro**", "macro_accuracy", None), ("**top-3**", "top3", None)):
        n_total = str(sum(results["n_test"].values())) if key == "accuracy" else ""
        row = [label, n_total] + [_ci(heads[h][key], heads[h].get(f"{key}_ci")) for h in names]
        if study:
            row.append(_fmt(study_value))
        lines.append("| " + " | ".join(row) + " |")
    if ranking and ranking["pairs"]:
        lines += [
            "",
            "## Head against head (same test photos)",
            "",
            "McNemar's exact test on the photos exactly one of the two heads gets right; "
            "the difference's interval is a paired bootstrap.",
            "",
            "| pair | accuracy difference (95% CI) | only first right | only second right | p | significant at 0.05 |",
            "|---|---:|---:|---:|---:|---|",
        ]
        for pair in ranking["pairs"].values():
            diff = f"{pair['difference']:+.3f} ({pair['difference_ci'][0]:+.3f} to {pair['difference_ci'][1]:+.3f})"
            lines.append(
                f"| {pair['a']} vs {pair['b']} | {diff} | {pair['only_a_right']} | {pair['only_b_right']} | "
                f"{pair['p_value']:.3g} | {'yes' if pair['significant'] else 'no'} |"
            )
    lines += [
        "",
        "## Predicted share beside true share",
        "",
        "A city predicted far more often than it occurs is a sink for ambiguous scenes "
        "(the study's plain roads went to Los Angeles).",
        "",
        "| city | true share | " + " | ".join(f"{h} predicted" for h in names) + " |",
        "|---|---:|" + "---:|" * len(names),
    ]
    for c in cities:
        first = heads[names[0]]["true_share"][c] if names else 0.0
        lines.append(f"| {c} | {_fmt(first)} | " + " | ".join(_fmt(heads[h]["predicted_share"][c]) for h in names) + " |")
    lines += [
        "",
        "## Heads",
        "",
        "What each head chose on the validation split, and its validation curve (per candidate, or per epoch). "
        "A choice at the edge of its grid means the grid should be wider.",
        "",
        "| head | val accuracy | fit seconds | chosen | at grid edge | validation curve |",
        "|---|---:|---:|---|---|---|",
    ]
    for h in names:
        info = heads[h]
        params = ", ".join(f"{k}={v}" for k, v in sorted(info.get("chosen", {}).items()))
        edge = info.get("at_grid_edge")
        edge = "" if edge is None else ("**yes**" if edge else "no")
        lines.append(
            f"| {h} | {_fmt(info.get('val_score'))} | {info.get('fit_seconds', 0):.1f} | {params} | {edge} | {_curve(info.get('validation_curve'))} |"
        )
    lines += ["", "## Confusion matrices", "", "Rows: true city; columns: predicted city; shading: row-normalised.", ""]
    for h in names:
        lines.append(f"![{h}](confusion_{h}.png)")
    counts = results.get("split_counts")
    if counts:
        lines += ["", "## Split sizes", "", "| city | train | val | test |", "|---|---:|---:|---:|"]
        for c in cities:
            lines.append(f"| {c} | {counts['train'].get(c, 0)} | {counts['val'].get(c, 0)} | {counts['test'].get(c, 0)} |")
    return "\n".join(lines) + "\n"


def plot_confusion(confusion, cities: list[str], title: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cm = np.asarray(confusion, dtype=float)
    norm = cm / np.maximum(cm.sum(axis=1, keepdims=True), 1)
    n = len(cities)
    fig, ax = plt.subplots(figsize=(1.0 + 0.7 * n, 0.8 + 0.6 * n), dpi=110)
    ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(n), cities, rotation=45, ha="right")
    ax.set_yticks(range(n), cities)
    ax.set_xlabel("predicted city")
    ax.set_ylabel("true city")
    ax.set_title(title)
    for i in range(n):
        for j in range(n):
            ax.text(j, i, int(cm[i, j]), ha="center", va="center", fontsize=8, color="white" if norm[i, j] > 0.5 else "black")
    fig.tight_layout()
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp)
    plt.close(fig)


def write_report(results: dict, reports_dir: str | Path) -> dict[str, Path]:
    """Write compare.md, compare.json and one confusion_<head>.png per head; return their paths."""
    out = Path(reports_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"md": out / "compare.md", "json": out / "compare.json"}
    for h, info in results["heads"].items():
        p = out / f"confusion_{h}.png"
        plot_confusion(info["confusion"], results["cities"], f"{h}: accuracy {info['accuracy']:.3f}", p)
        paths[f"png_{h}"] = p
    atomic_write(paths["json"], json.dumps(results, indent=2, sort_keys=False, default=str) + "\n")
    atomic_write(paths["md"], render_markdown(results))
    return paths
