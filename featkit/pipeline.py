"""The two steps after extraction, as single calls: fit heads on a cache, compare them on its test split.

This is where the cache (h5py) meets the heads (torch / scikit-learn) and the
report; the stages themselves stay unaware of each other.
"""

from __future__ import annotations

import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

from featkit import __version__
from featkit.errors import FeatkitError
from featkit.evaluate import evaluate_predictions
from featkit.heads import HEAD_NAMES, STREAMING_HEADS, load_head, make_head, save_head, shuffled_segments
from featkit.splits import split_counts
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


class StoreBlocks:
    """One split of the cache as a block source for :meth:`MLPHead.fit_blocks` / :meth:`LinearSVMHead.fit_blocks`.

    Each epoch reads the split once, in blocks gathered from short runs of rows
    in a shuffled order (:func:`featkit.heads.shuffled_segments`); only one
    block (``block_rows`` x features, float32) is in memory at a time.
    """

    def __init__(self, store: FeatureStore, split: str, block_rows: int = 4096):
        self.store, self.block_rows = store, block_rows
        self.rows = store.split_rows(split)
        self.y = store.column("city")[self.rows]
        self.n_features = int(store.f["features"].shape[1])

    def labels(self) -> np.ndarray:
        return self.y

    def blocks(self, rng: np.random.Generator | None = None):
        for runs in shuffled_segments(len(self.rows), self.block_rows, rng):
            X = np.concatenate([self.store.read_features(self.rows[a:b]) for a, b in runs])
            yield X, np.concatenate([self.y[a:b] for a, b in runs])


def _available_bytes() -> int:
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 1 << 62


def should_stream(n_rows: int, n_features: int, stream: str = "auto") -> bool:
    """``auto``: stream when the float32 training matrix would take over half the available memory."""
    if stream not in ("auto", "yes", "no"):
        raise FeatkitError(f"unknown --stream {stream!r}; choose one of: auto, yes, no")
    if stream != "auto":
        return stream == "yes"
    return n_rows * n_features * 4 > _available_bytes() // 2


def fit_heads(
    cache_dir: str | Path,
    head: str = "all",
    *,
    seed: int = 0,
    device: str = "auto",
    mlp_params: dict | None = None,
    stream: str = "auto",
    block_rows: int = 4096,
    log=print,
) -> list[dict]:
    """Train the named heads on the cache's train split (val split for early stopping / C) and save them.

    In memory (the default when it fits) the float32 training matrix is read
    once and shared; the logistic regression, which needs it whole, runs last
    and standardises it in place. Streaming (``stream="yes"``, or ``auto`` on a
    cache larger than half the free memory) trains the MLP and the SVM from
    shuffled blocks of the cache; the logistic regression still loads it.
    """
    names = resolve_heads(head)
    names.sort(key=lambda n: n == "logreg")  # the in-place head last
    cache_dir = Path(cache_dir)
    out = cache_dir / HEADS_DIR
    records = []
    with FeatureStore.open(cache_dir / CACHE_FILE) as store:
        cities = _cities(store)
        identity, cache_id = store.identity, store.cache_id
        n_train, n_features = len(store.split_rows("train")), int(store.f["features"].shape[1])
        if len(set(store.column("city")[store.split_rows("train")].tolist())) < 2:
            raise FeatkitError("the cache's train split holds fewer than two cities; extract photos of at least two cities")
        streaming = should_stream(n_train, n_features, stream)
        Xva, yva, _ = store.load_split("val")
        if len(yva) == 0:
            Xva = yva = None
        Xtr = ytr = None
        out.mkdir(parents=True, exist_ok=True)
        for name in names:
            params = {"device": device, **(mlp_params or {})} if name == "mlp" else {}
            if name == "logreg":
                params["copy"] = False
            est = make_head(name, random_state=seed, **params)
            t0 = time.perf_counter()
            if streaming and name in STREAMING_HEADS:
                est.fit_blocks(StoreBlocks(store, "train", block_rows), Xva, yva)
                how = "streamed"
            else:
                if Xtr is None:
                    Xtr, ytr, _ = store.load_split("train")
                est.fit(Xtr, ytr, Xva, yva)
                how = "in memory"
            seconds = time.perf_counter() - t0
            val_score = float(est.score(Xva, yva)) if yva is not None else None
            if name == "mlp":
                chosen = {"epochs": est.n_iter_, "best_epoch": getattr(est, "best_epoch_", est.n_iter_)}
            else:
                chosen = {"C": est.C_} if name == "logreg" else {"alpha": est.alpha_}
            record = {
                "head": name,
                "cache_id": cache_id,
                "cache_identity": identity,
                "cities": cities,
                "params": est.get_params(),
                "chosen": chosen,
                "val_score": val_score,
                "seed": seed,
                "fit_seconds": seconds,
                "training": how,
                "passes": int(getattr(est, "n_passes_", 0)),
                "n_train": n_train,
                "n_val": int(0 if yva is None else len(yva)),
                "provenance": {"argv": sys.argv, "featkit": __version__, "python": platform.python_version(), "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")},
            }
            save_head(out / f"{name}.joblib", est, record)
            records.append(record)
            log(f"{name}: val accuracy {_pct(val_score)} in {seconds:.1f}s, {how}, {record['passes']} passes ({', '.join(f'{k}={v}' for k, v in chosen.items())}) -> {out / (name + '.joblib')}")
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
        counts = split_counts(list(store.column("city")), list(store.column("split")))
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
