"""A Flickr-compatible REST endpoint on 127.0.0.1, for tests (test infrastructure: not shipped in featkit).

It answers ``flickr.photos.search`` the way Flickr does (OAuth-signed POSTs from
the real ``flickrapi`` client, JSON with ``stat``, pagination, ``extras``, a
result cap past which pages repeat earlier ones, ``stat: fail`` errors) and
serves the image bytes at each photo's ``url_n`` on the same server. Faults can
be queued for the next API or image requests, pinned to a photo id, or drawn at
random for a fraction of requests::

    with FakeFlickr(make_catalog(["Paris", "Tokyo"], 60), api_key=k, api_secret=s) as fake:
        fake.fail_next("api", "429", "503")
        fake.image_faults["1000007"] = "html"
        fake.random_faults["image"] = (0.01, ("500", "reset", "truncated"))
        download_photos(..., endpoint=fake.endpoint)

``api_delay_s``/``image_delay_s`` slow answers down, and ``in_flight`` counts the
requests being answered, so a test can kill a client in the middle of one.
"""

from __future__ import annotations

import base64
import collections
import contextlib
import functools
import datetime as dt
import hashlib
import hmac
import json
import math
import os
import random
import sys
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from featkit import photogen

API_FAULTS = ("429", "429-retry-after", "500", "502", "503", "hang", "reset", "malformed-json",
              "stat-fail-105")
IMAGE_FAULTS = ("429", "500", "502", "503", "hang", "reset", "truncated", "truncated-jpeg", "garbage", "html",
                "404", "unavailable", "gzip-bomb", "trailing-junk", "slow-drip")
GZIP_BOMB_BYTES = 256 << 20  # what a gzip-bomb answer inflates to (it is about 0.25 MB on the wire)
JUNK_BYTES = 4 << 20  # what a trailing-junk answer appends to the photo
# What a client may retry: the same request can succeed next time.
TRANSIENT_API_FAULTS = ("429", "500", "502", "503", "hang", "reset", "malformed-json", "stat-fail-105")
TRANSIENT_IMAGE_FAULTS = ("429", "500", "502", "503", "hang", "reset", "truncated")
REST_PATH = "/services/rest/"


@dataclass
class FakePhoto:
    """One photo the fake knows: searchable metadata plus how to make its bytes."""

    id: str
    owner: str
    title: str
    tags: str
    taken: dt.datetime
    license: str = "4"
    latitude: float | None = None
    longitude: float | None = None
    secret: str = "a1b2c3d4e5"
    server: str = "65535"
    city: str = ""
    image: Callable[[], bytes] | None = None
    words: frozenset[str] = field(init=False)

    def __post_init__(self) -> None:
        self.words = frozenset(f"{self.title} {self.tags}".lower().split())


def make_catalog(cities: Sequence[str], per_city: int, *, seed: int = 0, owners_per_city: int = 12,
                 start: dt.datetime = dt.datetime(2012, 1, 1), end: dt.datetime = dt.datetime(2024, 1, 1),
                 geo_fraction: float = 0.8, ambiguous: int = 0, exact_duplicates: int = 0,
                 near_duplicates: int = 0, image_size: tuple[int, int] = (320, 229),
                 centres: dict[str, tuple[float, float]] | None = None) -> list[FakePhoto]:
    """A deterministic photo catalogue: ``per_city`` photos per city, tagged
    ``"<city> streets"``, with :mod:`featkit.photogen` images rendered on demand.

    ``ambiguous`` extra photos per adjacent city pair carry both cities' tags;
    ``exact_duplicates``/``near_duplicates`` extra photos per city re-use an
    earlier photo's bytes or its scene with a slightly different exposure.
    """
    import random

    rng = random.Random(seed)
    span = (end - start).total_seconds()
    photos: list[FakePhoto] = []
    next_id = 1_000_000

    def add(city: str, title: str, tags: str, image: Callable[[], bytes]) -> None:
        nonlocal next_id
        geo = rng.random() < geo_fraction
        lat, lon = (centres or {}).get(city, (10.0 * (len(city) % 7), 10.0 * (len(city) % 11)))
        photos.append(FakePhoto(
            id=str(next_id), owner=f"{rng.randrange(owners_per_city) + 100 * (hash_city(city) % 90)}@N0{seed % 10}",
            title=title, tags=tags, taken=start + dt.timedelta(seconds=int(rng.random() * span)),
            license=rng.choice(["0", "1", "2", "4", "5", "7", "9", "10"]),
            latitude=round(lat + rng.uniform(-0.05, 0.05), 6) if geo else None,
            longitude=round(lon + rng.uniform(-0.05, 0.05), 6) if geo else None,
            secret=f"{rng.getrandbits(40):010x}", city=city, image=image))
        next_id += 1

    def render(city: str, i: int, variant: int = 0) -> Callable[[], bytes]:
        return lambda: photogen.render_jpeg(city, i, seed=seed, size=image_size, variant=variant)

    for city in cities:
        tag = city.lower()
        for i in range(per_city):
            add(city, f"{city} street scene {i}", f"{tag} streets", render(city, i))
        for i in range(exact_duplicates):
            add(city, f"{city} again {i}", f"{tag} streets", render(city, i))
        for i in range(near_duplicates):
            add(city, f"{city} burst {i}", f"{tag} streets", render(city, i, variant=1))
    for a, b in zip(cities, cities[1:]):
        for i in range(ambiguous):
            add(a, f"{a} or {b} {i}", f"{a.lower()} {b.lower()} streets", render(a, 10_000 + i))
    return photos


def hash_city(city: str) -> int:
    return sum(map(ord, city))


class FakeFlickr:
    """A loopback Flickr REST endpoint plus image host; use as a context manager.

    ``api_key``/``api_secret``: the credentials it accepts (OAuth1 HMAC-SHA1
    signatures are verified, like Flickr). ``cap``: results reachable per query;
    pages past it repeat earlier pages. ``image_delay_s``/``api_delay_s`` slow
    image/API responses. ``keep_bytes=False`` renders an image on every request
    instead of keeping its bytes (long runs: flat memory in the serving process).
    ``pad_to`` pads each JPEG with a comment segment to about that many bytes (Flickr's
    320-px images weigh 20-50 kB; rendering them that large would be slow). ``seed``
    drives :attr:`random_faults`.
    """

    def __init__(self, photos: Iterable[FakePhoto], *, api_key: str = "fake-key", api_secret: str = "fake-secret",
                 cap: int = 4000, hang_s: float = 2.0, image_delay_s: float = 0.0, api_delay_s: float = 0.0,
                 keep_bytes: bool = True, pad_to: int = 0, seed: int = 0):
        self.photos = list(photos)
        self.by_id = {p.id: p for p in self.photos}
        self.api_key, self.api_secret = api_key, api_secret
        self.cap, self.hang_s, self.image_delay_s, self.api_delay_s = cap, hang_s, image_delay_s, api_delay_s
        self.drip_s = 0.05  # between two bytes of a slow-drip answer
        self.keep_bytes, self.pad_to = keep_bytes, pad_to
        self.image_faults: dict[str, str] = {}      # photo id -> fault, on every request
        # kind -> (probability, faults): each request of that kind (not otherwise faulted) draws one
        self.random_faults: dict[str, tuple[float, Sequence[str]]] = {}
        self._rng = random.Random(seed)
        self.in_flight = {"api": 0, "image": 0}     # requests being answered right now
        self._queues = {"api": collections.deque(), "image": collections.deque()}
        self.api_calls: list[dict[str, str]] = []   # params of every API request (oauth_* removed)
        self.api_times: list[float] = []
        self.image_requests: collections.Counter[str] = collections.Counter()
        self.faults_served: list[tuple[str, str]] = []
        self._lock = threading.Lock()
        self._bytes: dict[str, bytes] = {}
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -- control ------------------------------------------------------------------

    def fail_next(self, kind: str, *faults: str) -> None:
        """Queue faults for the next ``kind`` ("api" or "image") requests, one each."""
        valid = API_FAULTS if kind == "api" else IMAGE_FAULTS
        for f in faults:
            if f not in valid:
                raise ValueError(f"unknown {kind} fault {f!r}; choose from {', '.join(valid)}")
        with self._lock:
            self._queues[kind].extend(faults)

    def _next_fault(self, kind: str, photo_id: str | None = None) -> str | None:
        with self._lock:
            fault = self.image_faults.get(photo_id) if photo_id else None
            if fault is None and self._queues[kind]:
                fault = self._queues[kind].popleft()
            if fault is None and kind in self.random_faults:
                rate, choices = self.random_faults[kind]
                if self._rng.random() < rate:
                    fault = self._rng.choice(list(choices))
            if fault:
                self.faults_served.append((kind, fault))
            return fault

    def image_bytes(self, photo: FakePhoto) -> bytes:
        with self._lock:
            data = self._bytes.get(photo.id)
        if data is None:
            data = photo.image() if photo.image else photogen.render_jpeg(photo.city or "x", int(photo.id))
            if len(data) < self.pad_to:
                data = _pad_jpeg(data, self.pad_to)
            if self.keep_bytes:
                with self._lock:
                    self._bytes[photo.id] = data
        return data

    @property
    def base_url(self) -> str:
        assert self._server is not None, "start the server first (use `with FakeFlickr(...)`)"
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    @property
    def endpoint(self) -> str:
        """The REST URL to give the client (``FlickrAPI.REST_URL``)."""
        return self.base_url + REST_PATH

    def image_url(self, photo: FakePhoto) -> str:
        return f"{self.base_url}/{photo.server}/{photo.id}_{photo.secret}_n.jpg"

    def start(self) -> "FakeFlickr":
        fake = self

        class Handler(_Handler):
            owner = fake

        self._server = _Server(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._server.block_on_close = False
        self._thread = threading.Thread(target=self._server.serve_forever, name="fakeflickr", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> "FakeFlickr":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- flickr.photos.search ----------------------------------------------------------

    def search(self, params: dict[str, str]) -> dict:
        """The JSON body Flickr would send for these search parameters."""
        text = params.get("text", "").lower().split()
        bbox = params.get("bbox")
        if not text and not bbox and not params.get("tags"):
            return _fail(3, "Parameterless searches have been disabled. Please use flickr.photos.getRecent instead.")
        try:
            lo = _parse_date(params.get("min_taken_date"), dt.datetime.min)
            hi = _parse_date(params.get("max_taken_date"), dt.datetime.max)
            per_page = min(500, max(1, int(params.get("per_page", "100"))))
            page = max(1, int(params.get("page", "1")))
            box = [float(v) for v in bbox.split(",")] if bbox else None
        except ValueError:
            return _fail(1, "Invalid parameter")
        licenses = set(params["license"].split(",")) if params.get("license") else None
        has_geo = params.get("has_geo") == "1"
        matched = []
        for p in self.photos:
            if text and not all(w in p.words for w in text):
                continue
            if not lo <= p.taken <= hi:
                continue
            if licenses is not None and p.license not in licenses:
                continue
            geo = p.latitude is not None
            if (has_geo or box) and not geo:
                continue
            if box and not (box[0] <= p.longitude <= box[2] and box[1] <= p.latitude <= box[3]):
                continue
            matched.append(p)
        if params.get("sort", "date-posted-desc").startswith("date-taken"):
            matched.sort(key=lambda p: (p.taken, int(p.id)), reverse=params.get("sort") != "date-taken-asc")
        else:
            matched.sort(key=lambda p: int(p.id), reverse=True)
        total = len(matched)
        reachable = matched[:self.cap]
        cap_pages = max(1, math.ceil(len(reachable) / per_page))
        # Past the cap Flickr serves earlier pages again.
        effective = (page - 1) % cap_pages + 1
        chunk = reachable[(effective - 1) * per_page:effective * per_page]
        extras = set(params.get("extras", "").split(","))
        return {"photos": {"page": page, "pages": math.ceil(total / per_page), "perpage": per_page,
                           "total": total, "photo": [self._entry(p, extras) for p in chunk]},
                "stat": "ok"}

    def _entry(self, p: FakePhoto, extras: set[str]) -> dict:
        e: dict[str, object] = {"id": p.id, "owner": p.owner, "secret": p.secret, "server": p.server,
                                "farm": 66, "title": p.title, "ispublic": 1, "isfriend": 0, "isfamily": 0}
        if "license" in extras:
            e["license"] = p.license
        if "owner_name" in extras:
            e["ownername"] = f"user {p.owner}"
        if "date_taken" in extras:
            e.update(datetaken=p.taken.strftime("%Y-%m-%d %H:%M:%S"), datetakengranularity=0,
                     datetakenunknown="0")
        if "tags" in extras:
            e["tags"] = p.tags
        if "geo" in extras:
            if p.latitude is None:
                e.update(latitude=0, longitude=0, accuracy=0, context=0)
            else:
                e.update(latitude=f"{p.latitude}", longitude=f"{p.longitude}", accuracy="16", context=0,
                         place_id="", woeid="", geo_is_family=0, geo_is_friend=0, geo_is_contact=0,
                         geo_is_public=1)
        if "url_n" in extras:
            e.update(url_n=self.image_url(p), height_n=229, width_n=320)
        return e


def _pad_jpeg(data: bytes, size: int) -> bytes:
    """``data`` (a JPEG) grown to about ``size`` bytes by COM segments right after SOI; the
    padding derives from the bytes, so equal images stay equal."""
    seed = hashlib.sha256(data).digest()
    need, segments = size - len(data), []
    while need > 4:
        n = min(need - 4, 65533)
        body = (seed * (n // 32 + 1))[:n]
        segments.append(b"\xff\xfe" + (n + 2).to_bytes(2, "big") + body)
        need -= n + 4
    return data[:2] + b"".join(segments) + data[2:]


def _fail(code: int, message: str) -> dict:
    return {"stat": "fail", "code": code, "message": message}


def _parse_date(value: str | None, default: dt.datetime) -> dt.datetime:
    if not value:
        return default
    if value.isdigit():
        return dt.datetime.fromtimestamp(int(value), dt.timezone.utc).replace(tzinfo=None)
    return dt.datetime.strptime(value.strip(), "%Y-%m-%d %H:%M:%S" if " " in value.strip() else "%Y-%m-%d")


def _verify_oauth(handler: "_Handler", body: str, key: str, secret: str) -> dict | None:
    """None if the request is signed with ``key``/``secret``, else Flickr's error body."""
    from oauthlib.oauth1.rfc5849 import signature, utils

    header = handler.headers.get("Authorization", "")
    if not header.startswith("OAuth "):
        return _fail(100, "Invalid API Key (Key has invalid format)")
    oauth = dict(utils.parse_authorization_header(header))
    if oauth.get("oauth_consumer_key") != key:
        return _fail(100, "Invalid API Key (Key not found)")
    uri = f"http://{handler.headers.get('Host')}{handler.path}"
    query = urllib.parse.urlsplit(handler.path).query
    params = signature.collect_parameters(uri_query=query, body=body,
                                          headers={"Authorization": header}, exclude_oauth_signature=True)
    base = signature.signature_base_string(handler.command, signature.base_string_uri(uri),
                                           signature.normalize_parameters(params))
    digest = hmac.new(f"{utils.escape(secret)}&".encode(), base.encode(), hashlib.sha1).digest()
    if base64.b64encode(digest).decode() != utils.unescape(oauth.get("oauth_signature", "")):
        return _fail(96, "Invalid signature")
    return None


class _Server(ThreadingHTTPServer):
    def handle_error(self, request, client_address) -> None:
        if not isinstance(sys.exc_info()[1], ConnectionError):  # a client killed or gone: not news
            super().handle_error(request, client_address)


class _Handler(BaseHTTPRequestHandler):
    owner: FakeFlickr
    protocol_version = "HTTP/1.1"
    # Headers and body leave in two writes: without TCP_NODELAY, Nagle's algorithm and the
    # client's delayed ACK hold every keep-alive response back about 40 ms.
    disable_nagle_algorithm = True

    def log_message(self, format: str, *args: object) -> None:  # quiet
        pass

    def _send(self, status: int, body: bytes, ctype: str, headers: dict[str, str] | None = None,
              length: int | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body) if length is None else length))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        try:
            self.wfile.write(body)
            self.wfile.flush()
        except (BrokenPipeError, ConnectionResetError):  # the client gave up (timeout, kill)
            self.close_connection = True

    def _common_fault(self, fault: str) -> bool:
        """Apply a fault shared by API and image requests; True if the response is done."""
        if fault in ("429", "429-retry-after"):
            headers = {"Retry-After": "1"} if fault == "429-retry-after" else {}
            self._send(429, b"Too Many Requests", "text/plain", headers)
        elif fault in ("500", "502", "503"):
            self._send(int(fault), b"<html><body>Server error</body></html>", "text/html")
        elif fault == "hang":
            time.sleep(self.owner.hang_s)
            self.close_connection = True
        elif fault == "reset":
            self.close_connection = True
        else:
            return False
        return True

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length).decode("utf-8") if length else ""
        with self._counted("api"):
            self._api(body)

    def do_GET(self) -> None:
        path = urllib.parse.urlsplit(self.path).path
        if path == REST_PATH:
            with self._counted("api"):
                self._api("")
        elif path.endswith("/photo_unavailable.png"):
            self._send(200, _PLACEHOLDER_PNG, "image/png")
        else:
            with self._counted("image"):
                self._image(path)

    @contextlib.contextmanager
    def _counted(self, kind: str) -> Iterator[None]:
        fake = self.owner
        with fake._lock:
            fake.in_flight[kind] += 1
        try:
            yield
        finally:
            with fake._lock:
                fake.in_flight[kind] -= 1

    def _api(self, body: str) -> None:
        fake = self.owner
        query = urllib.parse.urlsplit(self.path).query
        params = dict(urllib.parse.parse_qsl(query))
        params.update(urllib.parse.parse_qsl(body))
        with fake._lock:
            fake.api_calls.append({k: v for k, v in params.items() if not k.startswith("oauth_")})
            fake.api_times.append(time.monotonic())
        if fake.api_delay_s:
            time.sleep(fake.api_delay_s)
        fault = fake._next_fault("api")
        if fault and self._common_fault(fault):
            return
        if fault == "malformed-json":
            self._send(200, b'{"photos": {"page": 1, "pa', "application/json")
            return
        if fault == "stat-fail-105":
            rsp = _fail(105, "Service currently unavailable")
        else:
            rsp = _verify_oauth(self, body, fake.api_key, fake.api_secret)
        if rsp is None:
            method = params.get("method")
            if method != "flickr.photos.search":
                rsp = _fail(112, f'Method "{method}" not found')
            elif params.get("format") != "json":
                rsp = _fail(111, "Format not found (this fake speaks JSON only)")
            else:
                rsp = fake.search(params)
        self._send(200, json.dumps(rsp).encode(), "application/json")

    def _image(self, path: str) -> None:
        fake = self.owner
        name = path.rsplit("/", 1)[-1]
        photo_id = name.split("_", 1)[0]
        photo = fake.by_id.get(photo_id)
        with fake._lock:
            fake.image_requests[photo_id] += 1
        if photo is None or not name.startswith(f"{photo.id}_{photo.secret}_"):
            self._send(404, b"Not Found", "text/plain")
            return
        if fake.image_delay_s:
            time.sleep(fake.image_delay_s)
        fault = fake._next_fault("image", photo_id)
        if fault and self._common_fault(fault):
            return
        data = fake.image_bytes(photo)
        if fault == "truncated":  # promise all bytes, send half, hang up
            self._send(200, data[: len(data) // 2], "image/jpeg", length=len(data))
            self.close_connection = True
        elif fault == "truncated-jpeg":  # a complete response holding a cut file
            self._send(200, data[: len(data) // 2], "image/jpeg")
        elif fault == "garbage":  # a complete response whose bytes are no image at all
            self._send(200, hashlib.sha256(data).digest() * (len(data) // 32 + 1), "image/jpeg")
        elif fault == "html":
            self._send(200, b"<!DOCTYPE html><html><body>Oops, something went wrong</body></html>",
                       "text/html; charset=utf-8")
        elif fault == "404":
            self._send(404, b"Not Found", "text/plain")
        elif fault == "gzip-bomb":  # Content-Encoding: gzip of a JPEG header and half a gigabyte of zeros
            self._send(200, _gzip_bomb(), "image/jpeg", {"Content-Encoding": "gzip"})
        elif fault == "trailing-junk":  # the photo, then megabytes that are not part of it
            self._send(200, data + os.urandom(JUNK_BYTES), "image/jpeg")
        elif fault == "slow-drip":  # a byte at a time, each well within any per-read timeout, for ever
            self.send_response(200)
            self.send_header("Content-Type", "image/jpeg")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            try:
                for i in range(len(data)):
                    self.wfile.write(data[i : i + 1])
                    self.wfile.flush()
                    time.sleep(self.owner.drip_s)
            except (BrokenPipeError, ConnectionResetError):
                self.close_connection = True
        elif fault == "unavailable":  # Flickr redirects to a placeholder image
            self.send_response(302)
            self.send_header("Location", f"{fake.base_url}/images/photo_unavailable.png")
            self.send_header("Content-Length", "0")
            self.end_headers()
        else:
            self._send(200, data, "image/jpeg")


@functools.lru_cache(maxsize=1)
def _gzip_bomb() -> bytes:
    import zlib

    z = zlib.compressobj(9, zlib.DEFLATED, 31)  # gzip framing
    block = b"\0" * (1 << 20)
    return z.compress(b"\xff\xd8\xff\xe0") + b"".join(z.compress(block) for _ in range(GZIP_BOMB_BYTES >> 20)) + z.flush()


def _placeholder_png() -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (500, 374), (200, 200, 200)).save(buf, format="PNG")
    return buf.getvalue()


_PLACEHOLDER_PNG = _placeholder_png()
