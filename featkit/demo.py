"""``featkit demo``: the whole job on a fresh machine with no key and no network.

A Flickr-compatible endpoint on 127.0.0.1 (:mod:`featkit.fakeflickr`) serves a
small set of *generated* photos (:mod:`featkit.photogen`; no real photos ship
with featkit); the real ``flickrapi`` client downloads them as ``featkit
download`` would, then the spine runs as usual: extract, fit all heads, compare.
"""

from __future__ import annotations

from pathlib import Path

from featkit.backbones import load_backbone
from featkit.cities import load_cities
from featkit.collect import download_photos
from featkit.extract import extract_features
from featkit.fakeflickr import FakeFlickr, make_catalog
from featkit.manifest import scan_photos
from featkit.pipeline import CACHE_FILE, compare_heads, fit_heads

DEMO_CITIES = "Paris,Tokyo,London,New York"
_DEMO_KEY = "demo-key-not-secret"


def run_demo(
    cache_dir: str | Path,
    reports_dir: str | Path,
    *,
    cities: str = DEMO_CITIES,
    per_city: int = 40,
    weights: str | None = "random",
    image_size: int = 224,
    device: str = "auto",
    seed: int = 0,
    progress: bool = True,
    log=print,
) -> tuple[dict, dict[str, Path]]:
    """Serve generated photos locally, download them through flickrapi, extract, fit all heads, compare."""
    city_list = load_cities(cities)
    cache_dir, reports_dir = Path(cache_dir), Path(reports_dir)
    catalog = make_catalog([c.name for c in city_list], per_city, seed=seed, centres={c.name: (c.lat, c.lon) for c in city_list})
    with FakeFlickr(catalog, api_key=_DEMO_KEY, api_secret=_DEMO_KEY) as fake:
        log(f"demo: serving {len(catalog)} generated photos of {len(city_list)} cities at {fake.endpoint}")
        summary = download_photos(
            city_list, cache_dir, per_city, api_key=_DEMO_KEY, api_secret=_DEMO_KEY, endpoint=fake.endpoint,
            min_interval_s=0.0, progress=progress, log=log,
        )
    log(f"demo: {summary}")
    net, spec = load_backbone(weights, image_size=image_size, seed=seed)
    s = extract_features(
        scan_photos(cache_dir / "manifest.csv"), net, spec, cache_dir / CACHE_FILE, device=device, seed=seed, progress=progress,
    )
    log(f"demo: {s.line()}")
    fit_heads(cache_dir, "all", seed=seed, device=device, mlp_params={"max_iter": 60}, log=lambda m: log(f"demo: {m}"))
    return compare_heads(cache_dir, reports_dir)
