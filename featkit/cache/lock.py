"""The one file lock of featkit: an exclusive ``flock`` held by the one process writing something.

Every writer of the cache folder takes it: a backbone's feature file (``<cache>.lock``, held from opening
for append until closing; ``--overwrite``, ``split`` and ``verify --repair`` too), a heads folder while its
``manifest.json`` is edited (the folder itself, whose inode never changes, so no lock file lies among the
heads), and `featkit download` (``.download.lock``). A lock file is never deleted: two processes could
otherwise lock two different files of the same name.

``flock`` is dropped by the kernel when its holder dies, so a killed writer never leaves a stale lock.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

from featkit.errors import FeatkitError


class Lock:
    """An exclusive ``flock`` on ``path`` (a file, created if need be, or a folder), taken on creation.

    ``blocking=False`` refuses at once with ``busy`` (one line, saying what to do) when another process
    holds it; ``blocking=True`` waits (for locks held milliseconds, such as a manifest edit).
    """

    def __init__(self, path: str | Path, *, busy: str = "", blocking: bool = False):
        self.path = Path(path)
        self.fd: int | None = None
        try:
            if self.path.is_dir():
                fd = os.open(self.path, os.O_RDONLY)
            else:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            where = self.path if self.path.is_dir() else self.path.parent
            raise FeatkitError(f"cannot write in {where} ({e.strerror or type(e).__name__}); give a --cache folder you can write to") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
        except OSError:
            os.close(fd)
            raise FeatkitError(busy or f"{self.path} is held by another process; wait for it to finish") from None
        self.fd = fd

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing drops the flock
            self.fd = None

    def __enter__(self) -> "Lock":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def is_locked(path: str | Path, *, exclusive: bool) -> bool:
    """Whether another process holds a ``flock`` on ``path`` that a shared (or, with ``exclusive``, an
    exclusive) one would collide with: HDF5 takes its own, so this tells "in use" from "damaged"."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB)
        return False
    except OSError:
        return True
    finally:
        os.close(fd)
