"""Photo sources and the train / val / test split."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from featkit.errors import FeatkitError
from featkit.manifest import MANIFEST_COLUMNS, Photo, read_manifest, scan_photos, write_manifest
from featkit.splits import assign_splits


def _photos(n_per_city=40, owners=None):
    out = []
    for city in ("Paris", "Tokyo", "Venice"):
        for i in range(n_per_city):
            owner = f"{city[:2]}{i % owners}" if owners else ""
            out.append(Photo(f"{city}/{i}", city, Path(f"/x/{city}/{i}.jpg"), owner))
    return out


def test_split_is_deterministic_stratified_and_seeded():
    photos = _photos()
    a = assign_splits(photos, seed=1, test_size=5, val_size=0.1)
    assert a == assign_splits(list(reversed(photos)), seed=1, test_size=5, val_size=0.1)  # order-free
    assert a != assign_splits(photos, seed=2, test_size=5, val_size=0.1)
    per = Counter((p.city, a[p.photo_id]) for p in photos)
    for city in ("Paris", "Tokyo", "Venice"):
        assert per[(city, "test")] == 5 and per[(city, "val")] == 4 and per[(city, "train")] == 31


def test_owners_never_span_two_splits():
    photos = _photos(owners=8)
    photos.append(Photo("Tokyo/x", "Tokyo", Path("/x/t.jpg"), "Pa0"))  # one photographer in two cities
    splits = assign_splits(photos, seed=0, test_size=0.2, val_size=0.1)
    by_owner = {}
    for p in photos:
        by_owner.setdefault(p.owner, set()).add(splits[p.photo_id])
    assert all(len(s) == 1 for s in by_owner.values())
    assert {"train", "val", "test"} <= set(splits.values())


def test_recorded_splits_are_kept_when_photos_are_added():
    photos = _photos(20)
    first = assign_splits(photos, seed=0)
    more = photos + [Photo(f"Paris/new{i}", "Paris", Path("/x"), "") for i in range(10)]
    second = assign_splits(more, seed=0, fixed=first)
    assert all(second[k] == v for k, v in first.items())


def test_manifest_source(tmp_path):
    (tmp_path / "img").mkdir()
    m = tmp_path / "manifest.csv"
    m.write_text("photo_id,city,path,owner\n1,Paris,img/1.jpg,a\n2,Tokyo,/abs/2.jpg,b\n")
    photos = scan_photos(m)
    assert [p.photo_id for p in photos] == ["1", "2"]
    assert photos[0].path == tmp_path / "img" / "1.jpg" and photos[1].path == Path("/abs/2.jpg")
    assert photos[0].owner == "a"
    m.write_text("photo_id,city\n1,Paris\n")
    with pytest.raises(FeatkitError, match="lacks column"):
        scan_photos(m)
    m.write_text("photo_id,city,path\n1,Paris,a.jpg\n1,Tokyo,b.jpg\n")
    with pytest.raises(FeatkitError, match="appears twice"):
        scan_photos(m)


def test_one_reader_and_writer_for_the_manifest(tmp_path):
    m = tmp_path / "manifest.csv"
    rows = [{"photo_id": "7", "city": "Paris", "path": "images/Paris/7.jpg", "owner": "o", "sha256": "ab"},
            {"photo_id": "8", "city": "Tokyo", "path": "images/Tokyo/8.jpg", "note": "not a column"}]
    write_manifest(m, rows, MANIFEST_COLUMNS)
    columns, back = read_manifest(m, MANIFEST_COLUMNS)
    assert tuple(columns) == MANIFEST_COLUMNS and [r["photo_id"] for r in back] == ["7", "8"]
    assert back[0]["owner"] == "o" and back[1]["owner"] == "" and "note" not in back[1]
    assert not [p for p in tmp_path.iterdir() if p.name != "manifest.csv"]  # no temporary file left
    # extraction reads the downloader's manifest, extra columns and all
    assert [(p.photo_id, p.city, p.owner) for p in scan_photos(m)] == [("7", "Paris", "o"), ("8", "Tokyo", "")]
    m.write_text("photo_id,city,path\n1,Paris,a.jpg\n")
    assert read_manifest(m)[1] == [{"photo_id": "1", "city": "Paris", "path": "a.jpg"}]
    with pytest.raises(FeatkitError, match="lacks column.*owner.*move it away"):
        read_manifest(m, MANIFEST_COLUMNS, fix="move it away")
