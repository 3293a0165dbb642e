"""Which photos exist and which city each belongs to (splits: :mod:`featkit.splits`).

A photo source is either a folder with one sub-folder per city (the layout
torchvision's ``ImageFolder`` reads) or a manifest CSV with at least the
columns ``photo_id, city, path`` (``owner`` optional; ``featkit download``
writes one). Everything downstream is keyed by ``photo_id``.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

from featkit.errors import FeatkitError

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm"})


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
