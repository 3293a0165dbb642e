"""Download city photos from Flickr into ``cache/images/<city>/`` and ``cache/manifest.csv``.

One ``flickr.photos.search`` call per page of 500 brings ids, owners, licences,
geo, dates and the image URL (``extras``), so there are no per-photo API calls.
Flickr answers at most about 4,000 results per query (later pages repeat
earlier ones), so a query is split into taken-date windows, halved until each
holds no more than that. API calls are spaced (one per second by default) and
retried with exponential back-off and jitter; image downloads run in a small
thread pool and are not API calls.

What survives a crash: an image is written under a temporary name and renamed
once complete and decodable; each kept or rejected photo is appended to a
journal; the manifest (and ``skipped.csv``) are rewritten atomically from time
to time and at the end. A rerun replays the journal, deletes temporary files
and orphans, and downloads only what is missing.
"""

from __future__ import annotations

import csv
import datetime as dt
import fcntl
import hashlib
import io
import json
import math
import os
import random
import re
import threading
import time
import tomllib
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import requests
from PIL import UnidentifiedImageError

from featkit.cities import City, validate_city_name
from featkit.errors import FeatkitError
from featkit.images import decoded_size, dhash

MANIFEST_COLUMNS = ("photo_id", "city", "path", "owner", "license", "latitude", "longitude",
                    "date_taken", "url", "title", "sha256")
SKIPPED_COLUMNS = ("photo_id", "city", "reason")
ENDPOINT_ENV = "FEATKIT_FLICKR_ENDPOINT"
KEY_ENV, SECRET_ENV = "FLICKR_API_KEY", "FLICKR_API_SECRET"
DEFAULT_CONFIG = Path("~/.config/featkit/flickr.toml")
API_KEY_HELP = "https://www.flickr.com/services/api/misc.api_keys.html"
FLICKR_RESULT_CAP = 4000
EXTRAS = "url_n,owner_name,license,geo,date_taken,tags"
SIZE_SUFFIX = "n"  # url_n: 320 px on the longest side, enough for 224-px backbones
TAKEN_FROM = dt.datetime(2000, 1, 1, tzinfo=dt.timezone.utc)
MIN_WINDOW_S = 60  # a window is not split below this span
FLUSH_EVERY = 100  # rewrite the manifest after this many new images

# Flickr licence ids (flickr.photos.licenses.getInfo).
CC_LICENSES = ("1", "2", "3", "4", "5", "6", "9", "11", "12", "13", "14", "15", "16")
LICENSE_ALIASES = {
    "any": None,
    "cc": CC_LICENSES,
    "cc-commercial": ("4", "5", "6", "9", "11", "12", "13"),
    "public-domain": ("7", "8", "9", "10"),
}
# Flickr "stat: fail" codes worth retrying: search unavailable, service unavailable.
_RETRY_STAT_CODES = {0, 10, 105, 106}
_PHOTO_ID = re.compile(r"^[0-9]{1,20}$")
_DATE_TAKEN = re.compile(r"^\d{4}-\d{2}-\d{2} \d{2}:\d{2}:\d{2}$")
_TMP_SUFFIX = ".tmp"
_JOURNAL = ".download-journal.jsonl"
_LOCK = ".download.lock"


# --------------------------------------------------------------------------- credentials

def resolve_credentials(env: Mapping[str, str] = os.environ,
                        config_path: str | Path | None = None) -> tuple[str, str]:
    """The Flickr API key and secret, from the environment or a config file.

    ``FLICKR_API_KEY``/``FLICKR_API_SECRET`` win; otherwise ``config_path``
    (default ``~/.config/featkit/flickr.toml``, or ``$XDG_CONFIG_HOME/featkit``)
    with ``api_key = "..."`` and ``api_secret = "..."``. Neither value ever
    appears in an error message.
    """
    key, secret = env.get(KEY_ENV, "").strip(), env.get(SECRET_ENV, "").strip()
    if key and secret:
        return key, secret
    if config_path is None:
        xdg = env.get("XDG_CONFIG_HOME")
        config_path = Path(xdg) / "featkit" / "flickr.toml" if xdg else DEFAULT_CONFIG
    path = Path(config_path).expanduser()
    if not (key or secret) and path.is_file():
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError):
            raise FeatkitError(f"cannot read Flickr credentials from {path}; expected api_key = \"...\" "
                               "and api_secret = \"...\"") from None
        data = data.get("flickr", data)
        key, secret = str(data.get("api_key", "")).strip(), str(data.get("api_secret", "")).strip()
        if key and secret:
            return key, secret
    missing = " and ".join(n for n, v in ((KEY_ENV, key), (SECRET_ENV, secret)) if not v)
    raise FeatkitError(
        f"no Flickr API credentials ({missing} not set): get a key and secret at {API_KEY_HELP} and "
        f"`export {KEY_ENV}=... {SECRET_ENV}=...` (or put api_key/api_secret in {path})"
    )


def resolve_license(license: str | None) -> str | None:
    """Flickr's ``license`` parameter for ``any``/``cc``/... or a comma list of ids."""
    if license is None or not license.strip():
        return None
    value = license.strip().lower()
    if value in LICENSE_ALIASES:
        ids = LICENSE_ALIASES[value]
        return None if ids is None else ",".join(ids)
    ids = [part.strip() for part in value.split(",") if part.strip()]
    if not ids or not all(i.isdigit() and int(i) <= 16 for i in ids):
        raise FeatkitError(f"unknown licence {license!r}; choose one of: {', '.join(LICENSE_ALIASES)}, "
                           "or a comma list of Flickr licence ids 0-16 (e.g. 4,5,9)")
    return ",".join(ids)


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


# --------------------------------------------------------------------------- API client

class _Retryable(Exception):
    def __init__(self, why: str, retry_after: float | None = None):
        super().__init__(why)
        self.retry_after = retry_after


def _backoff(attempt: int, base: float, cap: float = 60.0, retry_after: float | None = None) -> float:
    """Exponential back-off with full jitter, at least any Retry-After, at most ``cap``."""
    delay = random.uniform(0, min(cap, base * 2 ** attempt))
    if retry_after is not None:
        delay = max(delay, retry_after)
    return min(delay, cap)


def _retry_after(headers: Mapping[str, str]) -> float | None:
    value = headers.get("Retry-After")
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        return None  # an HTTP date; the back-off applies


class _FlickrSearch:
    """``flickr.photos.search`` through the real flickrapi client, spaced and retried."""

    def __init__(self, api_key: str, api_secret: str, endpoint: str | None, *, min_interval_s: float,
                 max_retries: int, timeout_s: float, backoff_s: float, log: Callable[[str], None]):
        import flickrapi  # only the downloader needs it

        self._secrets = (api_key, api_secret)
        self._flickr = flickrapi.FlickrAPI(api_key, api_secret, format="parsed-json",
                                           store_token=False, timeout=timeout_s)
        if endpoint:
            # flickrapi posts to the class attribute REST_URL; an instance attribute overrides it.
            self._flickr.REST_URL = endpoint
        # Our own session (flickrapi shares one per class) with a hook that keeps the
        # last response, so a 429's Retry-After can be read.
        self._session = requests.Session()
        self._last: requests.Response | None = None
        self._session.hooks["response"].append(self._keep_response)
        self._flickr.flickr_oauth.session = self._session
        self._min_interval = min_interval_s
        self._max_retries = max_retries
        self._backoff = backoff_s
        self._log = log
        self._next_call = 0.0
        self.calls = 0

    def _keep_response(self, response: requests.Response, *args, **kwargs) -> None:
        self._last = response

    def redact(self, text: str) -> str:
        for s in self._secrets:
            if s:
                text = text.replace(s, "***")
        return text

    def search(self, **params: str) -> dict:
        from flickrapi.exceptions import FlickrError

        for attempt in range(self._max_retries + 1):
            wait = self._next_call - time.monotonic()
            if wait > 0:
                time.sleep(wait)
            self._next_call = time.monotonic() + self._min_interval
            self._last = None
            self.calls += 1
            try:
                try:
                    rsp = self._flickr.photos.search(**params)
                except FlickrError as e:
                    last = self._last
                    if e.code is None and last is not None and last.status_code != 200:
                        status = last.status_code
                        if status == 429 or status >= 500:
                            raise _Retryable(f"HTTP {status}", _retry_after(last.headers)) from None
                        raise FeatkitError(f"Flickr API answered HTTP {status} at {self._flickr.REST_URL}; "
                                           f"check --endpoint / ${ENDPOINT_ENV}") from None
                    if e.code in _RETRY_STAT_CODES:
                        raise _Retryable(f"Flickr error {e.code}") from None
                    hint = " (check FLICKR_API_KEY and FLICKR_API_SECRET)" if e.code in (96, 97, 98, 100) else ""
                    raise FeatkitError(f"Flickr refused the search: {self.redact(str(e))}{hint}") from None
                except requests.Timeout:
                    raise _Retryable("timeout") from None
                except requests.ConnectionError as e:
                    raise _Retryable(f"connection error ({type(e).__name__})") from None
                except ValueError:  # malformed JSON
                    raise _Retryable("malformed JSON") from None
                if not isinstance(rsp, dict) or not isinstance(rsp.get("photos"), dict):
                    raise _Retryable("unexpected response shape")
                return rsp["photos"]
            except _Retryable as r:
                if attempt >= self._max_retries:
                    raise FeatkitError(
                        f"Flickr API failed {attempt + 1} times (last: {r}); what was downloaded so far "
                        "is kept in the manifest, rerun later to resume") from None
                delay = _backoff(attempt, self._backoff, retry_after=r.retry_after)
                self._log(f"  Flickr API: {r}; retrying in {delay:.1f}s ({attempt + 1}/{self._max_retries})")
                time.sleep(delay)
        raise AssertionError("unreachable")


def _mysql_time(t: float) -> str:
    return dt.datetime.fromtimestamp(t, dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S")


def _search_windows(api: _FlickrSearch, base: dict[str, str], *, start: float, end: float,
                    per_page: int, cap: int) -> Iterator[list[dict]]:
    """Yield pages of photo dicts for one query, newest taken-date window first.

    A window whose ``total`` exceeds ``cap`` (or whose pages start repeating) is
    halved until each part can be paged through completely.
    """
    stack = [(start, end)]
    max_pages = max(1, cap // per_page)
    while stack:
        lo, hi = stack.pop()
        params = dict(base, min_taken_date=_mysql_time(lo), max_taken_date=_mysql_time(hi),
                      per_page=str(per_page), page="1")
        page = api.search(**params)
        photos = list(page.get("photo") or [])
        total = int(page.get("total") or 0)
        pages = int(page.get("pages") or 0)
        yield photos
        splittable = hi - lo > MIN_WINDOW_S
        if total > cap and splittable:
            mid = lo + (hi - lo) / 2
            stack.append((lo, math.floor(mid)))       # older half, done second
            stack.append((math.floor(mid) + 1, hi))  # newer half, done first
            continue
        seen = {p.get("id") for p in photos}
        for n in range(2, min(pages, max_pages) + 1):
            page = api.search(**dict(params, page=str(n)))
            photos = list(page.get("photo") or [])
            new = [p for p in photos if p.get("id") not in seen]
            if not new:
                # Pages repeat before `total` was reached: Flickr's cap is lower than
                # assumed here. Split if possible; otherwise take what we have.
                if splittable:
                    mid = lo + (hi - lo) / 2
                    stack.append((lo, math.floor(mid)))
                    stack.append((math.floor(mid) + 1, hi))
                break
            seen.update(p.get("id") for p in new)
            yield new


# --------------------------------------------------------------------------- images

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


# --------------------------------------------------------------------------- the run

class _Store:
    """The manifest, the skipped list and the journal of one output folder."""

    def __init__(self, out_dir: Path):
        self.out_dir = out_dir
        self.manifest = out_dir / "manifest.csv"
        self.skipped_path = out_dir / "skipped.csv"
        self.journal = out_dir / _JOURNAL
        self.rows: dict[str, dict[str, str]] = {}
        self.skipped: dict[str, dict[str, str]] = {}
        self._journal_fh: io.TextIOWrapper | None = None
        self.dirty = 0

    def load(self) -> None:
        for path, target, cols in ((self.manifest, self.rows, MANIFEST_COLUMNS),
                                   (self.skipped_path, self.skipped, SKIPPED_COLUMNS)):
            if path.exists():
                with path.open(newline="", encoding="utf-8") as fh:
                    reader = csv.DictReader(fh)
                    if tuple(reader.fieldnames or ()) != cols:
                        raise FeatkitError(f"{path} has columns {reader.fieldnames}, expected {','.join(cols)}; "
                                           "move it away to start a new download there")
                    for row in reader:
                        target[row["photo_id"]] = row
        if self.journal.exists():
            for line in self.journal.read_text(encoding="utf-8").splitlines():
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
        """Apply and journal one change (kept row, or dropped id with reason)."""
        self._apply({"kind": kind, "row": row})
        if self._journal_fh is None:
            self._journal_fh = self.journal.open("a", encoding="utf-8")
        self._journal_fh.write(json.dumps({"kind": kind, "row": row}) + "\n")
        self._journal_fh.flush()
        self.dirty += 1

    def flush(self) -> None:
        """Rewrite manifest and skipped list atomically, then empty the journal."""
        for path, rows, cols in ((self.manifest, self.rows, MANIFEST_COLUMNS),
                                 (self.skipped_path, self.skipped, SKIPPED_COLUMNS)):
            tmp = path.with_name(path.name + _TMP_SUFFIX)
            with tmp.open("w", newline="", encoding="utf-8") as fh:
                writer = csv.DictWriter(fh, fieldnames=cols, lineterminator="\n")
                writer.writeheader()
                for pid in sorted(rows, key=lambda p: (rows[p].get("city", ""), int(p))):
                    writer.writerow({c: rows[pid].get(c, "") for c in cols})
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, path)
        if self._journal_fh is not None:
            self._journal_fh.close()
            self._journal_fh = None
        self.journal.unlink(missing_ok=True)
        self.dirty = 0


def download_photos(
    cities: list[City],
    out_dir: Path,
    per_city: int,
    *,
    api_key: str,
    api_secret: str,
    endpoint: str | None = None,
    query_template: str = "{city} streets",
    license: str | None = None,
    has_geo: bool = False,
    min_size: int = 0,
    min_interval_s: float = 1.0,
    max_retries: int = 5,
    timeout_s: float = 30.0,
    backoff_s: float = 1.0,
    workers: int = 4,
    per_page: int = 500,
    result_cap: int = FLICKR_RESULT_CAP,
    near_dup_bits: int = 6,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> DownloadSummary:
    """Download up to ``per_city`` photos per city into ``out_dir``; resume what is there.

    ``out_dir`` receives ``images/<city>/<photo_id>.jpg``, ``manifest.csv``
    (columns :data:`MANIFEST_COLUMNS`, paths relative to ``out_dir``) and
    ``skipped.csv`` (photos rejected for good, with the reason). Rows of cities
    not in ``cities`` are kept as they are. ``endpoint`` overrides Flickr's REST
    URL (default: ``$FEATKIT_FLICKR_ENDPOINT``, else Flickr). ``min_size`` is the
    smallest accepted shorter side in pixels. A photo whose bytes equal a kept
    one, or whose difference hash is within ``near_dup_bits`` bits of one, is
    dropped as a (near-)duplicate; a photo returned for two cities is dropped
    from both.
    """
    _check_args(per_city, query_template, min_interval_s, max_retries, timeout_s, workers, per_page,
                result_cap, min_size)
    for c in cities:
        validate_city_name(c.name)
    names = [c.name for c in cities]
    if len({n.lower() for n in names}) != len(names):
        raise FeatkitError(f"city names must be distinct (case-insensitively): {', '.join(names)}")
    license_ids = resolve_license(license)
    endpoint = endpoint or os.environ.get(ENDPOINT_ENV) or None
    if endpoint and not re.match(r"^https?://", endpoint):
        raise FeatkitError(f"endpoint {endpoint!r} must be an http(s) URL such as "
                           "https://api.flickr.com/services/rest/")
    say = log if progress else (lambda _msg: None)

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    lock_fh = (out_dir / _LOCK).open("w")
    try:
        fcntl.flock(lock_fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock_fh.close()
        raise FeatkitError(f"another featkit download is writing to {out_dir}; wait for it or use another --out") from None
    try:
        api = _FlickrSearch(api_key, api_secret, endpoint, min_interval_s=min_interval_s,
                            max_retries=max_retries, timeout_s=timeout_s, backoff_s=backoff_s, log=say)
        run = _Run(cities, out_dir, per_city, api, query_template=query_template, license_ids=license_ids,
                   has_geo=has_geo, min_size=min_size, max_retries=max_retries, timeout_s=timeout_s,
                   backoff_s=backoff_s, workers=workers, per_page=per_page, result_cap=result_cap,
                   near_dup_bits=near_dup_bits, say=say)
        try:
            run.execute()
        except FeatkitError as e:
            raise FeatkitError(api.redact(str(e))) from None
        return run.summary()
    finally:
        fcntl.flock(lock_fh, fcntl.LOCK_UN)
        lock_fh.close()


def _check_args(per_city: int, template: str, min_interval_s: float, max_retries: int, timeout_s: float,
                workers: int, per_page: int, result_cap: int, min_size: int) -> None:
    if per_city < 1:
        raise FeatkitError(f"--per-city must be at least 1, got {per_city}")
    try:
        template.format(city="x")
    except (KeyError, IndexError, ValueError):
        raise FeatkitError(f"query template {template!r} may only use {{city}}, e.g. '{{city}} streets'") from None
    if "{city}" not in template:
        raise FeatkitError(f"query template {template!r} must contain {{city}}, e.g. '{{city}} streets'")
    if min_interval_s < 0 or max_retries < 0 or timeout_s <= 0 or min_size < 0:
        raise FeatkitError("min interval, retries and min size must be >= 0 and the timeout > 0")
    if not 1 <= workers <= 32:
        raise FeatkitError(f"--workers must be between 1 and 32, got {workers}")
    if not 1 <= per_page <= 500 or result_cap < per_page:
        raise FeatkitError(f"per_page must be 1-500 and no larger than the result cap ({per_page}, {result_cap})")


class _Run:
    def __init__(self, cities: list[City], out_dir: Path, per_city: int, api: _FlickrSearch, *,
                 query_template: str, license_ids: str | None, has_geo: bool, min_size: int,
                 max_retries: int, timeout_s: float, backoff_s: float, workers: int, per_page: int,
                 result_cap: int, near_dup_bits: int, say: Callable[[str], None]):
        self.cities, self.out_dir, self.per_city, self.api = cities, out_dir, per_city, api
        self.template, self.license_ids, self.has_geo = query_template, license_ids, has_geo
        self.min_size, self.max_retries, self.timeout_s, self.backoff_s = min_size, max_retries, timeout_s, backoff_s
        self.workers, self.per_page, self.result_cap, self.near_dup_bits = workers, per_page, result_cap, near_dup_bits
        self.say = say
        self.store = _Store(out_dir)
        self.stats = {c.name: CityStats(c.name) for c in cities}
        self.found_in: dict[str, set[str]] = {}        # photo id -> cities whose search returned it
        self.candidates: dict[str, _Candidate] = {}    # not yet fetched, by id
        self.sha_owner: dict[str, str] = {}            # sha256 -> kept photo id
        self.hash_ids: list[str] = []
        self.hashes: list[int] = []
        self._local = threading.local()

    # -- bookkeeping -------------------------------------------------------

    def _image_path(self, city: str, pid: str) -> Path:
        return self.out_dir / "images" / city / f"{pid}.jpg"

    def _kept(self, city: str) -> int:
        return sum(1 for r in self.store.rows.values() if r["city"] == city)

    def _prepare(self) -> None:
        """Load state, remove partial files, and make manifest and disk agree."""
        self.store.load()
        images = self.out_dir / "images"
        images.mkdir(exist_ok=True)
        for city_dir in images.iterdir():
            if city_dir.is_dir():
                for tmp in city_dir.glob(f"*{_TMP_SUFFIX}"):
                    tmp.unlink(missing_ok=True)
        for pid, row in list(self.store.rows.items()):
            path = self.out_dir / row["path"]
            if not path.is_file():
                self.say(f"  {row['path']} is missing; it will be downloaded again if still found")
                self.store.rows.pop(pid)
        self.store.flush()

    def _index_hashes(self) -> None:
        for pid, row in self.store.rows.items():
            if row.get("sha256"):
                self.sha_owner.setdefault(row["sha256"], pid)
            try:
                self.hashes.append(dhash((self.out_dir / row["path"]).read_bytes()))
                self.hash_ids.append(pid)
            except (OSError, ValueError, UnidentifiedImageError):
                pass

    def _near_duplicate_of(self, h: int) -> str | None:
        if not self.hashes:
            return None
        arr = np.fromiter(self.hashes, dtype=np.uint64, count=len(self.hashes))
        dist = np.bitwise_count(arr ^ np.uint64(h))
        i = int(np.argmin(dist))
        return self.hash_ids[i] if dist[i] <= self.near_dup_bits else None

    def _drop(self, pid: str, city: str, reason: str) -> None:
        self.store.record("drop", {"photo_id": pid, "city": city, "reason": reason})

    def _remove_kept(self, pid: str) -> None:
        row = self.store.rows.get(pid)
        if row is None:
            return
        (self.out_dir / row["path"]).unlink(missing_ok=True)
        if pid in self.hash_ids:
            i = self.hash_ids.index(pid)
            del self.hash_ids[i], self.hashes[i]
        if self.sha_owner.get(row["sha256"]) == pid:
            del self.sha_owner[row["sha256"]]

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
            gens[c.name] = _search_windows(self.api, base, start=TAKEN_FROM.timestamp(), end=end,
                                           per_page=self.per_page, cap=self.result_cap)
        return gens

    def _take_page(self, city: str, photos: list[dict]) -> None:
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
            if pid in self.store.skipped:
                stats.skipped["rejected in an earlier run"] += 1
                continue
            if pid in self.store.rows:
                other = self.store.rows[pid]["city"]
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
        already = pid in self.store.skipped and self.store.skipped[pid]["reason"].startswith("ambiguous")
        for city in cities:
            if city in self.stats:
                self.stats[city].ambiguous += 1
        if already:
            return
        self.candidates.pop(pid, None)
        self._remove_kept(pid)
        self._drop(pid, "|".join(sorted(cities)), "ambiguous: " + ", ".join(sorted(cities)))

    # -- download ------------------------------------------------------------

    def _session(self) -> requests.Session:
        s = getattr(self._local, "session", None)
        if s is None:
            s = self._local.session = requests.Session()
        return s

    def _fetch(self, cand: _Candidate) -> _Fetched:
        """Runs in a worker thread: download to a temporary file, or reuse the final one."""
        final = self._image_path(cand.city, cand.photo_id)
        if final.is_file():  # renamed before a crash, never journaled: adopt it
            return _Fetched(cand, data=None)
        for attempt in range(self.max_retries + 1):
            retry_after = None
            try:
                r = self._session().get(cand.row["url"], timeout=self.timeout_s)
                status = r.status_code
                if status == 429 or status >= 500:
                    why, retry_after = f"HTTP {status}", _retry_after(r.headers)
                elif status != 200:
                    return _Fetched(cand, error=f"HTTP {status}")
                elif "photo_unavailable" in r.url:
                    return _Fetched(cand, error="photo unavailable")
                else:
                    data = r.content
                    ctype = r.headers.get("Content-Type", "").split(";")[0].strip().lower()
                    if ctype.startswith("text/"):
                        return _Fetched(cand, error=f"not an image ({ctype})")
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
            except requests.Timeout:
                why = "timeout"
            except (requests.ConnectionError, requests.exceptions.ChunkedEncodingError,
                    requests.exceptions.ContentDecodingError) as e:
                why = f"connection error ({type(e).__name__})"
            except requests.RequestException as e:
                return _Fetched(cand, error=f"request failed ({type(e).__name__})")
            if attempt < self.max_retries:
                time.sleep(_backoff(attempt, self.backoff_s, retry_after=retry_after))
        return _Fetched(cand, error=f"download failed after {self.max_retries + 1} tries ({why})", permanent=False)

    def _settle(self, f: _Fetched) -> None:
        """Main thread, in submission order: dedupe, rename, journal."""
        cand, stats = f.candidate, self.stats[f.candidate.city]
        if f.error:
            stats.skipped[f.error] += 1
            if f.permanent:
                self._drop(cand.photo_id, cand.city, f.error)
            return
        final = self._image_path(cand.city, cand.photo_id)
        data = f.data if f.data is not None else final.read_bytes()
        if f.data is None:
            try:
                decoded_size(data)
            except ValueError:
                final.unlink(missing_ok=True)
                stats.skipped["not a decodable image"] += 1
                self._drop(cand.photo_id, cand.city, "not a decodable image")
                return
        sha = hashlib.sha256(data).hexdigest()
        h = dhash(data)
        reason, other = None, self.sha_owner.get(sha)
        if other is not None:
            reason = f"duplicate of {other}"
            stats.duplicates += 1
        else:
            other = self._near_duplicate_of(h)
            if other is not None:
                reason = f"near-duplicate of {other}"
                stats.near_duplicates += 1
        if reason:
            if f.tmp:
                f.tmp.unlink(missing_ok=True)
            else:
                final.unlink(missing_ok=True)
            self._drop(cand.photo_id, cand.city, reason)
            return
        if f.tmp:
            os.replace(f.tmp, final)
            stats.downloaded += 1
        else:
            stats.reused += 1
        self.store.record("keep", dict(cand.row, sha256=sha))
        self.sha_owner[sha] = cand.photo_id
        self.hash_ids.append(cand.photo_id)
        self.hashes.append(h)

    def _download(self, pool: ThreadPoolExecutor, batch: list[_Candidate]) -> None:
        futures = [pool.submit(self._fetch, c) for c in batch]
        try:
            for fut in futures:
                self._settle(fut.result())
                if self.store.dirty >= FLUSH_EVERY:
                    self.store.flush()
        finally:
            for fut in futures:
                fut.cancel()
            for fut in futures:  # leave no orphaned temporary file behind
                if not fut.cancelled():
                    try:
                        res = fut.result()
                    except Exception:  # noqa: BLE001
                        continue
                    if res.tmp is not None and res.tmp.exists():
                        res.tmp.unlink(missing_ok=True)

    # -- orchestration ------------------------------------------------------------

    def execute(self) -> None:
        self._prepare()
        try:
            short = [c.name for c in self.cities if self._kept(c.name) < self.per_city]
            if not short:
                return
            self._index_hashes()
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

    def _fill(self, city: str, searches: dict[str, Iterator[list[dict]]], pool: ThreadPoolExecutor) -> None:
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
        self.store.flush()
        # One to one: delete image files no manifest row points at.
        listed = {(self.out_dir / r["path"]).resolve() for r in self.store.rows.values()}
        for c in self.cities:
            city_dir = self.out_dir / "images" / c.name
            if city_dir.is_dir():
                for p in city_dir.iterdir():
                    if p.is_file() and p.resolve() not in listed and (
                            p.name.endswith(_TMP_SUFFIX) or re.match(r"^[0-9]+\.jpg$", p.name)):
                        p.unlink(missing_ok=True)
        for c in self.cities:
            stats = self.stats[c.name]
            rows = [r for r in self.store.rows.values() if r["city"] == c.name]
            stats.kept = len(rows)
            stats.owners = len({r["owner"] for r in rows})

    def summary(self) -> DownloadSummary:
        return DownloadSummary([self.stats[c.name] for c in self.cities], self.store.manifest, self.api.calls)
