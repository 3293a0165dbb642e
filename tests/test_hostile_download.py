"""Downloads that would take all the memory or all the time: bounded. The real flickrapi/requests client
against the loopback endpoint, with hostile image answers (tests/fakeflickr.py): a gzip bomb, a JPEG with
megabytes of junk after it, a slow drip; and an endpoint URL carrying a password."""

from __future__ import annotations

import io
import resource
import time

import pytest
from PIL import Image

from fakeflickr import GZIP_BOMB_BYTES, FakeFlickr, _gzip_bomb, make_catalog
from featkit.cities import load_cities
from featkit.collect import download_photos
from featkit.errors import FeatkitError
from featkit.fetcher import jpeg_to_end
from featkit.manifest import read_manifest
from test_collect import FAST, KEY, SECRET, manifest_rows


def skipped(out) -> dict[str, str]:
    p = out / "skipped.csv"
    return {r["photo_id"]: r["reason"] for r in read_manifest(p, ("photo_id", "city", "reason"))[1]} if p.exists() else {}


def test_a_gzip_bomb_is_refused_without_inflating_it(tmp_path):
    catalog = make_catalog(["Paris"], 6)
    bomb = catalog[0].id
    assert len(_gzip_bomb()) < 1_000_000  # made once, before the server needs it
    with FakeFlickr(catalog, api_key=KEY, api_secret=SECRET) as fake:
        fake.image_faults[bomb] = "gzip-bomb"
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        download_photos(load_cities("Paris"), tmp_path, 6, endpoint=fake.endpoint, max_retries=0, max_image_bytes=5_000_000, **FAST)
        grown_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    assert "larger than 5,000,000 bytes" in skipped(tmp_path)[bomb]
    assert bomb not in {r["photo_id"] for r in manifest_rows(tmp_path)}
    assert grown_mb < GZIP_BOMB_BYTES / 2**20 / 4, f"peak memory grew {grown_mb:.0f} MB"  # far from the 512 MB it inflates to


def test_a_jpeg_with_junk_after_it_is_stored_up_to_its_end(tmp_path):
    catalog = make_catalog(["Paris"], 4)
    junk = catalog[0].id
    with FakeFlickr(catalog, api_key=KEY, api_secret=SECRET) as fake:
        fake.image_faults[junk] = "trailing-junk"
        download_photos(load_cities("Paris"), tmp_path, 4, endpoint=fake.endpoint, **FAST)
        clean = fake.image_bytes(catalog[0])
    [row] = [r for r in manifest_rows(tmp_path) if r["photo_id"] == junk]
    stored = (tmp_path / row["path"]).read_bytes()
    assert stored == jpeg_to_end(clean) and len(stored) < 1_000_000
    Image.open(io.BytesIO(stored)).load()


def test_a_slow_drip_fails_at_the_deadline_instead_of_hanging(tmp_path):
    catalog = make_catalog(["Paris"], 4)
    drip = catalog[0].id
    with FakeFlickr(catalog, api_key=KEY, api_secret=SECRET) as fake:
        fake.image_faults[drip] = "slow-drip"
        fake.drip_s = 0.05  # each byte well within the 1 s per-read timeout; the whole photo would take minutes
        t0 = time.monotonic()
        summary = download_photos(load_cities("Paris"), tmp_path, 4, endpoint=fake.endpoint, max_retries=0, deadline_s=2.0, **FAST)
        took = time.monotonic() - t0
    assert took < 30, took
    assert drip not in {r["photo_id"] for r in manifest_rows(tmp_path)}
    assert sum(s.downloaded for s in summary.cities) == 3


def test_a_password_in_the_endpoint_never_shows(tmp_path):
    """An endpoint that cannot be reached is named in the error: the user and password in its URL are ***."""
    import socket

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    endpoint = f"http://alice:S3cretPass@127.0.0.1:{port}/services/rest/"
    with pytest.raises(FeatkitError) as e:
        download_photos(load_cities("Paris"), tmp_path, 2, endpoint=endpoint, **{**FAST, "max_retries": 0})
    msg = str(e.value)
    assert "S3cretPass" not in msg and "alice" not in msg and f"***@127.0.0.1:{port}" in msg, msg


def test_a_short_key_is_redacted_as_a_token_and_garbles_nothing():
    from featkit.flickr import redact

    text = "Flickr refused key ab: invalid key (about abc, tab ab/ab)"
    out = redact(text, ["ab", "sekrit"])
    assert out == "Flickr refused key ***: invalid key (about abc, tab ***/***)", out
    assert redact("http://u:sekrit@host/x?api_key=ab", ["ab", "sekrit"]) == "http://***@host/x?api_key=***"


def test_images_a_killed_run_fetched_whole_are_not_fetched_again(tmp_path):
    """A run killed with fetched images not yet settled leaves them staged (``<id>.jpg.fetched``, written whole
    or not at all): the next run adopts them without a request; a damaged one is fetched again."""
    catalog = make_catalog(["Paris"], 6)
    with FakeFlickr(catalog, api_key=KEY, api_secret=SECRET) as fake:
        folder = tmp_path / "images" / "Paris"
        folder.mkdir(parents=True)
        good, bad = catalog[0], catalog[1]
        (folder / f"{good.id}.jpg.fetched").write_bytes(fake.image_bytes(good))
        (folder / f"{bad.id}.jpg.fetched").write_bytes(fake.image_bytes(bad)[:100])  # cut: not whole
        summary = download_photos(load_cities("Paris"), tmp_path, 6, endpoint=fake.endpoint, **FAST)
        requests = dict(fake.image_requests)
    assert good.id not in requests and requests[bad.id] == 1
    kept = {r["photo_id"] for r in manifest_rows(tmp_path)}
    assert {good.id, bad.id} <= kept and summary.cities[0].reused == 1
    assert not list(tmp_path.rglob("*.fetched")) and not list(tmp_path.rglob("*.tmp"))
