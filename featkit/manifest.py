"""Which photos exist, which city each belongs to, and which split each is in.

A photo source is either a folder with one sub-folder per city (the layout
torchvision's ``ImageFolder`` reads) or a manifest CSV with at least the
columns ``photo_id, city, path`` (``owner`` optional; ``featkit download``
writes one). Everything downstream is keyed by ``photo_id``.
"""

from __future__ import annotations

import csv
import hashlib
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path

from featkit.errors import FeatkitError

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm"})
SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class Photo:
    """One photo of the source: a stable id, its city label, where it lies, who took it."""

    photo_id: str
    city: str
    path: Path
    owner: str = ""


def scan_photos(source: str | Path) -> list[Photo]:
    """List the photos of a folder-per-city tree or a manifest CSV, sorted by photo id.

    Raises FeatkitError when the source is missing, holds no images, or fewer
    than two cities (a classifier needs at least two classes).
    """
    source = Path(source)
    if not source.exists():
        raise FeatkitError(f"photo source {source} does not exist; give a folder with one sub-folder per city or a manifest CSV")
    if source.is_dir():
        photos = _scan_folder(source)
        where = f"folder {source}"
    elif source.suffix.lower() == ".csv":
        photos = _read_manifest(source)
        where = f"manifest {source}"
    else:
        raise FeatkitError(f"photo source {source} is neither a folder nor a .csv manifest")
    if not photos:
        raise FeatkitError(
            f"no images found in {where}; expected {source}/<city>/<photo>.jpg "
            f"(suffixes: {', '.join(sorted(IMAGE_SUFFIXES))}) or manifest rows"
        )
    cities = sorted({p.city for p in photos})
    if len(cities) < 2:
        raise FeatkitError(
            f"{where} holds images of {len(cities)} city ({', '.join(cities)}); "
            "a classifier needs at least two cities, one sub-folder each"
        )
    photos.sort(key=lambda p: p.photo_id)
    return photos


def _scan_folder(root: Path) -> list[Photo]:
    photos = []
    for city_dir in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        for path in sorted(city_dir.rglob("*")):
            if path.suffix.lower() in IMAGE_SUFFIXES and path.is_file() and not path.name.startswith("."):
                photos.append(Photo(photo_id=path.relative_to(root).as_posix(), city=city_dir.name, path=path))
    return photos


def _read_manifest(csv_path: Path) -> list[Photo]:
    try:
        with open(csv_path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            missing = {"photo_id", "city", "path"} - set(reader.fieldnames or [])
            if missing:
                raise FeatkitError(
                    f"manifest {csv_path} lacks column(s) {', '.join(sorted(missing))}; "
                    "expected at least photo_id, city, path (owner optional)"
                )
            rows = list(reader)
    except UnicodeDecodeError as e:
        raise FeatkitError(f"manifest {csv_path} is not UTF-8 text: {e.reason}") from None
    except csv.Error as e:
        raise FeatkitError(f"manifest {csv_path} is not a valid CSV: {e}") from None
    base = csv_path.parent
    photos, seen = [], set()
    for line, row in enumerate(rows, start=2):
        pid, city, rel = ((row.get(k) or "").strip() for k in ("photo_id", "city", "path"))
        if not pid or not city or not rel:
            raise FeatkitError(f"manifest {csv_path} line {line}: photo_id, city and path must all be set")
        if pid in seen:
            raise FeatkitError(f"manifest {csv_path} line {line}: photo_id {pid!r} appears twice")
        seen.add(pid)
        path = Path(rel)
        photos.append(Photo(pid, city, path if path.is_absolute() else base / path, (row.get("owner") or "").strip()))
    return photos


def _rank(seed: int, key: str) -> str:
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
    seed: int = 0,
    test_size: float = 0.125,
    val_size: float = 0.1,
    fixed: dict[str, str] | None = None,
) -> dict[str, str]:
    """Assign every photo to train / val / test, deterministically, stratified by city.

    ``test_size`` and ``val_size`` are per city: a count (>= 1, e.g. the study's
    500) or a fraction (< 1). Photos are grouped by owner when owners are
    known, so no photographer lands in two splits; otherwise each photo is its
    own group. Groups are taken in an order drawn from ``seed`` (a hash, so the
    order is the same on every machine), filling each city's test quota, then
    its val quota; the rest is train. ``fixed`` pins splits already recorded
    (photos already in a cache): their groups keep that split, so a cache that
    grows never moves a photo or an owner across splits.
    """
    fixed = fixed or {}
    by_city = Counter(p.city for p in photos)
    need = {}
    for city, n in by_city.items():
        n_test, n_val = _target(test_size, n), _target(val_size, n)
        if n_test + n_val >= n:
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

    for key in sorted(free, key=lambda k: _rank(seed, k)):
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
