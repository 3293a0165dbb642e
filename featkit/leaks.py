"""Does the test split leak? Photos of one owner, or near-identical photos, on both sides of the split.

A test photo whose owner also has photos in train (or val) is easier than a
stranger's: same camera, same trip, often the same street. A test photo with a
near-duplicate in train is not a test at all. featkit's splits group photos by
owner, so on a split it drew the owner count is zero; near-duplicates can still
cross (the same scene uploaded by two people), and a manifest with no owners
cannot be grouped. The report counts both and names them.

Near-duplicates are found the way the downloader finds them: 64-bit difference
hashes (:func:`featkit.images.dhash`) within ``bits`` of each other. Hashes are
kept in ``CACHE/dhash.json`` (keyed by path, size and modification time), so a
study-sized cache is hashed once.
"""

from __future__ import annotations

import json
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from featkit.atomic import atomic_write
from featkit.images import dhash

NEAR_DUP_BITS = 4  # stricter than the downloader's 6: here a hit is reported as a leak, so it should be a real one
MAX_LISTED = 25  # leaks named in the report; all are counted


@dataclass(frozen=True)
class SplitPhoto:
    photo_id: str
    city: str
    split: str
    path: str
    owner: str = ""


def _file_key(path: str) -> str | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return f"{path}|{st.st_size}|{st.st_mtime_ns}"


def _hash_file(path: str) -> int | None:
    try:
        with open(path, "rb") as f:
            return dhash(f.read())
    except Exception:  # unreadable now (moved, damaged): counted as unchecked, never fatal
        return None


def photo_hashes(paths: list[str], cache_path: Path | None = None, workers: int = 4) -> dict[str, int]:
    """dHash of every readable file in ``paths`` (path -> hash), reusing and updating ``cache_path``."""
    known: dict[str, int] = {}
    if cache_path is not None and cache_path.is_file():
        try:
            known = {k: int(v) for k, v in json.loads(cache_path.read_text(encoding="utf-8")).items()}
        except (ValueError, OSError, AttributeError, TypeError):
            known = {}  # a damaged hash cache is rebuilt, never trusted
    keys = {p: _file_key(p) for p in paths}
    todo = [p for p, k in keys.items() if k is not None and k not in known]
    if todo:
        with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:  # decoding releases the GIL
            for p, h in zip(todo, pool.map(_hash_file, todo)):
                if h is not None:
                    known[keys[p]] = h
        if cache_path is not None:
            live = {k for k in keys.values() if k is not None}
            try:
                atomic_write(cache_path, json.dumps({k: v for k, v in known.items() if k in live}))
            except OSError:
                pass  # a read-only cache folder only costs the re-hash next time
    return {p: known[k] for p, k in keys.items() if k is not None and k in known}


def _by_owner(photos: list[SplitPhoto]) -> dict[str, list[SplitPhoto]]:
    """Photos grouped by owner (photos without one left out), in their order."""
    groups: dict[str, list[SplitPhoto]] = {}
    for p in photos:
        if p.owner:
            groups.setdefault(p.owner, []).append(p)
    return groups


def split_leaks(photos: list[SplitPhoto], *, bits: int = NEAR_DUP_BITS, hash_cache: Path | None = None) -> dict:
    """Owners and near-duplicates shared by the test split and the photos heads learn from (train + val).

    Returns counts (``test_photos_with_shared_owner``, ``near_duplicate_pairs``, ``n_hashed``,
    ``n_unhashed``) and up to ``MAX_LISTED`` named examples of each.
    """
    test = [p for p in photos if p.split == "test"]
    seen = [p for p in photos if p.split in ("train", "val")]
    seen_owners, test_owners = _by_owner(seen), _by_owner(test)
    owner_rows = [
        {"owner": owner, "test": len(mine), "train_val": len(seen_owners[owner]),
         "example_test": mine[0].path, "example_train": seen_owners[owner][0].path}
        for owner, mine in sorted(test_owners.items()) if owner in seen_owners
    ]
    n_owner_photos = sum(r["test"] for r in owner_rows)

    hashes = photo_hashes([p.path for p in test + seen], hash_cache)
    t_hashed = [p for p in test if p.path in hashes]
    s_hashed = [p for p in seen if p.path in hashes]
    pairs = []
    if t_hashed and s_hashed:
        s_arr = np.array([hashes[p.path] for p in s_hashed], dtype=np.uint64)
        for p in t_hashed:
            dist = np.bitwise_count(s_arr ^ np.uint64(hashes[p.path]))
            for j in np.flatnonzero(dist <= bits):
                q = s_hashed[j]
                pairs.append({"test": p.path, "test_city": p.city, "train": q.path, "train_city": q.city,
                              "train_split": q.split, "bits": int(dist[j])})
    pairs.sort(key=lambda r: (r["bits"], r["test"], r["train"]))
    owners_known = sum(1 for p in test if p.owner)
    return {
        "test_photos_with_shared_owner": n_owner_photos,
        "shared_owners": len(owner_rows),
        "owners": owner_rows[:MAX_LISTED],
        "test_photos_with_owner": owners_known,
        "near_duplicate_pairs": len(pairs),
        "test_photos_with_near_duplicate": len({r["test"] for r in pairs}),
        "near_duplicates": pairs[:MAX_LISTED],
        "bits": bits,
        "n_hashed": len(t_hashed) + len(s_hashed),
        "n_unhashed": len(test) + len(seen) - len(t_hashed) - len(s_hashed),
        "n_test": len(test),
    }
