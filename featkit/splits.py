"""Which split (train / val / test) each photo is in: deterministic, stratified by city, grouped by owner."""

from __future__ import annotations

import hashlib
from collections import Counter, defaultdict
from collections.abc import Mapping

from featkit.cache.names import FAILED_CSV
from featkit.errors import FeatkitError
from featkit.manifest import Photo
from featkit.options import SPLIT

SPLITS = ("train", "val", "test")


def _group_rank(seed: int, key: str) -> str:
    """A deterministic pseudo-random sort key for a group, stable across runs and machines."""
    return hashlib.sha256(f"{seed}\0{key}".encode()).hexdigest()


def _target(size: float, n: int) -> int:
    """How many of a city's n photos a split of ``size`` (count >= 1 or fraction < 1) takes."""
    if size <= 0:
        return 0
    if size < 1:
        return max(1, round(size * n))
    return int(size)


def assign_splits(
    photos: list[Photo],
    *,
    seed: int = SPLIT.split_seed,
    test_size: float = SPLIT.test_size,
    val_size: float = SPLIT.val_size,
    fixed: dict[str, str] | None = None,
    unreadable: Mapping[str, int] | None = None,
    failed_csv: str = FAILED_CSV,
) -> dict[str, str]:
    """Assign every photo to train / val / test, deterministically, stratified by city.

    ``test_size`` and ``val_size`` are per city: a count (>= 1, e.g. the study's
    500) or a fraction (< 1). Photos are grouped by owner when owners are
    known, so no photographer lands in two splits; otherwise each photo is its
    own group. Groups are taken in an order drawn from ``seed`` (the split seed; a hash, so the
    order is the same on every machine), filling each city's test quota, then
    its val quota; the rest is train. ``fixed`` pins splits already recorded
    (photos already in a cache): their groups keep that split, so a cache that
    grows never moves a photo or an owner across splits. ``unreadable`` counts, per city, the
    photos left out because they cannot be read (listed in ``failed_csv``): a city with too few
    photos says so, since the fix is then to mend those photos, not to shrink the splits.
    """
    fixed = fixed or {}
    by_city = Counter(p.city for p in photos)
    need = {}
    for city, n in by_city.items():
        n_test, n_val = _target(test_size, n), _target(val_size, n)
        if n_test + n_val >= n:
            lost = (unreadable or {}).get(city, 0)
            if lost:
                raise FeatkitError(
                    f"city {city!r} has {n} readable photos ({lost} more cannot be read: see {failed_csv}); test size "
                    f"{test_size:g} and val size {val_size:g} leave none for training; fix or replace the unreadable photos "
                    "and rerun with --retry-failed, or use smaller sizes such as --test-size 0.2 --val-size 0.1"
                )
            raise FeatkitError(
                f"city {city!r} has {n} photos; test size {test_size:g} and val size {val_size:g} "
                "leave none for training; use fractions such as --test-size 0.2 --val-size 0.1"
            )
        need[city] = {"test": n_test, "val": n_val}

    groups: dict[str, list[Photo]] = defaultdict(list)
    for p in photos:
        groups[f"owner:{p.owner}" if p.owner else f"photo:{p.photo_id}"].append(p)

    splits: dict[str, str] = {}

    def take(members: list[Photo], split: str) -> None:
        for m in members:
            splits[m.photo_id] = split
            if split != "train":
                need[m.city][split] -= 1

    # Groups holding an already-recorded photo keep its split (the first recorded one wins).
    free = []
    for key, members in groups.items():
        pinned = next((fixed[m.photo_id] for m in members if m.photo_id in fixed), None)
        if pinned is not None:
            take(members, pinned)
        else:
            free.append(key)

    for key in sorted(free, key=lambda k: _group_rank(seed, k)):
        members = groups[key]
        main_city = Counter(m.city for m in members).most_common(1)[0][0]
        split = next((s for s in ("test", "val") if need[main_city][s] > 0), "train")
        take(members, split)
    return splits


def split_counts(cities: list[str], splits: list[str]) -> dict[str, dict[str, int]]:
    """Per split, per city photo counts, for reports and summaries."""
    counts = {s: {c: 0 for c in sorted(set(cities))} for s in SPLITS}
    for city, split in zip(cities, splits):
        counts[split][city] += 1
    return counts
