"""Download city photos from Flickr into ``cache/images/<city>/`` and ``cache/manifest.csv``.

One ``flickr.photos.search`` call per page of 500 brings ids, owners, licences,
geo, dates and the image URL (``extras``), so there are no per-photo API calls.
Searching, spacing and retrying API calls is :mod:`featkit.flickr`'s job;
the manifest format is :mod:`featkit.manifest`'s. Image downloads run in a small
thread pool (:mod:`featkit.fetcher`), are not API calls, and are retried the same way.
Duplicates are found by :mod:`featkit.duplicates`. This module runs the whole:
search pages become candidates, candidates are fetched and settled in order.

What survives a crash: an image is written under a temporary name and renamed
once complete and decodable; each kept or rejected photo is appended to a
journal (:mod:`featkit.journal`); the manifest (and ``skipped.csv``) are rewritten
atomically from time to time and at the end. A rerun replays the journal, deletes
temporary files and orphans, and downloads only what is missing.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import itertools
import os
import re
import time
from collections import Counter, deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from featkit.cities import City, validate_city_name
from featkit.duplicates import Dedup
from featkit.errors import FeatkitError
from featkit.cache.lock import Lock
from featkit.cache.names import DOWNLOAD_LOCK, IMAGES_DIR, STAGED_SUFFIX, image_file
from featkit.fetcher import Candidate, Fetched, ImageFetcher, photo_row
from featkit.flickr import ENDPOINT_ENV, FlickrClient, resolve_license, search_windows
from featkit.images import decoded_size, dhash
from featkit.journal import PHOTO_ID, TMP_SUFFIX, Journal
from featkit.options import DOWNLOAD, FETCH, DownloadOptions, FetchOptions
from featkit.validate import check_url

EXTRAS = "url_n,owner_name,license,geo,date_taken,tags"
SIZE_SUFFIX = "n"  # url_n: 320 px on the longest side, enough for 224-px backbones
TAKEN_FROM = dt.datetime(2000, 1, 1, tzinfo=dt.timezone.utc)
FLUSH_EVERY = 100  # rewrite the manifest after this many new images, or FLUSH_SHARE of those kept if more
FLUSH_SHARE = 0.1  # (each rewrite costs all the rows: a fixed interval would make a long run quadratic)


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
    max_retries: int = FETCH.max_retries,
    timeout_s: float = FETCH.timeout_s,
    backoff_s: float = FETCH.backoff_s,
    workers: int = DOWNLOAD.workers,
    per_page: int = FETCH.per_page,
    result_cap: int = FETCH.result_cap,
    near_dup_bits: int = FETCH.near_dup_bits,
    max_image_bytes: int = FETCH.max_image_bytes,
    deadline_s: float = FETCH.deadline_s,
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
    returned for two cities is dropped from both. Defaults: :class:`~featkit.options.DownloadOptions` (the
    command's) and :class:`~featkit.options.FetchOptions` (retries, timeouts, paging: the library's only).
    """
    DownloadOptions(per_city=per_city, query_template=query_template, min_size=min_size, min_interval_s=min_interval_s, workers=workers)
    FetchOptions(max_retries=max_retries, timeout_s=timeout_s, backoff_s=backoff_s, per_page=per_page, result_cap=result_cap,
                 near_dup_bits=near_dup_bits, max_image_bytes=max_image_bytes, deadline_s=deadline_s)
    _check_cities(cities)
    license_ids = resolve_license(license)
    endpoint = _resolve_endpoint(endpoint)
    say = log if progress else (lambda _msg: None)
    out_dir = Path(out_dir)
    with _exclusive(out_dir):
        client = FlickrClient(api_key, api_secret, endpoint, min_interval_s=min_interval_s,
                              max_retries=max_retries, timeout_s=timeout_s, backoff_s=backoff_s, log=say)
        fetcher = ImageFetcher(out_dir, min_size=min_size, max_retries=max_retries, timeout_s=timeout_s,
                                backoff_s=backoff_s, max_bytes=max_image_bytes, deadline_s=deadline_s)
        run = _Run(cities, out_dir, per_city, client, fetcher, query_template=query_template,
                   license_ids=license_ids, has_geo=has_geo, workers=workers, per_page=per_page,
                   result_cap=result_cap, near_dup_bits=near_dup_bits, say=say)
        try:
            run.execute()
        except FeatkitError as e:
            raise FeatkitError(client.redact(str(e))) from None
        return run.summary()


def _check_cities(cities: list[City]) -> None:
    """Valid and distinct city names (the other values are checked by the options classes, whose bounds are
    written once in :mod:`featkit.validate`)."""
    for c in cities:
        validate_city_name(c.name)
    names = [c.name for c in cities]
    if len({n.lower() for n in names}) != len(names):
        raise FeatkitError(f"city names must be distinct (case-insensitively): {', '.join(names)}")


def _resolve_endpoint(endpoint: str | None) -> str | None:
    return check_url("endpoint", endpoint or os.environ.get(ENDPOINT_ENV) or None)


def _exclusive(out_dir: Path) -> Lock:
    """The folder's download lock (one downloader per folder), held for the ``with`` block."""
    out_dir.mkdir(parents=True, exist_ok=True)
    return Lock(out_dir / DOWNLOAD_LOCK, busy=f"another featkit download is writing to {out_dir}; wait for it or use another --cache")


class _Run:
    """One download: search pages become candidates, candidates are fetched and settled."""

    def __init__(self, cities: list[City], out_dir: Path, per_city: int, client: FlickrClient,
                 fetcher: ImageFetcher, *, query_template: str, license_ids: str | None, has_geo: bool,
                 workers: int, per_page: int, result_cap: int, near_dup_bits: int, say: Callable[[str], None]):
        self.cities, self.out_dir, self.per_city = cities, out_dir, per_city
        self.client, self.fetcher = client, fetcher
        self.template, self.license_ids, self.has_geo = query_template, license_ids, has_geo
        self.workers, self.per_page, self.result_cap = workers, per_page, result_cap
        self.say = say
        self.journal = Journal(out_dir)
        self.dedup = Dedup(near_dup_bits)
        self.stats = {c.name: CityStats(c.name) for c in cities}
        self.found_in: dict[str, set[str]] = {}        # photo id -> cities whose search returned it
        self.candidates: dict[str, Candidate] = {}    # not yet fetched, by id

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
            city_dir = self.out_dir / IMAGES_DIR / c.name
            if city_dir.is_dir():
                for p in city_dir.iterdir():
                    if p.is_file() and p.resolve() not in listed and (
                            p.name.endswith((TMP_SUFFIX, STAGED_SUFFIX)) or re.match(r"^[0-9]+\.jpg$", p.name)):
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
            if not PHOTO_ID.match(pid):
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
            self.candidates[pid] = Candidate(pid, city, photo_row(photo, city, url))

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

    def _download(self, pool: ThreadPoolExecutor, batch: list[Candidate]) -> None:
        """Fetch ``batch`` on the pool and settle the results in order.

        Only a few fetches per worker run ahead of the one being settled: a fetched image
        waits in memory until settled, so submitting a whole batch (thousands) at once
        made memory grow with the batch.
        """
        ahead = max(64, 16 * self.workers)
        pending: deque[Future[Fetched]] = deque()
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
            for fut in pending:  # wait for the fetches under way: each leaves its image staged whole, or nothing
                if not fut.cancelled():
                    try:
                        fut.result()  # a staged image is adopted by the next run (or removed by its end)
                    except Exception:  # noqa: BLE001
                        continue

    def _settle(self, f: Fetched) -> None:
        """Main thread, in submission order: dedupe, rename, journal."""
        cand, stats = f.candidate, self.stats[f.candidate.city]
        if f.error:
            stats.skipped[f.error] += 1
            if f.permanent:
                self._drop(cand.photo_id, cand.city, f.error)
            return
        final = image_file(self.out_dir, cand.city, cand.photo_id)
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
        if f.tmp and not f.adopted:
            stats.downloaded += 1
        else:
            stats.reused += 1
        self.journal.record("keep", dict(cand.row, sha256=sha))
        self.dedup.add(cand.photo_id, sha, h)

    def _reused_bytes(self, cand: Candidate, final: Path) -> bytes | None:
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
