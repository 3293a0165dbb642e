"""featkit.collect against a loopback Flickr (featkit.fakeflickr) via the real flickrapi client."""

import csv
import hashlib
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from featkit.cities import City, load_cities
from featkit.collect import (CC_LICENSES, MANIFEST_COLUMNS, _FlickrSearch, _search_windows, download_photos,
                             resolve_credentials)
from featkit.errors import FeatkitError
from featkit.fakeflickr import FakeFlickr, make_catalog

# Distinctive strings, so the final test can grep everything the tests wrote for them.
KEY = "fkey9d1e0c7b3a5f"
SECRET = "fsecret4b8e2a6c0d9f"
REPO = Path(__file__).resolve().parents[1]
LOGS: list[str] = []  # every line the downloader logged, written out by the last test
FAST = dict(api_key=KEY, api_secret=SECRET, min_interval_s=0.0, backoff_s=0.01, timeout_s=1.0,
            per_page=10, result_cap=20, log=LOGS.append)


def manifest_rows(out: Path) -> list[dict]:
    with (out / "manifest.csv").open(newline="") as fh:
        reader = csv.DictReader(fh)
        assert tuple(reader.fieldnames) == MANIFEST_COLUMNS
        return list(reader)


def assert_one_to_one(out: Path) -> list[dict]:
    """Manifest rows and image files match exactly; no partial files; hashes right."""
    rows = manifest_rows(out)
    ids = [r["photo_id"] for r in rows]
    assert len(ids) == len(set(ids)), "a photo id appears twice"
    on_disk = {p.relative_to(out).as_posix() for p in (out / "images").rglob("*") if p.is_file()}
    assert on_disk == {r["path"] for r in rows}
    for r in rows:
        assert r["path"] == f"images/{r['city']}/{r['photo_id']}.jpg"
        assert hashlib.sha256((out / r["path"]).read_bytes()).hexdigest() == r["sha256"]
    assert len({r["sha256"] for r in rows}) == len(rows), "exact duplicate kept"
    assert not list(out.rglob("*.tmp")) and not (out / ".download-journal.jsonl").exists()
    return rows


def test_windows_past_the_cap_dedupe_and_ambiguity(tmp_path):
    cities = load_cities("Paris,Tokyo")
    catalog = make_catalog(["Paris", "Tokyo"], 40, ambiguous=2, exact_duplicates=2, near_duplicates=2)
    ambiguous_ids = {p.id for p in catalog if " or " in p.title}
    with FakeFlickr(catalog, api_key=KEY, api_secret=SECRET, cap=20) as fake:
        summary = download_photos(cities, tmp_path, 38, endpoint=fake.endpoint, **FAST)
    rows = assert_one_to_one(tmp_path)
    by_city = {c: [r for r in rows if r["city"] == c] for c in ("Paris", "Tokyo")}
    assert {c: len(v) for c, v in by_city.items()} == {"Paris": 38, "Tokyo": 38}
    assert not ambiguous_ids & {r["photo_id"] for r in rows}
    stats = {s.city: s for s in summary.cities}
    assert stats["Paris"].ambiguous == 2 and stats["Tokyo"].ambiguous == 2
    assert sum(s.duplicates + s.near_duplicates for s in summary.cities) >= 4
    # More than `cap` per city means more than one taken-date window was searched.
    windows = {(c["text"], c["min_taken_date"], c["max_taken_date"]) for c in fake.api_calls}
    assert len([w for w in windows if w[0] == "Paris streets"]) > 2
    for call in fake.api_calls:  # one method only, everything in the same call
        assert call["method"] == "flickr.photos.search" and call["format"] == "json"
        assert {"url_n", "license", "geo", "date_taken", "tags"} <= set(call["extras"].split(","))
        assert int(call["page"]) <= 2  # never past the cap (20 / 10 per page)
    assert fake.image_requests and max(fake.image_requests.values()) == 1
    paris = by_city["Paris"][0]
    assert paris["owner"] and paris["url"].startswith("http://127.0.0.1") and paris["date_taken"]
    assert "Paris" in summary.table() and "\n" not in str(summary)
    # A second run with the same target changes nothing and downloads nothing.
    with FakeFlickr(catalog, api_key=KEY, api_secret=SECRET, cap=20) as fake2:
        again = download_photos(cities, tmp_path, 38, endpoint=fake2.endpoint, **FAST)
    assert fake2.api_calls == [] and not fake2.image_requests
    assert sum(s.downloaded for s in again.cities) == 0 and manifest_rows(tmp_path) == rows


def test_default_flickr_cap_of_4000_is_passed_with_date_windows():
    catalog = make_catalog(["Paris"], 4600)  # images are never rendered here
    with FakeFlickr(catalog, api_key=KEY, api_secret=SECRET) as fake:
        api = _FlickrSearch(KEY, SECRET, fake.endpoint, min_interval_s=0, max_retries=0, timeout_s=5,
                            backoff_s=0.01, log=LOGS.append)
        base = {"text": "Paris streets", "extras": "url_n", "sort": "date-taken-desc"}
        pages = _search_windows(api, base, start=0, end=2e9, per_page=500, cap=4000)
        ids = [p["id"] for page in pages for p in page]
    assert len(set(ids)) == 4600
    assert all(int(c["page"]) <= 8 and c["per_page"] == "500" for c in fake.api_calls)


def test_every_injected_fault_is_survived(tmp_path):
    cities = load_cities("London")
    catalog = make_catalog(["London"], 14, seed=3)
    ids = [p.id for p in catalog]
    with FakeFlickr(catalog, api_key=KEY, api_secret=SECRET, cap=20, hang_s=1.5) as fake:
        fake.fail_next("api", "429", "429-retry-after", "500", "502", "503", "hang", "reset",
                       "malformed-json", "stat-fail-105")
        fake.fail_next("image", "429", "500", "502", "503", "hang", "reset", "truncated")
        permanent = {ids[0]: "html", ids[1]: "truncated-jpeg", ids[2]: "404", ids[3]: "unavailable"}
        fake.image_faults.update(permanent)
        summary = download_photos(cities, tmp_path, 14, endpoint=fake.endpoint, max_retries=9,
                                  workers=1, **dict(FAST, timeout_s=0.5))
    served = {f for _, f in fake.faults_served}
    assert {"429-retry-after", "hang", "malformed-json", "stat-fail-105", "truncated", "html",
            "truncated-jpeg", "404", "unavailable"} <= served
    rows = assert_one_to_one(tmp_path)
    assert {r["photo_id"] for r in rows} == set(ids[4:])
    skipped = summary.cities[0].skipped
    assert skipped == {"not an image (text/html)": 1, "not a decodable image": 1, "HTTP 404": 1,
                       "photo unavailable": 1}
    with (tmp_path / "skipped.csv").open() as fh:
        assert {r["photo_id"] for r in csv.DictReader(fh)} == set(permanent)


def test_retries_are_bounded_and_the_error_is_one_clean_line(tmp_path):
    with FakeFlickr(make_catalog(["Paris"], 3), api_key=KEY, api_secret=SECRET) as fake:
        fake.fail_next("api", *["503"] * 3)
        with pytest.raises(FeatkitError) as e:
            download_photos(load_cities("Paris"), tmp_path, 3, endpoint=fake.endpoint, max_retries=2, **FAST)
        assert len(fake.api_calls) == 3
    assert "failed 3 times" in str(e.value) and "HTTP 503" in str(e.value) and "\n" not in str(e.value)
    LOGS.append(str(e.value))


def test_wrong_secret_is_refused_without_leaking_it(tmp_path):
    with FakeFlickr(make_catalog(["Paris"], 3), api_key=KEY, api_secret=SECRET) as fake:
        with pytest.raises(FeatkitError) as e:
            download_photos(load_cities("Paris"), tmp_path, 3, endpoint=fake.endpoint,
                            **dict(FAST, api_secret="wrong" + SECRET))
    msg = str(e.value)
    assert "Invalid signature" in msg and "FLICKR_API_SECRET" in msg and SECRET not in msg
    LOGS.append(msg)


def test_rate_limit_spaces_api_calls(tmp_path):
    with FakeFlickr(make_catalog(["Paris"], 30), api_key=KEY, api_secret=SECRET, cap=20) as fake:
        download_photos(load_cities("Paris"), tmp_path, 25, endpoint=fake.endpoint,
                        **dict(FAST, min_interval_s=0.15))
        gaps = [b - a for a, b in zip(fake.api_times, fake.api_times[1:])]
    assert len(gaps) >= 3 and min(gaps) >= 0.14


def test_license_geo_bbox_and_min_size(tmp_path):
    catalog = make_catalog(["Venice"], 40, seed=5, centres={"Venice": (45.44, 12.32)})
    with FakeFlickr(catalog, api_key=KEY, api_secret=SECRET, cap=20) as fake:
        venice = load_cities("Venice")
        download_photos(venice, tmp_path / "a", 40, endpoint=fake.endpoint, license="cc", has_geo=True, **FAST)
        rows = assert_one_to_one(tmp_path / "a")
        expected = [p for p in catalog if p.license in CC_LICENSES and p.latitude is not None]
        assert len(rows) == len(expected) > 0
        assert all(r["license"] in CC_LICENSES and r["latitude"] and r["longitude"] for r in rows)
        assert all(c["license"] == ",".join(CC_LICENSES) and c["has_geo"] == "1" for c in fake.api_calls)
        # bbox only, no text: the west half of the photos' spread
        box = City("Venice", "", 45.44, 12.32, (12.0, 45.0, 12.32, 46.0))
        download_photos([box], tmp_path / "b", 40, endpoint=fake.endpoint, **FAST)
        rows = assert_one_to_one(tmp_path / "b")
        assert rows and all(float(r["longitude"]) <= 12.32 for r in rows)
        assert "text" not in fake.api_calls[-1] and fake.api_calls[-1]["bbox"] == "12,45,12.32,46"
        summary = download_photos(venice, tmp_path / "c", 3, endpoint=fake.endpoint, min_size=300, **FAST)
    assert manifest_rows(tmp_path / "c") == []
    assert summary.cities[0].skipped["smaller than --min-size 300"] >= 3


def test_bad_options_give_clean_errors(tmp_path):
    paris = load_cities("Paris")
    for kwargs, needle in [(dict(license="gpl"), "unknown licence"), (dict(query_template="{town}"), "{city}"),
                           (dict(endpoint="ftp://x"), "http(s) URL"), (dict(workers=0), "--workers")]:
        with pytest.raises(FeatkitError, match=needle.replace("(", r"\(").replace(")", r"\)")):
            download_photos(paris, tmp_path, 5, **dict(FAST, **kwargs))
    with pytest.raises(FeatkitError, match="safe folder name"):
        download_photos([City("../up", "x", 0, 0)], tmp_path, 5, **FAST)


def test_resolve_credentials(tmp_path):
    assert resolve_credentials({"FLICKR_API_KEY": KEY, "FLICKR_API_SECRET": SECRET}) == (KEY, SECRET)
    cfg = tmp_path / "flickr.toml"
    cfg.write_text(f'api_key = "{KEY}"\napi_secret = "{SECRET}"\n')
    assert resolve_credentials({}, config_path=cfg) == (KEY, SECRET)
    for env in ({}, {"FLICKR_API_KEY": KEY}):
        with pytest.raises(FeatkitError) as e:
            resolve_credentials(env, config_path=tmp_path / "absent.toml")
        msg = str(e.value)
        assert "https://www.flickr.com/services/api/misc.api_keys.html" in msg and "FLICKR_API_SECRET" in msg
        assert KEY not in msg and "\n" not in msg
    cfg.unlink()


KILL_SCRIPT = textwrap.dedent("""
    import sys
    from pathlib import Path
    from featkit.cities import load_cities
    from featkit.collect import download_photos
    download_photos(load_cities("Paris,Tokyo"), Path(sys.argv[2]), 20, api_key=sys.argv[3],
                    api_secret=sys.argv[4], endpoint=sys.argv[1], min_interval_s=0, backoff_s=0.01,
                    timeout_s=2, per_page=10, result_cap=20, workers=2)
""")


def test_killed_run_resumes_with_nothing_lost_or_duplicated(tmp_path):
    out = tmp_path / "cache"
    catalog = make_catalog(["Paris", "Tokyo"], 24, seed=7)
    with FakeFlickr(catalog, api_key=KEY, api_secret=SECRET, cap=20, image_delay_s=0.08) as fake:
        with (tmp_path / "child.log").open("w") as log:
            child = subprocess.Popen([sys.executable, "-c", KILL_SCRIPT, fake.endpoint, str(out), KEY, SECRET],
                                     stdout=log, stderr=subprocess.STDOUT, cwd=REPO,
                                     env=dict(os.environ, PYTHONPATH=str(REPO)))
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline and len(list(out.glob("images/*/*.jpg"))) < 12:
                assert child.poll() is None, (tmp_path / "child.log").read_text()
                time.sleep(0.02)
            child.send_signal(signal.SIGKILL)
            child.wait()
        done_before = {p.stem for p in out.glob("images/*/*.jpg")}
        assert 12 <= len(done_before) < 40, "the kill did not land mid-run"
        fake.image_delay_s = 0
        summary = download_photos(load_cities("Paris,Tokyo"), out, 20, endpoint=fake.endpoint, workers=2, **FAST)
    rows = assert_one_to_one(out)
    assert len(rows) == 40
    assert all(fake.image_requests[pid] == 1 for pid in done_before), "a finished image was fetched again"
    assert max(fake.image_requests.values()) <= 2  # at most in flight at the kill, then once more
    assert done_before <= {r["photo_id"] for r in rows}, "an image finished before the kill was lost"
    assert sum(s.downloaded for s in summary.cities) == 40 - len(done_before)


def test_nothing_written_contains_the_key_or_secret(tmp_path_factory, tmp_path):
    (tmp_path / "logged.txt").write_text("\n".join(LOGS))
    base = tmp_path_factory.getbasetemp()
    files = [p for p in base.rglob("*") if p.is_file()]
    assert any(p.name == "manifest.csv" for p in files) and any(p.name == "child.log" for p in files)
    leaks = [str(p) for p in files if KEY.encode() in p.read_bytes() or SECRET.encode() in p.read_bytes()]
    assert leaks == []
    # The resolve_credentials test wrote a config file on purpose; it deletes it itself.
    assert LOGS, "the downloader logged nothing to check"
