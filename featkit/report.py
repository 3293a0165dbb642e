"""The comparison report: compare.md (tables), compare.json (the same numbers), compare.html (one
self-contained page with figures and photo galleries), confusion-matrix PNGs.

Every string that comes from outside (city names from folder names, head names, owners, paths) is
escaped for the format it lands in: :func:`md` for Markdown, the template engine's autoescape for
HTML, :func:`featkit.figures.plain` for matplotlib labels.
"""

from __future__ import annotations

import base64
import json
import time
import uuid
from importlib import resources
from pathlib import Path

import numpy as np

from featkit.atomic import publish_files
from featkit.escape import printable
from featkit.naming import backbone_name, head_name as shown
from featkit.comparison import Comparison, as_dict

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


# What Markdown (or the HTML it may carry) acts on inside a line: code, emphasis, links and images,
# tags and entities, table cells, strikethrough, maths. Backslash escapes of ASCII punctuation are CommonMark.
_MD_SPECIAL = set("\\`*_[]<>&|~$")


def md(text) -> str:
    """Outside text (city, head and owner names, paths) as literal Markdown: every character
    Markdown or an HTML renderer would act on is backslash-escaped, so a ``|`` cannot break a
    table and ``<script>`` or ``[x](y)`` stay text."""
    return "".join("\\" + ch if ch in _MD_SPECIAL else ch for ch in printable(str(text).replace("\n", " ")))


def _km(x) -> str:
    return "" if x is None or (isinstance(x, float) and np.isnan(x)) else f"{x:,.0f}"


def render_markdown(results: Comparison | dict) -> str:
    """compare.md: the tables of a comparison (or of its ``compare.json`` mapping)."""
    results = as_dict(results)
    cities, heads = results["cities"], results["heads"]
    names = list(heads)
    study_acc = study_accuracy()
    study = set(study_acc) <= set(cities)
    header = ["city", "n test"] + [md(shown(h)) for h in names] + (["study"] if study else [])
    lines = [
        "# featkit: per-city comparison of heads" + (" and backbones" if len(results.get("backbones") or {}) > 1 else ""),
        "",
        f"Test split: {sum(results['n_test'].values())} photos; every head is evaluated on the same photos. "
        f"Cache: {md(results.get('cache_path', ''))} ({md(results.get('backbone', ''))}). "
        "The same report with figures and photo galleries: `compare.html`."
        + (f" Run `{md(results['run_id'])}` (compare.json and compare.html name the same run)." if results.get("run_id") else ""),
        "",
    ]
    ranking = results.get("ranking")
    if ranking:
        lines += ["**Verdict:** " + md(ranking["verdict"]), ""]
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
        row = [md(c), str(results["n_test"][c])] + [_ci(heads[h]["per_city"][c], heads[h].get("per_city_ci", {}).get(c)) for h in names]
        if study:
            row.append(_fmt(study_acc.get(c)))
        lines.append("| " + " | ".join(row) + " |")
    for label, key, study_value in (("**overall**", "accuracy", STUDY_OVERALL), ("**macro**", "macro_accuracy", None), ("**top-3**", "top3", None)):
        n_total = str(sum(results["n_test"].values())) if key == "accuracy" else ""
        row = [label, n_total] + [_ci(heads[h][key], heads[h].get(f"{key}_ci")) for h in names]
        if study:
            row.append(_fmt(study_value))
        lines.append("| " + " | ".join(row) + " |")
    grid = backbone_grid(results)
    if grid:
        lines += ["", "## Backbone x head", "", "Overall test accuracy (95% interval) of every pair, on the same test photos.", "",
                  "| backbone | " + " | ".join(md(shown(h)) for h in grid["heads"]) + " |", "|---|" + "---:|" * len(grid["heads"])]
        for b in grid["backbones"]:
            cells = [_ci(c["accuracy"], c["accuracy_ci"]) if c else "" for c in (grid["cells"][b].get(h) for h in grid["heads"])]
            lines.append(f"| {md(backbone_name(b))} | " + " | ".join(cells) + " |")
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
                f"| {md(pair['a'])} vs {md(pair['b'])} | {diff} | {pair['only_a_right']} | {pair['only_b_right']} | "
                f"{pair['p_value']:.3g} | {'yes' if pair['significant'] else 'no'} |"
            )
    if all("calibration" in heads[h] for h in names):
        lines += [
            "",
            "## Calibration",
            "",
            "Expected calibration error of the top-1 probability (equal-width bins; 0 is perfectly calibrated) "
            "with its 95% interval. ECE on a finite test split is biased upwards, so the interval is bias-corrected "
            "(BCa bootstrap; percentile above 6,000 photos) and can lie below the raw figure. Reliability diagrams: `compare.html`.",
            "",
            "| head | ECE (95% CI) | bins | mean confidence | accuracy |",
            "|---|---:|---:|---:|---:|",
        ]
        for h in names:
            cal = heads[h]["calibration"]
            lines.append(f"| {md(shown(h))} | {_ci(cal['ece'], cal['ece_ci'])} | {cal['n_bins']} | {_fmt(cal['mean_confidence'])} | {_fmt(heads[h]['accuracy'])} |")
    geo = results.get("geo")
    if geo is not None:
        lines += ["", "## How far off", ""]
        if geo["missing"]:
            lines.append(f"No distances: no coordinates for {', '.join(md(c) for c in geo['missing'])} in {md(geo['source'])} "
                         "(give a cities file with `--cities FILE`, or put a `cities.toml` beside the city folders).")
        else:
            lines += [
                f"Great-circle distance between the predicted and the true city's centre (0 km when right); coordinates from {md(geo['source'])}.",
                "",
                "| head | mean km (95% CI) | median km | within 500 km | within 2,500 km |",
                "|---|---:|---:|---:|---:|",
            ]
            for h in names:
                g = heads[h]["geo"]
                mean = f"{_km(g['mean_km'])} ({_km(g['mean_km_ci'][0])}-{_km(g['mean_km_ci'][1])})"
                lines.append(f"| {md(shown(h))} | {mean} | {_km(g['median_km'])} | {_ci(g['within_500_km'], g['within_500_km_ci'])} | "
                             f"{_ci(g['within_2500_km'], g['within_2500_km_ci'])} |")
    if names and "confused_pairs" in heads[names[0]]:
        lines += ["", "## Most confused city pairs", "", "Both directions; the share is of the first city's test photos.", "",
                  "| head | pair | first as second | second as first |", "|---|---|---:|---:|"]
        for h in names:
            for p in heads[h]["confused_pairs"]:
                lines.append(f"| {md(shown(h))} | {md(p['a'])} / {md(p['b'])} | {p['a_as_b']} ({_fmt(p['a_as_b_share'])}) | {p['b_as_a']} ({_fmt(p['b_as_a_share'])}) |")
    lines += [
        "",
        "## Predicted share beside true share",
        "",
        "A city predicted far more often than it occurs is a sink for ambiguous scenes "
        "(the study's plain roads went to Los Angeles).",
        "",
        "| city | true share | " + " | ".join(f"{md(shown(h))} predicted" for h in names) + " |",
        "|---|---:|" + "---:|" * len(names),
    ]
    for c in cities:
        first = heads[names[0]]["true_share"][c] if names else 0.0
        lines.append(f"| {md(c)} | {_fmt(first)} | " + " | ".join(_fmt(heads[h]["predicted_share"][c]) for h in names) + " |")
    leaks = results.get("leaks")
    if leaks:
        lines += ["", "## Split check", "", _leak_sentence(leaks)]
        if leaks["owners"]:
            lines += ["", "| owner | test photos | train/val photos |", "|---|---:|---:|"]
            lines += [f"| {md(o['owner'])} | {o['test']} | {o['train_val']} |" for o in leaks["owners"]]
        if leaks["near_duplicates"]:
            lines += ["", "| test photo | train/val photo | differing bits |", "|---|---|---:|"]
            lines += [f"| {md(d['test'])} | {md(d['train'])} | {d['bits']} |" for d in leaks["near_duplicates"]]
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
            f"| {md(shown(h))} | {_fmt(info.get('val_score'))} | {info.get('fit_seconds', 0):.1f} | {md(params)} | {edge} | {_curve(info.get('validation_curve'))} |"
        )
    lines += ["", "## Confusion matrices", "", "Rows: true city; columns: predicted city; shading: row-normalised.", ""]
    for h in names:
        lines.append(f"![{md(shown(h))}]({_png_name(h)})")
    counts = results.get("split_counts")
    if counts:
        lines += ["", "## Split sizes", "", "| city | train | val | test |", "|---|---:|---:|---:|"]
        for c in cities:
            lines.append(f"| {md(c)} | {counts['train'].get(c, 0)} | {counts['val'].get(c, 0)} | {counts['test'].get(c, 0)} |")
    return "\n".join(lines) + "\n"


def backbone_grid(results: Comparison | dict) -> dict | None:
    """Backbone x head overall accuracy (None with a single backbone): ``{"backbones", "heads", "cells"}``."""
    results = as_dict(results)
    heads = results["heads"]
    backbones = list(dict.fromkeys(m.get("backbone") for m in heads.values() if m.get("backbone")))
    if len(backbones) < 2:
        return None
    names = list(dict.fromkeys(m["head"] for m in heads.values()))
    cells = {b: {m["head"]: {"name": n, "accuracy": m["accuracy"], "accuracy_ci": m["accuracy_ci"]}
                 for n, m in heads.items() if m.get("backbone") == b} for b in backbones}
    return {"backbones": backbones, "heads": names, "cells": cells}


def _leak_sentence(leaks: dict) -> str:
    """One plain sentence on owners and near-duplicates shared by test and train/val."""
    owners = (f"{leaks['test_photos_with_shared_owner']} of {leaks['n_test']} test photos have an owner who also has photos in train or val "
              f"({leaks['shared_owners']} owners)" if leaks["test_photos_with_owner"] else
              "owners are not recorded for these photos, so owner leaks cannot be checked")
    dups = (f"{leaks['test_photos_with_near_duplicate']} test photos have a near-duplicate (dHash within {leaks['bits']} bits) in train or val "
            f"({leaks['near_duplicate_pairs']} pairs)")
    unchecked = f"; {leaks['n_unhashed']} photo files could not be read now and were not checked" if leaks["n_unhashed"] else ""
    clean = " The split is clean." if not leaks["test_photos_with_shared_owner"] and not leaks["near_duplicate_pairs"] and not leaks["n_unhashed"] else ""
    return f"{owners[0].upper() + owners[1:]}; {dups}{unchecked}.{clean}"


def _png_name(head: str) -> str:
    """A file name for a head's confusion PNG (head names are registry keys, but never trust them with a path)."""
    safe = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in head).strip(".") or "head"
    return f"confusion_{safe}.png"


GALLERY_PLACES = 30  # past this many places, galleries for the ones the head does worst on (a page stays a few MB)


def galleries(results: Comparison | dict, head: str, k: int = 4) -> list[dict]:
    """Per city: the ``k`` most confident right answers and the ``k`` most confident wrong ones of ``head``
    (for at most :data:`GALLERY_PLACES` places: those where ``head`` is least accurate, then by name)."""
    results = as_dict(results)
    cities, m, photos = results["cities"], results["heads"][head], results.get("test_photos", [])
    shown = cities if len(cities) <= GALLERY_PLACES else sorted(cities, key=lambda c: (m["per_city"][c], c))[:GALLERY_PLACES]
    by_city: dict[str, list[int]] = {}
    for i, p in enumerate(photos):
        by_city.setdefault(p["city"], []).append(i)
    out = []
    for city in shown:
        mine = list(by_city.get(city, []))
        mine.sort(key=lambda i: (-m["confidence"][i], photos[i]["path"]))
        right = [i for i in mine if m["correct"][i]][:k]
        wrong = [i for i in mine if not m["correct"][i]][:k]
        out.append({"city": city, "right": [_shot(photos[i], cities[m["predicted"][i]], m["confidence"][i]) for i in right],
                    "wrong": [_shot(photos[i], cities[m["predicted"][i]], m["confidence"][i]) for i in wrong],
                    "n": len(mine), "n_wrong": sum(1 for i in mine if not m["correct"][i])})
    return out


def _shot(photo: dict, predicted: str, confidence: float) -> dict:
    from featkit.figures import thumbnail_jpeg

    jpeg = thumbnail_jpeg(photo["path"])
    return {"src": _data_uri(jpeg, "image/jpeg") if jpeg else None, "path": photo["path"], "name": Path(photo["path"]).name,
            "city": photo["city"], "predicted": predicted, "confidence": confidence}


def _data_uri(data: bytes, mime: str) -> str:
    return f"data:{mime};base64," + base64.b64encode(data).decode("ascii")


def _best_head(results: dict) -> str:
    ranking = (results.get("ranking") or {}).get("ranking")
    return ranking[0] if ranking else max(results["heads"], key=lambda h: results["heads"][h]["accuracy"])


def render_html(results: Comparison | dict, confusion_pngs: dict[str, bytes] | None = None) -> str:
    """compare.html: one self-contained page (figures and thumbnails embedded as data: URIs; no scripts,
    fonts or requests, enforced by its Content-Security-Policy). Every outside string is escaped by the
    template engine (autoescape)."""
    from jinja2 import Environment, StrictUndefined

    from featkit import figures

    results = as_dict(results)
    cities, heads = results["cities"], results["heads"]
    names = list(heads)
    study_acc = study_accuracy()
    study = study_acc if set(study_acc) <= set(cities) else None
    confusion_pngs = confusion_pngs or {h: figures.confusion_png(heads[h]["confusion"], cities, f"{h}: accuracy {heads[h]['accuracy']:.3f}") for h in names}
    best = _best_head(results) if names else None
    has_cal = bool(names) and all("calibration" in heads[h] for h in names)
    geo = results.get("geo")
    has_geo = bool(names) and geo is not None and not geo["missing"] and all("geo" in heads[h] for h in names)
    context = {
        "r": results,
        "cities": cities,
        "heads": heads,
        "names": names,
        "study": study,
        "study_overall": STUDY_OVERALL,
        "n_total": sum(results["n_test"].values()),
        "best": best,
        "grid": backbone_grid(results),
        "figures": {
            "bars": _data_uri(figures.accuracy_bars_png(cities, heads, study), "image/png") if names else None,
            "reliability": _data_uri(figures.reliability_png(heads), "image/png") if has_cal else None,
            "distance": _data_uri(figures.distance_png(heads), "image/png") if has_geo else None,
            "confusion": {h: _data_uri(png, "image/png") for h, png in confusion_pngs.items()},
        },
        "has_geo": has_geo,
        "geo": geo,
        "galleries": galleries(results, best) if best and results.get("test_photos") and "confidence" in heads[best] else [],
        "leak_sentence": _leak_sentence(results["leaks"]) if results.get("leaks") else None,
    }
    env = Environment(autoescape=True, undefined=StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    env.filters.update(fmt=_fmt, ci=_ci, km=_km, signed=lambda x: f"{x:+.3f}", shown=shown, backbone=backbone_name)
    template = env.from_string((resources.files("featkit") / "templates" / "compare.html.j2").read_text(encoding="utf-8"))
    return template.render(**context)


def write_report(results: Comparison | dict, reports_dir: str | Path) -> dict[str, Path]:
    """Write compare.md, compare.json (:meth:`Comparison.to_dict`), compare.html and one confusion PNG per head
    as one set (:func:`featkit.atomic.publish_files`: a kill leaves all of this run or all of the last one),
    each naming the run (``run_id``); return their paths."""
    from featkit.figures import confusion_png

    results = dict(as_dict(results))
    results["run_id"] = run_id = time.strftime("%Y%m%dT%H%M%S") + "-" + uuid.uuid4().hex[:8]
    out = Path(reports_dir)
    out.mkdir(parents=True, exist_ok=True)
    files: dict[str, str | bytes] = {}
    pngs = {}
    for h, info in results["heads"].items():
        pngs[h] = confusion_png(info["confusion"], results["cities"], f"{h}: accuracy {info['accuracy']:.3f}")
        files[_png_name(h)] = pngs[h]
    files["compare.json"] = json.dumps(results, indent=1, sort_keys=False, default=str) + "\n"
    files["compare.md"] = render_markdown(results)
    files["compare.html"] = render_html(results, pngs)
    written = publish_files(out, files, run_id)
    paths = {"md": written["compare.md"], "json": written["compare.json"], "html": written["compare.html"]}
    paths.update({f"png_{h}": written[_png_name(h)] for h in results["heads"]})
    return paths
