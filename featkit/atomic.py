"""Write a file so that a reader (or a crash) sees the old version or the new one, never half of one.

Every output featkit writes (manifests, heads, reports, the CSV of failures, a
new feature cache) goes through :func:`atomic_path` or :func:`atomic_write`:
the bytes go to a temporary name beside the target, are flushed to disk
(``fsync``), and the temporary file is renamed over the target; the folder is
then synced so the rename itself survives a power cut.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path
from typing import Iterator


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # some filesystems (and Windows) cannot open a folder
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def fsync_file(path: str | Path) -> None:
    """Flush a closed file's bytes to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str | Path, *, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on a clean exit it is synced and renamed to ``path``.

    Whatever writes the file (``joblib.dump``, ``fig.savefig``, ``h5py.File``)
    writes to the yielded path. On an exception the temporary file is removed
    and ``path`` is left as it was. ``suffix`` keeps a file type that a writer
    infers from the name (``.png``).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp{suffix}")
    try:
        yield tmp
        fsync_file(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def atomic_write(path: str | Path, data: str | bytes, *, encoding: str = "utf-8") -> None:
    """Replace ``path`` with ``data`` (text or bytes) atomically."""
    with atomic_path(path) as tmp:
        if isinstance(data, str):
            tmp.write_text(data, encoding=encoding)
        else:
            tmp.write_bytes(data)


RUNS_DIR = ".runs"  # inside a folder written by publish_files: one subfolder per run, the newest linked as current
CURRENT = "current"


def _symlink_over(target: str, link: Path) -> None:
    """Make ``link`` a symbolic link to ``target`` in one rename (whatever ``link`` was before)."""
    tmp = link.with_name(f".{link.name}.{os.getpid()}.link")
    tmp.unlink(missing_ok=True)
    os.symlink(target, tmp)
    os.replace(tmp, link)


def publish_files(folder: str | Path, files: dict[str, str | bytes], run_id: str) -> dict[str, Path]:
    """Write a set of files that belong together (a report's ``compare.md``, ``.json``, ``.html`` and figures)
    so that a reader, or a kill at any moment, sees all of one run or all of the one before, never a mix.

    The files go to ``folder/.runs/<run_id>/`` (each synced); then one rename points ``folder/current`` at
    that run. ``folder/<name>`` is a link to ``current/<name>``, made once (a plain file an older featkit
    wrote is replaced by it after the switch). Earlier runs, and links to files this run lacks, are removed
    last. Returns ``{name: folder/<name>}``.
    """
    folder = Path(folder)
    runs = folder / RUNS_DIR
    run = runs / run_id
    run.mkdir(parents=True, exist_ok=False)
    for name, data in files.items():
        atomic_write(run / name, data)
    _fsync_dir(runs)
    _symlink_over(f"{RUNS_DIR}/{run_id}", folder / CURRENT)  # the switch: every name at once
    _fsync_dir(folder)
    for name in files:
        link = folder / name
        if not (link.is_symlink() and os.readlink(link) == f"{CURRENT}/{name}"):
            _symlink_over(f"{CURRENT}/{name}", link)
    for entry in folder.iterdir():
        if entry.is_symlink() and os.readlink(entry).startswith(f"{CURRENT}/") and entry.name not in files:
            entry.unlink()  # a figure of a head this run no longer has
    for old in runs.iterdir():
        if old.name != run_id:
            shutil.rmtree(old, ignore_errors=True)
    _fsync_dir(folder)
    return {name: folder / name for name in files}
