"""Photos as pixels: decoding, orientation, colour-mode conversion and resizing for the backbone,
plus the checks and the perceptual hash the downloader uses. PIL and numpy only (torch for the tensor)."""

from __future__ import annotations

import io
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

if TYPE_CHECKING:
    import torch

ImageFile.LOAD_TRUNCATED_IMAGES = False  # a truncated file is a failure to record, not grey pixels
Image.MAX_IMAGE_PIXELS = 200_000_000  # guard against decompression bombs without refusing big photos

# Modes Pillow converts to RGB faithfully; anything else is an "unsupported mode" failure.
_CONVERTIBLE = {"1", "L", "P", "RGB", "RGBX", "CMYK", "YCbCr", "LAB", "HSV"}
_ALPHA = {"RGBA", "LA", "PA", "RGBa", "La"}

# The resampling filters a backbone's config may ask for (torchvision's InterpolationMode values, timm's names).
_RESAMPLE = {
    "nearest": Image.NEAREST,
    "bilinear": Image.BILINEAR,
    "bicubic": Image.BICUBIC,
    "lanczos": Image.LANCZOS,
    "box": Image.BOX,
    "hamming": Image.HAMMING,
}
INTERPOLATIONS = tuple(_RESAMPLE)


def _resample(interpolation: str):
    try:
        return _RESAMPLE[interpolation]
    except KeyError:
        raise ValueError(f"unknown interpolation {interpolation!r}; choose one of: {', '.join(INTERPOLATIONS)}") from None


def size_wh(size: int | tuple[int, int] | list[int]) -> tuple[int, int]:
    """An input size as ``(width, height)``: an int is a square (``224`` -> ``(224, 224)``), a pair is ``(W, H)``."""
    if isinstance(size, (tuple, list)):
        w, h = size
        return int(w), int(h)
    return int(size), int(size)


class UnreadableImage(Exception):
    """A photo that cannot become an RGB tensor; the message is the recorded reason."""


def load_image(path: str | Path, size: int | tuple[int, int], interpolation: str = "bilinear") -> torch.Tensor:
    """Decode, orient (EXIF), convert to RGB and resize to ``size`` x ``size`` (an int) or to W x H
    (``size`` a ``(W, H)`` pair): uint8 (3, size, size), or (3, H, W).

    ``interpolation`` is the resampling filter (the backbone's: ``spec.interpolation``).
    Grayscale, palette, CMYK and 16-bit images are converted; transparent
    ones are composited onto white. Raises :class:`UnreadableImage`.
    """
    _resample(interpolation)  # a bad name is the caller's bug (ValueError), not an unreadable photo
    path = Path(path)
    with _unreadable_on_error():
        if path.stat().st_size == 0:
            raise UnreadableImage("empty file (0 bytes)")
        with Image.open(path) as im:
            im.load()
            return image_tensor(im, size, interpolation)


def memory_image_tensor(image: Image.Image | np.ndarray, size: int | tuple[int, int], interpolation: str = "bilinear") -> torch.Tensor:
    """An in-memory picture (a PIL image, or a uint8 array HxW, HxWx3 or HxWx4) as :func:`load_image` makes
    a file into: the same orientation, conversion and resize, the same :class:`UnreadableImage` reasons."""
    _resample(interpolation)
    with _unreadable_on_error():
        if isinstance(image, np.ndarray):
            image = _array_image(image)
        return image_tensor(image, size, interpolation)


def image_tensor(im: Image.Image, size: int | tuple[int, int], interpolation: str = "bilinear") -> torch.Tensor:
    """A decoded PIL image -> orient (EXIF), convert to RGB, resize to ``size`` x ``size`` (an int) or
    to W x H (a ``(W, H)`` pair) with the ``interpolation`` filter (PIL's, antialiased when shrinking):
    uint8 (3, size, size), or (3, H, W).

    The one place pixels are prepared for the backbone, so a photo read from a
    file (:func:`load_image`) and one handed over in memory
    (:func:`memory_image_tensor`) give the backbone the same numbers.
    Raises :class:`UnreadableImage` for a mode it cannot convert; Pillow's own
    errors pass through (the callers turn them into reasons).
    """
    resample = _resample(interpolation)
    im = ImageOps.exif_transpose(im)
    mode = im.mode
    if mode in _ALPHA:
        rgba = im.convert("RGBA")
        bg = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        im = Image.alpha_composite(bg, rgba).convert("RGB")
    elif mode.startswith("I;16") or mode in ("I", "F"):
        a = np.asarray(im, dtype=np.float32)
        hi = float(a.max()) or 1.0
        im = Image.fromarray((a * (255.0 / hi)).clip(0, 255).astype(np.uint8), "L").convert("RGB")
    elif mode in _CONVERTIBLE:
        im = im.convert("RGB")
    else:
        raise UnreadableImage(f"unsupported image mode {mode}")
    im = im.resize(size_wh(size), resample)
    import torch  # only here: the downloader's checks and hashes need no torch

    return torch.from_numpy(np.asarray(im, dtype=np.uint8).copy()).permute(2, 0, 1)


def _array_image(a: np.ndarray) -> Image.Image:
    """A uint8 array as the PIL image it stands for: HxW grayscale, HxWx3 RGB, HxWx4 RGBA."""
    if a.dtype != np.uint8:
        raise UnreadableImage(f"an array of {a.dtype}; expected uint8 pixels (HxW, HxWx3 or HxWx4)")
    if a.ndim == 2:
        return Image.fromarray(np.ascontiguousarray(a), "L")
    if a.ndim == 3 and a.shape[2] in (3, 4):
        return Image.fromarray(np.ascontiguousarray(a), "RGB" if a.shape[2] == 3 else "RGBA")
    raise UnreadableImage(f"an array of shape {a.shape}; expected HxW, HxWx3 or HxWx4 uint8 pixels")


@contextmanager
def _unreadable_on_error():
    """Turn Pillow's and the filesystem's errors into :class:`UnreadableImage` with the recorded reason."""
    try:
        yield
    except UnreadableImage:
        raise
    except FileNotFoundError:
        raise UnreadableImage("file not found") from None
    except UnidentifiedImageError:
        raise UnreadableImage("not an image Pillow can identify") from None
    except Image.DecompressionBombError as e:
        raise UnreadableImage(f"too large ({e})") from None
    except (OSError, ValueError, SyntaxError) as e:  # truncated data, bad headers, broken files
        raise UnreadableImage(f"cannot decode: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None


def dhash(data: bytes | Image.Image, bits: int = 8) -> int:
    """64-bit difference hash: signs of horizontal gradients of a 9x8 grayscale thumbnail."""
    img = Image.open(io.BytesIO(data)) if isinstance(data, bytes) else data
    if img.format == "JPEG":
        img.draft("L", ((bits + 1) * 4, bits * 4))
    small = np.asarray(img.convert("L").resize((bits + 1, bits), Image.BILINEAR), dtype=np.int16)
    value = 0
    for bit in (small[:, 1:] > small[:, :-1]).flatten():
        value = (value << 1) | int(bit)
    return value


def decoded_size(data: bytes) -> tuple[int, int]:
    """Fully decode the image; return (width, height) or raise ValueError."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()
            return img.size
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise ValueError(str(e)) from None
