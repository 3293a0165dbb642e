"""featkit.collect and featkit.flickr against a loopback Flickr (tests/fakeflickr.py) via the real flickrapi client."""

import csv
import hashlib
import logging
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from fakeflickr import FakeFlickr, make_catalog
from featkit.cities import City, load_cities
from featkit.collect import download_photos
from featkit.errors import FeatkitError
from featkit.flickr import CC_LICENSES, RETRY_STATUSES, FlickrClient, RateLimiter, resolve_credentials, search_windows
from featkit.manifest import MANIFEST_COLUMNS

# Distinctive strings, so the final test can grep everything the tests wrote for them.
KEY = "fkey9d1e0c7b3a5f"
SECRET = "fsecret4b8e2a6c0d9f"
REPO = Path(__file__).resolve().parents[1]
LOGS: list[str] = []  # every line the downloader logged in the current test, checked for leaks
FAST = dict(api_key=KEY, api_secret=SECRET, min_interval_s=0.0, backoff_s=0.01, timeout_s=1.0,
            per_page=10, result_cap=20, log=LOGS.append)


def leaks(folder: Path, texts=()) -> list[str]:
    """Files under ``folder`` and ``texts`` that hold the key or the secret."""
    found = [str(p) for p in folder.rglob("*") if p.is_file()
             and (KEY.encode() in p.read_bytes() or SECRET.encode() in p.read_bytes())]
    return found + [t for t in texts if KEY in t or SECRET in t]


@pytest.fixture(autouse=True)
def nothing_leaks(tmp_path, caplog):
    """After every test here: no file it wrote, no line the downloader logged, and no
    library warning (urllib3's retries, flickrapi's errors) holds the key or secret."""
    caplog.set_level(logging.WARNING)
    LOGS.clear()
    yield
    assert leaks(tmp_path, [*LOGS, caplog.text]) == []


class FakeClock:
    """A monotonic clock that only moves when slept on (or told to)."""

    def __init__(self, now: float = 1000.0):
        self.now = now
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


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
        api = FlickrClient(KEY, SECRET, fake.endpoint, min_interval_s=0, max_retries=0, timeout_s=5,
                           backoff_s=0.01, log=LOGS.append)
        base = {"text": "Paris streets", "extras": "url_n", "sort": "date-taken-desc"}
        pages = search_windows(api, base, start=0, end=2e9, per_page=500, cap=4000)
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


def test_rate_limit_spaces_api_calls():
    clock = FakeClock()
    with FakeFlickr(make_catalog(["Paris"], 30), api_key=KEY, api_secret=SECRET, cap=20) as fake:
        client = FlickrClient(KEY, SECRET, fake.endpoint, min_interval_s=0.25, max_retries=0, timeout_s=5,
                              log=LOGS.append, clock=clock, sleep=clock.sleep)
        base = {"text": "Paris streets", "extras": "url_n", "sort": "date-taken-desc"}
        pages = list(search_windows(client, base, start=0, end=2e9, per_page=10, cap=20))
        calls = len(fake.api_calls)
    assert pages and calls == client.calls and calls >= 4
    # back to back on the fake clock: every call after the first waits the whole interval
    assert clock.sleeps == [0.25] * (calls - 1)


def test_rate_limiter_sleeps_only_what_is_left_of_the_interval():
    clock = FakeClock()
    limiter = RateLimiter(2.0, clock=clock, sleep=clock.sleep)
    limiter.wait()             # the first call never waits
    clock.now += 0.5           # the call took half a second
    limiter.wait()
    clock.now += 3.0           # longer than the interval: no wait
    limiter.wait()
    limiter.wait()
    assert clock.sleeps == [1.5, 2.0]
    assert RateLimiter(0.0, clock=clock, sleep=clock.sleep).wait() is None and clock.sleeps == [1.5, 2.0]


def test_transport_failures_are_retried_by_urllib3_on_the_clients_own_session():
    import flickrapi

    clock = FakeClock()
    with FakeFlickr(make_catalog(["Paris"], 5), api_key=KEY, api_secret=SECRET) as fake:
        endpoint = fake.endpoint
        client = FlickrClient(KEY, SECRET, endpoint, min_interval_s=0, max_retries=3, timeout_s=2,
                              backoff_s=0.01, log=LOGS.append, clock=clock, sleep=clock.sleep)
        fake.fail_next("api", "503")
        photos = client.search(text="Paris streets", extras="url_n")
        assert len(photos["photo"]) == 5
        assert len(fake.api_calls) == 2 and client.calls == 2  # the 503, then the answer
        fake.fail_next("api", "reset", "502")  # a POST with no answer, then a bad gateway
        assert client.search(text="Paris streets")["total"] == 5
        assert len(fake.api_calls) == 5 and client.calls == 5
    # urllib3 did it: the client's own (outer) retry neither slept nor logged
    assert clock.sleeps == [] and LOGS == []
    retry = client.session.get_adapter(endpoint).max_retries
    assert set(RETRY_STATUSES) <= set(retry.status_forcelist) and "POST" in retry.allowed_methods
    # flickrapi's session, shared by every FlickrAPI in the process, is left as it was
    shared = flickrapi.auth.OAuthFlickrInterface.session
    assert shared is not client.session and shared.get_adapter(endpoint).max_retries.total == 0


def test_what_urllib3_cannot_see_is_retried_by_the_client():
    clock = FakeClock()
    with FakeFlickr(make_catalog(["Paris"], 5), api_key=KEY, api_secret=SECRET) as fake:
        client = FlickrClient(KEY, SECRET, fake.endpoint, min_interval_s=0, max_retries=2, timeout_s=2,
                              backoff_s=0.5, log=LOGS.append, clock=clock, sleep=clock.sleep)
        fake.fail_next("api", "malformed-json", "stat-fail-105")  # both arrive as HTTP 200
        assert client.search(text="Paris streets")["total"] == 5
        assert len(fake.api_calls) == 3
        assert len(clock.sleeps) == 2 and 0 <= clock.sleeps[0] <= 0.5 and 0 <= clock.sleeps[1] <= 1.0
        assert "malformed JSON" in LOGS[0] and "Flickr error 105" in LOGS[1]
        fake.fail_next("api", *["stat-fail-105"] * 3)
        with pytest.raises(FeatkitError, match="failed 3 times"):
            client.search(text="Paris streets")


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


def test_resume_reads_the_manifest_with_the_shared_parser(tmp_path):
    catalog = make_catalog(["Paris"], 6, seed=9)
    with FakeFlickr(catalog, api_key=KEY, api_secret=SECRET, cap=20) as fake:
        download_photos(load_cities("Paris"), tmp_path, 3, endpoint=fake.endpoint, **FAST)
        # a column a user added survives a resume; the rows are those of the first run plus new ones
        lines = (tmp_path / "manifest.csv").read_text().splitlines()
        lines = [lines[0] + ",note"] + [line + ",mine" for line in lines[1:]]
        (tmp_path / "manifest.csv").write_text("\n".join(lines) + "\n")
        download_photos(load_cities("Paris"), tmp_path, 5, endpoint=fake.endpoint, **FAST)
        with (tmp_path / "manifest.csv").open(newline="") as fh:
            rows = list(csv.DictReader(fh))
        assert len(rows) == 5 and [r["note"] for r in rows].count("mine") == 3
        (tmp_path / "manifest.csv").write_text("photo_id,city,path\n1,Paris,images/Paris/1.jpg\n")
        with pytest.raises(FeatkitError, match="lacks column.*move it away"):
            download_photos(load_cities("Paris"), tmp_path, 5, endpoint=fake.endpoint, **FAST)


def test_a_second_download_into_the_same_folder_is_refused(tmp_path):
    import fcntl

    with (tmp_path / ".download.lock").open("w") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(FeatkitError, match="use another --cache"):
            download_photos(load_cities("Paris"), tmp_path, 3, endpoint="http://127.0.0.1:9/", **FAST)


def test_bad_options_give_clean_errors(tmp_path):
    paris = load_cities("Paris")
    for kwargs, needle in [(dict(license="gpl"), "unknown licence"), (dict(query_template="{town}"), "{city}"),
                           (dict(endpoint="ftp://x"), "http(s) URL"), (dict(workers=0), "`workers`")]:
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


LEAK_SCRIPT = textwrap.dedent("""
    import sys
    from pathlib import Path
    from featkit.cities import load_cities
    from featkit.collect import download_photos
    print(download_photos(load_cities("Paris"), Path(sys.argv[2]), 8, api_key=sys.argv[3], api_secret=sys.argv[4],
                          endpoint=sys.argv[1], min_interval_s=0, backoff_s=0.01, timeout_s=0.5, max_retries=6,
                          per_page=10, result_cap=20, workers=1))
""")


def test_nothing_written_contains_the_key_or_secret(tmp_path, caplog):
    """A download through every kind of fault, and the failures, write and say nothing secret."""
    texts = []
    with FakeFlickr(make_catalog(["Paris"], 10, seed=4), api_key=KEY, api_secret=SECRET, cap=20, hang_s=1.0) as fake:
        fake.fail_next("api", "429", "500", "reset", "hang", "malformed-json", "stat-fail-105")
        fake.fail_next("image", "503", "reset", "truncated", "html")
        with (tmp_path / "child.log").open("w") as log:  # stdout and stderr, library warnings included
            subprocess.run([sys.executable, "-c", LEAK_SCRIPT, fake.endpoint, str(tmp_path / "cache"), KEY, SECRET],
                           stdout=log, stderr=subprocess.STDOUT, cwd=REPO, check=True, timeout=120,
                           env=dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), str(REPO / "tests")])))
        fake.fail_next("api", *["503"] * 2)
        for kwargs in (dict(max_retries=1), dict(api_secret="wrong" + SECRET), dict(api_key="wrong" + KEY)):
            with pytest.raises(FeatkitError) as e:
                download_photos(load_cities("Paris"), tmp_path / "failed", 3, endpoint=fake.endpoint,
                                **dict(FAST, **kwargs))
            texts.append(str(e.value))
        download_photos(load_cities("Paris"), tmp_path / "ok", 4, endpoint=fake.endpoint, **FAST)
    child_log = (tmp_path / "child.log").read_text()
    assert "retrying" in child_log and "downloaded 8 new images" in child_log, child_log
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert any(p.name == "manifest.csv" for p in files) and any(p.name == "child.log" for p in files)
    assert leaks(tmp_path, [*texts, *LOGS, caplog.text]) == []
    assert LOGS, "the downloader logged nothing to check"
    # The check can fail: a planted key is found.
    (tmp_path / "planted").mkdir()
    (tmp_path / "planted" / "x.txt").write_text(f"key={KEY}")
    assert leaks(tmp_path / "planted") and leaks(tmp_path, [f"secret {SECRET}"])
    (tmp_path / "planted" / "x.txt").unlink()
