"""Deterministic synthetic "street photos" for tests and ``featkit demo``.

Each city gets its own look (palette, stripe orientation and frequency, a
texture), and every image gets its own random skyline, phase, lighting and
noise, so no two images are near-duplicates under a difference hash while a
classifier on (even random-weight) CNN features can still tell cities apart.
"""

from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass

import numpy as np
from PIL import Image


@dataclass(frozen=True)
class CityStyle:
    """The per-city statistics a generated image is drawn from."""

    sky: tuple[int, int, int]
    palette: tuple[tuple[int, int, int], ...]
    angle_deg: float
    frequency: float  # stripe cycles per 100 px
    texture: str  # "noise", "checker" or "dots"


_STYLES: dict[str, CityStyle] = {
    "paris": CityStyle((170, 190, 215), ((200, 180, 140), (150, 130, 100), (90, 80, 70)), 0, 4, "noise"),
    "tokyo": CityStyle((60, 50, 90), ((230, 40, 90), (40, 200, 230), (250, 240, 60)), 90, 9, "checker"),
    "london": CityStyle((150, 150, 155), ((120, 40, 30), (60, 60, 70), (180, 170, 160)), 45, 6, "noise"),
    "bangkok": CityStyle((240, 200, 120), ((230, 150, 20), (200, 60, 40), (40, 120, 60)), 135, 3, "dots"),
    "new york": CityStyle((120, 170, 230), ((90, 90, 100), (200, 200, 210), (240, 200, 0)), 90, 14, "checker"),
    "amsterdam": CityStyle((190, 210, 230), ((110, 50, 30), (30, 70, 120), (240, 240, 230)), 0, 10, "dots"),
    "mumbai": CityStyle((250, 180, 150), ((220, 90, 40), (250, 220, 180), (80, 160, 150)), 30, 5, "noise"),
    "barcelona": CityStyle((90, 160, 250), ((230, 190, 120), (200, 80, 60), (50, 140, 200)), 60, 7, "dots"),
    "venice": CityStyle((200, 220, 240), ((210, 120, 90), (40, 110, 110), (240, 220, 170)), 0, 2, "noise"),
    "los angeles": CityStyle((250, 160, 90), ((240, 220, 160), (60, 160, 80), (120, 90, 140)), 150, 8, "checker"),
}


def city_style(city: str) -> CityStyle:
    """The style of a default city, or a deterministic one derived from the name."""
    style = _STYLES.get(city.lower())
    if style is not None:
        return style
    rng = np.random.default_rng(_seed_of("style", city.lower()))
    colour = lambda: tuple(int(v) for v in rng.integers(0, 256, 3))  # noqa: E731
    return CityStyle(
        sky=colour(),
        palette=(colour(), colour(), colour()),
        angle_deg=float(rng.integers(0, 12) * 15),
        frequency=float(rng.integers(2, 15)),
        texture=("noise", "checker", "dots")[int(rng.integers(0, 3))],
    )


def _seed_of(*parts: object) -> int:
    digest = hashlib.sha256("\x1f".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little")


def render_array(city: str, index: int, *, seed: int = 0, size: tuple[int, int] = (320, 229),
                 variant: int = 0) -> np.ndarray:
    """An ``(height, width, 3)`` uint8 image for ``(city, index, seed)``.

    ``variant > 0`` gives a near-duplicate of variant 0 (same scene, slightly
    different exposure and noise), like a re-upload or a burst shot.
    """
    width, height = size
    style = city_style(city)
    rng = np.random.default_rng(_seed_of(city.lower(), index, seed))
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)

    # Stripes in the city's orientation and frequency, with a random phase.
    angle = np.deg2rad(style.angle_deg + rng.uniform(-8, 8))
    freq = style.frequency * rng.uniform(0.85, 1.15) / 100.0
    proj = xx * np.cos(angle) + yy * np.sin(angle)
    stripes = 0.5 + 0.5 * np.sin(2 * np.pi * freq * proj + rng.uniform(0, 2 * np.pi))

    palette = np.array(style.palette, dtype=np.float32)
    img = np.empty((height, width, 3), dtype=np.float32)
    img[:] = np.array(style.sky, dtype=np.float32)
    # A random skyline: buildings of random widths and heights in palette colours.
    # This low-frequency structure is what makes every image's dHash different.
    x = 0
    while x < width:
        w = int(rng.integers(width // 14, width // 4))
        top = int(rng.integers(int(height * 0.1), int(height * 0.8)))
        colour = palette[int(rng.integers(0, len(palette)))] * rng.uniform(0.7, 1.2)
        img[top:, x:x + w] = colour
        x += w
    ground = int(height * rng.uniform(0.8, 0.92))
    img[ground:] = palette[-1] * 0.6

    building = (img != np.array(style.sky, dtype=np.float32)).any(axis=2, keepdims=True)
    img = img * np.where(building, 0.75 + 0.5 * stripes[..., None], 1.0)

    if style.texture == "checker":
        cell = int(rng.integers(6, 12))
        checker = ((xx // cell + yy // cell) % 2)[..., None]
        img = img * (0.85 + 0.3 * checker)
    elif style.texture == "dots":
        period = int(rng.integers(10, 18))
        d = ((xx % period - period / 2) ** 2 + (yy % period - period / 2) ** 2) < (period / 4) ** 2
        img = img * np.where(d[..., None], 1.25, 0.95)

    # A smooth random lighting field: gives every 9x8 cell of a difference hash a
    # definite gradient, so distinct images differ in many bits and a re-exposed
    # copy (variant) differs in few.
    field = np.zeros((height, width), dtype=np.float32)
    for _ in range(4):
        kx, ky = rng.uniform(0.5, 3.0, 2) * 2 * np.pi
        field += np.cos(kx * xx / width + ky * yy / height + rng.uniform(0, 2 * np.pi)).astype(np.float32)
    img = img * (1.0 + 0.12 * field[..., None])

    light = rng.uniform(0.8, 1.15)
    noise_rng = np.random.default_rng(_seed_of(city.lower(), index, seed, "noise", variant))
    if variant:
        light *= 1.0 + 0.02 * variant
    img = img * light + noise_rng.standard_normal(img.shape, dtype=np.float32) * (6 if style.texture == "noise" else 3)
    return np.clip(img, 0, 255).astype(np.uint8)


def render_jpeg(city: str, index: int, *, seed: int = 0, size: tuple[int, int] = (320, 229),
                variant: int = 0, quality: int = 85) -> bytes:
    """JPEG bytes of :func:`render_array` (deterministic for the same arguments)."""
    buf = io.BytesIO()
    Image.fromarray(render_array(city, index, seed=seed, size=size, variant=variant)).save(
        buf, format="JPEG", quality=quality)
    return buf.getvalue()


def write_photos(root, cities, per_city: int, *, seed: int = 0, size: tuple[int, int] = (320, 229)):
    """Write ``root/<city>/<i>.jpg`` (``per_city`` generated photos each); return ``root`` as a Path.

    Photos already there are kept, so a rerun writes nothing new.
    """
    from pathlib import Path

    root = Path(root)
    for city in cities:
        folder = root / city
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_city):
            path = folder / f"{i:05d}.jpg"
            if not path.exists():
                path.write_bytes(render_jpeg(city, i, seed=seed, size=size))
    return root
