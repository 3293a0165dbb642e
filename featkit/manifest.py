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
import os
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from featkit.atomic import atomic_path
from featkit.errors import FeatkitError, PhotoSourceWarning
from featkit.escape import csv_cell, csv_value

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
    """The photos of a folder-per-city tree: each visible sub-folder of ``root`` is a city, its photos are
    :func:`walk_images`'s. What is left out at the city level (hidden folders, images outside any city
    folder, a link to nothing, a folder without images, a folder that cannot be walked) is announced in one
    :class:`~featkit.errors.PhotoSourceWarning`, never dropped without a word."""
    photos, skipped = [], []
    try:
        with os.scandir(root) as it:
            entries = sorted(it, key=lambda e: e.name)
    except OSError as e:
        raise FeatkitError(f"cannot list folder {path_text(root)} ({e.strerror or type(e).__name__})") from None
    for entry in entries:
        name = path_text(entry.name)
        if not _is_dir(entry):
            if entry.is_symlink() and not os.path.exists(entry.path):
                skipped.append(f"{name} (a link to nothing)")
            elif not is_hidden(entry.name) and Path(entry.name).suffix.lower() in IMAGE_SUFFIXES:
                skipped.append(f"{name} (an image outside any city folder)")
            continue
        if is_hidden(entry.name):
            skipped.append(f"{name}/ (hidden: its name starts with '.')")
            continue
        files, left_out = walk_images(root / entry.name)
        skipped += [f"{path_text(p.relative_to(root).as_posix())}/ ({why})" for p, why in left_out]
        if not files:
            skipped.append(f"{name}/ (no image files)")
        for path in files:
            photos.append(Photo(photo_id=photo_id_text(path.relative_to(root).as_posix()), city=name, path=path))
    if skipped:
        shown = "; ".join(skipped[:8]) + (f"; and {len(skipped) - 8} more" if len(skipped) > 8 else "")
        warnings.warn(f"skipped in {path_text(root)}: {shown}", PhotoSourceWarning, stacklevel=3)
    return photos


def is_hidden(name: str) -> bool:
    """The one rule for hidden entries: a name that starts with "." (``.DS_Store``, ``.git``, ``..odd``)."""
    return name.startswith(".")


def walk_images(folder: str | Path) -> tuple[list[Path], list[tuple[Path, str]]]:
    """The image files under ``folder``, recursively, sorted; and the sub-folders left out, with why.

    The one rule for which files of a folder of photos are photos (extract's city folders, predict's
    folders): any file or folder below ``folder`` whose name is hidden (:func:`is_hidden`) is left out; a
    file is an image by its suffix (:data:`IMAGE_SUFFIXES`, any case), and whether it reads is checked
    where the photo is used (a failure recorded with its reason). Links are followed: a linked file is
    listed under its link's name (a dangling or looping one too, so reading it records why); a linked
    folder is walked, unless it is a folder this walk has already been through (a link loop, or a second
    link to it), which is left out and reported rather than walked forever.
    """
    folder = Path(folder)
    files: list[Path] = []
    left_out: list[tuple[Path, str]] = []
    try:
        st = folder.stat()
        seen = {(st.st_dev, st.st_ino)}
    except OSError:
        seen = set()
    stack = [folder]
    while stack:
        here = stack.pop()
        try:
            with os.scandir(here) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError as e:
            left_out.append((here, f"cannot be listed: {e.strerror or type(e).__name__}"))
            continue
        subfolders = []
        for entry in entries:
            if is_hidden(entry.name):
                continue
            path = here / entry.name
            if not _is_dir(entry):
                if path.suffix.lower() in IMAGE_SUFFIXES:
                    files.append(path)
                continue
            try:
                st = entry.stat()  # follows a link to the folder it names
            except OSError as e:
                left_out.append((path, f"cannot be read: {e.strerror or type(e).__name__}"))
                continue
            if (st.st_dev, st.st_ino) in seen:
                left_out.append((path, "a link to a folder already walked (a loop?)"))
                continue
            seen.add((st.st_dev, st.st_ino))
            subfolders.append(path)
        stack.extend(reversed(subfolders))
    return sorted(files), left_out


def _is_dir(entry: os.DirEntry) -> bool:
    try:
        return entry.is_dir()  # follows links
    except OSError:  # a link loop, no permission: not a folder to walk
        return False


def photo_id_text(path: str | bytes | os.PathLike) -> str:
    """A relative path as a photo id: :func:`path_text`, made injective. Bytes that are not UTF-8 are written
    ``\\xNN`` there, so ``b"bad\\xff.jpg"`` and a file literally named ``bad\\xff.jpg`` would get one id; here
    a literal backslash is doubled whenever the name holds one, so no two names share an id. Names without a
    backslash (all but a few) keep :func:`path_text`'s id, so caches built before keep theirs."""
    raw = os.fsencode(path)
    if b"\\" not in raw:
        return raw.decode("utf-8", "backslashreplace")
    # 0x5C never occurs inside a multi-byte UTF-8 sequence, so splitting on it splits no character
    return "\\\\".join(part.decode("utf-8", "backslashreplace") for part in raw.split(b"\\"))


def path_text(path: str | bytes | os.PathLike) -> str:
    """A path as valid UTF-8 text, bytes that are not UTF-8 written as ``\\xNN`` (``b"\\xff.jpg"`` ->
    ``"\\xff.jpg"``): what a photo id, a cache and a message hold. A Linux file name may be any bytes; Python
    reads those as lone surrogates, which HDF5's UTF-8 strings (and a terminal) refuse. The path itself,
    kept in :class:`Photo`, still opens the file."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


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
        with open(csv_path, newline="", encoding="utf-8-sig") as f:  # -sig: a file Excel saved with a BOM reads too
            reader = csv.DictReader(f)
            columns = list(reader.fieldnames or [])
            missing = [c for c in required if c not in columns]
            if missing:
                raise FeatkitError(f"manifest {csv_path} lacks column(s) {', '.join(sorted(missing))}; {fix}")
            rows = [{k: csv_value(v or "") for k, v in row.items() if k is not None} for row in reader]
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
    """Replace ``csv_path`` atomically with ``rows`` under ``columns`` (absent cells written empty; every cell
    through :func:`featkit.escape.csv_cell`, which :func:`read_manifest` undoes)."""
    with atomic_path(csv_path) as tmp:
        with tmp.open("w", newline="", encoding="utf-8") as fh:
            writer = csv.DictWriter(fh, fieldnames=list(columns), lineterminator="\n", extrasaction="ignore")
            writer.writeheader()
            for row in rows:
                writer.writerow({c: csv_cell(row.get(c, "")) for c in columns})  # titles, owners: outside text


def _and(names: Sequence[str]) -> str:
    return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} and {names[-1]}"
