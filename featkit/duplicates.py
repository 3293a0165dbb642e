"""Duplicates among the downloaded photos: the same bytes (SHA-256) or nearly the same picture (a
difference hash within a few bits), for :mod:`featkit.collect`. The hashes are :mod:`featkit.images`'."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import numpy as np
from PIL import UnidentifiedImageError

from featkit.images import dhash


class Dedup:
    """Kept photos by content: exact (sha256) and near (difference hash within ``bits``) duplicates."""

    def __init__(self, bits: int):
        self.bits = bits
        self.sha_owner: dict[str, str] = {}  # sha256 -> kept photo id
        self.ids: list[str] = []
        self._hashes = np.empty(1024, dtype=np.uint64)  # the first len(ids) hold their hashes

    @property
    def hashes(self) -> np.ndarray:
        return self._hashes[:len(self.ids)]

    def index(self, rows: Iterable[dict[str, str]], out_dir: Path) -> None:
        """Learn the photos already kept (their files are on disk)."""
        for row in rows:
            if row.get("sha256"):
                self.sha_owner.setdefault(row["sha256"], row["photo_id"])
            try:
                h = dhash((out_dir / row["path"]).read_bytes())
            except (OSError, ValueError, UnidentifiedImageError):
                continue
            self._append(row["photo_id"], h)

    def _append(self, pid: str, h: int) -> None:
        n = len(self.ids)
        if n == len(self._hashes):  # grown by doubling: no copy of every hash for every photo
            self._hashes = np.concatenate([self._hashes, np.empty_like(self._hashes)])
        self._hashes[n] = h
        self.ids.append(pid)

    def match(self, sha: str, h: int) -> tuple[str, str] | None:
        """``("duplicate", id)`` or ``("near-duplicate", id)`` of a kept photo, else None."""
        other = self.sha_owner.get(sha)
        if other is not None:
            return "duplicate", other
        if not self.ids:
            return None
        dist = np.bitwise_count(self.hashes ^ np.uint64(h))
        i = int(np.argmin(dist))
        return ("near-duplicate", self.ids[i]) if dist[i] <= self.bits else None

    def add(self, pid: str, sha: str, h: int) -> None:
        self.sha_owner[sha] = pid
        self._append(pid, h)

    def remove(self, pid: str, sha: str) -> None:
        if pid in self.ids:
            i, n = self.ids.index(pid), len(self.ids)
            self._hashes[i:n - 1] = self._hashes[i + 1:n]
            del self.ids[i]
        if self.sha_owner.get(sha) == pid:
            del self.sha_owner[sha]


