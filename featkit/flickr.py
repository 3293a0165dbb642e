"""Talking to Flickr: credentials, licences, a spaced and retried search client, date windows.

Every call goes through the real ``flickrapi`` client (OAuth-signed POSTs).
Transport failures (HTTP 429/500/502/503/504, refused or reset connections,
read timeouts) are retried by urllib3's :class:`~urllib3.util.Retry`, mounted
on the requests session the client posts with; Retry-After is honoured. A
small outer loop retries only what urllib3 cannot see: a 200 answer whose body
is cut or is ``stat: fail`` with a transient code. API calls are spaced by a
:class:`RateLimiter` (one per second by default; Flickr allows 3,600 an hour).

Flickr answers at most about 4,000 results per query (later pages repeat
earlier ones), so :func:`search_windows` splits a query into taken-date
windows, halved until each holds no more than that.
"""

from __future__ import annotations

import re

import datetime as dt
import math
import os
import random
import time
import tomllib
from collections.abc import Callable, Collection, Iterator, Mapping
from pathlib import Path
from typing import NoReturn

import requests
from requests.adapters import HTTPAdapter
from urllib3 import exceptions as urllib3_exceptions
from urllib3.exceptions import MaxRetryError
from urllib3.util import Retry

from featkit.escape import without_credentials
from featkit.errors import FeatkitError
from featkit.options import DOWNLOAD, ENDPOINT_ENV, FETCH

KEY_ENV, SECRET_ENV = "FLICKR_API_KEY", "FLICKR_API_SECRET"
DEFAULT_CONFIG = Path("~/.config/featkit/flickr.toml")
API_KEY_HELP = "https://www.flickr.com/services/api/misc.api_keys.html"
MIN_WINDOW_S = 60  # a window is not split below this span
RETRY_STATUSES = (429, 500, 502, 503, 504)
MAX_WAIT_S = 60.0  # no back-off, and no Retry-After, waits longer than this

# Flickr licence ids (flickr.photos.licenses.getInfo).
CC_LICENSES = ("1", "2", "3", "4", "5", "6", "9", "11", "12", "13", "14", "15", "16")
LICENSE_ALIASES = {
    "any": None,
    "cc": CC_LICENSES,
    "cc-commercial": ("4", "5", "6", "9", "11", "12", "13"),
    "public-domain": ("7", "8", "9", "10"),
}
# Flickr "stat: fail" codes worth retrying: search unavailable, service unavailable.
RETRY_STAT_CODES = frozenset({0, 10, 105, 106})
_CREDENTIAL_CODES = (96, 97, 98, 100)  # invalid signature / key
_RESUME = "what was downloaded so far is kept in the manifest, rerun later to resume"


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
                           "or a comma list of Flickr licence ids 0-16 (e.g. 4,5,9)", param="license")
    return ",".join(ids)


def redact(text: str, secrets: Collection[str]) -> str:
    """``text`` with every non-empty string of ``secrets`` replaced by ``***`` where it stands as a whole token
    (not inside a longer word: a short key must not garble the message around it), and the credentials of
    any URL in it (``user:PASS@``) too."""
    for s in sorted((s for s in secrets if s), key=len, reverse=True):
        text = re.sub(r"(?<![A-Za-z0-9])" + re.escape(s) + r"(?![A-Za-z0-9])", "***", text)
    return without_credentials(text)


# --------------------------------------------------------------------------- transport

class _CappedRetry(Retry):
    """urllib3's Retry, with a server's Retry-After capped like the back-off (``backoff_max``)."""

    def get_retry_after(self, response):  # type: ignore[override]
        seconds = super().get_retry_after(response)
        return None if seconds is None else min(seconds, self.backoff_max)


class BodyTooLarge(requests.RequestException):
    """An answer whose body (decoded) passed the bound its session sets: refused, never read whole."""


def _as_requests_error(e: BaseException) -> BaseException:
    """urllib3's errors met while reading a body, as requests raises them when it reads one (``iter_content``):
    what callers catch and retry."""
    if isinstance(e, urllib3_exceptions.ProtocolError):
        return requests.exceptions.ChunkedEncodingError(e)
    if isinstance(e, urllib3_exceptions.DecodeError):
        return requests.exceptions.ContentDecodingError(e)
    if isinstance(e, urllib3_exceptions.ReadTimeoutError):
        return requests.exceptions.ConnectionError(e)
    if isinstance(e, urllib3_exceptions.SSLError):
        return requests.exceptions.SSLError(e)
    return e


class BoundedAdapter(HTTPAdapter):
    """urllib3's transport with every answer's body read a socket read at a time, decoded (gzip included)
    as it comes: refused (:class:`BodyTooLarge`) past ``max_bytes`` and abandoned (``ReadTimeout``) when
    the whole request takes longer than ``deadline_s``, however slowly the bytes trickle in (a per-read
    timeout alone lets a slow drip hang a download for ever)."""

    def __init__(self, *args, max_bytes: int, deadline_s: float, **kwargs):
        self.max_bytes, self.deadline_s = max_bytes, deadline_s
        super().__init__(*args, **kwargs)

    def send(self, request, stream=False, timeout=None, verify=True, cert=None, proxies=None):  # type: ignore[override]
        stop = time.monotonic() + self.deadline_s
        response = super().send(request, stream=True, timeout=timeout, verify=verify, cert=cert, proxies=proxies)
        body = bytearray()
        try:
            while chunk := response.raw.read1(1 << 16, decode_content=True):
                body += chunk
                if len(body) > self.max_bytes:
                    raise BodyTooLarge(f"an answer larger than {self.max_bytes:,} bytes", response=response)
                if time.monotonic() > stop:
                    raise requests.exceptions.ReadTimeout(f"an answer that took longer than {self.deadline_s:g} s", response=response)
        except BaseException as e:
            response.close()
            err = _as_requests_error(e)
            if err is e:
                raise
            raise err from e
        response._content, response._content_consumed = bytes(body), True  # what requests does after a non-streamed read
        response.close()
        return response


def retrying_session(max_retries: int, backoff_s: float, methods: Collection[str] = ("GET",), *,
                     max_bytes: int = FETCH.max_image_bytes, deadline_s: float = FETCH.deadline_s) -> requests.Session:
    """A requests session whose transport retries transient failures ``max_retries`` times.

    Retried: HTTP 429/500/502/503/504 and connect/read errors, for ``methods``
    only (urllib3 leaves POST out by default; pass it where the call is
    read-only, as ``flickr.photos.search`` is). Waits grow exponentially from
    ``backoff_s`` with up to ``backoff_s`` of jitter (urllib3 retries the first
    failure at once), or follow Retry-After, never beyond ``MAX_WAIT_S``. After
    the last try the final response is returned rather than raised, so callers
    can report its status.
    """
    retry = _CappedRetry(total=max_retries, status_forcelist=RETRY_STATUSES,
                         allowed_methods=frozenset(m.upper() for m in methods),
                         backoff_factor=backoff_s, backoff_jitter=backoff_s, backoff_max=MAX_WAIT_S,
                         respect_retry_after_header=True, raise_on_status=False)
    session = requests.Session()
    adapter = BoundedAdapter(max_retries=retry, max_bytes=max_bytes, deadline_s=deadline_s)
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    return session


def tries_made(response: requests.Response) -> int:
    """How many requests urllib3 sent to get ``response`` (1 plus its transport retries)."""
    retries = getattr(response.raw, "retries", None)
    return 1 + len(getattr(retries, "history", ()) or ())


def gave_up(error: requests.RequestException) -> bool:
    """Whether urllib3 retried ``error`` to the end; if not, it struck after the headers
    (a body cut or stalled mid-way), where urllib3's Retry does not reach."""
    return any(isinstance(a, MaxRetryError) for a in error.args)


def backoff_delay(attempt: int, base: float, cap: float = MAX_WAIT_S) -> float:
    """Exponential back-off with full jitter for retry number ``attempt`` (0-based), at most ``cap``."""
    return random.uniform(0, min(cap, base * 2 ** attempt))


class RateLimiter:
    """Spaces calls at least ``min_interval_s`` apart; ``clock``/``sleep`` are injectable for tests."""

    def __init__(self, min_interval_s: float, *, clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] = time.sleep):
        self.min_interval_s = min_interval_s
        self._clock, self._sleep = clock, sleep
        self._next: float | None = None

    def wait(self) -> None:
        """Sleep until ``min_interval_s`` has passed since the previous call returned from here."""
        if self._next is not None:
            delay = self._next - self._clock()
            if delay > 0:
                self._sleep(delay)
        self._next = self._clock() + self.min_interval_s


# --------------------------------------------------------------------------- the client

class _Transient(Exception):
    """A failure worth another try that urllib3 could not see (the HTTP exchange succeeded)."""


class FlickrClient:
    """``flickr.photos.search`` through the real flickrapi client, spaced and retried.

    ``clock``/``sleep`` drive the spacing and the outer retry's waits (tests
    pass fakes). ``calls`` counts the HTTP requests sent, transport retries
    included where a response tells them.
    """

    def __init__(self, api_key: str, api_secret: str, endpoint: str | None = None, *,
                 min_interval_s: float = DOWNLOAD.min_interval_s, max_retries: int = FETCH.max_retries,
                 timeout_s: float = FETCH.timeout_s, backoff_s: float = FETCH.backoff_s, log: Callable[[str], None] = print,
                 clock: Callable[[], float] = time.monotonic, sleep: Callable[[float], None] = time.sleep):
        import flickrapi  # only the downloader needs it

        self._secrets = (api_key, api_secret)
        self._flickr = flickrapi.FlickrAPI(api_key, api_secret, format="parsed-json",
                                           store_token=False, timeout=timeout_s)
        if endpoint:
            # flickrapi posts to the class attribute REST_URL; an instance attribute overrides it.
            self._flickr.REST_URL = endpoint
        # flickrapi 2.4 posts through ``OAuthFlickrInterface.session``, ONE requests.Session
        # created at import and shared by every client in the process. Mounting our Retry
        # there would change every other FlickrAPI user (and the last client's settings
        # would win), so this client gets its own session as an instance attribute,
        # which ``do_request`` (``self.session.post``) finds first.
        self.session = retrying_session(max_retries, backoff_s, methods=("POST",))
        self.session.hooks["response"].append(self._keep_response)
        self._flickr.flickr_oauth.session = self.session
        self._last: requests.Response | None = None
        self._limiter = RateLimiter(min_interval_s, clock=clock, sleep=sleep)
        self._sleep = sleep
        self.max_retries, self.backoff_s = max_retries, backoff_s
        self._log = log
        self.calls = 0

    @property
    def endpoint(self) -> str:
        """The REST URL, as messages show it (a user and password in it written ``***``)."""
        return without_credentials(self._flickr.REST_URL)

    def _keep_response(self, response: requests.Response, *args, **kwargs) -> None:
        # Called once per final response (after urllib3's retries): flickrapi raises a
        # bare FlickrError for a non-200 status, so the status and tries are read here.
        self._last = response
        self.calls += tries_made(response) - 1

    def redact(self, text: str) -> str:
        """``text`` with the API key and secret replaced by ``***``."""
        return redact(text, self._secrets)

    def search(self, **params: str) -> dict:
        """The ``photos`` object of one ``flickr.photos.search`` answer."""
        for attempt in range(self.max_retries + 1):
            self._limiter.wait()
            try:
                return self._search_once(params)
            except _Transient as why:
                if attempt >= self.max_retries:
                    raise FeatkitError(f"Flickr API failed {attempt + 1} times (last: {why}); {_RESUME}") from None
                delay = backoff_delay(attempt, self.backoff_s)
                self._log(f"  Flickr API: {why}; retrying in {delay:.1f}s ({attempt + 1}/{self.max_retries})")
                self._sleep(delay)
        raise AssertionError("unreachable")

    def _search_once(self, params: Mapping[str, str]) -> dict:
        from flickrapi.exceptions import FlickrError

        self._last = None
        self.calls += 1
        try:
            rsp = self._flickr.photos.search(**params)
        except FlickrError as e:
            self._raise_for(e)
        except requests.RequestException as e:
            why = f"connection error ({type(e).__name__})"
            if not gave_up(e):  # the body broke off after the headers
                raise _Transient(why) from None
            # urllib3 already retried this; another outer round would multiply the tries.
            raise FeatkitError(f"Flickr API failed {self.max_retries + 1} times (last: {why}) at "
                               f"{self.endpoint}; {_RESUME}") from None
        except ValueError:  # a 200 whose JSON is cut or invalid (after RequestException: some are ValueErrors)
            raise _Transient("malformed JSON") from None
        if not isinstance(rsp, dict) or not isinstance(rsp.get("photos"), dict):
            raise _Transient("unexpected response shape")
        return rsp["photos"]

    def _raise_for(self, e: Exception) -> NoReturn:
        code, last = getattr(e, "code", None), self._last
        if code is None and last is not None and last.status_code != 200:
            status = last.status_code
            if status in RETRY_STATUSES:  # urllib3 gave up on it
                raise FeatkitError(f"Flickr API failed {tries_made(last)} times (last: HTTP {status}); "
                                   f"{_RESUME}") from None
            raise FeatkitError(f"Flickr API answered HTTP {status} at {self.endpoint}; "
                               f"check --endpoint / ${ENDPOINT_ENV}") from None
        if code in RETRY_STAT_CODES:
            raise _Transient(f"Flickr error {code}") from None
        hint = " (check FLICKR_API_KEY and FLICKR_API_SECRET)" if code in _CREDENTIAL_CODES else ""
        raise FeatkitError(f"Flickr refused the search: {self.redact(str(e))}{hint}") from None


# --------------------------------------------------------------------------- date windows

def _mysql_time(t: float) -> str:
    return dt.datetime.fromtimestamp(t, dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S")


def _halves(lo: float, hi: float) -> list[tuple[float, float]]:
    """The older then the newer half of a window (pushed in this order, the newer is done first)."""
    mid = math.floor(lo + (hi - lo) / 2)
    return [(lo, mid), (mid + 1, hi)]


def search_windows(client: FlickrClient, base: dict[str, str], *, start: float, end: float,
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
        page = client.search(**params)
        photos = list(page.get("photo") or [])
        total = int(page.get("total") or 0)
        pages = int(page.get("pages") or 0)
        yield photos
        splittable = hi - lo > MIN_WINDOW_S
        if total > cap and splittable:
            stack.extend(_halves(lo, hi))
            continue
        seen = {p.get("id") for p in photos}
        for n in range(2, min(pages, max_pages) + 1):
            page = client.search(**dict(params, page=str(n)))
            new = [p for p in page.get("photo") or [] if p.get("id") not in seen]
            if not new:
                # Pages repeat before `total` was reached: Flickr's cap is lower than
                # assumed here. Split if possible; otherwise take what we have.
                if splittable:
                    stack.extend(_halves(lo, hi))
                break
            seen.update(p.get("id") for p in new)
            yield new
