"""Outside text (file names, place names, photo titles) never reaches a sink that would act on it: formula
cells are escaped in every CSV featkit writes, control characters in terminal output, CSV and Markdown."""

from __future__ import annotations

import csv
import json
import os

import pytest
from typer.testing import CliRunner

from conftest import FAST, fitted_cache, make_photos
from featkit.cli import app
from featkit.escape import csv_cell, csv_value, printable
from featkit.manifest import MANIFEST_COLUMNS, read_manifest, write_manifest
from featkit.report import md

FORMULA = "=cmd|' /C calc'!A0"
NAME_FORMULA = "=cmd|' -C calc'!A0"  # the same, spelt without a slash, as a file name
ESC = "\x1b]8;;evil.example\x1b\\x\x1b[2J"  # a hyperlink and a clear-screen sequence


@pytest.mark.parametrize("text", [FORMULA, "+1+1", "-2+3", "@SUM(A1)", "\tx", "\rx"])
def test_formula_cells_are_escaped_and_read_back(text):
    cell = csv_cell(text)
    assert cell.startswith("'") and "\t" not in cell and "\r" not in cell
    if text[0] in "=+-@":
        assert csv_value(cell) == text


def test_control_and_bidi_characters_are_escaped_for_terminals_and_markdown():
    for text in (ESC, "a\u202eb", "\x9b31m", "a\x00b\x7f"):
        for out in (printable(text), csv_cell(text), md(text)):
            assert not any(ord(c) < 32 or 0x7f <= ord(c) <= 0x9f or c in "\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069" for c in out), repr(out)
    assert printable("Zürich, 東京") == "Zürich, 東京"  # letters of every script stay


def test_the_download_manifest_escapes_titles_and_reads_them_back(tmp_path):
    row = {c: "" for c in MANIFEST_COLUMNS} | {"photo_id": "1", "city": "Paris", "path": "images/Paris/1.jpg", "owner": FORMULA}
    if "title" in MANIFEST_COLUMNS:
        row["title"] = FORMULA
    p = tmp_path / "manifest.csv"
    write_manifest(p, [row])
    raw = list(csv.DictReader(p.open()))
    assert raw[0]["owner"] == "'" + FORMULA
    _, rows = read_manifest(p)
    assert rows[0]["owner"] == FORMULA


@pytest.mark.skipif(os.name != "posix", reason="any-byte file names are a POSIX thing")
def test_hostile_file_names_are_inert_in_failed_csv_predictions_csv_and_the_terminal(tmp_path):
    photos, cache = fitted_cache(tmp_path, "--test-size", "3", "--val-size", "2", n=10)
    bad = photos / "Paris" / f"{NAME_FORMULA}{ESC}.jpg"
    bad.write_bytes(b"not a jpeg")
    runner = CliRunner()
    r = runner.invoke(app, ["extract", str(photos), "--cache", str(cache), *FAST, "--test-size", "3", "--val-size", "2"])
    assert r.exit_code == 0, r.output
    assert "\x1b" not in r.output
    failed = list(csv.DictReader((cache / "failed.csv").open(encoding="utf-8")))
    assert len(failed) == 1
    for cell in failed[0].values():
        assert not cell.startswith(("=", "+", "-", "@")) and "\x1b" not in cell, failed
    good = photos / "Paris" / f"{NAME_FORMULA}.jpg"
    (photos / "Paris" / "000.jpg").rename(good)
    out_csv = tmp_path / "pred.csv"
    r = runner.invoke(app, ["predict", str(good), str(bad), "--cache", str(cache), "--workers", "0", "--csv", str(out_csv)])
    assert r.exit_code == 0, r.output
    assert "\x1b" not in r.output
    rows = list(csv.reader(out_csv.open(encoding="utf-8")))[1:]
    assert rows and all(not cell.startswith(("=", "+", "@")) and "\x1b" not in cell for row in rows for cell in row), rows
    r = runner.invoke(app, ["predict", str(bad), str(good), "--cache", str(cache), "--workers", "0", "--json"])
    lines = [line for line in r.output.splitlines() if line.startswith("{")]
    assert len(lines) == 2 and "\x1b" not in r.output
    assert json.loads(lines[0])["source"].endswith(ESC + ".jpg")  # the JSON still carries the name exactly
