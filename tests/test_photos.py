"""Hostile photos: each one is either extracted or recorded in failed.csv with its reason, never dropped
silently, never stored twice, never a traceback. One zoo folder is extracted once (a module fixture);
each case then checks its own photo."""

from __future__ import annotations

import csv
import os
import re
import struct
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from conftest import FAST, make_photos
from featkit.cli import app
from featkit.errors import FeatkitError, PhotoSourceWarning
from featkit.images import UnreadableImage, check_image_file, decoded_size, dhash, load_image, memory_image_tensor
from featkit.manifest import read_manifest, scan_photos, walk_images
from featkit.splits import assign_splits
from featkit.cache.store import FeatureStore

SUMMARY = re.compile(r"(\d+) extracted, (\d+) skipped.*?; (\d+) already cached; cache holds (\d+) photos")


# --------------------------------------------------------------------------- making hostile files

def bomb_png(path: Path, width: int, height: int) -> Path:
    """A real 1-bit PNG of zeros, width x height: a few hundred KB on disk, width * height bytes once decoded."""
    row = b"\0" * (1 + (width + 7) // 8)  # filter byte + packed bits
    z = zlib.compressobj(9)
    idat = b"".join(z.compress(row * 1000) for _ in range(height // 1000)) + z.compress(row * (height % 1000)) + z.flush()

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b""))
    return path


def _rgb(seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 255, (40, 50, 3), dtype=np.uint8)


def make_zoo(tmp: Path) -> Path:
    root = make_photos(tmp / "zoo", n=12)
    rgb = _rgb()
    paris, tokyo, venice = root / "Paris", root / "Tokyo", root / "Venice"
    full = (paris / "000.jpg").read_bytes()
    (paris / "truncated.jpg").write_bytes(full[: len(full) // 2])
    (paris / "empty.jpg").write_bytes(b"")
    (paris / "text.jpg").write_text("this is not an image")
    Image.fromarray((np.random.default_rng(2).integers(0, 65535, (30, 30))).astype(np.uint16)).save(paris / "sixteen.png")
    Image.fromarray(rgb).convert("CMYK").save(paris / "cmyk.jpg")
    Image.fromarray(rgb).convert("RGBA").save(paris / "rgba.png")
    Image.fromarray(rgb).convert("P").save(paris / "palette.gif")
    frames = [Image.fromarray(np.roll(rgb, k, axis=1)).convert("P") for k in range(3)]
    frames[0].save(paris / "animated.gif", save_all=True, append_images=frames[1:], duration=100, loop=0)
    bomb_png(paris / "bomb.png", 30000, 30000)  # past twice the limit: Pillow itself refuses it
    bomb_png(paris / "bomb_warn.png", 15000, 15000)  # between the limit and twice it: Pillow only warns
    with open(os.fsencode(tokyo) + b"/\xff.jpg", "wb") as f:  # a name that is not UTF-8
        f.write(full)
    os.symlink("nowhere.jpg", tokyo / "dangling.jpg")
    os.symlink("loop_b.jpg", tokyo / "loop_a.jpg")
    os.symlink("loop_a.jpg", tokyo / "loop_b.jpg")
    outside = tmp / "outside"
    outside.mkdir()
    (outside / "real.jpg").write_bytes((tokyo / "000.jpg").read_bytes())
    os.symlink(outside / "real.jpg", tokyo / "linked.jpg")
    (tokyo / "sub").mkdir()
    (tokyo / "sub" / "x.jpg").write_bytes((tokyo / "001.jpg").read_bytes())
    os.symlink("..", tokyo / "sub" / "back")  # a folder link loop inside a city
    (venice / ".hidden.jpg").write_bytes((venice / "000.jpg").read_bytes())
    (venice / ".cache").mkdir()
    (venice / ".cache" / "y.jpg").write_bytes((venice / "001.jpg").read_bytes())
    (venice / "photo.JPG").write_bytes((venice / "002.jpg").read_bytes())
    (venice / "notes.txt").write_text("not a photo")
    os.symlink("../Paris/001.jpg", venice / "dup.jpg")  # the same file as a photo of another city
    os.mkfifo(venice / "fifo.jpg")  # reading it would block for ever
    (root / "..odd").mkdir()
    (root / "..odd" / "z.jpg").write_bytes(full)
    os.symlink("Paris", root / "Rome")  # a city folder that is another city's
    return root


STORED = "stored"
ABSENT = "absent"  # not a photo by the rule (hidden, not walked): in neither the cache nor failed.csv
# photo_id -> STORED, ABSENT, or a regex the recorded reason must match in full
ZOO = {
    "Paris/000.jpg": STORED,
    "Paris/truncated.jpg": r"cannot decode: .*",
    "Paris/empty.jpg": re.escape("empty file (0 bytes)"),
    "Paris/text.jpg": "not an image Pillow can identify",
    "Paris/sixteen.png": STORED,
    "Paris/cmyk.jpg": STORED,
    "Paris/rgba.png": STORED,
    "Paris/palette.gif": STORED,
    "Paris/animated.gif": STORED,
    "Paris/bomb.png": r"too many pixels: 900,000,000 > 200,000,000",
    "Paris/bomb_warn.png": r"too many pixels: 15000 x 15000 > 200,000,000",
    "Tokyo/\\xff.jpg": STORED,
    "Tokyo/dangling.jpg": re.escape("dangling link (to nowhere.jpg)"),
    "Tokyo/loop_a.jpg": "symlink loop",
    "Tokyo/loop_b.jpg": "symlink loop",
    "Tokyo/linked.jpg": STORED,
    "Tokyo/sub/x.jpg": STORED,
    "Tokyo/sub/back/sub/x.jpg": ABSENT,
    "Venice/.hidden.jpg": ABSENT,
    "Venice/.cache/y.jpg": ABSENT,
    "Venice/photo.JPG": STORED,
    "Venice/notes.txt": ABSENT,
    "Venice/dup.jpg": re.escape("same file as Paris/001.jpg (city Paris)"),
    "Venice/fifo.jpg": re.escape("not a regular file"),
    "..odd/z.jpg": ABSENT,
    "Rome/000.jpg": re.escape("same file as Paris/000.jpg (city Paris)"),
    "Rome/cmyk.jpg": re.escape("same file as Paris/cmyk.jpg (city Paris)"),
    "Rome/empty.jpg": re.escape("empty file (0 bytes)"),
    "Rome/bomb_warn.png": r"too many pixels: 15000 x 15000 > 200,000,000",
}


def _failed_csv(cache: Path) -> dict[str, dict]:
    path = cache / "failed.csv"
    if not path.exists():
        return {}
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len({r["photo_id"] for r in rows}), "failed.csv lists a photo twice"
    return {r["photo_id"]: r for r in rows}


def _stored(cache: Path) -> list[dict]:
    with FeatureStore.open(cache / "features.h5") as s:
        return [dict(zip(("photo_id", "city", "split", "path"), r)) for r in zip(*(s.column(k).tolist() for k in ("photo_id", "city", "split", "path")))]


def _extract(source: Path, cache: Path, *extra: str):
    result = CliRunner().invoke(app, ["extract", str(source), "--cache", str(cache), *FAST, *extra])
    assert "Traceback" not in result.output, result.output
    return result


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("photos")
    root = make_zoo(tmp)
    cache = tmp / "cache"
    result = _extract(root, cache)
    assert result.exit_code == 0, result.output
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        seen = [p.photo_id for p in scan_photos(root)]
    return {"root": root, "output": result.output, "stored": _stored(cache), "failed": _failed_csv(cache), "seen": seen}


@pytest.mark.parametrize("photo_id,expected", list(ZOO.items()), ids=list(ZOO))
def test_zoo_photo_is_extracted_or_recorded_with_its_reason(zoo, photo_id, expected):
    stored = {r["photo_id"] for r in zoo["stored"]}
    if expected == STORED:
        assert photo_id in stored and photo_id not in zoo["failed"]
    elif expected == ABSENT:
        assert photo_id not in stored and photo_id not in zoo["failed"] and photo_id not in zoo["seen"]
    else:
        assert photo_id not in stored
        assert photo_id in zoo["failed"], f"{photo_id} neither stored nor in failed.csv"
        assert re.fullmatch(expected, zoo["failed"][photo_id]["reason"]), zoo["failed"][photo_id]["reason"]


def test_zoo_counts_add_up_and_nothing_is_stored_twice(zoo):
    m = SUMMARY.search(zoo["output"])
    assert m, zoo["output"]
    extracted, skipped, already, total = map(int, m.groups())
    ids = [r["photo_id"] for r in zoo["stored"]]
    assert len(ids) == len(set(ids)) == extracted == total and already == 0
    assert skipped == len(zoo["failed"])
    assert extracted + skipped == len(zoo["seen"]) == len(set(zoo["seen"]))
    assert set(ids) | set(zoo["failed"]) == set(zoo["seen"])
    real = [os.path.realpath(r["path"]) for r in zoo["stored"]]
    assert len(real) == len(set(real)), "one file stored under two photo ids"
    for r in zoo["stored"]:  # the label is the city folder the photo was listed in
        assert r["city"] == r["photo_id"].split("/")[0]
    assert {r["city"] for r in zoo["stored"]} == {"Paris", "Tokyo", "Venice"}


def test_zoo_non_utf8_name_is_stored_as_escaped_text(zoo):
    row = next(r for r in zoo["stored"] if r["photo_id"] == "Tokyo/\\xff.jpg")
    assert row["path"].endswith("Tokyo/\\xff.jpg")
    row["path"].encode("utf-8")  # valid text, no lone surrogate


def test_zoo_city_level_skips_are_announced(zoo):
    warning = [line for line in zoo["output"].splitlines() if line.startswith("warning: skipped in ")]
    assert len(warning) == 1, zoo["output"]
    assert "..odd/ (hidden: its name starts with '.')" in warning[0]
    assert "Tokyo/sub/back/ (a link to a folder already walked" in warning[0]
    assert ".hidden" not in warning[0]  # hidden entries inside a city are left out by the documented rule, quietly


def test_bom_crlf_manifest_with_missing_files_fills_test_and_val_from_readable_photos(tmp_path):
    """A manifest saved by Excel (BOM, CRLF) whose rows name 4 missing files, exactly the photos that
    would have taken Paris's test and val places: the quotas are filled from the readable ones."""
    root = make_photos(tmp_path / "photos", n=10)
    photos = scan_photos(root)
    first = assign_splits(photos, seed=0, test_size=2, val_size=2)
    gone = [p for p in photos if p.city == "Paris" and first[p.photo_id] != "train"]
    assert len(gone) == 4
    for p in gone:
        p.path.unlink()
    lines = ["photo_id,city,path"] + [f"{p.photo_id},{p.city},{p.path.relative_to(root)}" for p in photos]
    (root / "manifest.csv").write_bytes(("\ufeff" + "\r\n".join(lines) + "\r\n").encode("utf-8"))
    cache = tmp_path / "cache"
    r = _extract(root / "manifest.csv", cache, "--test-size", "2", "--val-size", "2")
    assert r.exit_code == 0, r.output
    assert "26 extracted, 4 skipped" in r.output
    failed = _failed_csv(cache)
    assert {pid: row["reason"] for pid, row in failed.items()} == {p.photo_id: "file not found" for p in gone}
    counts = {}
    for row in _stored(cache):
        counts[(row["city"], row["split"])] = counts.get((row["city"], row["split"]), 0) + 1
    for city in ("Paris", "Tokyo", "Venice"):
        assert counts[(city, "test")] == 2 and counts[(city, "val")] == 2, counts
    assert counts[("Paris", "train")] == 2


def test_read_manifest_tolerates_a_bom(tmp_path):
    p = tmp_path / "m.csv"
    p.write_bytes("\ufeffphoto_id,city,path\r\na,Paris,a.jpg\r\n".encode("utf-8"))
    columns, rows = read_manifest(p)
    assert columns == ["photo_id", "city", "path"] and rows == [{"photo_id": "a", "city": "Paris", "path": "a.jpg"}]


def test_too_few_readable_photos_names_them_and_failed_csv(tmp_path):
    root = make_photos(tmp_path / "photos", cities=("Paris", "Tokyo"), n=4)
    for i in range(3):
        (root / "Paris" / f"{i:03d}.jpg").write_bytes(b"")
    cache = tmp_path / "cache"
    r = _extract(root, cache, "--test-size", "1", "--val-size", "1")
    assert r.exit_code == 2
    assert re.search(r"error: city 'Paris' has 1 readable photos \(3 more cannot be read: see .*failed\.csv\).*--retry-failed", r.output), r.output
    assert len(_failed_csv(cache)) == 3


def test_a_fixed_file_is_retried_by_itself_and_retry_failed_retries_the_rest(tmp_path):
    root = make_photos(tmp_path / "photos", cities=("Paris", "Tokyo"), n=6)
    good = (root / "Paris" / "000.jpg").read_bytes()
    (root / "Paris" / "broken.jpg").write_bytes(good[: len(good) // 2])
    (root / "Tokyo" / "still_broken.jpg").write_text("not an image")
    (root / "Tokyo" / "gone.jpg").symlink_to(root / "nowhere.jpg")  # a link to nothing: fixed by making its file
    cache = tmp_path / "cache"
    assert "12 extracted, 3 skipped" in _extract(root, cache).output

    r = _extract(root, cache)  # nothing changed: recorded failures are not read again
    assert "0 extracted, 0 skipped" in r.output and "15 already cached" in r.output
    assert set(_failed_csv(cache)) == {"Paris/broken.jpg", "Tokyo/still_broken.jpg", "Tokyo/gone.jpg"}

    (root / "Paris" / "broken.jpg").write_bytes(good)  # fixed: its size and time change
    (root / "nowhere.jpg").write_bytes(good)  # the link now leads somewhere
    r = _extract(root, cache)  # tried again without being asked
    assert r.exit_code == 0, r.output
    assert "2 extracted, 0 skipped" in r.output and "2 failed before and tried again" in r.output, r.output
    assert set(_failed_csv(cache)) == {"Tokyo/still_broken.jpg"}
    assert {"Paris/broken.jpg", "Tokyo/gone.jpg"} <= {row["photo_id"] for row in _stored(cache)}

    r = _extract(root, cache, "--retry-failed")  # asked: the unchanged one is read again too (and fails again)
    assert "0 extracted, 1 skipped" in r.output and "1 failed before and tried again" in r.output, r.output
    assert set(_failed_csv(cache)) == {"Tokyo/still_broken.jpg"}  # listed once though recorded twice
    assert "14 photos" in r.output


# --------------------------------------------------------------------------- the pixel limit on every path

@pytest.fixture(scope="module")
def bombs(tmp_path_factory):
    d = tmp_path_factory.mktemp("bombs")
    return bomb_png(d / "warn.png", 15000, 15000), bomb_png(d / "error.png", 30000, 30000)


@pytest.mark.parametrize("which,reason", [(0, "too many pixels: 15000 x 15000 > 200,000,000"), (1, "too many pixels: 900,000,000 > 200,000,000")])
def test_pixel_limit_refused_before_decoding(bombs, which, reason):
    path = bombs[which]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # Pillow's own, below twice the limit
        for read in (lambda p: load_image(p, 32), check_image_file):
            with pytest.raises(UnreadableImage, match=f"^{re.escape(reason)}$"):
                read(path)
        data = path.read_bytes()  # the downloader's checks
        for read in (decoded_size, dhash):
            with pytest.raises(ValueError, match=f"^{re.escape(reason)}$"):
                read(data)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # Pillow's warning made an error by a filter is refused the same way
        with pytest.raises(UnreadableImage, match=r"^too many pixels: [\d,]+ > 200,000,000$"):
            load_image(path, 32)


def test_pixel_limit_on_in_memory_pictures(bombs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        lazy = Image.open(bombs[0])  # opened, not decoded
    with pytest.raises(UnreadableImage, match=r"^too many pixels: 15000 x 15000 > "):
        memory_image_tensor(lazy, 32)
    huge = np.broadcast_to(np.zeros(1, dtype=np.uint8), (15000, 15000))  # no memory behind it
    with pytest.raises(UnreadableImage, match=r"^too many pixels: 15000 x 15000 > "):
        memory_image_tensor(huge, 32)


# --------------------------------------------------------------------------- one rule for folders

def test_walk_is_safe_and_shared_with_predict(tmp_path):
    from featkit.prediction import _expand

    d = tmp_path / "new"
    (d / "a" / ".hidden").mkdir(parents=True)
    Image.fromarray(_rgb()).save(d / "a" / "p.jpg")
    Image.fromarray(_rgb()).save(d / "a" / ".hidden" / "q.jpg")
    Image.fromarray(_rgb()).save(d / ".r.jpg")
    os.symlink("..", d / "a" / "up")  # a loop
    files, left_out = walk_images(d)
    assert files == [d / "a" / "p.jpg"]
    assert [(p.name, why.split(" (")[0]) for p, why in left_out] == [("up", "a link to a folder already walked")]
    inputs = _expand([d])
    assert [(i.source, i.error is None) for i in inputs] == [(str(d / "a" / "p.jpg"), True), (str(d / "a" / "up"), False)]


def test_hidden_and_outside_entries_of_a_photo_folder_warn(tmp_path):
    root = make_photos(tmp_path / "photos", cities=("Paris", "Tokyo"), n=2)
    (root / ".git").mkdir()
    (root / "Empty").mkdir()
    Image.fromarray(_rgb()).save(root / "stray.jpg")
    with pytest.warns(PhotoSourceWarning) as caught:
        photos = scan_photos(root)
    message = str(caught[0].message)
    for part in (".git/ (hidden", "Empty/ (no image files)", "stray.jpg (an image outside any city folder)"):
        assert part in message
    assert len(photos) == 4


def test_a_source_of_one_readable_city_is_still_refused(tmp_path):
    root = make_photos(tmp_path / "photos", cities=("Paris",), n=2)
    with pytest.raises(FeatkitError, match="at least two cities"):
        scan_photos(root)
