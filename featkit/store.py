"""The HDF5 feature cache: append-only, resumable, and never read as another backbone's.

Layout of ``features.h5``::

    /features   (n, d) float16 (or float32), chunked, resizable
    /photo_id   (n,)   utf-8 strings       /city  /split  /path  /owner  likewise
    /failed/photo_id, /failed/path, /failed/reason   photos that could not be read
    attrs: identity (JSON: backbone spec + dtype), n_rows, n_failed (the committed
           counts), cache_id (a uuid, new on every --overwrite), featkit_version,
           created, provenance (JSON: argv, seed, versions, ...), split_protocol
           (JSON: seed, test_size, val_size of the recorded splits)

File layout of a cache folder (every name is defined here and nowhere else)::

    CACHE/features.h5                      the features (above)
    CACHE/failed.csv                       photos that could not be read, for people
    CACHE/heads/<head>.joblib              fitted heads
    CACHE/features.h5.rank<k>-of-<n>.h5    a torchrun rank's part, until rank 0 joins it

Rows beyond ``n_rows`` are leftovers of a batch that was being written when
the process died; opening for append truncates them, so each photo is stored
exactly once (the committed-row-count design from lhotse's feature writers).
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
FAILED_FIELDS = ("photo_id", "path", "reason")
_STR = h5py.string_dtype("utf-8")


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


class FeatureStore:
    """A handle on ``features.h5``. Use :meth:`open_for_append` to write, :meth:`open` to read."""

    def __init__(self, path: Path, f: h5py.File):
        self.path = Path(path)
        self.f = f

    # -- opening ---------------------------------------------------------------------------
    @classmethod
    def open(cls, path: str | Path, *, writable: bool = False) -> "FeatureStore":
        """Open an existing cache, read-only unless ``writable``."""
        path = Path(path)
        if not path.exists():
            raise FeatkitError(f"no feature cache at {path}; run `featkit extract PHOTOS_DIR` first (or point --cache at it)")
        store = cls(path, _h5open(path, "a" if writable else "r"))
        if writable:
            store._truncate_uncommitted()
        return store

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

        Leftover rows of an interrupted batch are truncated here.
        """
        path = Path(path)
        if overwrite and path.exists():
            path.unlink()
        if path.exists():
            store = cls(path, _h5open(path, "a"))
            check_identity(
                store.identity,
                identity,
                f"feature cache {path}",
                "use another --cache folder for this backbone, or rerun with --overwrite to rebuild this one",
            )
            store._truncate_uncommitted()
            return store
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".creating")
        f = _h5open(tmp, "w")
        dim, dtype = int(identity["feature_dim"]), identity["dtype"]
        # About 1 MB per chunk: big enough for fast sequential reads, small enough to shuffle by chunk.
        chunk_rows = max(1, min(1024, (1 << 20) // (dim * np.dtype(dtype).itemsize)))
        f.create_dataset("features", shape=(0, dim), maxshape=(None, dim), dtype=dtype, chunks=(chunk_rows, dim))
        for name in ROW_FIELDS:
            f.create_dataset(name, shape=(0,), maxshape=(None,), dtype=_STR, chunks=(4096,))
        g = f.create_group("failed")
        for name in FAILED_FIELDS:
            g.create_dataset(name, shape=(0,), maxshape=(None,), dtype=_STR, chunks=(1024,))
        f.attrs["identity"] = json.dumps(identity, sort_keys=True)
        f.attrs["cache_id"] = uuid.uuid4().hex
        f.attrs["featkit_version"] = __version__
        f.attrs["created"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        f.attrs["provenance"] = json.dumps(provenance or {}, sort_keys=True, default=str)
        f.attrs["n_rows"] = 0
        f.attrs["n_failed"] = 0
        f.close()
        fsync_file(tmp)
        tmp.replace(path)  # a half-created file never sits under the real name
        return cls(path, _h5open(path, "a"))

    def close(self) -> None:
        if self.f.id.valid:
            self.f.close()

    def __enter__(self) -> "FeatureStore":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- what it holds -----------------------------------------------------------------------
    @property
    def identity(self) -> dict:
        return json.loads(self.f.attrs["identity"])

    @property
    def cache_id(self) -> str:
        return str(self.f.attrs["cache_id"])

    @property
    def n_rows(self) -> int:
        return int(self.f.attrs["n_rows"])

    @property
    def n_failed(self) -> int:
        return int(self.f.attrs["n_failed"])

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
            h.update(f"{pid}\t{split}\n".encode())
        return h.hexdigest()[:16]

    def record_split_protocol(self, protocol: dict) -> None:
        self.f.attrs["split_protocol"] = json.dumps(protocol, sort_keys=True)
        self.f.flush()

    def rewrite_splits(self, splits: dict[str, str], protocol: dict) -> None:
        """Assign the stored photos to new splits (``photo_id -> split``) without touching their features.

        The split column is rewritten in one write and flushed before the protocol is
        recorded; heads trained on the old splits no longer match :attr:`split_id`.
        """
        ids = self.column("photo_id")
        missing = [p for p in ids if p not in splits]
        if missing:
            raise FeatkitError(f"no new split for {len(missing)} stored photos (e.g. {missing[0]!r})")
        if self.n_rows:
            self.f["split"][: self.n_rows] = [splits[p] for p in ids]
            self.f.flush()
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
        """A committed string column (photo_id, city, split, path, owner) as a numpy array of str."""
        return self.f[name].asstr()[: self.n_rows].astype(object).astype(str) if self.n_rows else np.array([], dtype=str)

    def failed(self) -> list[dict]:
        n = self.n_failed
        cols = {k: self.f["failed"][k].asstr()[:n] for k in FAILED_FIELDS} if n else {k: [] for k in FAILED_FIELDS}
        return [dict(zip(FAILED_FIELDS, vals)) for vals in zip(*(cols[k] for k in FAILED_FIELDS))]

    def done_ids(self) -> set[str]:
        """Photo ids already handled: stored rows and recorded failures."""
        return set(self.column("photo_id")) | {r["photo_id"] for r in self.failed()}

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
        for start in range(0, len(rows), block_rows):
            sel = rows[start : start + block_rows]
            lo, hi = int(sel[0]), int(sel[-1]) + 1
            if hi - lo == len(sel):  # contiguous: one slice read
                out[start : start + len(sel)] = ds[lo:hi]
            else:  # read the covering range and pick; cheaper than h5py fancy indexing
                block = ds[lo:hi]
                out[start : start + len(sel)] = block[sel - lo]
        return out

    def load_split(self, split: str, *, dtype=np.float32) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(X, y, photo_ids)`` of one split; ``y`` holds city names."""
        rows = self.split_rows(split)
        return self.read_features(rows, dtype=dtype), self.column("city")[rows], self.column("photo_id")[rows]

    def blocks(self, split: str, block_rows: int = 4096) -> "StoreBlocks":
        """One split as a block source (:mod:`featkit.blocks`), for heads that stream."""
        return StoreBlocks(self, split, block_rows)

    def write_failed_csv(self, path: str | Path) -> None:
        """The recorded failures as a CSV for people (``photo_id, path, reason``); removed when there are none."""
        path = Path(path)
        failed = self.failed()
        if not failed:
            path.unlink(missing_ok=True)
            return
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=list(FAILED_FIELDS), lineterminator="\n")
        w.writeheader()
        w.writerows(failed)
        atomic_write(path, buf.getvalue())

    # -- writing ---------------------------------------------------------------------------
    def _truncate_uncommitted(self) -> None:
        n, nf = self.n_rows, self.n_failed
        for name in ("features",) + ROW_FIELDS:
            if self.f[name].shape[0] != n:
                self.f[name].resize(n, axis=0)
        for name in FAILED_FIELDS:
            if self.f["failed"][name].shape[0] != nf:
                self.f["failed"][name].resize(nf, axis=0)
        self.f.flush()

    def append(self, rows: dict[str, list[str]], features: np.ndarray, failed: list[tuple[str, str, str]] = ()) -> None:
        """Write one batch of rows (and failures), then commit it by bumping the counts.

        A crash before the final attribute write leaves the counts at their
        old values, and the next :meth:`open_for_append` truncates the rows.
        """
        n, k = self.n_rows, len(features)
        if k:
            self.f["features"].resize(n + k, axis=0)
            self.f["features"][n : n + k] = features.astype(self.f["features"].dtype, copy=False)
            for name in ROW_FIELDS:
                self.f[name].resize(n + k, axis=0)
                self.f[name][n : n + k] = rows[name]
        nf = self.n_failed
        if failed:
            for i, name in enumerate(FAILED_FIELDS):
                ds = self.f["failed"][name]
                ds.resize(nf + len(failed), axis=0)
                ds[nf:] = [r[i] for r in failed]
        self.f.flush()
        self._before_commit()
        self.f.attrs["n_rows"] = n + k
        self.f.attrs["n_failed"] = nf + len(failed)
        self.f.flush()

    def _before_commit(self) -> None:
        """A seam for tests: raising here simulates a crash between the data write and the commit."""


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
    except BlockingIOError:
        raise FeatkitError(f"feature cache {path} is locked by another process (another extract running?); wait for it or use another --cache") from None
    except OSError as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        if "lock" in msg.lower():
            raise FeatkitError(f"feature cache {path} is locked by another process (another extract running?); wait for it or use another --cache") from None
        raise FeatkitError(f"feature cache {path} cannot be opened as HDF5 ({msg}); it may be damaged: rerun extract with --overwrite") from None
