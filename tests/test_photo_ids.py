"""Photo ids cannot collide: the escape of names that are not UTF-8 is injective."""

from __future__ import annotations

import os
import shutil

import pytest
from typer.testing import CliRunner

from conftest import FAST, make_photos
from featkit.cache.names import cache_file
from featkit.cache.store import FeatureStore
from featkit.cli import app
from featkit.manifest import photo_id_text


def test_the_probes_two_names_get_two_ids():
    raw = b"Paris/bad\xff.jpg"           # a byte that is not UTF-8
    literal = b"Paris/bad\\xff.jpg"      # a file literally named bad\xff.jpg
    assert photo_id_text(raw) != photo_id_text(literal)
    assert photo_id_text(raw) == "Paris/bad\\xff.jpg"  # as before: caches built earlier keep their ids
    assert photo_id_text("Paris/plain.jpg") == "Paris/plain.jpg"


@pytest.mark.parametrize("names", [
    [b"a\\b", b"a\\\\b", b"a\\\\\\b"],
    [b"\xff", b"\\xff", b"\\\\xff", b"\\\xff"],
    [b"x\xc3", b"x\\xc3", "x\u00e9".encode(), b"x\xc3\xa9\\"],
])
def test_ids_are_distinct_for_every_mix_of_backslashes_and_bad_bytes(names):
    ids = [photo_id_text(n) for n in names]
    assert len(set(ids)) == len(ids), ids
    for i in ids:
        i.encode("utf-8")  # valid UTF-8 text, as HDF5 and terminals need


@pytest.mark.skipif(os.name != "posix", reason="file names of arbitrary bytes are a POSIX thing")
def test_extract_stores_both_files_and_the_cache_verifies(tmp_path):
    photos = make_photos(tmp_path / "photos", n=8)
    src = photos / "Paris" / "000.jpg"
    folder = os.fsencode(photos / "Paris")
    shutil.copy(src, os.path.join(folder, b"bad\xff.jpg"))
    shutil.copy(photos / "Paris" / "001.jpg", os.path.join(folder, b"bad\\xff.jpg"))
    cache = tmp_path / "cache"
    r = CliRunner().invoke(app, ["extract", str(photos), "--cache", str(cache), *FAST, "--test-size", "2", "--val-size", "2"])
    assert r.exit_code == 0, r.output
    assert "26 extracted" in r.output, r.output
    with FeatureStore.open(cache_file(cache)) as s:
        ids = s.column("photo_id").tolist()
        assert len(ids) == len(set(ids)) == 26
        assert s.verify().ok
    r = CliRunner().invoke(app, ["extract", str(photos), "--cache", str(cache), *FAST, "--test-size", "2", "--val-size", "2"])
    assert r.exit_code == 0 and "0 extracted" in r.output and "26 already cached" in r.output, r.output
