"""`featkit demo` (generated photos, offline) and `featkit download` through the CLI against the loopback Flickr endpoint."""

from __future__ import annotations

import csv
import json

from fakeflickr import FakeFlickr, make_catalog
from featkit.cli import app
from featkit.heads import HEAD_NAMES


def test_demo_runs_the_whole_job_offline(runner, tmp_path):
    r = runner.invoke(app, ["demo", "--cache", str(tmp_path / "cache"), "--reports", str(tmp_path / "reports"),
                            "--image-size", "32", "--per-city", "16", "--cities", "Paris,Tokyo,London", "--no-progress"])
    assert r.exit_code == 0, r.output
    assert "GENERATED photos" in r.output and "reports/demo/compare.html" in r.output
    data = json.loads((tmp_path / "reports" / "demo" / "compare.json").read_text())
    assert data["cities"] == ["London", "Paris", "Tokyo"]
    assert set(data["heads"]) == set(HEAD_NAMES)
    assert all(h["accuracy"] > 0.5 for h in data["heads"].values())  # chance is 1/3
    photos = sorted((tmp_path / "cache" / "demo" / "photos").rglob("*.jpg"))
    assert len(photos) == 48 and {p.parent.name for p in photos} == {"London", "Paris", "Tokyo"}
    assert sum(data["n_test"].values()) > 0


def test_download_command_against_loopback_flickr(runner, tmp_path, monkeypatch):
    key, secret = "k3y-for-cli-test", "s3cret-for-cli-test"
    monkeypatch.setenv("FLICKR_API_KEY", key)
    monkeypatch.setenv("FLICKR_API_SECRET", secret)
    with FakeFlickr(make_catalog(["London", "Paris"], 12), api_key=key, api_secret=secret) as fake:
        r = runner.invoke(app, ["download", "--cities", "London,Paris", "--per-city", "10", "--cache", str(tmp_path / "c"),
                                "--endpoint", fake.endpoint, "--min-interval", "0", "--no-progress"])
    assert r.exit_code == 0, r.output
    rows = list(csv.DictReader(open(tmp_path / "c" / "manifest.csv")))
    assert sorted({r["city"] for r in rows}) == ["London", "Paris"] and len(rows) == 20
    on_disk = sorted(p.relative_to(tmp_path / "c").as_posix() for p in (tmp_path / "c" / "images").rglob("*.jpg"))
    assert on_disk == sorted(r["path"] for r in rows)
    assert key not in r.output and secret not in r.output
    assert secret not in (tmp_path / "c" / "manifest.csv").read_text()
    # and the spine reads the manifest straight away
    r = runner.invoke(app, ["extract", str(tmp_path / "c" / "manifest.csv"), "--cache", str(tmp_path / "c"),
                            "--weights", "random", "--image-size", "32", "--no-progress", "--workers", "0"])
    assert r.exit_code == 0 and "20 extracted, 0 skipped" in r.output, r.output


def test_download_without_key_says_how_to_get_one(runner, monkeypatch, tmp_path):
    monkeypatch.delenv("FLICKR_API_KEY", raising=False)
    monkeypatch.delenv("FLICKR_API_SECRET", raising=False)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path))
    monkeypatch.setenv("HOME", str(tmp_path))
    r = runner.invoke(app, ["download", "--cache", str(tmp_path / "c")])
    assert r.exit_code != 0
    assert r.output.count("error: ") == 1 and "FLICKR_API_KEY" in r.output and "flickr.com" in r.output
