"""The HDF5 feature cache: append-only, crash-safe, checksummed, and never read as another backbone's.

Layout of ``features.h5`` (``format`` 2)::

    /features          (n, d) float16 (or float32), chunked, resizable, never filtered
    /text/<col>/bytes  uint8: the UTF-8 bytes of every row's value, one after the other
    /text/<col>/end    (n,) int64: where row i's bytes end (row i is bytes[end[i-1]:end[i]])
                       for col in photo_id, city, path, owner
    /split             (n,) int8: 0 train, 1 val, 2 test (the one column ever rewritten, in place)
    /failed/text/<col>/...   photos that could not be read (photo_id, path, reason), likewise
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

One writer at a time: :meth:`FeatureStore.open_for_append` (and ``--overwrite``,
which would otherwise delete a file another process writes) holds an exclusive
lock on ``<cache>.lock`` until the store is closed.

Caches of the first layout (``format`` 1: variable-length strings, no checksums)
are read as they are; appending to one rewrites it into this layout first.

File layout of a cache folder (every name is defined here and nowhere else)::

    CACHE/features.h5                      the features (above); features-<backbone>.h5 for others
    CACHE/features.h5.lock                 held by the process writing features.h5
    CACHE/failed.csv                       photos that could not be read, for people
    CACHE/heads/<head>.joblib              fitted heads (and heads/manifest.json)
    CACHE/features.h5.rank<k>-of-<n>.h5    a torchrun rank's part, until rank 0 joins it
"""

from __future__ import annotations

import csv
import glob
import hashlib
import io
import json
import os
import re
import time
import uuid
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np

from featkit import __version__
from featkit.atomic import atomic_write, fsync_file
from featkit.blocks import shuffled_segments
from featkit.errors import FeatkitError
from featkit.options import DTYPES

CACHE_FILE = "features.h5"
FAILED_CSV = "failed.csv"
HEADS_DIR = "heads"
ROW_FIELDS = ("photo_id", "city", "split", "path", "owner")
FAILED_FIELDS = ("photo_id", "path", "reason")  # failed.csv's columns
# and what the store keeps of a failure: plus the file's size and modification time when it failed
# (``file_signature``), so a photo whose file changed since is tried again without being asked
FAILED_STORED = FAILED_FIELDS + ("signature",)


DEFAULT_KEY = "vgg16"  # the study's features (VGG16 conv base, flatten, 224): CACHE/features.h5 and CACHE/heads/
_KEYED = re.compile(r"^features-([A-Za-z0-9][A-Za-z0-9._-]*)\.h5$")


def _key(key: str | None) -> str:
    return DEFAULT_KEY if key is None else key.replace(":", "-")


def cache_file(cache_dir: str | Path, key: str | None = None) -> Path:
    """Where one backbone's features lie: ``CACHE/features.h5`` for the default (VGG16 as the study
    used it), ``CACHE/features-<key>.h5`` for every other backbone (``key``: the backbone spec's ``key``)."""
    key = _key(key)
    return Path(cache_dir) / (CACHE_FILE if key == DEFAULT_KEY else f"features-{key}.h5")


def heads_dir(cache_dir: str | Path, key: str | None = None) -> Path:
    """Where the heads fitted on one backbone's features are saved: ``CACHE/heads`` for the default
    backbone, ``CACHE/heads/<key>`` for the others."""
    key = _key(key)
    return Path(cache_dir) / HEADS_DIR if key == DEFAULT_KEY else Path(cache_dir) / HEADS_DIR / key


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
    key = _key(backbone)
    if key not in keys:
        raise FeatkitError(f"the cache {cache_dir} holds no features of backbone {backbone!r}; it holds: {', '.join(keys)}", param="backbone")
    return [key]


def sibling_caches(path: str | Path) -> list[Path]:
    """The other backbones' feature files in the same cache folder as ``path``."""
    path = Path(path)
    return [cache_file(path.parent, k) for k in backbone_keys(path.parent) if cache_file(path.parent, k).name != path.name]


def shared_splits(path: str | Path) -> tuple[dict[str, str], dict | None]:
    """The split every backbone of this cache folder shares: ``photo_id -> split`` and the protocol, from the
    other backbone with the most photos (``({}, None)`` when ``path`` is the folder's only one). A new
    backbone's photos keep these splits, so backbones are compared on the same test photos."""
    best: tuple[int, dict[str, str], dict | None] = (-1, {}, None)
    for other in sibling_caches(path):
        with FeatureStore.open(other) as store:
            if store.n_rows > best[0]:
                best = (store.n_rows, dict(zip(store.column("photo_id"), store.column("split"))), store.split_protocol)
    return best[1], best[2]


def shard_path(cache_path: str | Path, rank: int, world_size: int) -> Path:
    """Where rank ``rank`` of ``world_size`` writes its part: ``<cache>.rank<k>-of-<n>.h5`` beside the cache."""
    p = Path(cache_path)
    return p.with_name(f"{p.name}.rank{rank}-of-{world_size}.h5")


def shard_files(cache_path: str | Path) -> list[Path]:
    """Shard files of this cache that exist now, from runs of any size."""
    p = Path(cache_path)
    return sorted(Path(s) for s in glob.glob(os.path.join(glob.escape(str(p.parent)), glob.escape(p.name) + ".rank*-of-*.h5")))


def cache_identity(spec, dtype: str) -> dict:
    """What a cache's features mean: the backbone spec's identity plus the stored dtype."""
    return {**spec.identity(), "dtype": dtype}


def _describe(identity: dict) -> str:
    keys = ("arch", "weights_sha256", "image_size", "pooling", "feature_dim", "dtype")
    parts = []
    for k in keys:
        v = identity.get(k)
        if k == "weights_sha256" and isinstance(v, str):
            v = v[:12]
        elif k == "image_size" and isinstance(v, list):
            v = "x".join(map(str, v))
        parts.append(f"{k}={v}")
    return " ".join(parts)


def check_identity(found: dict, expected: dict, what: str, fix: str) -> None:
    """Refuse, naming both identities and the fix, when two identities differ."""
    if found != expected:
        diff = sorted(k for k in set(found) | set(expected) if found.get(k) != expected.get(k))
        raise FeatkitError(
            f"{what} was built with [{_describe(found)}] but this run uses [{_describe(expected)}] "
            f"(differs in: {', '.join(diff)}); {fix}"
        )


SPLIT_CODES = ("train", "val", "test")  # /split holds the index into this tuple
FORMAT = 2
TEXT_FIELDS = ("photo_id", "city", "path", "owner")  # ROW_FIELDS but split, which is a code


def _invalid_codes(codes: np.ndarray) -> np.ndarray:
    """Which split codes are none of :data:`SPLIT_CODES`' (damage: the layout never writes them)."""
    return (codes < 0) | (codes >= len(SPLIT_CODES))


def _encode(values) -> list[bytes]:
    return [str(v).encode("utf-8", "surrogateescape") for v in values]


class _Text:
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
            raise _Damaged(f"the offsets of text column {self.end.parent.name} are inconsistent")
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


class _Damaged(Exception):
    """Something in a cache file is not as this layout writes it (the message says what)."""


def _crc(features: np.ndarray, texts: list[bytes]) -> int:
    c = zlib.crc32(np.ascontiguousarray(features).tobytes())
    for t in texts:
        c = zlib.crc32(t, c)
    return c


@dataclass
class Damage:
    """What :meth:`FeatureStore.verify` found: ``fatal`` (the file cannot be trusted at all: rebuild it)
    or rows that fail their checks (``bad_rows``, dropped by a repair and extracted again), and why."""

    path: Path
    problems: list[str] = field(default_factory=list)
    bad_rows: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    fatal: bool = False
    n_rows: int = 0
    n_batches: int = 0
    legacy: bool = False  # the first layout: nothing to verify against

    @property
    def ok(self) -> bool:
        return not self.problems and not self.legacy

    def line(self) -> str:
        if self.legacy:
            return (f"feature cache {self.path} has no checksums to verify (an older featkit's layout); "
                    f"rewrite it with them: featkit verify --cache {self.path.parent} --repair")
        if self.ok:
            return f"{self.path}: ok ({self.n_rows} rows in {self.n_batches} checksummed batches)"
        what = "; ".join(self.problems[:3]) + (f"; and {len(self.problems) - 3} more" if len(self.problems) > 3 else "")
        if self.fatal:
            fix = f"rebuild it: featkit extract PHOTOS --cache {self.path.parent} --overwrite"
        else:
            fix = f"drop and re-extract just those rows: featkit extract PHOTOS --cache {self.path.parent} --repair"
        return f"feature cache {self.path} is damaged: {what}; {fix}"


class FeatureStore:
    """A handle on ``features.h5``. Use :meth:`open_for_append` to write, :meth:`open` to read."""

    def __init__(self, path: Path, f: h5py.File, lock=None):
        self.path = Path(path)
        self.f = f
        self._lock = lock
        self._columns: dict[str, np.ndarray] = {}  # committed columns read so far, valid while n_rows holds
        self._failed: tuple[tuple[int, int, int], list[dict]] | None = None  # failed() as of one commit
        try:
            self._check_structure()
        except BaseException:
            self.close()
            raise

    # -- opening ---------------------------------------------------------------------------
    @classmethod
    def open(cls, path: str | Path, *, writable: bool = False) -> "FeatureStore":
        """Open an existing cache, read-only unless ``writable`` (which takes the writer's lock)."""
        path = Path(path)
        if not path.is_file():
            what = "is not a file" if path.exists() else "does not exist"
            raise FeatkitError(f"no feature cache at {path} (it {what}); run `featkit extract PHOTOS_DIR --cache {path.parent}` first")
        if not writable:
            return cls(path, _h5open(path, "r"))
        lock = _WriterLock(path)
        try:
            store = cls._reopen(path, lock)
        except BaseException:
            lock.release()
            raise
        store._truncate_uncommitted()
        return store

    @classmethod
    def _reopen(cls, path: Path, lock: "_WriterLock") -> "FeatureStore":
        """An existing cache opened for writing under ``lock`` (held by the caller), a first-layout one
        rewritten in this layout first."""
        if _is_legacy(path):
            _upgrade(path)
        return cls(path, _h5open(path, "a"), lock)

    @classmethod
    def open_for_append(
        cls,
        path: str | Path,
        identity: dict,
        *,
        overwrite: bool = False,
        provenance: dict | None = None,
    ) -> "FeatureStore":
        """Create the cache, or reopen it to append after checking it was built the same way.

        Takes the writer's lock first (``--overwrite`` too: it never deletes a file another
        process is writing). Leftover rows of an interrupted batch are truncated here.
        """
        path = Path(path)
        lock = _WriterLock(path)
        try:
            if overwrite and path.exists():
                path.unlink()
            if path.exists():
                store = cls._reopen(path, lock)
                try:
                    check_identity(
                        store.identity,
                        identity,
                        f"feature cache {path}",
                        "use another --cache folder for this backbone, or rerun with --overwrite to rebuild this one",
                    )
                    store._truncate_uncommitted()
                except BaseException:
                    store._lock = None
                    store.close()
                    raise
                return store
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(path.name + ".creating")
            _create(tmp, identity, provenance)
            tmp.replace(path)  # a half-created file never sits under the real name
            return cls(path, _h5open(path, "a"), lock)
        except BaseException:
            lock.release()
            raise

    def close(self) -> None:
        if self.f.id.valid:
            self.f.close()
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def __enter__(self) -> "FeatureStore":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- what it holds -----------------------------------------------------------------------
    @property
    def legacy(self) -> bool:
        """A cache of the first layout (variable-length strings, no checksums): readable, rewritten on append."""
        return "format" not in self.f.attrs

    @property
    def identity(self) -> dict:
        return json.loads(self.f.attrs["identity"])

    @property
    def cache_id(self) -> str:
        return str(self.f.attrs["cache_id"])

    def _commit(self) -> tuple[int, int, int]:
        if self.legacy:
            return int(self.f.attrs["n_rows"]), int(self.f.attrs["n_failed"]), 0
        n_rows, n_failed, n_batches = (int(v) for v in self.f.attrs["commit"])
        return n_rows, n_failed, n_batches

    @property
    def n_rows(self) -> int:
        return self._commit()[0]

    @property
    def n_failed(self) -> int:
        return self._commit()[1]

    @property
    def n_batches(self) -> int:
        return self._commit()[2]

    @property
    def split_protocol(self) -> dict | None:
        """How the recorded splits were drawn (``seed``, ``test_size``, ``val_size``); None for an old cache."""
        text = self.f.attrs.get("split_protocol")
        return None if text is None else json.loads(text)

    @property
    def split_id(self) -> str:
        """A fingerprint of which photo is in which split: heads trained on one split are refused on another."""
        h = hashlib.sha256()
        for pid, split in zip(self.column("photo_id"), self.column("split")):
            h.update(f"{pid}\t{split}\n".encode("utf-8", "surrogateescape"))
        return h.hexdigest()[:16]

    def record_split_protocol(self, protocol: dict) -> None:
        self.f.attrs["split_protocol"] = json.dumps(protocol, sort_keys=True)
        self.f.flush()

    def rewrite_splits(self, splits: dict[str, str], protocol: dict) -> None:
        """Assign the stored photos to new splits (``photo_id -> split``) without touching their features.

        The split codes are rewritten in place (a fixed-width column: a kill leaves each
        code old or new) and flushed before the protocol is recorded; heads trained on the
        old splits no longer match :attr:`split_id`.
        """
        ids = self.column("photo_id")
        missing = [p for p in ids if p not in splits]
        if missing:
            raise FeatkitError(f"no new split for {len(missing)} stored photos (e.g. {missing[0]!r})")
        if self.n_rows:
            self.f["split"][: self.n_rows] = np.array([SPLIT_CODES.index(splits[p]) for p in ids], dtype=np.int8)
            self.f.flush()
        self._columns.clear()
        self.record_split_protocol(protocol)

    @property
    def provenance(self) -> dict:
        return json.loads(self.f.attrs.get("provenance", "{}"))

    @property
    def n_features(self) -> int:
        """The width of a feature vector."""
        return int(self.f["features"].shape[1])

    def cities(self) -> list[str]:
        """The cities of the stored photos, sorted."""
        return sorted(set(self.column("city").tolist()))

    def column(self, name: str) -> np.ndarray:
        """A committed row column (photo_id, city, split, path, owner) as a numpy array of str."""
        if name not in ROW_FIELDS:
            raise KeyError(name)
        n = self.n_rows
        cached = self._columns.get(name)
        if cached is not None and len(cached) == n:
            return cached
        try:
            if not n:
                col = np.array([], dtype=str)
            elif self.legacy:
                col = self.f[name].asstr()[:n].astype(object).astype(str)
            elif name == "split":
                codes = self.f["split"][:n]
                if len(codes) < n or _invalid_codes(codes).any():
                    raise FeatkitError(Damage(self.path, ["the split column holds values other than train, val, test"]).line())
                col = np.array(SPLIT_CODES)[codes]
            else:
                col = np.array(_Text(self.f["text"][name]).read(n), dtype=str)
        except _Damaged as e:
            raise FeatkitError(Damage(self.path, [str(e)], fatal=True).line()) from None
        except (OSError, KeyError, ValueError, UnicodeDecodeError) as e:
            raise FeatkitError(Damage(self.path, [f"column {name} cannot be read ({_first_line(e)})"], fatal=True).line()) from None
        self._columns[name] = col
        return col

    def failed(self) -> list[dict]:
        """Photos recorded as unreadable and not stored since (a retried photo that worked is no longer
        failed), the latest record of each: ``{photo_id, path, reason}``."""
        commit = self._commit()
        if self._failed is not None and self._failed[0] == commit:
            return self._failed[1]
        n = commit[1]
        if not n:
            return []
        if self.legacy:
            cols = {k: list(self.f["failed"][k].asstr()[:n]) for k in FAILED_FIELDS}
            cols["signature"] = [""] * n  # not recorded then: such a failure is retried only when asked
        else:
            cols = {k: _Text(self.f["failed"]["text"][k]).read(n) for k in FAILED_STORED}
        stored = set(self.column("photo_id").tolist())
        latest: dict[str, dict] = {}
        for vals in zip(*(cols[k] for k in FAILED_STORED)):
            rec = dict(zip(FAILED_STORED, vals))
            if rec["photo_id"] not in stored:
                latest.pop(rec["photo_id"], None)
                latest[rec["photo_id"]] = rec
        self._failed = (commit, list(latest.values()))  # read once per commit (plan, done_ids, failed.csv all ask)
        return self._failed[1]

    def done_ids(self, *, retry_failed: bool = False, signatures: dict[str, str] | None = None) -> set[str]:
        """Photo ids already handled: stored rows and (unless ``retry_failed``) recorded failures, except those
        whose file changed since it failed (``signatures``: ``photo_id -> file_signature`` now), tried again."""
        done = set(self.column("photo_id").tolist())
        if retry_failed:
            return done
        signatures = signatures or {}
        return done | {r["photo_id"] for r in self.failed() if not _changed(r["signature"], signatures.get(r["photo_id"]))}

    def split_rows(self, split: str) -> np.ndarray:
        """Row indices of one split, ascending."""
        return np.flatnonzero(self.column("split") == split)

    def read_features(self, rows: np.ndarray, *, dtype=np.float32, block_rows: int = 4096) -> np.ndarray:
        """Rows of the feature matrix as one ``dtype`` array, converted block by block.

        Never materialises a float64 (or a whole-file) copy: each block is read
        in the stored dtype and cast into the preallocated output.
        """
        rows = np.asarray(rows, dtype=np.int64)
        ds = self.f["features"]
        out = np.empty((len(rows), ds.shape[1]), dtype=dtype)
        if len(rows) == 0:
            return out
        try:
            for start in range(0, len(rows), block_rows):
                sel = rows[start : start + block_rows]
                lo, hi = int(sel[0]), int(sel[-1]) + 1
                if hi - lo == len(sel):  # contiguous: one slice read
                    out[start : start + len(sel)] = ds[lo:hi]
                else:  # read the covering range and pick; cheaper than h5py fancy indexing
                    block = ds[lo:hi]
                    out[start : start + len(sel)] = block[sel - lo]
        except OSError as e:
            raise FeatkitError(Damage(self.path, [f"features cannot be read ({_first_line(e)})"], fatal=True).line()) from None
        return out

    def load_split(self, split: str, *, dtype=np.float32) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(X, y, photo_ids)`` of one split; ``y`` holds city names."""
        rows = self.split_rows(split)
        return self.read_features(rows, dtype=dtype), self.column("city")[rows], self.column("photo_id")[rows]

    def blocks(self, split: str, block_rows: int = 4096) -> "StoreBlocks":
        """One split as a block source (:mod:`featkit.blocks`), for heads that stream."""
        return StoreBlocks(self, split, block_rows)

    def write_failed_csv(self, path: str | Path) -> int:
        """The photos failed now (:meth:`failed`) as a CSV for people (``photo_id, path, reason``); removed when
        there are none. Returns how many rows it holds."""
        path = Path(path)
        failed = self.failed()
        if not failed:
            path.unlink(missing_ok=True)
            return 0
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=list(FAILED_FIELDS), lineterminator="\n", extrasaction="ignore")
        w.writeheader()
        w.writerows(failed)
        atomic_write(path, buf.getvalue().encode("utf-8", "backslashreplace"))
        return len(failed)

    # -- checking ----------------------------------------------------------------------------
    def _check_structure(self) -> None:
        """Refuse, in one line naming the file and the fix, a file that is not a whole cache of a layout this
        featkit writes: missing datasets, attributes that do not parse, counts larger than the data."""
        try:
            problems = _structure_problems(self.f)
        except (OSError, KeyError, ValueError, TypeError) as e:
            problems = [f"its structure cannot be read ({_first_line(e)})"]
        if problems:
            raise FeatkitError(Damage(self.path, problems, fatal=True).line())

    def verify(self, *, block_rows: int = 4096) -> Damage:
        """Read every committed row and check it: each batch's CRC-32, finite features, split codes,
        unique photo ids. Returns what was found (``Damage.ok`` when nothing)."""
        d = Damage(self.path, n_rows=self.n_rows, n_batches=self.n_batches)
        if self.legacy:
            d.legacy = True
            return d
        n = d.n_rows
        bad: list[np.ndarray] = []
        try:
            ends = self.f["batches"]["end"][: d.n_batches].astype(np.int64)
            crcs = self.f["batches"]["crc"][: d.n_batches].astype(np.int64)
            if len(ends) != d.n_batches or (len(ends) and ends[-1] != n) or (np.diff(ends) <= 0).any() or (len(ends) and ends[0] <= 0):
                d.problems.append("its batch table does not match its rows")
                d.fatal = True
                return d
            texts = [_Text(self.f["text"][name]) for name in TEXT_FIELDS]
            ds = self.f["features"]
            n_crc = n_nan = 0
            lo = 0
            for hi, crc in zip(ends.tolist(), crcs.tolist()):
                X = ds[lo:hi]
                raw = [t.read_raw(lo, hi)[0] for t in texts]
                if _crc(X, raw) != crc:
                    bad.append(np.arange(lo, hi))
                    n_crc += 1
                elif not np.isfinite(X).all():
                    bad.append(np.arange(lo, hi)[~np.isfinite(X).all(axis=1)])
                    n_nan += 1
                lo = hi
            if n_crc:
                d.problems.append(f"{n_crc} of {d.n_batches} batches fail their checksum")
            if n_nan:
                d.problems.append(f"{n_nan} batches hold non-finite features")
            wrong = np.flatnonzero(_invalid_codes(self.f["split"][:n]))
            if len(wrong):
                d.problems.append(f"{len(wrong)} rows have a split other than train, val, test")
                bad.append(wrong)
            ids = texts[0].read(n)
            if len(set(ids)) != len(ids):
                d.problems.append("some photo ids are stored twice")
                d.fatal = True
        except _Damaged as e:
            d.problems.append(str(e))
            d.fatal = True
        except (OSError, KeyError, ValueError, UnicodeDecodeError) as e:
            d.problems.append(f"it cannot be read through ({_first_line(e)})")
            d.fatal = True
        if bad:
            d.bad_rows = np.unique(np.concatenate(bad))
        return d

    def check_intact(self) -> None:
        """:meth:`verify`, raising its one line when anything is wrong (``fit`` and ``compare`` call this
        before they read a feature, so a damaged cache never gives wrong numbers)."""
        d = self.verify()
        if not d.ok and not d.legacy:  # the first layout has nothing to check against; it gets checksums when appended to
            raise FeatkitError(d.line())

    # -- writing ---------------------------------------------------------------------------
    def _truncate_uncommitted(self) -> None:
        n, nf, nb = self._commit()
        if self.f["features"].shape[0] != n:
            self.f["features"].resize(n, axis=0)
        if self.f["split"].shape[0] != n:
            self.f["split"].resize(n, axis=0)
        for name in TEXT_FIELDS:
            _Text(self.f["text"][name]).truncate(n)
        for name in FAILED_STORED:
            _Text(self.f["failed"]["text"][name]).truncate(nf)
        for name in ("end", "crc"):
            if self.f["batches"][name].shape[0] != nb:
                self.f["batches"][name].resize(nb, axis=0)
        self.f.flush()

    def append(self, rows: dict[str, list[str]], features: np.ndarray, failed: list[tuple[str, str, str]] = ()) -> None:
        """Write one batch of rows (and failures), then commit it by rewriting the one commit attribute.

        A crash before that write leaves the counts at their old values, and the
        next :meth:`open_for_append` truncates the rows.
        """
        n, nf, nb = self._commit()
        k = len(features)
        if k:
            X = features.astype(self.f["features"].dtype, copy=False)
            self.f["features"].resize(n + k, axis=0)
            self.f["features"][n : n + k] = X
            raw = []
            for name in TEXT_FIELDS:
                values = _encode(rows[name])
                _Text(self.f["text"][name]).append(n, values)
                raw.append(b"".join(values))
            self.f["split"].resize(n + k, axis=0)
            self.f["split"][n : n + k] = np.array([SPLIT_CODES.index(s) for s in rows["split"]], dtype=np.int8)
            for name, value in (("end", n + k), ("crc", _crc(X, raw))):
                self.f["batches"][name].resize(nb + 1, axis=0)
                self.f["batches"][name][nb] = value
            nb += 1
        if failed:
            for i, name in enumerate(FAILED_STORED):  # a failure without its signature (3 values) records ""
                _Text(self.f["failed"]["text"][name]).append(nf, _encode(r[i] if i < len(r) else "" for r in failed))
        self.f.flush()
        self._before_commit()
        self.f.attrs["commit"] = np.array([n + k, nf + len(failed), nb], dtype=np.int64)
        self.f.flush()
        self._columns.clear()

    def _before_commit(self) -> None:
        """A seam for tests: raising here simulates a crash between the data write and the commit."""

    def drop_rows(self, rows: np.ndarray) -> int:
        """Rewrite this cache without ``rows`` (damaged ones), keeping every other row, failure and attribute;
        the photos dropped are extracted again by the next ``extract``. Returns how many were dropped."""
        n = self.n_rows
        keep = np.setdiff1d(np.arange(n, dtype=np.int64), np.asarray(rows, dtype=np.int64))
        _rewrite(self, keep)
        self.f = _h5open(self.path, "a")
        self._columns.clear()
        self._failed = None  # another file now
        return n - len(keep)


def file_signature(path: str | Path) -> str:
    """What a failure records of its file, to notice a fix: ``size:mtime_ns``, or ``absent`` when it cannot be
    looked at (missing, a dangling link, a loop)."""
    try:
        st = os.stat(path)
    except (OSError, ValueError):
        return "absent"
    return f"{st.st_size}:{st.st_mtime_ns}"


def _changed(recorded: str, now: str | None) -> bool:
    """Whether a failed photo's file changed since (an older failure recorded nothing: not known to have)."""
    return bool(recorded) and now is not None and recorded != now


def verify_cache(path: str | Path, *, repair: bool = False) -> tuple[Damage, int]:
    """Check one cache file through (``featkit verify``); with ``repair``, rewrite it without the rows that fail
    (they are extracted again by the next ``extract``) and bring an older layout up to date. Returns what was
    found and how many rows were dropped. Damage that cannot be repaired row by row is one raised line naming the fix."""
    if not repair:
        with FeatureStore.open(path) as store:
            return store.verify(), 0
    with FeatureStore.open(path, writable=True) as store:  # takes the writer's lock; rewrites a first-layout cache
        d = store.verify()
        if d.fatal:
            raise FeatkitError(d.line())
        return d, (store.drop_rows(d.bad_rows) if len(d.bad_rows) else 0)


def lock_file(cache_path: str | Path) -> Path:
    """The file whose ``flock`` the one process writing ``cache_path`` holds (see :class:`_WriterLock`)."""
    p = Path(cache_path)
    return p.with_name(p.name + ".lock")


class _WriterLock:
    """An exclusive ``flock`` on ``<cache>.lock``, held by the one process writing a cache (never deleted, so no
    two processes can lock two different files of the same name)."""

    def __init__(self, cache_path: Path):
        import fcntl

        self.path = lock_file(cache_path)
        try:
            cache_path.parent.mkdir(parents=True, exist_ok=True)
            self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise FeatkitError(f"cannot write in {cache_path.parent} ({e.strerror or type(e).__name__}); give a --cache folder you can write to") from None
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(self.fd)
            self.fd = None
            raise FeatkitError(
                f"feature cache {cache_path} is being written by another process (another extract running?); "
                f"wait for it to finish, or use another --cache"
            ) from None

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing drops the flock
            self.fd = None


def _first_line(e: BaseException) -> str:
    return str(e).splitlines()[0] if str(e) else type(e).__name__


def _create(path: Path, identity: dict, provenance: dict | None, attrs: dict | None = None) -> None:
    """An empty cache of this layout at ``path`` (synced): what :meth:`FeatureStore.open_for_append` renames into place."""
    f = h5py.File(path, "w")
    try:
        dim, dtype = int(identity["feature_dim"]), identity["dtype"]
        # About 1 MB per chunk: big enough for fast sequential reads, small enough to shuffle by chunk.
        chunk_rows = max(1, min(1024, (1 << 20) // (dim * np.dtype(dtype).itemsize)))
        f.create_dataset("features", shape=(0, dim), maxshape=(None, dim), dtype=dtype, chunks=(chunk_rows, dim))
        f.create_dataset("split", shape=(0,), maxshape=(None,), dtype=np.int8, chunks=(1 << 14,))
        text = f.create_group("text")
        for name in TEXT_FIELDS:
            _Text.create(text, name)
        ftext = f.create_group("failed").create_group("text")
        for name in FAILED_STORED:
            _Text.create(ftext, name)
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


_COPIED_ATTRS = ("identity", "cache_id", "featkit_version", "created", "provenance", "split_protocol")


def _rewrite(store: FeatureStore, keep: np.ndarray, *, block_rows: int = 2048) -> None:
    """Replace ``store``'s file by one of this layout holding only rows ``keep`` (and every failure), atomically;
    closes ``store.f``. Used to drop damaged rows and to bring a first-layout cache up to date."""
    src = store
    path = store.path
    tmp = path.with_name(path.name + ".rewriting")
    attrs = {k: src.f.attrs[k] for k in _COPIED_ATTRS if k in src.f.attrs}
    _create(tmp, src.identity, None, attrs)
    cols = {name: src.column(name) for name in TEXT_FIELDS}
    if src.legacy:
        cols["split"] = src.column("split")
    else:  # read the codes as they are: rows with a bad one are among those dropped
        cols["split"] = np.array(SPLIT_CODES)[np.clip(src.f["split"][: src.n_rows], 0, len(SPLIT_CODES) - 1)]
    failed = src.failed()
    dst = FeatureStore(tmp, h5py.File(tmp, "a"))
    try:
        for start in range(0, len(keep), block_rows):
            sel = keep[start : start + block_rows]
            dst.append({name: cols[name][sel].tolist() for name in ROW_FIELDS}, src.read_features(sel, dtype=src.f["features"].dtype))
        if failed:
            dst.append({}, np.empty((0, 0)), [tuple(r[k] for k in FAILED_STORED) for r in failed])
    finally:
        dst.close()
    src.f.close()
    fsync_file(tmp)
    tmp.replace(path)


def _is_legacy(path: Path) -> bool:
    with _h5open(path, "r") as f:
        return "format" not in f.attrs


def _upgrade(path: Path) -> None:
    """Rewrite a first-layout cache (variable-length strings, no checksums) into this one, keeping every row."""
    store = FeatureStore(path, _h5open(path, "r"))
    try:
        _rewrite(store, np.arange(store.n_rows))
    finally:
        store.close()


def _structure_problems(f: h5py.File) -> list[str]:
    problems = []
    for attr in ("identity", "provenance", "split_protocol"):
        if attr in f.attrs:
            try:
                json.loads(f.attrs[attr])
            except (ValueError, TypeError):
                problems.append(f"its {attr} attribute is not JSON")
    if "identity" not in f.attrs:
        problems.append("it has no identity attribute")
    legacy = "format" not in f.attrs
    if not legacy and int(f.attrs["format"]) != FORMAT:
        return [f"it has layout format {f.attrs['format']}, which this featkit does not know (upgrade featkit)"]
    if legacy:
        needed = ["features", *ROW_FIELDS, *(f"failed/{k}" for k in FAILED_FIELDS)]
        counts = ("n_rows", "n_failed")
    else:
        needed = ["features", "split", "batches/end", "batches/crc", *(f"text/{k}/{p}" for k in TEXT_FIELDS for p in ("bytes", "end")),
                  *(f"failed/text/{k}/{p}" for k in FAILED_STORED for p in ("bytes", "end"))]
        counts = ("commit",)
    missing = [name for name in needed if name not in f]
    if missing:
        problems.append(f"dataset(s) {', '.join(missing)} are missing")
    absent = [c for c in counts if c not in f.attrs]
    if absent:
        problems.append(f"attribute(s) {', '.join(absent)} are missing")
    if problems:
        return problems
    if legacy:
        n, nf, nb = int(f.attrs["n_rows"]), int(f.attrs["n_failed"]), 0
        row_sets = ["features", *ROW_FIELDS]
        failed_sets = [f"failed/{k}" for k in FAILED_FIELDS]
    else:
        commit = np.asarray(f.attrs["commit"]).ravel()
        if commit.shape != (3,) or (commit < 0).any():
            return ["its commit attribute is not three counts"]
        n, nf, nb = (int(v) for v in commit)
        row_sets = ["features", "split", *(f"text/{k}/end" for k in TEXT_FIELDS)]
        failed_sets = [f"failed/text/{k}/end" for k in FAILED_STORED]
        if f["batches/end"].shape[0] < nb or f["batches/crc"].shape[0] < nb:
            problems.append(f"it records {nb} batches but holds fewer")
    short = [name for name in row_sets if f[name].shape[0] < n]
    if short:
        problems.append(f"it records {n} rows but {', '.join(short)} hold(s) fewer")
    if any(f[name].shape[0] < nf for name in failed_sets):
        problems.append(f"it records {nf} failed photos but holds fewer")
    try:
        dim = int(json.loads(f.attrs["identity"]).get("feature_dim", f["features"].shape[1]))
    except (ValueError, TypeError, AttributeError):
        dim = f["features"].shape[1]
    if f["features"].ndim != 2 or f["features"].shape[1] != dim:
        problems.append(f"its features are {f['features'].shape[1:]} wide, not the {dim} its identity says")
    return problems


class StoreBlocks:
    """One split of the cache as a block source (see :mod:`featkit.blocks`).

    Each pass reads the split once, in blocks gathered from short runs of rows
    in a shuffled order (:func:`featkit.blocks.shuffled_segments`); only one
    block (``block_rows`` x features, float32) is in memory at a time.
    """

    def __init__(self, store: FeatureStore, split: str, block_rows: int = 4096):
        self.store, self.block_rows = store, block_rows
        self.rows = store.split_rows(split)
        self.y = store.column("city")[self.rows]
        self.n_features = store.n_features

    def labels(self) -> np.ndarray:
        return self.y

    def blocks(self, rng: np.random.Generator | None = None):
        for runs in shuffled_segments(len(self.rows), self.block_rows, rng):
            X = np.concatenate([self.store.read_features(self.rows[a:b]) for a, b in runs])
            yield X, np.concatenate([self.y[a:b] for a, b in runs])


def _h5open(path: Path, mode: str) -> h5py.File:
    try:
        return h5py.File(path, mode)
    except OSError as e:
        if mode != "r" and path.exists() and not os.access(path, os.W_OK):
            raise FeatkitError(f"feature cache {path} is read-only; make it writable (chmod u+w) or copy the cache folder elsewhere") from None
        if isinstance(e, BlockingIOError) or ("lock" in _first_line(e).lower() and _locked(path, exclusive=mode != "r")):
            raise FeatkitError(f"feature cache {path} is in use by another process (an extract writing it?); wait for it to finish, or use another --cache") from None
        raise FeatkitError(
            f"feature cache {path} cannot be opened as HDF5 ({_first_line(e)}); it is damaged or not a cache: "
            f"rebuild it with featkit extract PHOTOS --cache {path.parent} --overwrite"
        ) from None


def _locked(path: Path, *, exclusive: bool) -> bool:
    """Whether another process holds a lock on ``path`` that HDF5's own (``flock``) would collide with."""
    import fcntl

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
