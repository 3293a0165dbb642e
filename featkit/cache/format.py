"""The bytes of a feature file (``format`` 2): which datasets, their types, and how a batch is checksummed.

Layout of ``features.h5``::

    /features          (n, d) float16 (or float32), chunked, resizable, never filtered
    /text/<col>/bytes  uint8: the UTF-8 bytes of every row's value, one after the other
    /text/<col>/end    (n,) int64: where row i's bytes end (row i is bytes[end[i-1]:end[i]])
                       for col in photo_id, city, path, owner
    /split             (n,) int8: 0 train, 1 val, 2 test (the one column ever rewritten, in place)
    /failed/text/<col>/...   photos that could not be read (photo_id, path, reason, signature), likewise
    /batches/end, /batches/crc   one entry per appended batch: its last row + 1, and the CRC-32
                       of its features' bytes and its text bytes (checked by verify, fit, compare)
    attrs: format (2), commit ([n_rows, n_failed, n_batches], the one committed count, written
           last), identity (JSON: backbone spec + dtype), cache_id (a uuid, new on every
           --overwrite), featkit_version, created, provenance (JSON), split_protocol (JSON)

Why this layout: HDF5 keeps variable-length strings in a global heap that a kill
in the middle of a write can leave inconsistent, taking committed rows with it
(``bad heap index``). Here every column is a plain fixed-width dataset that is
only ever appended to; a committed byte is never rewritten except by the same
bytes (a chunk written back whole by one ``pwrite``), and nothing is compressed,
so a chunk never moves. Rows past the commit are leftovers of a batch that was
being written when the process died: opening for append truncates them, so each
photo is stored exactly once (the committed-count design of lhotse's feature
writers). Paths keep their raw bytes (``surrogateescape``), so a file name that
is not UTF-8 survives the round trip.

The first layout (``format`` 1: variable-length strings, no checksums) is read by
:mod:`featkit.cache.integrity`, which holds all of its code.
"""

from __future__ import annotations

import json
import os
import time
import uuid
import zlib
from pathlib import Path

import h5py
import numpy as np

from featkit import __version__
from featkit.atomic import fsync_file
from featkit.cache.lock import is_locked
from featkit.errors import CacheDamaged, FeatkitError

FORMAT = 2
ROW_FIELDS = ("photo_id", "city", "split", "path", "owner")
TEXT_FIELDS = ("photo_id", "city", "path", "owner")  # ROW_FIELDS but split, which is a code
SPLIT_CODES = ("train", "val", "test")  # /split holds the index into this tuple
FAILED_FIELDS = ("photo_id", "path", "reason")  # failed.csv's columns
# and what the store keeps of a failure: plus the file's size and modification time when it failed
# (``file_signature``), so a photo whose file changed since is tried again without being asked
FAILED_STORED = FAILED_FIELDS + ("signature",)
COPIED_ATTRS = ("identity", "cache_id", "featkit_version", "created", "provenance", "split_protocol")  # kept by a rewrite


class Damaged(Exception):
    """Something in a cache file is not as this layout writes it (the message says what)."""


def first_line(e: BaseException) -> str:
    return str(e).splitlines()[0] if str(e) else type(e).__name__


def invalid_codes(codes: np.ndarray) -> np.ndarray:
    """Which split codes are none of :data:`SPLIT_CODES`' (damage: the layout never writes them)."""
    return (codes < 0) | (codes >= len(SPLIT_CODES))


def encode(values) -> list[bytes]:
    return [str(v).encode("utf-8", "surrogateescape") for v in values]


def crc(features: np.ndarray, texts: list[bytes]) -> int:
    """A batch's checksum: CRC-32 of its features' bytes, then of each text column's bytes."""
    c = zlib.crc32(np.ascontiguousarray(features).tobytes())
    for t in texts:
        c = zlib.crc32(t, c)
    return c


class TextColumn:
    """One append-only text column: the values' bytes one after the other, and where each ends."""

    def __init__(self, group: h5py.Group):
        self.bytes, self.end = group["bytes"], group["end"]

    @staticmethod
    def create(parent: h5py.Group, name: str) -> None:
        g = parent.create_group(name)
        g.create_dataset("bytes", shape=(0,), maxshape=(None,), dtype=np.uint8, chunks=(1 << 16,))
        g.create_dataset("end", shape=(0,), maxshape=(None,), dtype=np.int64, chunks=(4096,))

    def n_bytes(self, n: int) -> int:
        return int(self.end[n - 1]) if n else 0

    def read_raw(self, lo: int, hi: int) -> tuple[bytes, np.ndarray]:
        """Rows lo..hi-1: their bytes in one piece and their ends, relative to that piece."""
        if hi <= lo:
            return b"", np.zeros(0, dtype=np.int64)
        first = int(self.end[lo - 1]) if lo else 0
        ends = self.end[lo:hi].astype(np.int64)
        if len(ends) != hi - lo or (np.diff(ends) < 0).any() or ends[0] < first or ends[-1] > self.bytes.shape[0]:
            raise Damaged(f"the offsets of text column {self.end.parent.name} are inconsistent")
        return self.bytes[first : int(ends[-1])].tobytes(), ends - first

    def read(self, n: int) -> list[str]:
        data, ends = self.read_raw(0, n)
        starts = np.concatenate([[0], ends[:-1]]) if n else ends
        return [data[a:b].decode("utf-8", "surrogateescape") for a, b in zip(starts.tolist(), ends.tolist())]

    def append(self, n: int, values: list[bytes]) -> None:
        """Write ``values`` as rows n.. (past the committed ones; uncommitted until the store commits)."""
        at = self.n_bytes(n)
        blob = b"".join(values)
        self.bytes.resize(at + len(blob), axis=0)
        if blob:
            self.bytes[at:] = np.frombuffer(blob, dtype=np.uint8)
        self.end.resize(n + len(values), axis=0)
        if values:
            self.end[n:] = at + np.cumsum([len(v) for v in values], dtype=np.int64)

    def truncate(self, n: int) -> None:
        if self.end.shape[0] != n:
            self.end.resize(n, axis=0)
        nb = self.n_bytes(n)
        if self.bytes.shape[0] != nb:
            self.bytes.resize(nb, axis=0)


def create_file(path: Path, identity: dict, provenance: dict | None, attrs: dict | None = None) -> None:
    """An empty cache of this layout at ``path`` (synced): what a new cache is renamed from into place, or a rewrite."""
    f = h5py.File(path, "w", rdcc_nbytes=0)
    try:
        dim, dtype = int(identity["feature_dim"]), identity["dtype"]
        # About 1 MB per chunk: big enough for fast sequential reads, small enough to shuffle by chunk.
        chunk_rows = max(1, min(1024, (1 << 20) // (dim * np.dtype(dtype).itemsize)))
        f.create_dataset("features", shape=(0, dim), maxshape=(None, dim), dtype=dtype, chunks=(chunk_rows, dim))
        f.create_dataset("split", shape=(0,), maxshape=(None,), dtype=np.int8, chunks=(1 << 14,))
        text = f.create_group("text")
        for name in TEXT_FIELDS:
            TextColumn.create(text, name)
        ftext = f.create_group("failed").create_group("text")
        for name in FAILED_STORED:
            TextColumn.create(ftext, name)
        b = f.create_group("batches")
        b.create_dataset("end", shape=(0,), maxshape=(None,), dtype=np.int64, chunks=(4096,))
        b.create_dataset("crc", shape=(0,), maxshape=(None,), dtype=np.uint32, chunks=(4096,))
        base = {
            "identity": json.dumps(identity, sort_keys=True),
            "cache_id": uuid.uuid4().hex,
            "featkit_version": __version__,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "provenance": json.dumps(provenance or {}, sort_keys=True, default=str),
        }
        for k, v in {**base, **(attrs or {})}.items():
            f.attrs[k] = v
        f.attrs["format"] = FORMAT
        f.attrs["commit"] = np.zeros(3, dtype=np.int64)
    finally:
        f.close()
    fsync_file(path)


def h5open(path: Path, mode: str) -> h5py.File:
    try:
        # Writing, no chunk cache: HDF5 writes a cached chunk back when its dataset handle is freed, where an
        # error (a full disk) is only printed and the batch would be committed anyway; uncached, the write
        # itself raises, before the commit.
        return h5py.File(path, mode, rdcc_nbytes=0) if mode != "r" else h5py.File(path, mode)
    except OSError as e:
        if mode != "r" and path.exists() and not os.access(path, os.W_OK):
            raise FeatkitError(f"feature cache {path} is read-only; make it writable (chmod u+w) or copy the cache folder elsewhere") from None
        if isinstance(e, BlockingIOError) or ("lock" in first_line(e).lower() and is_locked(path, exclusive=mode != "r")):
            raise FeatkitError(f"feature cache {path} is in use by another process (an extract writing it?); wait for it to finish, or use another --cache") from None
        raise CacheDamaged(
            f"feature cache {path} cannot be opened as HDF5 ({first_line(e)}); it is damaged or not a cache: "
            f"rebuild it with featkit extract PHOTOS --cache {path.parent} --overwrite"
        ) from None


