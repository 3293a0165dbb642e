"""Download city photos from Flickr into ``cache/images/<city>/`` and ``cache/manifest.csv``.

One ``flickr.photos.search`` call per page of 500 brings ids, owners, licences,
geo, dates and the image URL (``extras``), so there are no per-photo API calls.
Searching, spacing and retrying API calls is :mod:`featkit.flickr`'s job;
the manifest format is :mod:`featkit.manifest`'s. Image downloads run in a small
thread pool, are not API calls, and are retried the same way.

What survives a crash: an image is written under a temporary name and renamed
once complete and decodable; each kept or rejected photo is appended to a
journal; the manifest (and ``skipped.csv``) are rewritten atomically from time
to time and at the end. A rerun replays the journal, deletes temporary files
and orphans, and downloads only what is missing.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import hashlib
import io
import itertools
import json
import os
import re
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import requests
from PIL import UnidentifiedImageError

from featkit.cities import City, validate_city_name
from featkit.errors import FeatkitError
from featkit.options import DOWNLOAD, DownloadOptions
from featkit.flickr import (ENDPOINT_ENV, FLICKR_RESULT_CAP, RETRY_STATUSES, FlickrClient, backoff_delay, gave_up,
                            resolve_license, retrying_session, search_windows, tries_made)
from featkit.images import decoded_size, dhash
from featkit.manifest import MANIFEST_COLUMNS, SKIPPED_COLUMNS, read_manifest, write_manifest
from featkit.validate import check_float, check_int, check_url

EXTRAS = "url_n,owner_name,license,geo,date_taken,tags"
SIZE_SUFFIX = "n"  # url_n: 320 px on the longest side, enough for 224-px backbones
TAKEN_FROM = dt.datetime(2000, 1, 1, tzinfo=dt.timezone.utc)
FLUSH_EVERY = 100  # rewrite the manifest after this many new images, or FLUSH_SHARE of those kept if more
FLUSH_SHARE = 0.1  # (each rewrite costs all the rows: a fixed interval would make a long run quadratic)
_PHOTO_ID = re.compile(r"^[0-9]{1,20}$")
_DATE_TAKEN = re.compile(r"^\d{4}-\d{2}-\d{2} \d{2}:\d{2}:\d{2}$")
_TMP_SUFFIX = ".tmp"
_JOURNAL = ".download-journal.jsonl"
_LOCK = ".download.lock"


# --------------------------------------------------------------------------- summary

@dataclass
class CityStats:
    """What happened to one city's photos in one run."""

    city: str
    found: int = 0          # distinct photo ids the searches returned
    downloaded: int = 0     # new images written this run
    reused: int = 0         # already on disk from an earlier run
    kept: int = 0           # rows in the manifest at the end
    duplicates: int = 0     # exact (same bytes) duplicates removed
    near_duplicates: int = 0
    ambiguous: int = 0      # also returned for another city: dropped from both
    skipped: Counter = field(default_factory=Counter)  # reason -> count
    owners: int = 0         # distinct owners among kept photos
    exhausted: bool = False  # the searches ran out before per_city


@dataclass
class DownloadSummary:
    """Per-city counts of a download run; ``str()`` is one line, ``lines()`` a table."""

    cities: list[CityStats]
    manifest: Path
    api_calls: int = 0

    def lines(self) -> list[str]:
        head = f"{'city':<14} {'found':>6} {'new':>6} {'reused':>6} {'kept':>6} {'dup':>5} {'near':>5} " \
               f"{'ambig':>5} {'owners':>6}  skipped"
        out = [head]
        for s in self.cities:
            skipped = ", ".join(f"{n} {r}" for r, n in sorted(s.skipped.items())) or "-"
            note = "  (search exhausted)" if s.exhausted else ""
            out.append(f"{s.city:<14} {s.found:>6} {s.downloaded:>6} {s.reused:>6} {s.kept:>6} "
                       f"{s.duplicates:>5} {s.near_duplicates:>5} {s.ambiguous:>5} {s.owners:>6}  {skipped}{note}")
        return out

    def table(self) -> str:
        return "\n".join(self.lines())

    def __str__(self) -> str:
        new = sum(s.downloaded for s in self.cities)
        kept = sum(s.kept for s in self.cities)
        dups = sum(s.duplicates + s.near_duplicates for s in self.cities)
        amb = sum(s.ambiguous for s in self.cities)
        skipped = sum(sum(s.skipped.values()) for s in self.cities)
        return (f"downloaded {new} new images; {kept} kept in {len(self.cities)} cities; "
                f"{dups} duplicates and {amb} ambiguous removed; {skipped} skipped; "
                f"{self.api_calls} API calls; manifest {self.manifest}")


# --------------------------------------------------------------------------- candidates

@dataclass
class _Candidate:
    photo_id: str
    city: str
    row: dict[str, str]


@dataclass
class _Fetched:
    candidate: _Candidate
    data: bytes | None = None   # None: reused file already on disk
    error: str | None = None
    permanent: bool = True
    tmp: Path | None = None


def _photo_row(photo: dict, city: str, image_url: str) -> dict[str, str]:
    lat, lon = str(photo.get("latitude") or ""), str(photo.get("longitude") or "")
    try:
        has_geo = float(lat) != 0.0 or float(lon) != 0.0
    except ValueError:
        has_geo = False
    date = str(photo.get("datetaken") or "")
    return {
        "photo_id": str(photo["id"]),
        "city": city,
        "path": f"images/{city}/{photo['id']}.jpg",
        "owner": _clean(photo.get("owner")),
        "license": _clean(photo.get("license")),
        "latitude": lat if has_geo else "",
        "longitude": lon if has_geo else "",
        "date_taken": date if _DATE_TAKEN.match(date) else "",
        "url": image_url,
        "title": _clean(photo.get("title"))[:300],
        "sha256": "",
    }


def _clean(value: object) -> str:
    return " ".join(str(value if value is not None else "").split())


def _image_path(out_dir: Path, city: str, pid: str) -> Path:
    return out_dir / "images" / city / f"{pid}.jpg"


# --------------------------------------------------------------------------- the journal

class _Journal:
    """What one output folder holds: manifest rows, skipped rows, and the journal of changes since.

    Every change is appended to the journal (one JSON line, flushed) before it
    counts; :meth:`flush` rewrites both CSVs atomically and empties the journal.
    Columns a user added to the manifest are kept.
    """

    def __init__(self, out_dir: Path):
        self.out_dir = out_dir
        self.manifest = out_dir / "manifest.csv"
        self.skipped_path = out_dir / "skipped.csv"
        self.path = out_dir / _JOURNAL
        self.rows: dict[str, dict[str, str]] = {}
        self.skipped: dict[str, dict[str, str]] = {}
        self.columns = {self.manifest: MANIFEST_COLUMNS, self.skipped_path: SKIPPED_COLUMNS}
        self._fh: io.TextIOWrapper | None = None
        self.dirty = 0

    def load(self) -> None:
        """Read both CSVs (with :func:`featkit.manifest.read_manifest`), then replay the journal."""
        for path, target in ((self.manifest, self.rows), (self.skipped_path, self.skipped)):
            if path.exists():
                ours = self.columns[path]
                columns, rows = read_manifest(path, ours, fix=f"expected the columns featkit download writes "
                                              f"({','.join(ours)}); move it away to start a new download there")
                self.columns[path] = (*ours, *(c for c in columns if c not in ours))
                target.update((row["photo_id"], row) for row in rows)
        if self.path.exists():
            for line in self.path.read_text(encoding="utf-8").splitlines():
                try:
                    entry = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a line cut by a kill
                self._apply(entry)

    def _apply(self, entry: dict) -> None:
        kind, row = entry.get("kind"), entry.get("row") or {}
        pid = row.get("photo_id", "")
        if not _PHOTO_ID.match(pid):
            return
        if kind == "keep":
            self.rows[pid] = {c: row.get(c, "") for c in MANIFEST_COLUMNS}
            self.skipped.pop(pid, None)
        elif kind == "drop":
            self.rows.pop(pid, None)
            self.skipped[pid] = {c: row.get(c, "") for c in SKIPPED_COLUMNS}

    def record(self, kind: str, row: dict[str, str]) -> None:
        """Apply and journal one change (``keep`` a row, or ``drop`` an id with a reason)."""
        self._apply({"kind": kind, "row": row})
        if self._fh is None:
            self._fh = self.path.open("a", encoding="utf-8")
        self._fh.write(json.dumps({"kind": kind, "row": row}) + "\n")
        self._fh.flush()
        self.dirty += 1

    def flush(self) -> None:
        """Rewrite manifest and skipped list atomically, then empty the journal."""
        for path, rows in ((self.manifest, self.rows), (self.skipped_path, self.skipped)):
            ordered = sorted(rows.values(), key=lambda r: (r.get("city", ""), int(r["photo_id"])))
            write_manifest(path, ordered, self.columns[path])
        if self._fh is not None:
            self._fh.close()
            self._fh = None
        self.path.unlink(missing_ok=True)
        self.dirty = 0

    def remove_leftovers(self) -> None:
        """Delete temporary files a killed run left: partial images and half-written CSVs."""
        for path in (self.manifest, self.skipped_path):
            for tmp in self.out_dir.glob(f".{path.name}.*{_TMP_SUFFIX}"):
                tmp.unlink(missing_ok=True)
        images = self.out_dir / "images"
        images.mkdir(exist_ok=True)
        for city_dir in images.iterdir():
            if city_dir.is_dir():
                for tmp in city_dir.glob(f"*{_TMP_SUFFIX}"):
                    tmp.unlink(missing_ok=True)

    def kept(self, city: str) -> list[dict[str, str]]:
        return [r for r in self.rows.values() if r["city"] == city]


# --------------------------------------------------------------------------- dedup

class _Dedup:
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


# --------------------------------------------------------------------------- image fetch

class _ImageFetcher:
    """Downloads one candidate's image to a temporary file beside its final path (worker threads).

    Transport failures are retried by urllib3 (:func:`featkit.flickr.retrying_session`,
    one session per thread); a body cut after the headers, which urllib3 cannot
    see, by the loop here.
    """

    def __init__(self, out_dir: Path, *, min_size: int, max_retries: int, timeout_s: float, backoff_s: float,
                 sleep: Callable[[float], None] = time.sleep):
        self.out_dir, self.min_size = out_dir, min_size
        self.max_retries, self.timeout_s, self.backoff_s = max_retries, timeout_s, backoff_s
        self._sleep = sleep
        self._local = threading.local()

    def _session(self) -> requests.Session:
        s = getattr(self._local, "session", None)
        if s is None:
            s = self._local.session = retrying_session(self.max_retries, self.backoff_s)
        return s

    def fetch(self, cand: _Candidate) -> _Fetched:
        """A temporary file with the checked bytes, the final file to reuse, or why not."""
        final = _image_path(self.out_dir, cand.city, cand.photo_id)
        if final.is_file():  # renamed before a crash, never journaled: adopt it
            return _Fetched(cand, data=None)
        failed = f"download failed after {self.max_retries + 1} tries"
        why = ""
        for attempt in range(self.max_retries + 1):
            try:
                r = self._session().get(cand.row["url"], timeout=self.timeout_s)
            except requests.RequestException as e:
                why = f"connection error ({type(e).__name__})"
                if not isinstance(e, (requests.ConnectionError, requests.Timeout,
                                      requests.exceptions.ChunkedEncodingError,
                                      requests.exceptions.ContentDecodingError)):
                    return _Fetched(cand, error=f"request failed ({type(e).__name__})")
                if gave_up(e):  # urllib3 already spent the retries
                    return _Fetched(cand, error=f"{failed} ({why})", permanent=False)
            else:
                if r.status_code in RETRY_STATUSES:  # urllib3 gave up on it
                    return _Fetched(cand, error=f"download failed after {tries_made(r)} tries "
                                                f"(HTTP {r.status_code})", permanent=False)
                return self._accept(cand, r, final)
            if attempt < self.max_retries:
                self._sleep(backoff_delay(attempt, self.backoff_s))
        return _Fetched(cand, error=f"{failed} ({why})", permanent=False)

    def _accept(self, cand: _Candidate, r: requests.Response, final: Path) -> _Fetched:
        """Check a complete response; write an acceptable image to a temporary file."""
        if r.status_code != 200:
            return _Fetched(cand, error=f"HTTP {r.status_code}")
        if "photo_unavailable" in r.url:
            return _Fetched(cand, error="photo unavailable")
        ctype = r.headers.get("Content-Type", "").split(";")[0].strip().lower()
        if ctype.startswith("text/"):
            return _Fetched(cand, error=f"not an image ({ctype})")
        data = r.content
        try:
            w, h = decoded_size(data)
        except ValueError:
            return _Fetched(cand, error="not a decodable image")
        if min(w, h) < self.min_size:
            return _Fetched(cand, error=f"smaller than --min-size {self.min_size}")
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = final.with_name(f"{final.name}.{os.getpid()}.{threading.get_ident()}{_TMP_SUFFIX}")
        tmp.write_bytes(data)
        return _Fetched(cand, data=data, tmp=tmp)


# --------------------------------------------------------------------------- the run

def download_photos(
    cities: list[City],
    out_dir: Path,
    per_city: int = DOWNLOAD.per_city,
    *,
    api_key: str,
    api_secret: str,
    endpoint: str | None = None,
    query_template: str = DOWNLOAD.query_template,
    license: str | None = DOWNLOAD.license,
    has_geo: bool = DOWNLOAD.has_geo,
    min_size: int = DOWNLOAD.min_size,
    min_interval_s: float = DOWNLOAD.min_interval_s,
    max_retries: int = 5,
    timeout_s: float = 30.0,
    backoff_s: float = 1.0,
    workers: int = DOWNLOAD.workers,
    per_page: int = 500,
    result_cap: int = FLICKR_RESULT_CAP,
    near_dup_bits: int = 6,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> DownloadSummary:
    """Download up to ``per_city`` photos per city into ``out_dir``; resume what is there.

    ``out_dir`` receives ``images/<city>/<photo_id>.jpg``, ``manifest.csv``
    (columns :data:`featkit.manifest.MANIFEST_COLUMNS`, paths relative to
    ``out_dir``) and ``skipped.csv`` (photos rejected for good, with the
    reason). Rows of cities not in ``cities`` are kept as they are. ``endpoint``
    overrides Flickr's REST URL (default: ``$FEATKIT_FLICKR_ENDPOINT``, else
    Flickr). ``min_size`` is the smallest accepted shorter side in pixels. A
    photo whose bytes equal a kept one, or whose difference hash is within
    ``near_dup_bits`` bits of one, is dropped as a (near-)duplicate; a photo
    returned for two cities is dropped from both.
    """
    _check_args(cities, per_city, query_template, min_interval_s, max_retries, timeout_s, workers, per_page,
                result_cap, min_size)
    license_ids = resolve_license(license)
    endpoint = _resolve_endpoint(endpoint)
    say = log if progress else (lambda _msg: None)
    out_dir = Path(out_dir)
    with _exclusive(out_dir):
        client = FlickrClient(api_key, api_secret, endpoint, min_interval_s=min_interval_s,
                              max_retries=max_retries, timeout_s=timeout_s, backoff_s=backoff_s, log=say)
        fetcher = _ImageFetcher(out_dir, min_size=min_size, max_retries=max_retries, timeout_s=timeout_s,
                                backoff_s=backoff_s)
        run = _Run(cities, out_dir, per_city, client, fetcher, query_template=query_template,
                   license_ids=license_ids, has_geo=has_geo, workers=workers, per_page=per_page,
                   result_cap=result_cap, near_dup_bits=near_dup_bits, say=say)
        try:
            run.execute()
        except FeatkitError as e:
            raise FeatkitError(client.redact(str(e))) from None
        return run.summary()


def _check_args(cities: list[City], per_city: int, template: str, min_interval_s: float, max_retries: int,
                timeout_s: float, workers: int, per_page: int, result_cap: int, min_size: int) -> None:
    """The same checks as ``featkit download``'s (:class:`~featkit.options.DownloadOptions`, whose bounds are
    written once in :mod:`featkit.validate`), plus those of the parameters only the library takes."""
    DownloadOptions(per_city=per_city, query_template=template, min_size=min_size, min_interval_s=min_interval_s, workers=workers)
    check_int("max_retries", max_retries, low=0, high=100)
    check_float("timeout_s", timeout_s, low=0, low_open=True, high=3600.0)
    check_int("per_page", per_page, low=1, high=500)
    check_int("result_cap", result_cap, low=per_page, why=" (at least per_page)")
    for c in cities:
        validate_city_name(c.name)
    names = [c.name for c in cities]
    if len({n.lower() for n in names}) != len(names):
        raise FeatkitError(f"city names must be distinct (case-insensitively): {', '.join(names)}")


def _resolve_endpoint(endpoint: str | None) -> str | None:
    return check_url("endpoint", endpoint or os.environ.get(ENDPOINT_ENV) or None)


@contextlib.contextmanager
def _exclusive(out_dir: Path) -> Iterator[None]:
    """Hold the folder's download lock (one downloader per folder) for the ``with`` block."""
    out_dir.mkdir(parents=True, exist_ok=True)
    lock_fh = (out_dir / _LOCK).open("w")
    try:
        fcntl.flock(lock_fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock_fh.close()
        raise FeatkitError(f"another featkit download is writing to {out_dir}; "
                           "wait for it or use another --cache") from None
    try:
        yield
    finally:
        fcntl.flock(lock_fh, fcntl.LOCK_UN)
        lock_fh.close()


class _Run:
    """One download: search pages become candidates, candidates are fetched and settled."""

    def __init__(self, cities: list[City], out_dir: Path, per_city: int, client: FlickrClient,
                 fetcher: _ImageFetcher, *, query_template: str, license_ids: str | None, has_geo: bool,
                 workers: int, per_page: int, result_cap: int, near_dup_bits: int, say: Callable[[str], None]):
        self.cities, self.out_dir, self.per_city = cities, out_dir, per_city
        self.client, self.fetcher = client, fetcher
        self.template, self.license_ids, self.has_geo = query_template, license_ids, has_geo
        self.workers, self.per_page, self.result_cap = workers, per_page, result_cap
        self.say = say
        self.journal = _Journal(out_dir)
        self.dedup = _Dedup(near_dup_bits)
        self.stats = {c.name: CityStats(c.name) for c in cities}
        self.found_in: dict[str, set[str]] = {}        # photo id -> cities whose search returned it
        self.candidates: dict[str, _Candidate] = {}    # not yet fetched, by id

    # -- orchestration ------------------------------------------------------------

    def execute(self) -> None:
        self._prepare()
        try:
            short = [c.name for c in self.cities if self._kept(c.name) < self.per_city]
            if not short:
                return
            self.dedup.index(self.journal.rows.values(), self.out_dir)
            searches = self._searches()
            with ThreadPoolExecutor(max_workers=self.workers) as pool:
                while short:
                    for city in short:
                        self._fill(city, searches, pool)
                    # all cities: an ambiguous photo may have left a finished one short
                    short = [c.name for c in self.cities
                             if self._kept(c.name) < self.per_city and not self.stats[c.name].exhausted]
        finally:
            self._finish()

    def _kept(self, city: str) -> int:
        return len(self.journal.kept(city))

    def _prepare(self) -> None:
        """Load state, remove partial files, and make manifest and disk agree."""
        self.journal.load()
        self.journal.remove_leftovers()
        for pid, row in list(self.journal.rows.items()):
            if not (self.out_dir / row["path"]).is_file():
                self.say(f"  {row['path']} is missing; it will be downloaded again if still found")
                self.journal.rows.pop(pid)
        self.journal.flush()

    def _fill(self, city: str, searches: dict[str, Iterator[list[dict]]], pool: ThreadPoolExecutor) -> None:
        """Fetch candidates of ``city`` until it has ``per_city`` photos or its searches run out."""
        stats = self.stats[city]
        while not stats.exhausted:
            need = self.per_city - self._kept(city)
            if need <= 0:
                return
            mine = [c for c in self.candidates.values() if c.city == city]
            if len(mine) < need:
                try:
                    self._take_page(city, next(searches[city]))
                except StopIteration:
                    stats.exhausted = True
                mine = [c for c in self.candidates.values() if c.city == city]
                if len(mine) < need and not stats.exhausted:
                    continue
            batch = mine[:need]
            for c in batch:
                del self.candidates[c.photo_id]
            if batch:
                self.say(f"{city}: downloading {len(batch)} (kept {self._kept(city)}/{self.per_city})")
                self._download(pool, batch)

    def _finish(self) -> None:
        self.journal.flush()
        # One to one: delete image files no manifest row points at.
        listed = {(self.out_dir / r["path"]).resolve() for r in self.journal.rows.values()}
        for c in self.cities:
            city_dir = self.out_dir / "images" / c.name
            if city_dir.is_dir():
                for p in city_dir.iterdir():
                    if p.is_file() and p.resolve() not in listed and (
                            p.name.endswith(_TMP_SUFFIX) or re.match(r"^[0-9]+\.jpg$", p.name)):
                        p.unlink(missing_ok=True)
        for c in self.cities:
            rows = self.journal.kept(c.name)
            self.stats[c.name].kept = len(rows)
            self.stats[c.name].owners = len({r["owner"] for r in rows})

    def summary(self) -> DownloadSummary:
        return DownloadSummary([self.stats[c.name] for c in self.cities], self.journal.manifest,
                               self.client.calls)

    # -- search --------------------------------------------------------------

    def _searches(self) -> dict[str, Iterator[list[dict]]]:
        gens = {}
        end = time.time() + 86400
        for c in self.cities:
            base: dict[str, str] = {"extras": EXTRAS, "sort": "date-taken-desc", "content_type": "1",
                                    "media": "photos"}
            text = c.search_text(self.template)
            if text:
                base["text"] = text
            if c.bbox:
                base["bbox"] = ",".join(f"{v:g}" for v in c.bbox)
            if self.license_ids:
                base["license"] = self.license_ids
            if self.has_geo:
                base["has_geo"] = "1"
            gens[c.name] = search_windows(self.client, base, start=TAKEN_FROM.timestamp(), end=end,
                                          per_page=self.per_page, cap=self.result_cap)
        return gens

    def _take_page(self, city: str, photos: list[dict]) -> None:
        """Turn one page of search results into candidates (or skips, or ambiguities)."""
        stats = self.stats[city]
        for photo in photos:
            if not isinstance(photo, dict):
                continue
            pid = str(photo.get("id", ""))
            if not _PHOTO_ID.match(pid):
                stats.skipped["invalid photo id"] += 1
                continue
            seen = self.found_in.setdefault(pid, set())
            if city in seen:
                continue
            seen.add(city)
            stats.found += 1
            if len(seen) > 1:
                self._make_ambiguous(pid, seen)
                continue
            if pid in self.journal.skipped:
                stats.skipped["rejected in an earlier run"] += 1
                continue
            if pid in self.journal.rows:
                other = self.journal.rows[pid]["city"]
                if other != city:  # kept earlier for another city: ambiguous
                    seen.add(other)
                    self._make_ambiguous(pid, seen)
                continue
            url = str(photo.get(f"url_{SIZE_SUFFIX}") or "")
            if not re.match(r"^https?://", url):
                stats.skipped["no image URL"] += 1
                continue
            self.candidates[pid] = _Candidate(pid, city, _photo_row(photo, city, url))

    def _make_ambiguous(self, pid: str, cities: set[str]) -> None:
        skipped = self.journal.skipped.get(pid)
        for city in cities:
            if city in self.stats:
                self.stats[city].ambiguous += 1
        if skipped is not None and skipped["reason"].startswith("ambiguous"):
            return
        self.candidates.pop(pid, None)
        row = self.journal.rows.get(pid)
        self._drop(pid, "|".join(sorted(cities)), "ambiguous: " + ", ".join(sorted(cities)))
        if row is not None:  # kept earlier: its file goes too
            # Only once the manifest no longer lists it: a run killed in between leaves an
            # unlisted file (deleted at the end of the next run), never a row without its file.
            self.journal.flush()
            (self.out_dir / row["path"]).unlink(missing_ok=True)
            self.dedup.remove(pid, row["sha256"])

    # -- download ------------------------------------------------------------

    def _download(self, pool: ThreadPoolExecutor, batch: list[_Candidate]) -> None:
        """Fetch ``batch`` on the pool and settle the results in order.

        Only a few fetches per worker run ahead of the one being settled: a fetched image
        waits in memory until settled, so submitting a whole batch (thousands) at once
        made memory grow with the batch.
        """
        ahead = max(64, 16 * self.workers)
        pending: deque[Future[_Fetched]] = deque()
        todo = iter(batch)
        try:
            while True:
                for cand in itertools.islice(todo, ahead - len(pending)):
                    pending.append(pool.submit(self.fetcher.fetch, cand))
                if not pending:
                    break
                fut = pending[0]
                self._settle(fut.result())
                pending.popleft()
                if self.journal.dirty >= max(FLUSH_EVERY, FLUSH_SHARE * len(self.journal.rows)):
                    self.journal.flush()
        finally:
            for fut in pending:
                fut.cancel()
            for fut in pending:  # leave no orphaned temporary file behind
                if not fut.cancelled():
                    try:
                        res = fut.result()
                    except Exception:  # noqa: BLE001
                        continue
                    if res.tmp is not None and res.tmp.exists():
                        res.tmp.unlink(missing_ok=True)

    def _settle(self, f: _Fetched) -> None:
        """Main thread, in submission order: dedupe, rename, journal."""
        cand, stats = f.candidate, self.stats[f.candidate.city]
        if f.error:
            stats.skipped[f.error] += 1
            if f.permanent:
                self._drop(cand.photo_id, cand.city, f.error)
            return
        final = _image_path(self.out_dir, cand.city, cand.photo_id)
        data = f.data if f.data is not None else self._reused_bytes(cand, final)
        if data is None:
            return
        sha, h = hashlib.sha256(data).hexdigest(), dhash(data)
        dup = self.dedup.match(sha, h)
        if dup is not None:
            kind, other = dup
            if kind == "duplicate":
                stats.duplicates += 1
            else:
                stats.near_duplicates += 1
            (f.tmp or final).unlink(missing_ok=True)
            self._drop(cand.photo_id, cand.city, f"{kind} of {other}")
            return
        if f.tmp:
            os.replace(f.tmp, final)
            stats.downloaded += 1
        else:
            stats.reused += 1
        self.journal.record("keep", dict(cand.row, sha256=sha))
        self.dedup.add(cand.photo_id, sha, h)

    def _reused_bytes(self, cand: _Candidate, final: Path) -> bytes | None:
        """The bytes of an image a killed run left at its final name, if it decodes."""
        data = final.read_bytes()
        try:
            decoded_size(data)
        except ValueError:
            final.unlink(missing_ok=True)
            self.stats[cand.city].skipped["not a decodable image"] += 1
            self._drop(cand.photo_id, cand.city, "not a decodable image")
            return None
        return data

    def _drop(self, pid: str, city: str, reason: str) -> None:
        self.journal.record("drop", {"photo_id": pid, "city": city, "reason": reason})
