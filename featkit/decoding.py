"""The engine's decode stage: photos -> uint8 batches at the backbone's input size, for
:func:`featkit.engine.feature_batches`.

``decode`` cpu: :class:`PhotoDataset` decodes and resizes each photo in DataLoader worker
processes (:func:`~featkit.images.load_image`) and :func:`collate` stacks them; in-memory
pictures go through :class:`MemoryDataset`. ``decode`` gpu: :class:`JpegDataset` ships the JPEG
bytes nvJPEG decodes exactly as the CPU would (the rest is decoded on the CPU), and
:class:`GpuDecoder` decodes them on the backbone's CUDA device and resizes them there
(:func:`resize_on_device`, the CPU's filters as torch modes). :func:`resolve_decode` owns what
``decode`` means (``auto`` is cpu for now) and whether nvJPEG works on a device.
"""

from __future__ import annotations

import functools
import io
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from featkit.errors import FeatkitError
from featkit.images import UnreadableImage, check_pixels, load_image, memory_image_tensor, size_wh
from featkit.manifest import Photo
from featkit.options import DECODES


class PhotoDataset(torch.utils.data.Dataset):
    """Photo ``i`` -> ``(i, pixels, reason)``: uint8 (3, H, W) at ``size``, or None and why not."""

    def __init__(self, paths: list[str], size: int | tuple[int, int], interpolation: str = "bilinear"):
        self.paths, self.size, self.interpolation = paths, size, interpolation

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        try:
            return i, load_image(self.paths[i], self.size, self.interpolation), ""
        except UnreadableImage as e:
            return i, None, str(e)


class MemoryDataset(torch.utils.data.Dataset):
    """In-memory picture ``i`` (a PIL image or a uint8 array) -> ``(i, pixels, reason)``, prepared as :func:`load_image` prepares a file."""

    def __init__(self, images: list, size: int | tuple[int, int], interpolation: str = "bilinear"):
        self.images, self.size, self.interpolation = images, size, interpolation

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        try:
            return i, memory_image_tensor(self.images[i], self.size, self.interpolation), ""
        except UnreadableImage as e:
            return i, None, str(e)


def collate(items):
    ok = [(i, t) for i, t, _ in items if t is not None]
    bad = [(i, reason) for i, t, reason in items if t is None]
    images = torch.stack([t for _, t in ok]) if ok else None
    return [i for i, _ in ok], images, bad


def _nvjpeg_can_take(data: bytes) -> bool:
    """Whether nvJPEG decodes ``data`` exactly as :func:`load_image` would: a complete baseline
    3-channel JPEG without an EXIF rotation (nvJPEG ignores EXIF and may pass truncated data)."""
    if data[:2] != b"\xff\xd8" or data[-2:] != b"\xff\xd9":
        return False
    try:
        with Image.open(io.BytesIO(data)) as im:  # reads the headers only
            check_pixels(im.size)  # over the limit: the CPU path refuses it, with the reason
            return (
                im.format == "JPEG" and im.mode == "RGB" and not im.info.get("progressive")
                and not im.info.get("progression") and im.getexif().get(0x0112, 1) == 1
            )
    except Exception:  # anything odd: the CPU path decides, and records the reason if it fails
        return False


class JpegDataset(PhotoDataset):
    """Photo ``i`` -> its file bytes when nvJPEG can take them, else decoded on the CPU as by :class:`PhotoDataset`."""

    def __getitem__(self, i: int):
        try:
            data = Path(self.paths[i]).read_bytes()
        except OSError:
            data = b""
        if data and _nvjpeg_can_take(data):
            return i, data, ""
        return super().__getitem__(i)


def collate_jpeg(items):
    """One uint8 tensor of all the JPEG bytes (one transfer from the worker), their offsets, and the CPU-decoded rest."""
    jpeg = [(i, d) for i, d, _ in items if isinstance(d, bytes)]
    cpu = [(i, t, r) for i, t, r in items if not isinstance(t, bytes)]
    buf = torch.frombuffer(bytearray(b"".join(d for _, d in jpeg)), dtype=torch.uint8) if jpeg else torch.empty(0, dtype=torch.uint8)
    ends = np.cumsum([len(d) for _, d in jpeg]).tolist()
    return [i for i, _ in jpeg], buf, ends, collate(cpu)


def resolve_decode(decode: str, dev: torch.device) -> str:
    """``cpu`` or ``gpu`` (nvJPEG on the backbone's CUDA device); ``auto`` is ``cpu`` for now.

    ``auto`` stays on the CPU until the nvJPEG path has run clean at scale:
    on an H100 (torch 2.11, torchvision 0.26) one 20,000-photo run stalled
    inside ``decode_jpeg``. ``gpu`` asks for it explicitly.
    """
    if decode not in DECODES:
        raise FeatkitError(f"unknown `decode` {decode!r}; choose one of: {', '.join(DECODES)}", param="decode")
    if decode in ("cpu", "auto"):
        return "cpu"
    if dev.type != "cuda":
        raise FeatkitError(
            f"`decode` gpu needs the backbone on a CUDA GPU, but this run's device is {dev}; use `decode` cpu or auto (or `device` cuda)",
            param="decode",
        )
    problem = _nvjpeg_problem(dev)
    if problem is None:
        return "gpu"
    raise FeatkitError(f"`decode` gpu asked for, but torchvision cannot decode JPEGs on {dev} ({problem}); use `decode` cpu or auto", param="decode")


@functools.lru_cache(maxsize=None)  # one trial decode per device, however often a run asks
def _nvjpeg_problem(dev: torch.device) -> str | None:
    """None when torchvision's nvJPEG decode works on ``dev``, else why not."""
    try:
        buf = io.BytesIO()
        Image.new("RGB", (16, 16), (200, 100, 50)).save(buf, format="JPEG")
        out = _decode_on_gpu([torch.frombuffer(bytearray(buf.getvalue()), dtype=torch.uint8)], dev)
        return None if tuple(out[0].shape) == (3, 16, 16) else f"got shape {tuple(out[0].shape)}"
    except Exception as e:  # missing image ops, no nvJPEG in this build, driver problems
        return str(e).splitlines()[0] if str(e) else type(e).__name__


def _decode_on_gpu(datas: list[torch.Tensor], dev: torch.device) -> list[torch.Tensor]:
    from torchvision.io import ImageReadMode, decode_jpeg

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # torchvision points to torchcodec; decode_jpeg stays
        return decode_jpeg(datas, mode=ImageReadMode.RGB, device=dev)


class GpuDecoder:
    """nvJPEG decode and resize on a side stream of their own.

    torchvision's CUDA decoder allocates its outputs on the current stream but
    writes them from a private stream that does not wait for it
    (pytorch/vision#9606), so on the backbone's stream it could be handed memory
    the queued forward pass still reads. On a side stream, drained before each
    decode, it only ever gets blocks of finished decodes; the batch it hands
    over is recorded on the backbone's stream so it is not recycled early.
    """

    def __init__(self, photos: list[Photo], size: int | tuple[int, int], dev: torch.device, interpolation: str = "bilinear"):
        self.photos, self.size, self.dev, self.interpolation = photos, size, dev, interpolation
        self.stream = torch.cuda.Stream(dev)

    def __call__(self, item):
        main = torch.cuda.current_stream(self.dev)
        self.stream.synchronize()
        with torch.cuda.stream(self.stream):
            idx, images, bad = _gpu_images(item, self.photos, self.size, self.dev, self.interpolation)
        if images is not None:
            main.wait_stream(self.stream)
            images.record_stream(main)
        return idx, images, bad


# load_image's PIL filters as torch modes: (mode, antialias). PIL antialiases bilinear and bicubic when
# shrinking (as torch's antialias=True does); its nearest picks pixel centres like "nearest-exact".
DEVICE_RESIZE = {"bilinear": ("bilinear", True), "bicubic": ("bicubic", True), "nearest": ("nearest-exact", False)}


def resize_on_device(images: list[torch.Tensor], size: int | tuple[int, int], interpolation: str = "bilinear") -> torch.Tensor:
    """uint8 (3, H, W) images on one device -> uint8 (B, 3, size, size) (``size`` an int) or (B, 3, h, w)
    (``size`` a ``(w, h)`` pair), like :func:`load_image`'s PIL resize with the same ``interpolation``
    (antialiased when shrinking), batched over images of the same size."""
    if interpolation not in DEVICE_RESIZE:
        raise FeatkitError(f"interpolation {interpolation!r} has no resize on the device (it does {', '.join(DEVICE_RESIZE)}); use `decode` cpu")
    mode, antialias = DEVICE_RESIZE[interpolation]
    w, h = size_wh(size)
    out = torch.empty((len(images), 3, h, w), dtype=torch.uint8, device=images[0].device)
    by_shape: dict[tuple, list[int]] = {}
    for k, im in enumerate(images):
        by_shape.setdefault(tuple(im.shape), []).append(k)
    for shape, ks in by_shape.items():
        x = torch.stack([images[k] for k in ks]).float()
        if shape[1:] != (h, w):
            kw = {"antialias": True, "align_corners": False} if antialias else {}
            x = torch.nn.functional.interpolate(x, size=(h, w), mode=mode, **kw)
        out[ks] = x.round_().clamp_(0, 255).to(torch.uint8)
    return out


def _gpu_images(item, photos: list[Photo], size: int | tuple[int, int], dev: torch.device, interpolation: str = "bilinear"):
    """A GPU-path batch -> (indices, uint8 images on ``dev`` in that order, failures).

    A batch nvJPEG refuses is retried photo by photo; a photo it still refuses
    is decoded on the CPU (which records the reason if that fails too)."""
    jpeg_idx, buf, ends, (cpu_idx, cpu_images, bad) = item
    decoded: dict[int, torch.Tensor] = {}
    if jpeg_idx:
        datas = [buf[a:b] for a, b in zip([0] + ends[:-1], ends)]
        try:
            decoded = dict(zip(jpeg_idx, _decode_on_gpu(datas, dev)))
        except RuntimeError:
            for i, d in zip(jpeg_idx, datas):
                try:
                    decoded[i] = _decode_on_gpu([d], dev)[0]
                except RuntimeError:
                    try:
                        decoded[i] = load_image(photos[i].path, size, interpolation).to(dev)
                    except UnreadableImage as e:
                        bad = bad + [(i, str(e))]
    resized = dict(zip(decoded, resize_on_device(list(decoded.values()), size, interpolation))) if decoded else {}
    if cpu_images is not None:
        resized.update(zip(cpu_idx, cpu_images.to(dev)))
    if not resized:
        return [], None, bad
    order = sorted(resized)  # the loader's order: photo indices ascend within a batch
    return order, torch.stack([resized[i] for i in order]), sorted(bad)
