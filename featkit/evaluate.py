"""Every fitted head of a cache on the same test split: the numbers the report shows.

Heads trained on another cache, another backbone or other cities are refused.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from featkit import __version__
from featkit.cities import city_coordinates
from featkit.comparison import Comparison, HeadResult, Ranking
from featkit.naming import backbone_name, head_name
from featkit.errors import FeatkitError
from featkit.leaks import SplitPhoto, split_leaks
from featkit.metrics import evaluate_predictions, geographic_error, rank_heads
from featkit.provenance import provenance
from featkit.splits import split_counts
from featkit.cache.identity import check_identity
from featkit.cache.names import DEFAULT_KEY, HASH_CACHE, backbone_keys, cache_file, heads_dir, resolve_backbones
from featkit.cache.shelf import fitted_head_files, load_head
from featkit.cache.store import FeatureStore


def evaluate_heads(cache_dir: str | Path, *, cities_spec: str | None = None, leaks: bool = True) -> Comparison:
    """Evaluate every fitted head of every backbone of the cache on the same test photos; the results
    the report is made of (a :class:`~featkit.comparison.Comparison`). With one backbone the entries are named by head (``mlp``); with several,
    by backbone and head (``vgg16/mlp``), and every pair is compared on the same photos.

    ``cities_spec`` (a ``--cities`` value) gives the cities' coordinates for the distance
    figures; without it a ``cities.toml`` in the photo folder, then the default cities, are used.
    ``leaks``: check the split for owners and near-duplicate photos shared by test and train.
    """
    cache_dir = Path(cache_dir)
    resolve_backbones(cache_dir)  # no feature file at all: say so (and how to make one) before looking for heads
    fitted, ignored = fitted_head_files(cache_dir)
    if not fitted:
        keys = backbone_keys(cache_dir)
        where = heads_dir(cache_dir) if not keys or keys == [DEFAULT_KEY] else f"{heads_dir(cache_dir)} (or its backbone folders)"
        extra = f" ({len(ignored)} file(s) there are not featkit's own and were ignored)" if ignored else ""
        raise FeatkitError(f"no fitted heads in {where}{extra}; run `featkit fit --head all` first")
    heads, backbones = {}, {}
    reference = None  # the first backbone's test photos, in its row order: every head is judged on these
    for key, paths in fitted.items():
        with FeatureStore.open(cache_file(cache_dir, key)) as store:
            store.check_intact()  # a damaged cache is refused, never turned into wrong numbers
            Xte, yte, ids = store.load_split("test")
            found = {
                "cities": store.cities(), "identity": store.identity, "cache_id": store.cache_id, "split_id": store.split_id,
                "backbone": store.provenance.get("backbone", ""), "path": store.path,
            }
            if reference is None:  # the photo columns are the report's: read them from the reference backbone only
                found["columns"] = {k: store.column(k) for k in ("photo_id", "city", "split", "path", "owner")}
        if len(yte) == 0:
            raise FeatkitError("the cache's test split is empty; re-extract with a larger `test_size`", param="test_size")
        if reference is None:
            reference = {**found, "ids": ids, "y": yte}
        else:
            Xte, yte = _aligned(Xte, yte, ids, reference, key)
        backbones[key] = found["backbone"]
        prefix = f"{key}/" if len(fitted) > 1 else ""
        for p in paths:
            est, rec = load_head(p)
            name = rec.get("head", p.stem)
            _check_head(name, p, est, rec, found)
            metrics = evaluate_predictions(reference["cities"], yte, est.predict_proba(Xte), est.classes_)
            heads[prefix + name] = HeadResult.from_metrics(
                metrics, backbone=key, head=name, name=head_name(prefix + name), backbone_name=backbone_name(key), **{k: rec.get(k) for k in ("val_score", "fit_seconds", "chosen", "seed", "validation_curve", "at_grid_edge")},
            )
    cities, columns, yte = reference["cities"], reference["columns"], reference["y"]
    counts = split_counts(list(columns["city"]), list(columns["split"]))
    cache_id, backbone = reference["cache_id"], reference["backbone"]
    everyone = [SplitPhoto(*row) for row in zip(*(columns[k].tolist() for k in ("photo_id", "city", "split", "path", "owner")))]
    test = [p for p in everyone if p.split == "test"]
    geo = city_coordinates(cities, cities_spec, _photo_roots(test))
    if not geo["missing"]:
        coords = np.array([geo["coords"][c] for c in cities])
        true_idx = np.array([cities.index(str(c)) for c in yte])
        for m in heads.values():
            m.geo = geographic_error(true_idx, np.asarray(m.predicted), coords)
    return Comparison(
        cities=cities,
        heads=heads,
        test_photos=[{"photo_id": p.photo_id, "city": p.city, "path": p.path, "owner": p.owner} for p in test],
        geo={"source": geo["source"], "missing": geo["missing"], "coords": geo["coords"]},
        leaks=split_leaks(everyone, hash_cache=cache_dir / HASH_CACHE) if leaks else None,
        ranking=Ranking(**rank_heads({h: np.asarray(m.correct, dtype=bool) for h, m in heads.items()})),
        n_test={c: counts["test"].get(c, 0) for c in cities},
        split_counts=counts,
        cache_path=str(reference["path"]),
        cache_id=cache_id,
        backbone=backbone if len(backbones) == 1 else "; ".join(f"{k}: {v}" for k, v in backbones.items()),
        backbones=backbones,
        featkit=__version__,
        generated=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        provenance=provenance(),
        backbone_names={k: backbone_name(k) for k in backbones},
    )


def _photo_roots(photos: list[SplitPhoto]) -> list[Path]:
    """The folder(s) holding the city folders of these photos (``ROOT/<city>/<photo>``), most common first."""
    roots: dict[Path, int] = {}
    for p in photos:
        root = Path(p.path).parent.parent
        roots[root] = roots.get(root, 0) + 1
    return sorted(roots, key=lambda r: -roots[r])


def _check_head(name: str, path: Path, est, rec: dict, found: dict) -> None:
    """Refuse a head trained on another cache, backbone, build, split or set of cities, naming the fix."""
    cities = found["cities"]
    check_identity(rec["cache_identity"], found["identity"], f"head {name!r} ({path})", "refit it on this cache with `featkit fit`")
    if rec["cities"] != cities or [str(c) for c in est.classes_] != cities:
        raise FeatkitError(
            f"head {name!r} ({path}) was trained on cities {', '.join(map(str, est.classes_))} but the cache holds "
            f"{', '.join(cities)}; refit it with `featkit fit`"
        )
    if rec["cache_id"] != found["cache_id"]:
        raise FeatkitError(f"head {name!r} ({path}) was trained on an earlier build of this cache (rebuilt with --overwrite since); refit it with `featkit fit`")
    if rec.get("split_id") not in (None, found["split_id"]):
        raise FeatkitError(
            f"head {name!r} ({path}) was trained on other splits of this cache (re-drawn with `featkit split` since); "
            "refit it with `featkit fit`"
        )


def _aligned(X: np.ndarray, y: np.ndarray, ids: np.ndarray, reference: dict, key: str) -> tuple[np.ndarray, np.ndarray]:
    """One backbone's test rows in the reference backbone's photo order; refused unless they are the same photos
    (a paired comparison is only meaningful on the same test photos)."""
    ref_ids = reference["ids"]
    if reference["cities"] != sorted(set(y.tolist()) | set(reference["cities"])) or set(ids.tolist()) != set(ref_ids.tolist()):
        only_ref = len(set(ref_ids.tolist()) - set(ids.tolist()))
        only_key = len(set(ids.tolist()) - set(ref_ids.tolist()))
        raise FeatkitError(
            f"backbone {key!r} holds other test photos than {Path(reference['path']).name} ({only_key} only in {key}, {only_ref} "
            "only in the other); extract every backbone from the same photos, or re-draw one split for all with `featkit split`"
        )
    order = {pid: i for i, pid in enumerate(ids.tolist())}
    rows = np.array([order[pid] for pid in ref_ids.tolist()], dtype=np.int64)
    return X[rows], y[rows]
