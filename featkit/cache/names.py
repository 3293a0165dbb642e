"""Every file name under a cache folder, and where each backbone's files lie. Nothing else in featkit
spells one (``tests/test_architecture.py`` checks it).

::

    CACHE/features.h5                      VGG16's features as the study used them (the default backbone)
    CACHE/features-<key>.h5                every other backbone's (``key``: its spec's ``key``, ``:`` -> ``-``)
    CACHE/features.h5.lock                 held by the one process writing features.h5 (:mod:`featkit.cache.lock`)
    CACHE/features.h5.rank<k>-of-<n>.h5    a torchrun rank's part, until rank 0 joins it
    CACHE/features.h5.creating / .rewriting  a cache being created or rewritten, renamed into place when whole
    CACHE/failed.csv                       photos that could not be read, for people
    CACHE/dhash.json                       the split check's photo hashes (path -> dHash), rebuilt when damaged
    CACHE/heads/<head>.joblib              heads fitted on the default backbone's features; heads/<key>/ for others
    CACHE/heads/manifest.json              which head files featkit's fit wrote there, with their SHA-256
    CACHE/images/<city>/<photo_id>.jpg     photos `featkit download` fetched
    CACHE/manifest.csv, CACHE/skipped.csv  what download kept (and rejected for good, with a reason)
    CACHE/images/<city>/<id>.jpg.fetched   an image downloaded whole but not yet kept (a kill leaves it: adopted next run)
    CACHE/.download-journal.jsonl          download's journal of fetches not yet in the manifest
    CACHE/.download.lock                   held by the one `featkit download` writing the folder
"""

from __future__ import annotations

import glob
import os
import re
from pathlib import Path

from featkit.errors import FeatkitError

CACHE_FILE = "features.h5"
FAILED_CSV = "failed.csv"
HEADS_DIR = "heads"
HEADS_MANIFEST = "manifest.json"
HASH_CACHE = "dhash.json"
IMAGES_DIR = "images"
DOWNLOAD_MANIFEST = "manifest.csv"
SKIPPED_CSV = "skipped.csv"
DOWNLOAD_JOURNAL = ".download-journal.jsonl"
DOWNLOAD_LOCK = ".download.lock"
HEAD_SUFFIX = ".joblib"
LOCK_SUFFIX = ".lock"
CREATING_SUFFIX = ".creating"
REWRITING_SUFFIX = ".rewriting"
STAGED_SUFFIX = ".fetched"  # images/<city>/<id>.jpg.fetched: a downloaded image, whole, not yet settled into the manifest

DEFAULT_KEY = "vgg16"  # the study's features (VGG16 conv base, flatten, 224): CACHE/features.h5 and CACHE/heads/
_KEYED = re.compile(r"^features-([A-Za-z0-9][A-Za-z0-9._-]*)\.h5$")


def file_key(backbone: str | None) -> str:
    """The key a backbone's files are named by: ``timm:NAME`` -> ``timm-NAME``; None is the default's."""
    return DEFAULT_KEY if backbone is None else backbone.replace(":", "-")


def cache_file(cache_dir: str | Path, key: str | None = None) -> Path:
    """Where one backbone's features lie: ``CACHE/features.h5`` for the default (VGG16 as the study
    used it), ``CACHE/features-<key>.h5`` for every other backbone (``key``: the backbone spec's ``key``)."""
    key = file_key(key)
    return Path(cache_dir) / (CACHE_FILE if key == DEFAULT_KEY else f"features-{key}.h5")


def heads_dir(cache_dir: str | Path, key: str | None = None) -> Path:
    """Where the heads fitted on one backbone's features are saved: ``CACHE/heads`` for the default
    backbone, ``CACHE/heads/<key>`` for the others."""
    key = file_key(key)
    return Path(cache_dir) / HEADS_DIR if key == DEFAULT_KEY else Path(cache_dir) / HEADS_DIR / key


def head_file(folder: str | Path, head: str) -> Path:
    """A fitted head's file in a heads folder."""
    return Path(folder) / f"{head}{HEAD_SUFFIX}"


def image_file(cache_dir: str | Path, city: str, photo_id: str) -> Path:
    """Where `featkit download` keeps one photo."""
    return Path(cache_dir) / IMAGES_DIR / city / f"{photo_id}.jpg"


def backbone_keys(cache_dir: str | Path) -> list[str]:
    """The backbones whose features a cache folder holds (the default first, then by name)."""
    folder = Path(cache_dir)
    keys = [DEFAULT_KEY] if (folder / CACHE_FILE).is_file() else []
    if folder.is_dir():
        # (a stray "features-vgg16.h5" is not the default's file, which is features.h5: not listed)
        keys += sorted(m.group(1) for f in folder.iterdir() if (m := _KEYED.match(f.name)) and ".rank" not in f.name and m.group(1) != DEFAULT_KEY)
    return keys


def resolve_backbones(cache_dir: str | Path, backbone: str | None = None) -> list[str]:
    """``backbone`` (a key or a backbone name such as ``timm:NAME``) checked against the cache, or every
    backbone the cache holds; a one-line error when there is none or it is not there."""
    keys = backbone_keys(cache_dir)
    if not keys:
        raise FeatkitError(f"no feature cache in {cache_dir}; run `featkit extract PHOTOS --cache {cache_dir}` first")
    if backbone is None:
        return keys
    key = file_key(backbone)
    if key not in keys:
        raise FeatkitError(f"the cache {cache_dir} holds no features of backbone {backbone!r}; it holds: {', '.join(keys)}", param="backbone")
    return [key]


def sibling_files(path: str | Path) -> list[Path]:
    """The other backbones' feature files in the same cache folder as ``path``."""
    path = Path(path)
    return [cache_file(path.parent, k) for k in backbone_keys(path.parent) if cache_file(path.parent, k).name != path.name]


def shard_path(cache_path: str | Path, rank: int, world_size: int) -> Path:
    """Where rank ``rank`` of ``world_size`` writes its part: ``<cache>.rank<k>-of-<n>.h5`` beside the cache."""
    p = Path(cache_path)
    return p.with_name(f"{p.name}.rank{rank}-of-{world_size}.h5")


def shard_files(cache_path: str | Path) -> list[Path]:
    """Shard files of this cache that exist now, from runs of any size."""
    p = Path(cache_path)
    return sorted(Path(s) for s in glob.glob(os.path.join(glob.escape(str(p.parent)), glob.escape(p.name) + ".rank*-of-*.h5")))


def lock_file(path: str | Path) -> Path:
    """The file whose ``flock`` the one process writing ``path`` holds (never deleted: see :mod:`featkit.cache.lock`)."""
    p = Path(path)
    return p.with_name(p.name + LOCK_SUFFIX)


def beside(path: str | Path, suffix: str) -> Path:
    """``path`` with ``suffix`` appended to its name: the temporary a cache is created or rewritten as."""
    p = Path(path)
    return p.with_name(p.name + suffix)
