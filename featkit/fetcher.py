"""One photo of a search result on its way to disk, for :mod:`featkit.collect`: its manifest row
(:func:`photo_row`), and the download of its image to a temporary file beside its final path
(:class:`ImageFetcher`, run in worker threads), checked before it is kept: a complete answer, an image
that decodes, at least ``min_size`` pixels on its shorter side."""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import requests

from featkit.atomic import atomic_write
from featkit.cache.names import STAGED_SUFFIX, image_file
from featkit.flickr import RETRY_STATUSES, BodyTooLarge, backoff_delay, gave_up, retrying_session, tries_made
from featkit.images import decoded_size
from featkit.options import FETCH

DATE_TAKEN = re.compile(r"^\d{4}-\d{2}-\d{2} \d{2}:\d{2}:\d{2}$")


@dataclass
class Candidate:
    photo_id: str
    city: str
    row: dict[str, str]


@dataclass
class Fetched:
    candidate: Candidate
    data: bytes | None = None   # None: reused file already on disk
    error: str | None = None
    permanent: bool = True
    tmp: Path | None = None     # the staged file (``<final>.fetched``) that settling renames to the final name
    adopted: bool = False       # staged by an earlier run (killed before it settled the image), not fetched now


def photo_row(photo: dict, city: str, image_url: str) -> dict[str, str]:
    lat, lon = str(photo.get("latitude") or ""), str(photo.get("longitude") or "")
    try:
        has_geo = float(lat) != 0.0 or float(lon) != 0.0
    except ValueError:
        has_geo = False
    date = str(photo.get("datetaken") or "")
    return {
        "photo_id": str(photo["id"]),
        "city": city,
        "path": image_file("", city, str(photo["id"])).as_posix(),
        "owner": clean_text(photo.get("owner")),
        "license": clean_text(photo.get("license")),
        "latitude": lat if has_geo else "",
        "longitude": lon if has_geo else "",
        "date_taken": date if DATE_TAKEN.match(date) else "",
        "url": image_url,
        "title": clean_text(photo.get("title"))[:300],
        "sha256": "",
    }


def clean_text(value: object) -> str:
    return " ".join(str(value if value is not None else "").split())



def jpeg_to_end(data: bytes) -> bytes:
    """A JPEG up to its end-of-image marker (anything after it dropped: junk a server or an attacker appended);
    any other format as it is. The markers are walked, so an FFD9 inside a segment or a thumbnail is not
    taken for the end; a JPEG whose walk fails is left whole for the decoder to judge."""
    if not data.startswith(b"\xff\xd8"):
        return data
    i, n = 2, len(data)
    while i + 4 <= n:
        if data[i] != 0xFF:
            return data
        marker = data[i + 1]
        if marker == 0xD9:
            return data[: i + 2]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if 0xD0 <= marker <= 0xD7 or marker == 0x01:  # stand-alone markers
            i += 2
            continue
        seg = int.from_bytes(data[i + 2 : i + 4], "big")
        i += 2 + seg
        if marker == 0xDA:  # start of scan: entropy-coded data until a marker that is not a restart or a stuffed byte
            while i + 1 < n and not (data[i] == 0xFF and data[i + 1] not in (0x00, *range(0xD0, 0xD8))):
                i += 1
    return data


class ImageFetcher:
    """Downloads one candidate's image to a temporary file beside its final path (worker threads).

    Transport failures are retried by urllib3 (:func:`featkit.flickr.retrying_session`,
    one session per thread); a body cut after the headers, which urllib3 cannot
    see, by the loop here.
    """

    def __init__(self, out_dir: Path, *, min_size: int, max_retries: int, timeout_s: float, backoff_s: float,
                 max_bytes: int = FETCH.max_image_bytes, deadline_s: float = FETCH.deadline_s,
                 sleep: Callable[[float], None] = time.sleep):
        self.out_dir, self.min_size = out_dir, min_size
        self.max_bytes, self.deadline_s = max_bytes, deadline_s
        self.max_retries, self.timeout_s, self.backoff_s = max_retries, timeout_s, backoff_s
        self._sleep = sleep
        self._local = threading.local()

    def _session(self) -> requests.Session:
        s = getattr(self._local, "session", None)
        if s is None:
            s = self._local.session = retrying_session(self.max_retries, self.backoff_s, max_bytes=self.max_bytes, deadline_s=self.deadline_s)
        return s

    def fetch(self, cand: Candidate) -> Fetched:
        """A temporary file with the checked bytes, the final file to reuse, or why not."""
        final = image_file(self.out_dir, cand.city, cand.photo_id)
        if final.is_file():  # renamed before a crash, never journaled: adopt it
            return Fetched(cand, data=None)
        staged = final.with_name(final.name + STAGED_SUFFIX)
        if staged.is_file():  # fetched whole by a run killed before it settled it: no second request
            adopted = self._check(cand, staged.read_bytes(), staged, write=False)
            if adopted.error is None:
                adopted.adopted = True
                return adopted
            staged.unlink(missing_ok=True)
        failed = f"download failed after {self.max_retries + 1} tries"
        why = ""
        for attempt in range(self.max_retries + 1):
            try:
                r = self._session().get(cand.row["url"], timeout=self.timeout_s)
            except BodyTooLarge as e:
                return Fetched(cand, error=str(e))
            except requests.RequestException as e:
                why = f"connection error ({type(e).__name__})"
                if not isinstance(e, (requests.ConnectionError, requests.Timeout,
                                      requests.exceptions.ChunkedEncodingError,
                                      requests.exceptions.ContentDecodingError)):
                    return Fetched(cand, error=f"request failed ({type(e).__name__})")
                if gave_up(e):  # urllib3 already spent the retries
                    return Fetched(cand, error=f"{failed} ({why})", permanent=False)
            else:
                if r.status_code in RETRY_STATUSES:  # urllib3 gave up on it
                    return Fetched(cand, error=f"download failed after {tries_made(r)} tries "
                                                f"(HTTP {r.status_code})", permanent=False)
                return self._accept(cand, r, final)
            if attempt < self.max_retries:
                self._sleep(backoff_delay(attempt, self.backoff_s))
        return Fetched(cand, error=f"{failed} ({why})", permanent=False)

    def _accept(self, cand: Candidate, r: requests.Response, final: Path) -> Fetched:
        """Check a complete response; write an acceptable image to a temporary file."""
        if r.status_code != 200:
            return Fetched(cand, error=f"HTTP {r.status_code}")
        if "photo_unavailable" in r.url:
            return Fetched(cand, error="photo unavailable")
        ctype = r.headers.get("Content-Type", "").split(";")[0].strip().lower()
        if ctype.startswith("text/"):
            return Fetched(cand, error=f"not an image ({ctype})")
        return self._check(cand, jpeg_to_end(r.content), final.with_name(final.name + STAGED_SUFFIX))

    def _check(self, cand: Candidate, data: bytes, staged: Path, *, write: bool = True) -> Fetched:
        """Accept ``data`` if it decodes and is large enough, staged whole at ``staged`` (with ``write``:
        :func:`featkit.atomic.atomic_write`, so a kill leaves the whole image or none of it)."""
        try:
            w, h = decoded_size(data)
        except ValueError:
            return Fetched(cand, error="not a decodable image")
        if min(w, h) < self.min_size:
            return Fetched(cand, error=f"smaller than --min-size {self.min_size}")
        if write:
            atomic_write(staged, data)
        return Fetched(cand, data=data, tmp=staged)
