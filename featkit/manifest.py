"""Which photos exist and which city each belongs to (splits: :mod:`featkit.splits`).

A photo source is either a folder with one sub-folder per city (the layout
torchvision's ``ImageFolder`` reads) or a manifest CSV with at least the
columns ``photo_id, city, path`` (``owner`` optional; ``featkit download``
writes one with :data:`MANIFEST_COLUMNS`). Everything downstream is keyed by
``photo_id``. This module is the one reader and writer of manifest files:
extraction and the downloader's resume read them with :func:`read_manifest`,
the downloader writes them with :func:`write_manifest`.
"""

from __future__ import annotations

import csv
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from featkit.atomic import atomic_path
from featkit.errors import FeatkitError

# What ``featkit download`` writes (paths relative to the manifest's folder), and the
# list of photos it rejected for good.
MANIFEST_COLUMNS = ("photo_id", "city", "path", "owner", "license", "latitude", "longitude",
                    "date_taken", "url", "title", "sha256")
SKIPPED_COLUMNS = ("photo_id", "city", "reason")
REQUIRED_COLUMNS = ("photo_id", "city", "path")  # what extraction needs; owner is optional
KEY_COLUMNS = ("photo_id", "city", "path")       # never empty where present in the required set
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
    _, rows = read_manifest(csv_path)
    base = csv_path.parent
    photos = []
    for row in rows:
        path = Path(row["path"].strip())
        photos.append(Photo(row["photo_id"].strip(), row["city"].strip(),
                            path if path.is_absolute() else base / path, row.get("owner", "").strip()))
    return photos


# --------------------------------------------------------------------------- the manifest file

def read_manifest(csv_path: str | Path, required: Sequence[str] = REQUIRED_COLUMNS, *,
                  fix: str = "expected at least photo_id, city, path (owner optional)",
                  ) -> tuple[list[str], list[dict[str, str]]]:
    """The column names and rows of a manifest CSV (``skipped.csv`` has the same format).

    One rule for every reader: the ``required`` columns must be there, any other
    column is carried along; ``photo_id`` (and ``city``, ``path`` where
    required) must be set on every row, and no ``photo_id`` may appear twice.
    Missing trailing cells read as ``""``. ``fix`` ends the message for a file
    that lacks a required column.
    """
    csv_path = Path(csv_path)
    try:
        with open(csv_path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            columns = list(reader.fieldnames or [])
            missing = [c for c in required if c not in columns]
            if missing:
                raise FeatkitError(f"manifest {csv_path} lacks column(s) {', '.join(sorted(missing))}; {fix}")
            rows = [{k: v or "" for k, v in row.items() if k is not None} for row in reader]
    except UnicodeDecodeError as e:
        raise FeatkitError(f"manifest {csv_path} is not UTF-8 text: {e.reason}") from None
    except csv.Error as e:
        raise FeatkitError(f"manifest {csv_path} is not a valid CSV: {e}") from None
    keys = [k for k in KEY_COLUMNS if k in required]
    seen: set[str] = set()
    for line, row in enumerate(rows, start=2):
        if not all(row[k].strip() for k in keys):
            raise FeatkitError(f"manifest {csv_path} line {line}: {_and(keys)} must all be set")
        pid = row["photo_id"].strip()
        if pid in seen:
            raise FeatkitError(f"manifest {csv_path} line {line}: photo_id {pid!r} appears twice")
        seen.add(pid)
    return columns, rows


def write_manifest(csv_path: str | Path, rows: Iterable[Mapping[str, str]],
                   columns: Sequence[str] = MANIFEST_COLUMNS) -> None:
    """Replace ``csv_path`` atomically with ``rows`` under ``columns`` (absent cells written empty)."""
    with atomic_path(csv_path) as tmp:
        with tmp.open("w", newline="", encoding="utf-8") as fh:
            writer = csv.DictWriter(fh, fieldnames=list(columns), lineterminator="\n", extrasaction="ignore")
            writer.writeheader()
            for row in rows:
                writer.writerow({c: row.get(c, "") for c in columns})


def _and(names: Sequence[str]) -> str:
    return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} and {names[-1]}"
