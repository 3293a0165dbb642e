"""Every fitted head of a cache on the same test split: the numbers the report shows.

Heads trained on another cache, another backbone or other cities are refused.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from featkit import __version__
from featkit.cities import city_coordinates
from featkit.errors import FeatkitError
from featkit.heads import load_head
from featkit.leaks import HASH_CACHE, SplitPhoto, split_leaks
from featkit.metrics import evaluate_predictions, geographic_error, rank_heads
from featkit.provenance import provenance
from featkit.splits import split_counts
from featkit.store import FeatureStore, cache_file, check_identity, heads_dir


def evaluate_heads(cache_dir: str | Path, *, cities_spec: str | None = None, leaks: bool = True) -> dict:
    """Evaluate every head in ``CACHE/heads`` on the cache's test split; the results the report is made of.

    ``cities_spec`` (a ``--cities`` value) gives the cities' coordinates for the distance
    figures; without it a ``cities.toml`` in the photo folder, then the default cities, are used.
    ``leaks``: check the split for owners and near-duplicate photos shared by test and train.
    """
    cache_dir = Path(cache_dir)
    paths = sorted(heads_dir(cache_dir).glob("*.joblib"))
    if not paths:
        raise FeatkitError(f"no fitted heads in {heads_dir(cache_dir)}; run `featkit fit --head all` first")
    with FeatureStore.open(cache_file(cache_dir)) as store:
        cities = store.cities()
        Xte, yte, _ = store.load_split("test")
        identity, cache_id, split_id = store.identity, store.cache_id, store.split_id
        columns = {k: store.column(k) for k in ("photo_id", "city", "split", "path", "owner")}
        counts = split_counts(list(columns["city"]), list(columns["split"]))
        backbone = store.provenance.get("backbone", "")
    if len(yte) == 0:
        raise FeatkitError("the cache's test split is empty; re-extract with a larger `test_size`", param="test_size")
    heads = {}
    for p in paths:
        est, rec = load_head(p)
        name = rec.get("head", p.stem)
        check_identity(rec["cache_identity"], identity, f"head {name!r} ({p})", "refit it on this cache with `featkit fit`")
        if rec["cities"] != cities or [str(c) for c in est.classes_] != cities:
            raise FeatkitError(
                f"head {name!r} ({p}) was trained on cities {', '.join(map(str, est.classes_))} but the cache holds "
                f"{', '.join(cities)}; refit it with `featkit fit`"
            )
        if rec["cache_id"] != cache_id:
            raise FeatkitError(f"head {name!r} ({p}) was trained on an earlier build of this cache (rebuilt with --overwrite since); refit it with `featkit fit`")
        if rec.get("split_id") not in (None, split_id):
            raise FeatkitError(
                f"head {name!r} ({p}) was trained on other splits of this cache (re-drawn with `featkit split` since); "
                "refit it with `featkit fit`"
            )
        metrics = evaluate_predictions(cities, yte, est.predict_proba(Xte), est.classes_)
        heads[name] = {
            **metrics,
            **{k: rec.get(k) for k in ("val_score", "fit_seconds", "chosen", "seed", "validation_curve", "at_grid_edge")},
        }
    everyone = [SplitPhoto(*row) for row in zip(*(columns[k].tolist() for k in ("photo_id", "city", "split", "path", "owner")))]
    test = [p for p in everyone if p.split == "test"]
    geo = city_coordinates(cities, cities_spec, _photo_roots(test))
    if not geo["missing"]:
        coords = np.array([geo["coords"][c] for c in cities])
        true_idx = np.array([cities.index(str(c)) for c in yte])
        for m in heads.values():
            m["geo"] = geographic_error(true_idx, np.asarray(m["predicted"]), coords)
    return {
        "cities": cities,
        "heads": heads,
        "test_photos": [{"photo_id": p.photo_id, "city": p.city, "path": p.path, "owner": p.owner} for p in test],
        "geo": {"source": geo["source"], "missing": geo["missing"], "coords": geo["coords"]},
        "leaks": split_leaks(everyone, hash_cache=cache_dir / HASH_CACHE) if leaks else None,
        "ranking": rank_heads({h: np.asarray(m["correct"], dtype=bool) for h, m in heads.items()}),
        "n_test": {c: counts["test"].get(c, 0) for c in cities},
        "split_counts": counts,
        "cache_path": str(cache_file(cache_dir)),
        "cache_id": cache_id,
        "backbone": backbone,
        "featkit": __version__,
        "generated": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "provenance": provenance(),
    }


def _photo_roots(photos: list[SplitPhoto]) -> list[Path]:
    """The folder(s) holding the city folders of these photos (``ROOT/<city>/<photo>``), most common first."""
    roots: dict[Path, int] = {}
    for p in photos:
        root = Path(p.path).parent.parent
        roots[root] = roots.get(root, 0) + 1
    return sorted(roots, key=lambda r: -roots[r])
