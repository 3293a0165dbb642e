"""The read/write handle on one backbone's feature file, :class:`FeatureStore`, and what reads through it.

One writer at a time: :meth:`FeatureStore.open_for_append` (and ``--overwrite``, which would otherwise
delete a file another process writes) holds :mod:`featkit.cache.lock`'s lock on ``<cache>.lock`` until the
store is closed. A batch is committed by rewriting one attribute after its bytes are durable
(:mod:`featkit.cache.format` has the layout, :mod:`featkit.cache.integrity` the checks and the first layout).
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
from pathlib import Path

import h5py
import numpy as np

from featkit.atomic import atomic_write, fsync_file
from featkit.cache import integrity
from featkit.cache.format import (
    FAILED_FIELDS, FAILED_STORED, ROW_FIELDS, SPLIT_CODES, TEXT_FIELDS, Damaged, TextColumn, crc, create_file, encode,
    first_line, h5open, invalid_codes,
)
from featkit.cache.identity import check_identity
from featkit.cache.integrity import Damage
from featkit.cache.lock import Lock
from featkit.cache.streaming import StoreBlocks
from featkit.cache.names import CREATING_SUFFIX, beside, lock_file, sibling_files
from featkit.errors import CacheDamaged, FeatkitError
from featkit.escape import csv_cell


def writer_lock(cache_path: Path) -> Lock:
    """The lock the one process writing ``cache_path`` holds (``<cache>.lock``)."""
    return Lock(lock_file(cache_path), busy=(
        f"feature cache {cache_path} is being written by another process (another extract running?); "
        f"wait for it to finish, or use another --cache"))


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
            return cls(path, h5open(path, "r"))
        lock = writer_lock(path)
        try:
            store = cls._reopen(path, lock)
        except BaseException:
            lock.release()
            raise
        store._truncate_uncommitted()
        return store

    @classmethod
    def _reopen(cls, path: Path, lock: Lock) -> "FeatureStore":
        """An existing cache opened for writing under ``lock`` (held by the caller), a first-layout one
        rewritten in this layout first."""
        if integrity.is_legacy(path):
            integrity.upgrade(path, cls)
        return cls(path, h5open(path, "a"), lock)

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
        lock = writer_lock(path)
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
            tmp = beside(path, CREATING_SUFFIX)
            create_file(tmp, identity, provenance)
            tmp.replace(path)  # a half-created file never sits under the real name
            return cls(path, h5open(path, "a"), lock)
        except BaseException:
            lock.release()
            raise

    def discard(self) -> None:
        """Remove the file this handle created and close it (a run refused before it stored anything must not
        leave an empty cache behind); still under the writer's lock until the file is gone."""
        if self.f.id.valid:
            self.f.close()
        self.path.unlink(missing_ok=True)
        self.close()

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
        return integrity.is_legacy_file(self.f)

    @property
    def identity(self) -> dict:
        return json.loads(self.f.attrs["identity"])

    @property
    def cache_id(self) -> str:
        return str(self.f.attrs["cache_id"])

    def _commit(self) -> tuple[int, int, int]:
        if self.legacy:
            return integrity.legacy_commit(self.f)
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
                col = integrity.legacy_column(self.f, name, n)
            elif name == "split":
                codes = self.f["split"][:n]
                if len(codes) < n or invalid_codes(codes).any():
                    raise integrity.damaged(self.path, ["the split column holds values other than train, val, test"], fatal=False)
                col = np.array(SPLIT_CODES)[codes]
            else:
                col = np.array(TextColumn(self.f["text"][name]).read(n), dtype=str)
        except Damaged as e:
            raise integrity.fail_line(self.path, str(e)) from None
        except (OSError, KeyError, ValueError, UnicodeDecodeError) as e:
            raise integrity.fail_line(self.path, f"column {name} cannot be read ({first_line(e)})") from None
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
            cols = integrity.legacy_failed(self.f, n)
        else:
            cols = {k: TextColumn(self.f["failed"]["text"][k]).read(n) for k in FAILED_STORED}
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
            raise integrity.fail_line(self.path, f"features cannot be read ({first_line(e)})") from None
        return out

    def load_split(self, split: str, *, dtype=np.float32) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(X, y, photo_ids)`` of one split; ``y`` holds city names."""
        rows = self.split_rows(split)
        return self.read_features(rows, dtype=dtype), self.column("city")[rows], self.column("photo_id")[rows]

    def blocks(self, split: str, block_rows: int = 4096) -> StoreBlocks:
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
        w.writerows({k: csv_cell(r[k]) for k in FAILED_FIELDS} for r in failed)  # names and reasons are outside text
        atomic_write(path, buf.getvalue().encode("utf-8", "backslashreplace"))
        return len(failed)

    # -- checking ----------------------------------------------------------------------------
    def _check_structure(self) -> None:
        """Refuse, in one line naming the file and the fix, a file that is not a whole cache of a layout this
        featkit writes: missing datasets, attributes that do not parse, counts larger than the data."""
        try:
            problems = integrity.structure_problems(self.f)
        except (OSError, KeyError, ValueError, TypeError) as e:
            problems = [f"its structure cannot be read ({first_line(e)})"]
        if problems:
            raise integrity.damaged(self.path, problems)

    def verify(self, *, block_rows: int = 4096) -> Damage:
        """Every committed row checked (:func:`featkit.cache.integrity.verify`)."""
        return integrity.verify(self, block_rows=block_rows)

    def check_intact(self) -> None:
        """:meth:`verify`, raising its one line when anything is wrong (``fit`` and ``compare`` call this
        before they read a feature, so a damaged cache never gives wrong numbers)."""
        integrity.check_intact(self)

    # -- writing ---------------------------------------------------------------------------
    def _truncate_uncommitted(self) -> None:
        n, nf, nb = self._commit()
        if self.f["features"].shape[0] != n:
            self.f["features"].resize(n, axis=0)
        if self.f["split"].shape[0] != n:
            self.f["split"].resize(n, axis=0)
        for name in TEXT_FIELDS:
            TextColumn(self.f["text"][name]).truncate(n)
        for name in FAILED_STORED:
            TextColumn(self.f["failed"]["text"][name]).truncate(nf)
        for name in ("end", "crc"):
            if self.f["batches"][name].shape[0] != nb:
                self.f["batches"][name].resize(nb, axis=0)
        self.f.flush()

    def append(self, rows: dict[str, list[str]], features: np.ndarray, failed: list[tuple[str, str, str]] = ()) -> None:
        """Write one batch of rows (and failures), then commit it by rewriting the one commit attribute.

        A crash before that write leaves the counts at their old values, and the
        next :meth:`open_for_append` truncates the rows. A write the disk refuses (full, failing,
        over a quota) is one line before anything is committed: what was committed before stays.
        """
        n_before = self.n_rows
        try:
            self._write_batch(rows, features, failed)
        except OSError as e:
            why = os.strerror(e.errno) if e.errno else first_line(e)
            raise FeatkitError(
                f"cannot write to feature cache {self.path} ({why}); the {n_before} photos committed before are kept: "
                "free some space (or fix the disk) and rerun the same command to resume"
            ) from None

    def _write_batch(self, rows: dict[str, list[str]], features: np.ndarray, failed) -> None:
        n, nf, nb = self._commit()
        k = len(features)
        if k:
            X = features.astype(self.f["features"].dtype, copy=False)
            self.f["features"].resize(n + k, axis=0)
            self.f["features"][n : n + k] = X
            raw = []
            for name in TEXT_FIELDS:
                values = encode(rows[name])
                TextColumn(self.f["text"][name]).append(n, values)
                raw.append(b"".join(values))
            self.f["split"].resize(n + k, axis=0)
            self.f["split"][n : n + k] = np.array([SPLIT_CODES.index(s) for s in rows["split"]], dtype=np.int8)
            for name, value in (("end", n + k), ("crc", crc(X, raw))):
                self.f["batches"][name].resize(nb + 1, axis=0)
                self.f["batches"][name][nb] = value
            nb += 1
        if failed:
            for i, name in enumerate(FAILED_STORED):  # a failure without its signature (3 values) records ""
                TextColumn(self.f["failed"]["text"][name]).append(nf, encode(r[i] if i < len(r) else "" for r in failed))
        self._make_durable()  # the commit below is recorded only once the batch's bytes are on the disk
        self._before_commit()
        self.f.attrs["commit"] = np.array([n + k, nf + len(failed), nb], dtype=np.int64)
        self._make_durable()
        self._columns.clear()

    def _make_durable(self) -> None:
        """HDF5's buffers to the kernel, then the kernel's to the disk: a full disk (or a failing one) is an
        error here, before the commit that would claim the bytes, not a commit of bytes that never landed."""
        self.f.flush()
        fsync_file(self.path)

    def _before_commit(self) -> None:
        """A seam for tests: raising here simulates a crash between the data write and the commit."""

    def drop_rows(self, rows: np.ndarray) -> int:
        """Rewrite this cache without ``rows`` (damaged ones), keeping every other row, failure and attribute;
        the photos dropped are extracted again by the next ``extract``. Returns how many were dropped."""
        n = self.n_rows
        keep = np.setdiff1d(np.arange(n, dtype=np.int64), np.asarray(rows, dtype=np.int64))
        integrity.rewrite(self, keep)
        self.f = h5open(self.path, "a")
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
            raise CacheDamaged(d.line())
        return d, (store.drop_rows(d.bad_rows) if len(d.bad_rows) else 0)


def shared_splits(path: str | Path) -> tuple[dict[str, str], dict | None]:
    """The split every backbone of this cache folder shares: ``photo_id -> split`` and the protocol, from the
    other backbone with the most photos (``({}, None)`` when ``path`` is the folder's only one). A new
    backbone's photos keep these splits, so backbones are compared on the same test photos."""
    best: tuple[int, dict[str, str], dict | None] = (-1, {}, None)
    for other in sibling_files(path):
        with FeatureStore.open(other) as store:
            if store.n_rows > best[0]:
                best = (store.n_rows, dict(zip(store.column("photo_id"), store.column("split"))), store.split_protocol)
    return best[1], best[2]
