"""Photos that would take gigabytes to decode are refused from their header, by the memory their mode needs,
not only by their pixel count (a 772 KB RGBA PNG just under the 200 Mpx limit took 4.7 GB)."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import pytest
from PIL import Image

from featkit.images import MAX_DECODE_BYTES, MAX_PIXELS, UnreadableImage, check_image_file, decode_bytes, load_image


def png(path: Path, w: int, h: int, colour_type: int, bit_depth: int = 8, *, rows: bool = False) -> Path:
    """A PNG of ``w`` x ``h``: with ``rows``, all-zero pixels, deflated (a real bomb: tiny file, huge image);
    else only a header and an empty image stream (enough for Pillow to read the size and mode)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    channels = {0: 1, 2: 3, 4: 2, 6: 4}[colour_type]
    if rows:
        z = zlib.compressobj(9)
        line = b"\0" * (1 + w * channels * bit_depth // 8)
        data = b"".join(z.compress(line) for _ in range(h)) + z.flush()
    else:
        data = zlib.compress(b"")
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, bit_depth, colour_type, 0, 0, 0))
                     + chunk(b"IDAT", data) + chunk(b"IEND", b""))
    return path


@pytest.mark.parametrize("w,h,colour_type,bits,mode", [
    (9000, 9000, 6, 8, "RGBA"),   # 81 Mpx: under the pixel limit, 1.6 GB to decode and composite
    (14000, 14000, 6, 8, "RGBA"),  # the probe's: 196 Mpx
    (12000, 12000, 0, 16, "I;16"),  # 144 Mpx of 16-bit grey, through float32
])
def test_a_bomb_under_the_pixel_limit_is_refused_from_its_header(tmp_path, w, h, colour_type, bits, mode):
    p = png(tmp_path / "bomb.png", w, h, colour_type, bits)
    with Image.open(p) as im:
        assert im.size == (w, h) and im.mode.startswith(mode[:3])
    assert w * h <= MAX_PIXELS and decode_bytes((w, h), mode) > MAX_DECODE_BYTES
    for read in (check_image_file, lambda path: load_image(path, 32)):
        with pytest.raises(UnreadableImage, match=r"^too large to decode: .* needs about [\d.]+ GiB"):
            read(p)


def test_big_photos_whose_decoding_fits_are_still_read(tmp_path):
    """The bound is on memory, not on ordinary big photos: 60 Mpx of grey or 100 Mpx palette pass the check."""
    for w, h, ct in ((8000, 7500, 0),):
        p = png(tmp_path / "grey.png", w, h, ct)
        assert check_image_file(p) == (w, h)
    assert decode_bytes((10_000, 10_000), "P") < MAX_DECODE_BYTES
    assert decode_bytes((8000, 6000), "RGB") < MAX_DECODE_BYTES  # a 48 Mpx camera photo


def test_a_real_deflate_bomb_is_refused_without_decoding(tmp_path):
    """A real one (all pixels deflated: a few hundred KB on disk) fails fast with the reason."""
    p = png(tmp_path / "real.png", 9000, 9000, 6, rows=True)
    assert p.stat().st_size < 2_000_000
    with pytest.raises(UnreadableImage, match="too large to decode"):
        load_image(p, 32)
