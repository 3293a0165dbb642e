"""The numbers a reader asks for (calibration, distances, confused pairs, leaks) and compare.html."""

from __future__ import annotations

import base64
import io
import json
import re
import shutil
import subprocess

import numpy as np
import pytest
from PIL import Image
from sklearn.metrics import balanced_accuracy_score

import featkit
from conftest import LOGREG, MLP, make_photos
from featkit.leaks import SplitPhoto, split_leaks
from featkit.cities import EARTH_RADIUS_KM, great_circle_km
from featkit.metrics import balanced_accuracy, calibration, confused_pairs, evaluate_predictions, geographic_error
from featkit.report import md, render_html, render_markdown, write_report

QUARTER_EARTH_KM = np.pi / 2 * EARTH_RADIUS_KM  # (0, 0) to (0, 90): a quarter of a great circle


# --------------------------------------------------------------------------- calibration


def test_ece_of_a_head_that_says_0_9_and_is_right_half_the_time_is_0_4():
    cal = calibration(np.full(1000, 0.9), np.arange(1000) % 2 == 0)
    assert cal["ece"] == pytest.approx(0.4)
    assert len(cal["bins"]) == 1 and cal["bins"][0]["n"] == 1000 and cal["bins"][0]["accuracy"] == pytest.approx(0.5)


def test_a_perfectly_calibrated_toy_scores_near_zero_and_an_overconfident_one_does_not():
    rng = np.random.default_rng(0)
    conf = rng.uniform(0.2, 1.0, 5000)
    calibrated = rng.uniform(size=conf.size) < conf  # right with exactly the stated probability
    good = calibration(conf, calibrated)
    assert good["ece"] < 0.03 and good["n_bins"] == 15
    assert good["ece_ci"][0] <= 0.03
    overconfident = rng.uniform(size=conf.size) < conf - 0.15  # right 15 points less often than it says
    bad = calibration(conf, overconfident)
    assert bad["ece"] == pytest.approx(0.15, abs=0.03) and bad["ece_ci"][0] > good["ece_ci"][1]
    # reliability bins: counts add up, each bin's mean confidence lies inside it
    assert sum(b["n"] for b in good["bins"]) == 5000
    assert all(b["lo"] <= b["confidence"] <= b["hi"] for b in good["bins"])


def test_balanced_accuracy_matches_scikit_learn_also_vectorised():
    rng = np.random.default_rng(1)
    t = rng.integers(0, 5, (7, 40))
    t[0] = np.where(t[0] == 3, 0, t[0])  # a resample that lacks a class
    p = np.where(rng.uniform(size=t.shape) < 0.5, t, rng.integers(0, 5, t.shape))
    got = balanced_accuracy(t, p, 5)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        want = [balanced_accuracy_score(a, b) for a, b in zip(t, p)]
    assert np.allclose(got, want)
    assert balanced_accuracy(t[1], p[1], 5) == pytest.approx(want[1])


# --------------------------------------------------------------------------- distances


def test_great_circle_distances_with_known_answers():
    assert great_circle_km(0, 0, 0, 90) == pytest.approx(QUARTER_EARTH_KM)
    assert great_circle_km(0, 0, 0, 1) == pytest.approx(111.195, abs=0.01)
    assert great_circle_km(48.8566, 2.3522, 51.5074, -0.1278) == pytest.approx(343.5, abs=1.0)  # Paris-London


def test_geographic_error_of_two_cities_a_known_distance_apart():
    coords = np.array([[0.0, 0.0], [0.0, 90.0]])
    true = np.array([0, 0, 1, 1])
    pred = np.array([0, 1, 1, 1])  # one miss of a quarter of the Earth
    g = geographic_error(true, pred, coords)
    assert g["mean_km"] == pytest.approx(QUARTER_EARTH_KM / 4)
    assert g["median_km"] == 0.0
    assert g["within_500_km"] == 0.75 and g["within_2500_km"] == 0.75
    assert g["distances_km"] == [0.0, round(QUARTER_EARTH_KM, 1), 0.0, 0.0]


def test_confused_pairs_count_both_directions():
    cm = [[5, 3, 0], [1, 6, 0], [0, 4, 2]]
    pairs = confused_pairs(cm, ["A", "B", "C"])
    assert pairs[0] == {"a": "A", "b": "B", "total": 4, "a_as_b": 3, "a_as_b_share": 3 / 8, "b_as_a": 1, "b_as_a_share": 1 / 7}
    assert pairs[1]["a"] == "B" and pairs[1]["b"] == "C" and pairs[1]["b_as_a"] == 4
    assert len(pairs) == 2  # A and C are never confused


# --------------------------------------------------------------------------- leaks


def _photo(tmp_path, name, colour, seed):
    rng = np.random.default_rng(seed)
    img = np.clip(np.array(colour) + rng.normal(0, 60, (48, 64, 3)), 0, 255).astype(np.uint8)
    img[:, :32] //= 2  # structure, so the difference hash has bits to set
    path = tmp_path / f"{name}.jpg"
    Image.fromarray(img).save(path, quality=92)
    return str(path)


def test_leaks_name_shared_owners_and_near_duplicates_and_a_clean_split_has_none(tmp_path):
    a = _photo(tmp_path, "a", (200, 80, 80), 0)
    b = _photo(tmp_path, "b", (80, 200, 80), 1)
    c = _photo(tmp_path, "c", (80, 80, 200), 2)
    Image.open(a).resize((60, 45)).save(tmp_path / "a_small.jpg", quality=80)  # the same scene, re-encoded smaller
    clean = [SplitPhoto("1", "X", "train", a, "alice"), SplitPhoto("2", "Y", "test", b, "bob"), SplitPhoto("3", "X", "val", c, "carol")]
    none = split_leaks(clean, hash_cache=tmp_path / "h.json")
    assert none["test_photos_with_shared_owner"] == 0 and none["near_duplicate_pairs"] == 0 and none["n_unhashed"] == 0
    leaky = clean + [SplitPhoto("4", "X", "test", str(tmp_path / "a_small.jpg"), "alice"), SplitPhoto("5", "X", "test", str(tmp_path / "gone.jpg"), "dave")]
    found = split_leaks(leaky, hash_cache=tmp_path / "h.json")
    assert found["test_photos_with_shared_owner"] == 1 and found["owners"][0]["owner"] == "alice"
    assert found["near_duplicate_pairs"] == 1 and found["near_duplicates"][0]["train"] == a
    assert found["n_unhashed"] == 1  # the missing file is counted, not fatal
    assert json.loads((tmp_path / "h.json").read_text())  # hashes kept for the next run


# --------------------------------------------------------------------------- rendering


HOSTILE = "<script>alert(1)</script> | [x](http://evil.test) $a$"


def _results(tmp_path, cities=("Paris", "Tokyo", HOSTILE)):
    """A results dict like evaluate_heads makes, with real thumbnails to embed."""
    cities = list(cities)
    rng = np.random.default_rng(0)
    y = np.repeat(cities, 6)
    proba = rng.dirichlet(np.ones(len(cities)), len(y))
    proba[np.arange(0, len(y), 2), np.repeat(np.arange(len(cities)), 6)[::2]] += 2  # half of them right
    proba /= proba.sum(axis=1, keepdims=True)
    head = evaluate_predictions(cities, y, proba, np.array(cities))
    head["geo"] = geographic_error(np.repeat(np.arange(len(cities)), 6), np.asarray(head["predicted"]), np.array([[48.8, 2.3], [35.7, 139.7], [0.0, 0.0]]))
    photos = []
    for i, c in enumerate(y):
        path = tmp_path / f"p{i}.jpg"
        Image.fromarray(rng.integers(0, 255, (300, 400, 3), dtype=np.uint8)).save(path)
        photos.append({"photo_id": str(i), "city": str(c), "path": str(path), "owner": ""})
    leaks = split_leaks([SplitPhoto(p["photo_id"], p["city"], "test", p["path"], "") for p in photos])
    return {
        "cities": cities, "heads": {MLP: {**head, "val_score": 0.5, "fit_seconds": 1.0, "chosen": {"alpha": 0.1}}},
        "n_test": {c: 6 for c in cities}, "test_photos": photos, "leaks": leaks,
        "geo": {"source": "a test", "missing": [], "coords": {}}, "backbone": "vgg16 <b>test</b>",
        "ranking": {"ranking": [MLP], "pairs": {}, "verdict": f"{MLP} is the only head."},
    }


def _data_uris(html: str) -> list[bytes]:
    return [base64.b64decode(m) for m in re.findall(r'src="data:image/(?:png|jpeg);base64,([A-Za-z0-9+/=]+)"', html)]


def _n_thumbs(results, k=4):
    m = results["heads"][MLP]
    per = {}
    for p, ok in zip(results["test_photos"], m["correct"]):
        per.setdefault(p["city"], [0, 0])[0 if ok else 1] += 1
    return sum(min(k, r) + min(k, w) for r, w in per.values())


def test_html_is_self_contained_escaped_and_every_image_decodes(tmp_path):
    results = _results(tmp_path)
    html = render_html(results)
    assert "<script" not in html.lower()  # the hostile city name is text, not a tag
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    assert not re.search(r'(src|href)="(?!data:)', html)  # nothing fetched from anywhere
    assert "Content-Security-Policy" in html and "default-src 'none'" in html
    images = _data_uris(html)
    # accuracy bars, reliability, distances, one confusion matrix, the thumbnails
    n_thumbs = _n_thumbs(results)
    assert n_thumbs >= 12 and len(images) == 4 + n_thumbs
    for data in images:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            assert max(im.size) <= 1600
    thumbs = [d for d in images if d[:3] == b"\xff\xd8\xff"]
    assert len(thumbs) == n_thumbs and all(max(Image.open(io.BytesIO(t)).size) <= 128 for t in thumbs)
    assert "said " in html and "right</div>" in html


def test_markdown_escapes_outside_text(tmp_path):
    text = render_markdown(_results(tmp_path))
    assert "<script>" not in text and not re.search(r"(?<!\\)\]\(http", text) and r"\[x\](http" in text
    row = next(line for line in text.splitlines() if "alert" in line and line.startswith("| ") and "n test" not in line)
    assert len(re.findall(r"(?<!\\)\|", row)) == len(re.findall(r"(?<!\\)\|", text.splitlines()[text.splitlines().index(row) - 1]))
    assert md("a|b<c>[d]") == r"a\|b\<c\>\[d\]"


def test_report_without_coordinates_says_so(tmp_path):
    results = _results(tmp_path)
    results["geo"] = {"source": "featkit's default cities", "missing": ["Atlantis"], "coords": {}}
    del results["heads"][MLP]["geo"]
    paths = write_report(results, tmp_path / "r")
    assert "No distances: no coordinates for Atlantis" in paths["md"].read_text()
    assert "No distances: no coordinates for Atlantis" in paths["html"].read_text()
    assert paths[f"png_{MLP}"].name == f"confusion_{MLP}.png" and paths[f"png_{MLP}"].exists()


def test_compare_writes_html_with_distances_galleries_and_a_clean_split_check(tmp_path):
    photos = make_photos(tmp_path / "photos", cities=("Paris", "Tokyo", "Venice"), n=10)
    cache = tmp_path / "cache"
    featkit.extract(photos, cache, weights="random", image_size=32, batch_size=8, workers=0, progress=False, test_size=3, val_size=2)
    featkit.fit(cache, head=LOGREG, progress=False, log=lambda m: None)
    results, paths = featkit.compare(cache, tmp_path / "reports")
    head = results["heads"][LOGREG]
    assert head["geo"]["n"] == 9 and results["geo"]["source"] == "featkit's default cities"
    assert results["leaks"]["near_duplicate_pairs"] == 0 and results["leaks"]["n_unhashed"] == 0
    html = paths["html"].read_text()
    assert "How far off" in html and f"Photos right and wrong ({LOGREG})" in html and len(_data_uris(html)) >= 9 + 4
    # a cities.toml beside the city folders wins over the defaults (here: Tokyo moved to the equator)
    (photos / "cities.toml").write_text(
        '[[city]]\nname = "Paris"\nlat = 0.0\nlon = 0.0\n[[city]]\nname = "Tokyo"\nlat = 0.0\nlon = 90.0\n[[city]]\nname = "Venice"\nlat = 0.0\nlon = 1.0\n'
    )
    results, _ = featkit.compare(cache, tmp_path / "reports", leaks=False)
    assert results["geo"]["source"].endswith("cities.toml") and results["leaks"] is None
    # a cities file without one of the cities: the figure is skipped and the city named
    (tmp_path / "two.toml").write_text('[[city]]\nname = "Paris"\nlat = 1.0\nlon = 2.0\n[[city]]\nname = "Tokyo"\nlat = 3.0\nlon = 4.0\n')
    results, paths = featkit.compare(cache, tmp_path / "reports", cities=str(tmp_path / "two.toml"), leaks=False)
    assert results["geo"]["missing"] == ["Venice"] and "geo" not in results["heads"][LOGREG]


# --------------------------------------------------------------------------- headless Chromium

CHROMIUM = next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)), None)

# Appended to a copy of the report: lists every resource the page requested, every CSP violation,
# and every image that failed to decode, into the DOM that --dump-dom prints.
PROBE = """<script nonce="probe">
const violations = [];
document.addEventListener("securitypolicyviolation", e => violations.push(e.blockedURI + " " + e.violatedDirective));
window.addEventListener("load", () => setTimeout(() => {
  const imgs = Array.from(document.images);
  const out = {images: imgs.length, broken: imgs.filter(i => !(i.complete && i.naturalWidth > 0)).map(i => i.alt),
               requests: performance.getEntriesByType("resource").map(r => r.name), violations: violations,
               text: document.body.innerText.includes("<script>alert(1)<\\/script>")};
  const pre = document.createElement("pre"); pre.id = "probe"; pre.textContent = JSON.stringify(out);
  document.body.appendChild(pre);
}, 200));
</script>"""


def _chromium(*args: str, timeout: int = 90) -> subprocess.CompletedProcess:
    base = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-extensions",
            "--host-resolver-rules=MAP * ~NOTFOUND", "--virtual-time-budget=5000"]
    return subprocess.run(base + list(args), capture_output=True, text=True, timeout=timeout)


@pytest.mark.skipif(CHROMIUM is None, reason="headless Chromium is not installed (Debian: apt-get install chromium)")
def test_html_renders_offline_in_headless_chromium_with_every_image_decoded(tmp_path):
    page = tmp_path / "compare.html"
    results = _results(tmp_path)
    page.write_text(render_html(results), encoding="utf-8")
    shot = tmp_path / "shot.png"
    r = _chromium("--hide-scrollbars", "--window-size=1280,2400", f"--screenshot={shot}", page.as_uri())
    assert shot.exists(), r.stderr[-2000:]
    with Image.open(shot) as im:
        assert im.size == (1280, 2400)
        assert len(set(np.asarray(im.convert("L").resize((64, 120))).ravel().tolist())) > 20  # a page was drawn, not a blank
    # the probe copy: the page's own policy stays, with only the probe's nonce allowed to run
    html = page.read_text(encoding="utf-8")
    probed = html.replace("default-src 'none';", "default-src 'none'; script-src 'nonce-probe';", 1).replace("</body>", PROBE + "</body>", 1)
    (tmp_path / "probe.html").write_text(probed, encoding="utf-8")
    r = _chromium("--dump-dom", (tmp_path / "probe.html").as_uri())
    found = re.search(r'<pre id="probe">(.*?)</pre>', r.stdout, re.S)
    assert found, r.stderr[-2000:]
    probe = json.loads(found.group(1).replace("&quot;", '"').replace("&lt;", "<").replace("&gt;", ">").replace("&amp;", "&"))
    assert probe["images"] == 4 + _n_thumbs(results) and probe["broken"] == []
    assert probe["requests"] == [] and probe["violations"] == []
    assert probe["text"] is True  # the hostile city name is shown as text
