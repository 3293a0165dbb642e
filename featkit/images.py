"""Photos as pixels: decoding, orientation, colour-mode conversion and resizing for the backbone,
plus the checks and the perceptual hash the downloader uses. PIL and numpy only (torch for the tensor)."""

from __future__ import annotations

import errno
import io
import os
import re
import stat
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from featkit.manifest import path_text

if TYPE_CHECKING:
    import torch

ImageFile.LOAD_TRUNCATED_IMAGES = False  # a truncated file is a failure to record, not grey pixels
# Guard against decompression bombs without refusing big photos. Pillow only *warns* between this and twice
# it, so featkit enforces it itself, from the header, before anything is decoded (see open_image).
MAX_PIXELS = 200_000_000
Image.MAX_IMAGE_PIXELS = MAX_PIXELS

# Guard against bombs by the memory their decoding needs, too: a 772 KB RGBA PNG just under MAX_PIXELS took
# 4.7 GB to decode and composite. Pillow keeps 1 byte a pixel for 1/L/P, 2 for I;16, 4 for every other mode;
# converting to RGB makes copies (transparent ones composited onto white: four of them, 16-bit ones through
# float32: three), so a photo is refused, from its header, when its peak would pass MAX_DECODE_BYTES.
MAX_DECODE_BYTES = 1 << 30
_PEAK_BYTES_PER_PIXEL = {"one_byte": 1 + 4, "16bit": 2 + 4 + 4 + 1 + 4, "alpha": 4 * 4 + 4, "other": 4 + 4}

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
    ones are composited onto white. Raises :class:`UnreadableImage` (for the
    reasons of :func:`open_image`, or a decoding error).
    """
    _resample(interpolation)  # a bad name is the caller's bug (ValueError), not an unreadable photo
    with _unreadable_on_error():
        with open_image(path) as im:
            im.load()
            return image_tensor(im, size, interpolation)


def check_image_file(path: str | Path) -> tuple[int, int]:
    """The (width, height) of an image file, from its header only (nothing is decoded): the cheap check
    extraction runs on every photo before it assigns splits. Raises :class:`UnreadableImage` for the
    reasons of :func:`open_image`. Safe to call from several threads."""
    with _unreadable_on_error():
        with open_image(path) as im:
            return im.size


def open_image(path: str | Path) -> Image.Image:
    """``Image.open`` (headers only) of a regular, non-empty file whose pixel count is within
    :data:`MAX_PIXELS`; the caller closes it. Raises :class:`UnreadableImage` with the reason: file not found,
    dangling link, symlink loop, not a regular file, empty file, too many pixels (Pillow's
    ``DecompressionBombError`` and ``DecompressionBombWarning`` included); other Pillow errors pass through
    (:func:`load_image` and :func:`check_image_file` turn them into reasons)."""
    try:
        st = os.stat(path)  # follows links
    except FileNotFoundError:
        if os.path.islink(path):
            raise UnreadableImage(f"dangling link (to {path_text(os.readlink(path))})") from None
        raise UnreadableImage("file not found") from None
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise UnreadableImage("symlink loop") from None
        raise UnreadableImage(f"cannot read: {e.strerror or type(e).__name__}") from None
    if not stat.S_ISREG(st.st_mode):
        raise UnreadableImage("not a regular file" + (" (a folder)" if stat.S_ISDIR(st.st_mode) else ""))
    if st.st_size == 0:
        raise UnreadableImage("empty file (0 bytes)")
    return _open_within_limit(path)


def _open_within_limit(fp) -> Image.Image:
    """``Image.open(fp)``, refused (:class:`UnreadableImage`) when the header claims more than :data:`MAX_PIXELS`."""
    try:
        im = Image.open(fp)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:  # the warning when a filter makes it an error
        raise UnreadableImage(_too_many_pixels(e)) from None
    try:
        check_bounds(im)
    except UnreadableImage:
        im.close()
        raise
    return im


def decode_bytes(size: tuple[int, int], mode: str) -> int:
    """About the most memory decoding an image of ``size`` and ``mode`` and making it RGB takes (bytes)."""
    w, h = size
    if mode in ("1", "L", "P"):
        kind = "one_byte"
    elif mode.startswith("I;16") or mode in ("I", "F"):
        kind = "16bit"
    elif mode in _ALPHA:
        kind = "alpha"
    else:
        kind = "other"
    return w * h * _PEAK_BYTES_PER_PIXEL[kind]


def check_decode_memory(im: Image.Image) -> None:
    """Refuse (:class:`UnreadableImage`), before anything is decoded, an image whose decoding and conversion
    would need more than :data:`MAX_DECODE_BYTES`. A palette image with transparency is counted as the
    RGBA it becomes."""
    mode = "RGBA" if im.mode == "P" and "transparency" in im.info else im.mode
    need = decode_bytes(im.size, mode)
    if need > MAX_DECODE_BYTES:
        w, h = im.size
        raise UnreadableImage(f"too large to decode: {w} x {h} {im.mode} needs about {need / 2**30:.1f} GiB "
                              f"(more than {MAX_DECODE_BYTES / 2**30:.0f} GiB)")


def check_bounds(im: Image.Image) -> None:
    """Both bounds of an opened (not yet decoded) image: its pixel count and the memory its decoding needs."""
    check_pixels(im.size)
    check_decode_memory(im)


def check_pixels(size: tuple[int, int]) -> None:
    """Refuse (:class:`UnreadableImage`) a (width, height) of more than :data:`MAX_PIXELS` pixels."""
    w, h = size
    if w * h > MAX_PIXELS:
        raise UnreadableImage(f"too many pixels: {w} x {h} > {MAX_PIXELS:,}")


def _too_many_pixels(e: Exception) -> str:
    """The reason for Pillow's own refusal, which gives the pixel count but not the size."""
    m = re.search(r"\((\d+) pixels\)", str(e))
    return f"too many pixels: {int(m.group(1)):,} > {MAX_PIXELS:,}" if m else f"too many pixels ({e})"


def memory_image_tensor(image: Image.Image | np.ndarray, size: int | tuple[int, int], interpolation: str = "bilinear") -> torch.Tensor:
    """An in-memory picture (a PIL image, or a uint8 array HxW, HxWx3 or HxWx4) as :func:`load_image` makes
    a file into: the same orientation, conversion and resize, the same :class:`UnreadableImage` reasons."""
    _resample(interpolation)
    with _unreadable_on_error():
        if isinstance(image, np.ndarray):
            check_pixels((image.shape[1], image.shape[0]) if image.ndim >= 2 else (image.size, 1))
            image = _array_image(image)
        return image_tensor(image, size, interpolation)  # checks a PIL image's size before it decodes anything


def image_tensor(im: Image.Image, size: int | tuple[int, int], interpolation: str = "bilinear") -> torch.Tensor:
    """A decoded PIL image -> orient (EXIF), convert to RGB, resize to ``size`` x ``size`` (an int) or
    to W x H (a ``(W, H)`` pair) with the ``interpolation`` filter (PIL's, antialiased when shrinking):
    uint8 (3, size, size), or (3, H, W).

    The one place pixels are prepared for the backbone, so a photo read from a
    file (:func:`load_image`) and one handed over in memory
    (:func:`memory_image_tensor`) give the backbone the same numbers.
    Raises :class:`UnreadableImage` for a mode it cannot convert or more than
    :data:`MAX_PIXELS` pixels (checked first: a lazily opened image is not decoded yet); Pillow's own
    errors pass through (the callers turn them into reasons).
    """
    resample = _resample(interpolation)
    check_bounds(im)
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
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise UnreadableImage(_too_many_pixels(e)) from None
    except PermissionError as e:
        raise UnreadableImage(f"cannot read: {e.strerror}") from None
    except (OSError, ValueError, SyntaxError) as e:  # truncated data, bad headers, broken files
        raise UnreadableImage(f"cannot decode: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None


def dhash(data: bytes | Image.Image, bits: int = 8) -> int:
    """64-bit difference hash: signs of horizontal gradients of a 9x8 grayscale thumbnail.

    Raises ValueError (among Pillow's errors) for more than :data:`MAX_PIXELS` pixels, or more memory than
    :data:`MAX_DECODE_BYTES`, before decoding."""
    try:
        img = _open_within_limit(io.BytesIO(data)) if isinstance(data, bytes) else data
        check_bounds(img)
    except UnreadableImage as e:
        raise ValueError(str(e)) from None
    if img.format == "JPEG":
        img.draft("L", ((bits + 1) * 4, bits * 4))
    small = np.asarray(img.convert("L").resize((bits + 1, bits), Image.BILINEAR), dtype=np.int16)
    value = 0
    for bit in (small[:, 1:] > small[:, :-1]).flatten():
        value = (value << 1) | int(bit)
    return value


def decoded_size(data: bytes) -> tuple[int, int]:
    """Fully decode the image; return (width, height) or raise ValueError (more than :data:`MAX_PIXELS`
    pixels included, refused before decoding)."""
    try:
        with _open_within_limit(io.BytesIO(data)) as img:
            img.load()
            return img.size
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, UnreadableImage) as e:
        raise ValueError(str(e)) from None
