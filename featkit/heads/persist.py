"""Saving and loading fitted heads: only the files in the heads folder's ``manifest.json``, with their
SHA-256, are ever unpickled (:func:`trusted_heads`, :func:`load_head`).

Moved here verbatim from ``featkit/heads.py``, so that this one file can move on (into the cache
package, which owns the cache folder's layout) without touching the heads themselves.
"""

from __future__ import annotations

import os
import time
import warnings

import joblib
from sklearn.base import BaseEstimator

from featkit.atomic import atomic_path
from featkit.errors import FeatkitError, UntrustedHeadWarning


HEADS_MANIFEST = "manifest.json"  # beside the heads: which files featkit's fit wrote there, with their SHA-256


def _sha256(path) -> str:
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _read_manifest(folder) -> dict:
    import json
    from pathlib import Path

    path = Path(folder) / HEADS_MANIFEST
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        return {str(k): v for k, v in data.get("heads", {}).items() if isinstance(v, dict) and isinstance(v.get("sha256"), str)}
    except (OSError, ValueError, AttributeError):
        return {}  # missing or damaged: nothing in the folder is trusted


def save_head(path, head: BaseEstimator, record: dict) -> None:
    """Save a fitted head with joblib, together with what it was trained on (``record``), and enter the
    file's SHA-256 in the folder's ``manifest.json``: :func:`load_head` unpickles nothing else.

    Atomic: a killed save never leaves a half-written head under the real name; a kill between the
    head and the manifest leaves the new file untrusted (refit), never a wrong head trusted.
    """
    import json
    from pathlib import Path

    from featkit.atomic import atomic_write

    path = Path(path)
    with atomic_path(path) as tmp:
        joblib.dump({"head": head, "record": record}, tmp)
    import fcntl

    # Two fits saving into one folder at once: each reads, edits and replaces the manifest under a lock on
    # the folder itself (its inode, unlike the manifest's, never changes), so neither loses the other's
    # entry. Blocking: a save holds it for milliseconds.
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        heads = _read_manifest(path.parent)
        heads[path.name] = {"sha256": _sha256(path), "head": record.get("head", path.stem), "saved": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        atomic_write(path.parent / HEADS_MANIFEST, json.dumps({"heads": heads}, indent=1, sort_keys=True) + "\n")
    finally:
        os.close(fd)


def trusted_heads(folder) -> tuple[list, list]:
    """``(trusted, ignored)`` head files of a heads folder: the ``*.joblib`` files its manifest lists with the
    SHA-256 they have now, and every other ``*.joblib`` (planted, copied, stale, edited, or saved before
    featkit kept a manifest), which is never unpickled."""
    from pathlib import Path

    folder = Path(folder)
    files = sorted(folder.glob("*.joblib")) if folder.is_dir() else []
    listed = _read_manifest(folder)
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


def load_head(path) -> tuple[BaseEstimator, dict]:
    """Unpickle a head, but only one :func:`save_head` wrote: its SHA-256 must be the manifest's."""
    from pathlib import Path

    import hashlib
    import io

    path = Path(path)
    entry = _read_manifest(path.parent).get(path.name)
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
