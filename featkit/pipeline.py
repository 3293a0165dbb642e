"""The two steps after extraction, as single calls: fit heads on a cache, compare them on its test split.

This is where the cache (h5py) meets the heads (torch / scikit-learn) and the
report; the stages themselves stay unaware of each other.
"""

from __future__ import annotations

import platform
import sys
import time
from pathlib import Path

import numpy as np

from featkit import __version__
from featkit.errors import FeatkitError
from featkit.evaluate import evaluate_predictions
from featkit.heads import HEAD_NAMES, load_head, make_head, save_head
from featkit.report import write_report
from featkit.store import FeatureStore, check_identity

CACHE_FILE = "features.h5"
HEADS_DIR = "heads"


def resolve_heads(head: str) -> list[str]:
    """``all`` or one name -> the list of head names; unknown names are refused with the choices."""
    if head == "all":
        return list(HEAD_NAMES)
    names = [h.strip() for h in head.split(",") if h.strip()]
    bad = [h for h in names if h not in HEAD_NAMES]
    if bad or not names:
        raise FeatkitError(f"unknown head {', '.join(bad) or head!r}; choose one of: {', '.join(HEAD_NAMES)}, all")
    return names


def _cities(store: FeatureStore) -> list[str]:
    return sorted(set(store.column("city").tolist()))


def fit_heads(
    cache_dir: str | Path,
    head: str = "all",
    *,
    seed: int = 0,
    device: str = "auto",
    mlp_params: dict | None = None,
    log=print,
) -> list[dict]:
    """Train the named heads on the cache's train split (val split for early stopping / C) and save them."""
    names = resolve_heads(head)
    cache_dir = Path(cache_dir)
    with FeatureStore.open(cache_dir / CACHE_FILE) as store:
        cities = _cities(store)
        Xtr, ytr, _ = store.load_split("train")
        Xva, yva, _ = store.load_split("val")
        identity, cache_id = store.identity, store.cache_id
    if len(set(ytr.tolist())) < 2:
        raise FeatkitError(f"the cache's train split holds {len(set(ytr.tolist()))} city; extract photos of at least two cities")
    if len(yva) == 0:
        Xva = yva = None
    out = cache_dir / HEADS_DIR
    out.mkdir(parents=True, exist_ok=True)
    records = []
    for name in names:
        params = {"device": device, **(mlp_params or {})} if name == "mlp" else {}
        est = make_head(name, random_state=seed, **params)
        t0 = time.perf_counter()
        est.fit(Xtr, ytr, Xva, yva)
        seconds = time.perf_counter() - t0
        val_score = float(est.score(Xva, yva)) if yva is not None else None
        chosen = {"C": est.C_} if hasattr(est, "C_") else {"epochs": est.n_iter_, "best_epoch": getattr(est, "best_epoch_", est.n_iter_)}
        record = {
            "head": name,
            "cache_id": cache_id,
            "cache_identity": identity,
            "cities": cities,
            "params": {k: v for k, v in est.get_params().items()},
            "chosen": chosen,
            "val_score": val_score,
            "seed": seed,
            "fit_seconds": seconds,
            "n_train": int(len(ytr)),
            "n_val": int(0 if yva is None else len(yva)),
            "provenance": {"argv": sys.argv, "featkit": __version__, "python": platform.python_version(), "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")},
        }
        save_head(out / f"{name}.joblib", est, record)
        records.append(record)
        log(f"{name}: val accuracy {_pct(val_score)} in {seconds:.1f}s ({', '.join(f'{k}={v}' for k, v in chosen.items())}) -> {out / (name + '.joblib')}")
    return records


def _pct(x):
    return "n/a" if x is None else f"{x:.3f}"


def compare_heads(cache_dir: str | Path, reports_dir: str | Path) -> tuple[dict, dict[str, Path]]:
    """Evaluate every fitted head on the cache's test split and write the report."""
    cache_dir = Path(cache_dir)
    paths = sorted((cache_dir / HEADS_DIR).glob("*.joblib"))
    if not paths:
        raise FeatkitError(f"no fitted heads in {cache_dir / HEADS_DIR}; run `featkit fit --head all` first")
    with FeatureStore.open(cache_dir / CACHE_FILE) as store:
        cities = _cities(store)
        Xte, yte, _ = store.load_split("test")
        identity, cache_id = store.identity, store.cache_id
        counts = {s: {c: int(n) for c, n in zip(*np.unique(store.column("city")[store.split_rows(s)], return_counts=True))} for s in ("train", "val", "test")}
        backbone = store.provenance.get("backbone", "")
    if len(yte) == 0:
        raise FeatkitError("the cache's test split is empty; re-extract with a larger --test-size")
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
        metrics = evaluate_predictions(cities, yte, est.predict_proba(Xte), est.classes_)
        heads[name] = {**metrics, "val_score": rec["val_score"], "fit_seconds": rec["fit_seconds"], "chosen": rec["chosen"], "seed": rec["seed"]}
    results = {
        "cities": cities,
        "heads": heads,
        "n_test": {c: counts["test"].get(c, 0) for c in cities},
        "split_counts": counts,
        "cache_path": str(cache_dir / CACHE_FILE),
        "cache_id": cache_id,
        "backbone": backbone,
        "featkit": __version__,
        "generated": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    return results, write_report(results, reports_dir)
