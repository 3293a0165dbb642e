"""The heads shelf of a cache folder: which fitted heads featkit's fit wrote there, saving one, loading one,
listing them, and choosing one.

A head is a pickle, and unpickling runs code, so nothing is unpickled unless the heads folder's
``manifest.json`` lists the file with the SHA-256 it has now: :func:`save_head` enters each head it saves
(under the heads folder's :mod:`featkit.cache.lock` lock, so concurrent fits keep every entry), and
:func:`load_head` checks the very bytes it then unpickles. Every other ``*.joblib`` (planted, copied in,
stale, edited, saved before featkit kept a manifest) is warned about once and never loaded.
"""

from __future__ import annotations

import hashlib
import io
import json
import time
import warnings
from pathlib import Path

import joblib

from featkit.atomic import atomic_path, atomic_write
from featkit.cache.lock import Lock
from featkit.cache.names import HEAD_SUFFIX, HEADS_MANIFEST, backbone_keys, head_file, heads_dir
from featkit.errors import FeatkitError, UntrustedHeadWarning
from featkit.naming import head_key, head_name


def _sha256(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def read_manifest(folder) -> dict:
    """``{file name: entry}`` of a heads folder's manifest (``{}`` when missing or damaged: nothing trusted)."""
    path = Path(folder) / HEADS_MANIFEST
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        return {str(k): v for k, v in data.get("heads", {}).items() if isinstance(v, dict) and isinstance(v.get("sha256"), str)}
    except (OSError, ValueError, AttributeError):
        return {}


def save_head(path, head, record: dict) -> None:
    """Save a fitted head with joblib, together with what it was trained on (``record``), and enter the
    file's SHA-256 in the folder's ``manifest.json``: :func:`load_head` unpickles nothing else.

    Atomic: a killed save never leaves a half-written head under the real name; a kill between the
    head and the manifest leaves the new file untrusted (refit), never a wrong head trusted.
    """
    path = Path(path)
    with atomic_path(path) as tmp:
        joblib.dump({"head": head, "record": record}, tmp)
    # Two fits saving into one folder at once: each reads, edits and replaces the manifest under a lock on
    # the folder itself (its inode, unlike the manifest's, never changes), so neither loses the other's
    # entry. Blocking: a save holds it for milliseconds.
    with Lock(path.parent, blocking=True):
        heads = read_manifest(path.parent)
        heads[path.name] = {"sha256": _sha256(path), "head": record.get("head", path.stem), "saved": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        atomic_write(path.parent / HEADS_MANIFEST, json.dumps({"heads": heads}, indent=1, sort_keys=True) + "\n")


def trusted_heads(folder) -> tuple[list, list]:
    """``(trusted, ignored)`` head files of a heads folder: the ``*.joblib`` files its manifest lists with the
    SHA-256 they have now, and every other ``*.joblib``, which is never unpickled."""
    folder = Path(folder)
    files = sorted(folder.glob(f"*{HEAD_SUFFIX}")) if folder.is_dir() else []
    listed = read_manifest(folder)
    trusted, ignored = [], []
    for f in files:
        entry = listed.get(f.name)
        (trusted if entry is not None and entry["sha256"] == _sha256(f) else ignored).append(f)
    return trusted, ignored


def warn_ignored(ignored: list) -> None:
    """One warning naming the head files that are not featkit's own (never loaded)."""
    if ignored:
        names = ", ".join(str(p) for p in ignored[:5]) + (f" and {len(ignored) - 5} more" if len(ignored) > 5 else "")
        warnings.warn(
            f"ignored {len(ignored)} head file(s) that featkit's fit did not write here, or that changed since: {names} "
            "(a head is a pickle, and unpickling runs code; refit with `featkit fit`)",
            UntrustedHeadWarning, stacklevel=2,
        )


def load_head(path) -> tuple[object, dict]:
    """Unpickle a head, but only one :func:`save_head` wrote: its SHA-256 must be the manifest's."""
    path = Path(path)
    entry = read_manifest(path.parent).get(path.name)
    try:
        data = path.read_bytes()  # read once: the bytes checked are the bytes unpickled
    except OSError:
        data = None
    if entry is None or data is None or entry["sha256"] != hashlib.sha256(data).hexdigest():
        raise FeatkitError(
            f"head file {path} is not one featkit's fit wrote there (not in {path.parent / HEADS_MANIFEST}, or changed since); "
            "it is not loaded, because unpickling runs code: refit with `featkit fit`"
        )
    try:
        obj = joblib.load(io.BytesIO(data))
        return obj["head"], obj["record"]
    except Exception as e:
        raise FeatkitError(f"head file {path} cannot be read ({type(e).__name__}); refit it with `featkit fit`") from None


def fitted_head_files(cache_dir: str | Path) -> tuple[dict[str, list[Path]], list[Path]]:
    """The head files featkit's fit wrote for each backbone of a cache (``{key: files}``, backbones without
    any left out), and the other ``*.joblib`` files found beside them, which are warned about once and
    never unpickled."""
    fitted, ignored = {}, []
    for key in backbone_keys(cache_dir):
        trusted, untrusted = trusted_heads(heads_dir(cache_dir, key))
        ignored += untrusted
        if trusted:
            fitted[key] = trusted
    warn_ignored(ignored)  # planted, stale or edited files
    return fitted, ignored


def fitted_heads(cache_dir: str | Path) -> dict[str, tuple[str, Path]]:
    """``{name: (backbone key, file)}`` of the heads fitted on a cache. Names are ``mlp`` when the cache has
    heads of one backbone only, else ``<backbone>/mlp`` (as in the report)."""
    fitted, _ = fitted_head_files(cache_dir)
    found = {(key, p.stem): p for key, files in fitted.items() for p in files}
    several = len({k for k, _ in found}) > 1
    return {(f"{k}/{h}" if several else h): (k, p) for (k, h), p in found.items()}


def choose_head(cache_dir: str | Path, head: str | None = None) -> tuple[str, str, Path, object, dict]:
    """``(name, backbone key, file, estimator, record)`` of the named head (``mlp``, or ``<backbone>/mlp``
    when the cache holds several backbones, the backbone spelt as extract takes it, ``timm:NAME/mlp``, or
    by its file key, ``timm-NAME/mlp``), or with ``head=None`` of the one with the best validation
    accuracy (its record's ``val_score``; the first listed on a tie). The name returned is the user's spelling."""
    heads = fitted_heads(cache_dir)
    if not heads:
        raise FeatkitError(f"no fitted heads in {heads_dir(cache_dir)}; run `featkit fit` first (and `featkit extract` before it)")
    if head is not None:
        if not isinstance(head, str) or head_key(head) not in heads:
            fitted = ", ".join(head_name(h) for h in heads)
            raise FeatkitError(f"no fitted head {head!r} in {heads_dir(cache_dir)}; fitted: {fitted}", param="head")
        key, path = heads[head_key(head)]
        return (head_name(head_key(head)), key, path, *load_head(path))
    best = None
    for name, (key, path) in heads.items():
        est, rec = load_head(path)
        score = rec.get("val_score")
        score = float("-inf") if score is None else float(score)
        if best is None or score > best[0]:
            best = (score, head_name(name), key, path, est, rec)
    return best[1:]
