"""``featkit demo``: the whole job on a fresh machine with no key, no network and no real photos.

Generated photos (:mod:`featkit.photogen`; no real photos ship with featkit)
are written into ``CACHE/photos/<city>/``, then the spine runs as usual:
extract, fit all heads, compare. (``featkit download`` is covered by its own
tests against a loopback Flickr endpoint.)
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from featkit import api
from featkit.backbone_spec import RANDOM_SOURCE, check_vgg16_size
from featkit.cities import load_cities
from featkit.comparison import Comparison
from featkit.devices import resolve_device
from featkit.errors import FeatkitError
from featkit.heads import MLPHead, head_name
from featkit.options import BACKBONE, DEMO, EXTRACT
from featkit.photogen import write_photos
from featkit.validate import check_int, check_seed, ensure_writable_dir

DEMO_MIN_PER_CITY = 3  # one photo each for train, val and test (a bound, not a default)


def run_demo(
    cache_dir: str | Path,
    reports_dir: str | Path,
    *,
    cities: str = DEMO.cities,
    per_city: int = DEMO.per_city,
    weights: str | None = DEMO.weights,
    image_size: int | tuple[int, int] | str | None = BACKBONE.image_size,
    device: str = EXTRACT.device,
    seed: int = DEMO.seed,
    max_iter: int = DEMO.max_iter,
    progress: bool = EXTRACT.progress,
    log: Callable[[str], None] = print,
) -> tuple[Comparison, dict[str, Path]]:
    """Write generated photos of ``cities``, extract, fit all heads, compare; returns ``(results, paths)``.
    ``seed`` is every seed of the run (the photos, the random weights, the split, the training): a demo is
    one fresh cache. ``max_iter``: the MLP's most epochs. Every argument is checked before the first photo is written."""
    city_list = load_cities(cities)
    check_int("per_city", per_city, low=DEMO_MIN_PER_CITY, why=" (one photo each for train, val and test)")
    check_vgg16_size(image_size)
    resolve_device(device)
    check_seed(seed)
    check_int("max_iter", max_iter, low=1)
    if weights not in (None, RANDOM_SOURCE) and not Path(weights).is_file():
        raise FeatkitError(f"weights file {weights} does not exist; give a state_dict file for vgg16().features or vgg16(), or `weights` random", param="weights")
    cache_dir = Path(ensure_writable_dir(cache_dir, "cache_dir"))
    ensure_writable_dir(reports_dir, "reports_dir")
    photos = write_photos(cache_dir / "photos", [c.name for c in city_list], per_city, seed=seed)
    log(f"demo: {per_city} generated photos per city of {', '.join(c.name for c in city_list)} in {photos}")
    s = api.extract(photos, cache_dir, weights=weights, image_size=image_size, device=device, split_seed=seed, weights_seed=seed, progress=progress)
    log(f"demo: {s.line()}")
    api.fit(cache_dir, "all", seed=seed, device=device, params={head_name(MLPHead): {"max_iter": max_iter}}, progress=progress, log=lambda m: log(f"demo: {m}"))
    return api.compare(cache_dir, reports_dir)
