"""Every fitted head of a cache on the same test split: the numbers the report shows.

Heads trained on another cache, another backbone or other cities are refused.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from featkit import __version__
from featkit.errors import FeatkitError
from featkit.heads import load_head
from featkit.metrics import evaluate_predictions, rank_heads
from featkit.provenance import provenance
from featkit.splits import split_counts
from featkit.store import FeatureStore, cache_file, check_identity, heads_dir


def evaluate_heads(cache_dir: str | Path) -> dict:
    """Evaluate every head in ``CACHE/heads`` on the cache's test split; the results the report is made of."""
    cache_dir = Path(cache_dir)
    paths = sorted(heads_dir(cache_dir).glob("*.joblib"))
    if not paths:
        raise FeatkitError(f"no fitted heads in {heads_dir(cache_dir)}; run `featkit fit --head all` first")
    with FeatureStore.open(cache_file(cache_dir)) as store:
        cities = store.cities()
        Xte, yte, _ = store.load_split("test")
        identity, cache_id, split_id = store.identity, store.cache_id, store.split_id
        counts = split_counts(list(store.column("city")), list(store.column("split")))
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
    return {
        "cities": cities,
        "heads": heads,
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
