"""Is a feature file whole, and mending it: the structure check on opening, ``verify`` (every batch's
checksum, finite features, split codes, unique ids), the rewrite that drops damaged rows, and all code of
the first layout (``format`` 1: variable-length strings, no checksums), which is read as it is and
rewritten into the current one when appended to or repaired.

The functions take a :class:`~featkit.cache.store.FeatureStore` (this module does not import it: the
handle calls in here).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np

from featkit.cache.format import (
    COPIED_ATTRS, FAILED_FIELDS, FAILED_STORED, FORMAT, ROW_FIELDS, SPLIT_CODES, TEXT_FIELDS, Damaged, TextColumn,
    crc, create_file, first_line, h5open, invalid_codes,
)
from featkit.atomic import fsync_file
from featkit.cache.names import REWRITING_SUFFIX, beside
from featkit.errors import CacheDamaged


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


def verify(store, *, block_rows: int = 4096) -> Damage:
    """Read every committed row of ``store`` (a :class:`~featkit.cache.store.FeatureStore`) and check it:
    each batch's CRC-32, finite features, split codes, unique photo ids. Returns what was found (``Damage.ok`` when nothing)."""
    d = Damage(store.path, n_rows=store.n_rows, n_batches=store.n_batches)
    if store.legacy:
        d.legacy = True
        return d
    n = d.n_rows
    bad: list[np.ndarray] = []
    try:
        ends = store.f["batches"]["end"][: d.n_batches].astype(np.int64)
        crcs = store.f["batches"]["crc"][: d.n_batches].astype(np.int64)
        if len(ends) != d.n_batches or (len(ends) and ends[-1] != n) or (np.diff(ends) <= 0).any() or (len(ends) and ends[0] <= 0):
            d.problems.append("its batch table does not match its rows")
            d.fatal = True
            return d
        texts = [TextColumn(store.f["text"][name]) for name in TEXT_FIELDS]
        ds = store.f["features"]
        n_crc = n_nan = 0
        lo = 0
        for hi, expected in zip(ends.tolist(), crcs.tolist()):
            X = ds[lo:hi]
            raw = [t.read_raw(lo, hi)[0] for t in texts]
            if crc(X, raw) != expected:
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
        wrong = np.flatnonzero(invalid_codes(store.f["split"][:n]))
        if len(wrong):
            d.problems.append(f"{len(wrong)} rows have a split other than train, val, test")
            bad.append(wrong)
        ids = texts[0].read(n)
        if len(set(ids)) != len(ids):
            d.problems.append("some photo ids are stored twice")
            d.fatal = True
    except Damaged as e:
        d.problems.append(str(e))
        d.fatal = True
    except (OSError, KeyError, ValueError, UnicodeDecodeError) as e:
        d.problems.append(f"it cannot be read through ({first_line(e)})")
        d.fatal = True
    if bad:
        d.bad_rows = np.unique(np.concatenate(bad))
    return d



def check_intact(store) -> None:
    """:func:`verify`, raising its one line when anything is wrong (``fit`` and ``compare`` call this
    before they read a feature, so a damaged cache never gives wrong numbers)."""
    d = verify(store)
    if not d.ok and not d.legacy:  # the first layout has nothing to check against; it gets checksums when appended to
        raise CacheDamaged(d.line())


def damaged(path: Path, problems: list[str], *, fatal: bool = True) -> CacheDamaged:
    """The one-line error for a damaged file: what is wrong, and the fix (a rebuild when ``fatal``, else ``--repair``)."""
    return CacheDamaged(Damage(path, problems, fatal=fatal).line())


def fail_line(path: Path, problem: str) -> CacheDamaged:
    """The one line for a file that cannot be trusted at all: what is wrong, and rebuild it."""
    return damaged(path, [problem])


# -- the first layout ----------------------------------------------------------------------------
def is_legacy_file(f: h5py.File) -> bool:
    return "format" not in f.attrs


def is_legacy(path: Path) -> bool:
    with h5open(path, "r") as f:
        return is_legacy_file(f)


def legacy_commit(f: h5py.File) -> tuple[int, int, int]:
    """The first layout's counts: rows and failures (no batches)."""
    return int(f.attrs["n_rows"]), int(f.attrs["n_failed"]), 0


def legacy_column(f: h5py.File, name: str, n: int) -> np.ndarray:
    """A row column of the first layout: a variable-length string dataset per column."""
    return f[name].asstr()[:n].astype(object).astype(str)


def legacy_failed(f: h5py.File, n: int) -> dict[str, list[str]]:
    cols = {k: list(f["failed"][k].asstr()[:n]) for k in FAILED_FIELDS}
    cols["signature"] = [""] * n  # not recorded then: such a failure is retried only when asked
    return cols


def upgrade(path: Path, store_class) -> None:
    """Rewrite a first-layout cache (variable-length strings, no checksums) into this one, keeping every row."""
    store = store_class(path, h5open(path, "r"))
    try:
        rewrite(store, np.arange(store.n_rows))
    finally:
        store.close()


def rewrite(store, keep: np.ndarray, *, block_rows: int = 2048) -> None:
    """Replace ``store``'s file by one of this layout holding only rows ``keep`` (and every failure), atomically;
    closes ``store.f``. Used to drop damaged rows and to bring a first-layout cache up to date."""
    src = store
    path = store.path
    tmp = beside(path, REWRITING_SUFFIX)
    attrs = {k: src.f.attrs[k] for k in COPIED_ATTRS if k in src.f.attrs}
    create_file(tmp, src.identity, None, attrs)
    cols = {name: src.column(name) for name in TEXT_FIELDS}
    if src.legacy:
        cols["split"] = src.column("split")
    else:  # read the codes as they are: rows with a bad one are among those dropped
        cols["split"] = np.array(SPLIT_CODES)[np.clip(src.f["split"][: src.n_rows], 0, len(SPLIT_CODES) - 1)]
    failed = src.failed()
    dst = type(store)(tmp, h5open(tmp, "a"))
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


def structure_problems(f: h5py.File) -> list[str]:
    """What keeps ``f`` from being a whole cache of a layout this featkit writes (missing datasets, attributes
    that do not parse, counts larger than the data); empty when nothing."""
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


