"""One pass of the photos through the frozen backbone, into the HDF5 feature cache.

The engine has two public parts that know nothing of each other:

- :func:`feature_batches` turns photos into feature batches. Images are decoded
  and resized in DataLoader worker processes and travel as uint8 tensors, or,
  with ``decode`` gpu (``auto`` means cpu for now), the workers read JPEG bytes and nvJPEG
  decodes them on the device, which also resizes. Batches go through the
  backbone under ``torch.inference_mode()`` (half-precision autocast, pinned
  memory and channels-last on CUDA); on CUDA the next batch is launched before
  the last one's features (float16 when the cache is) are copied back, and an
  out-of-memory error halves the batch instead of ending the run. It knows
  nothing about the store.
- :func:`write_batches` appends those batches to a :class:`~featkit.store.FeatureStore`
  from a writer thread fed by a bounded queue, committing each batch before the
  next, so the slowest stage (decode, forward, write) sets the pace and a killed
  run resumes where it stopped.

:func:`extract_features` drives both for one process; :mod:`featkit.distributed`
drives the same parts on every torchrun rank. Both take one :class:`~featkit.options.ExtractOptions`.
A photo that cannot be read is recorded with its reason and skipped; it never aborts the run."""

from __future__ import annotations

import functools
import io
import os
import queue
import sys
import threading
import time
import warnings
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np
import torch
from PIL import Image

from featkit.backbones import BackboneSpec, FeatureNet, source_of_spec
from featkit.devices import resolve_device
from featkit.errors import FeatkitError
from featkit.images import UnreadableImage, check_image_file, check_pixels, load_image, memory_image_tensor, size_wh
from featkit.manifest import Photo, path_text
from featkit.options import DECODES, EXTRACT, ExtractOptions
from featkit.provenance import provenance
from featkit.splits import assign_splits, split_counts
from featkit.store import FAILED_CSV, ROW_FIELDS, FeatureStore, cache_identity, file_signature, shared_splits


class _PhotoDataset(torch.utils.data.Dataset):
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


class _MemoryDataset(torch.utils.data.Dataset):
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


def _collate(items):
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


class _JpegDataset(_PhotoDataset):
    """Photo ``i`` -> its file bytes when nvJPEG can take them, else decoded on the CPU as by :class:`_PhotoDataset`."""

    def __getitem__(self, i: int):
        try:
            data = Path(self.paths[i]).read_bytes()
        except OSError:
            data = b""
        if data and _nvjpeg_can_take(data):
            return i, data, ""
        return super().__getitem__(i)


def _collate_jpeg(items):
    """One uint8 tensor of all the JPEG bytes (one transfer from the worker), their offsets, and the CPU-decoded rest."""
    jpeg = [(i, d) for i, d, _ in items if isinstance(d, bytes)]
    cpu = [(i, t, r) for i, t, r in items if not isinstance(t, bytes)]
    buf = torch.frombuffer(bytearray(b"".join(d for _, d in jpeg)), dtype=torch.uint8) if jpeg else torch.empty(0, dtype=torch.uint8)
    ends = np.cumsum([len(d) for _, d in jpeg]).tolist()
    return [i for i, _ in jpeg], buf, ends, _collate(cpu)


@dataclass
class FeatureBatch:
    """Photos that were read and their features (rows in the same order), and photos that were not.

    ``features`` is float32, or float16 when the run stores float16 and the
    backbone ran on CUDA (its autocast output, copied back without a float32 round trip).
    """

    photos: list[Photo]
    features: np.ndarray  # (len(photos), feature_dim)
    failed: list[tuple[Photo, str]]  # (photo, reason)


def default_workers(processes_per_node: int = 1) -> int:
    """Decoding workers: the cores left after the main process(es), at most 8 each."""
    return max(1, min(8, (os.cpu_count() or 2) // max(1, processes_per_node) - 1))


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


class _GpuDecoder:
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
_TORCH_RESIZE = {"bilinear": ("bilinear", True), "bicubic": ("bicubic", True), "nearest": ("nearest-exact", False)}


def resize_on_device(images: list[torch.Tensor], size: int | tuple[int, int], interpolation: str = "bilinear") -> torch.Tensor:
    """uint8 (3, H, W) images on one device -> uint8 (B, 3, size, size) (``size`` an int) or (B, 3, h, w)
    (``size`` a ``(w, h)`` pair), like :func:`load_image`'s PIL resize with the same ``interpolation``
    (antialiased when shrinking), batched over images of the same size."""
    if interpolation not in _TORCH_RESIZE:
        raise FeatkitError(f"interpolation {interpolation!r} has no resize on the device (it does {', '.join(_TORCH_RESIZE)}); use `decode` cpu")
    mode, antialias = _TORCH_RESIZE[interpolation]
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


class _Backbone:
    """The net on its device, run on uint8 batches; halves the batch on CUDA out-of-memory and goes on."""

    def __init__(self, net: FeatureNet, dev: torch.device, batch_size: int):
        self.dev, self.on_cuda = dev, dev.type == "cuda"
        if self.on_cuda:
            torch.backends.cudnn.benchmark = True
            self.net = net.to(dev, memory_format=torch.channels_last)
        else:
            self.net = net.to(dev)
        self.chunk = batch_size  # the largest batch the device has managed; halved on out-of-memory

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        n, outs, start = len(images), [], 0
        while start < n:
            k = min(self.chunk, n - start)
            try:
                outs.append(self._forward(images[start : start + k]))
                start += k
            except torch.OutOfMemoryError:
                if self.chunk == 1:
                    raise FeatkitError(
                        f"{self.dev} ran out of memory on a batch of one photo; free the GPU (other processes?) or use `device` cpu",
                        param="device",
                    ) from None
                self.chunk = max(1, min(self.chunk, k) // 2)
                if self.on_cuda:
                    torch.cuda.empty_cache()
                print(f"featkit: {self.dev} out of memory; batches of {self.chunk} from now on", file=sys.stderr, flush=True)
        return outs[0] if len(outs) == 1 else torch.cat(outs)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.on_cuda:
            return self.net(x)
        k = len(x)
        if k < self.chunk:  # pad to the usual shape: one cuDNN autotune per batch size, not one per short batch
            x = torch.cat([x, x.new_zeros((self.chunk - k, *x.shape[1:]))])
        x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast("cuda", dtype=torch.float16):
            return self.net(x)[:k]


def feature_batches(
    photos: list[Photo],
    net: FeatureNet,
    image_size: int | tuple[int, int],
    dev: torch.device,
    *,
    batch_size: int = EXTRACT.batch_size,
    workers: int = 0,
    decode: str = EXTRACT.decode,
    dtype: str = "float32",
    images: list | None = None,
    interpolation: str = "bilinear",
) -> Iterator[FeatureBatch]:
    """Run ``photos`` through ``net`` on ``dev``, ``batch_size`` at a time, in order.

    Decoding runs in ``workers`` DataLoader processes, or, with ``decode`` gpu
    (``auto`` means cpu for now), in nvJPEG on the device, with the workers reading file
    bytes and decoding on the CPU only what nvJPEG cannot take. On CUDA the
    next batch is launched before the previous one's features are handed out,
    so the device-to-host copy (into pinned memory, float16 when ``dtype`` is
    float16) overlaps the next forward pass. A CUDA out-of-memory error halves
    the batch and goes on.

    ``images``, one per photo, are pictures already in memory (PIL images or
    uint8 arrays, see :func:`~featkit.images.memory_image_tensor`) standing for
    ``photos`` (whose paths are then only names): they are prepared in this
    process, on the CPU, and go through the same backbone path.

    ``interpolation`` is the filter that resizes photos to ``image_size`` (the
    backbone's ``spec.interpolation``), on the CPU and on the device alike;
    ``image_size`` is an int (a square) or a ``(W, H)`` pair (``spec.image_size``).
    """
    if not photos:
        return
    if images is not None and len(images) != len(photos):
        raise ValueError(f"feature_batches: {len(images)} images for {len(photos)} photos")
    mode = "cpu" if images is not None else resolve_decode(decode, dev)
    if mode == "gpu" and interpolation not in _TORCH_RESIZE:
        raise FeatkitError(f"`decode` gpu resizes on the device, which has no {interpolation!r} interpolation (it does {', '.join(_TORCH_RESIZE)}); use `decode` cpu", param="decode")
    workers = 0 if images is not None else workers
    backbone = _Backbone(net, dev, batch_size)
    on_cuda = backbone.on_cuda
    paths = [str(p.path) for p in photos]
    if images is not None:
        dataset = _MemoryDataset(images, image_size, interpolation)
    else:
        dataset = (_JpegDataset if mode == "gpu" else _PhotoDataset)(paths, image_size, interpolation)
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_size=batch_size,
        num_workers=workers,
        collate_fn=_collate_jpeg if mode == "gpu" else _collate,
        pin_memory=on_cuda and mode == "cpu",
        prefetch_factor=4 if workers else None,
        persistent_workers=False,
    )
    out_dtype = torch.float16 if (on_cuda and dtype == "float16") else torch.float32
    gpu_decoder = _GpuDecoder(photos, image_size, dev, interpolation) if mode == "gpu" else None

    @torch.inference_mode()  # only around the work: a generator must not leave the mode on while suspended at a yield
    def launch(item):
        """Decode (GPU path), forward and start the copy back; returns what ``finish`` needs."""
        if mode == "gpu":
            idx, images, bad = gpu_decoder(item)
        else:
            idx, images, bad = item
        if images is None:
            return idx, None, bad, None
        out = backbone(images.to(dev, non_blocking=on_cuda))
        if not on_cuda:
            return idx, out.numpy(), bad, None
        host = torch.empty(out.shape, dtype=out_dtype, pin_memory=True)
        host.copy_(out, non_blocking=True)
        done = torch.cuda.Event()
        done.record()
        return idx, host, bad, done

    def finish(launched) -> FeatureBatch:
        idx, feats, bad, done = launched
        if feats is None:
            feats = np.empty((0, 0), dtype=np.float32)  # a batch of only unreadable photos
        elif done is not None:
            done.synchronize()
            feats = feats.numpy()
        return FeatureBatch([photos[i] for i in idx], feats, [(photos[i], reason) for i, reason in bad])

    pending = None
    for item in loader:
        if not on_cuda:  # nothing runs asynchronously: hand each batch out at once
            yield finish(launch(item))
            continue
        launched = launch(item)
        if pending is not None:
            yield finish(pending)
        pending = launched
    if pending is not None:
        yield finish(pending)


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


@dataclass
class ExtractSummary:
    n_extracted: int = 0
    n_skipped: int = 0
    n_already: int = 0
    n_total_rows: int = 0
    n_total_failed: int = 0
    seconds: float = 0.0
    split_counts: dict = field(default_factory=dict)
    interrupted: bool = False
    n_repaired: int = 0  # damaged rows dropped by --repair before this run (and extracted again by it)
    n_retried: int = 0  # photos failed before and tried again (--retry-failed, or their file changed)
    cache_path: str = ""
    failed_csv: str = ""
    rank: int = 0  # under torchrun: this process's rank, the number of processes,
    world_size: int = 1
    reporter: bool = True  # and whether this is the one process (rank 0) that should print the summary

    def line(self) -> str:
        if not self.reporter:
            return (
                f"rank {self.rank} of {self.world_size}: {self.n_extracted} extracted, {self.n_skipped} skipped "
                f"into its shard; rank 0 joined them into {self.cache_path}"
            )
        rate = self.n_extracted / self.seconds if self.seconds > 0 else 0.0
        s = f"{self.n_extracted} extracted, {self.n_skipped} skipped"
        if self.n_skipped or self.n_total_failed:
            s += f" (see {self.failed_csv})"
        s += f"; {self.n_already} already cached; cache holds {self.n_total_rows} photos ({rate:.1f} images/s)"
        if self.n_retried:
            s += f"; {self.n_retried} failed before and tried again"
        if self.n_repaired:
            s += f"; {self.n_repaired} damaged rows were dropped and extracted again"
        return s

    def finish(self, store: FeatureStore) -> None:
        """Take the cache's totals after a run, and write ``failed.csv`` beside it."""
        self.n_total_rows, self.n_total_failed = store.n_rows, store.write_failed_csv(self.failed_csv)
        self.split_counts = split_counts(list(store.column("city")), list(store.column("split")))


_DONE = object()


class _Writer(threading.Thread):
    """The writer thread of :func:`write_batches`: takes batches from a bounded queue, one commit each."""

    def __init__(self, write_one: Callable[[FeatureBatch], None], queue_size: int):
        super().__init__(name="featkit-writer", daemon=True)
        self.write_one, self.queue = write_one, queue.Queue(maxsize=queue_size)
        self.error: BaseException | None = None
        self.stopping = threading.Event()

    def run(self) -> None:
        try:
            while not self.stopping.is_set():
                b = self.queue.get()
                if b is _DONE or self.stopping.is_set():
                    return
                self.write_one(b)
        except BaseException as e:  # on_batch's KeyboardInterrupt included: the caller re-raises it
            self.error = e

    def put(self, b) -> None:
        """Queue ``b``, waiting while the queue is full; re-raise the writer's error, if any, here."""
        while True:
            if self.error is not None:
                raise self.error
            if not self.is_alive():
                raise RuntimeError("featkit's writer thread stopped unexpectedly")
            try:
                self.queue.put(b, timeout=0.05)
                return
            except queue.Full:
                continue

    def stop(self) -> None:
        """Drop what is queued (never committed: a rerun extracts it), let the batch being written finish, and wait."""
        self.stopping.set()
        while True:
            try:
                self.queue.get_nowait()
            except queue.Empty:
                break
        try:
            self.queue.put_nowait(_DONE)
        except queue.Full:
            pass
        self.join()


def write_batches(
    store: FeatureStore,
    batches: Iterable[FeatureBatch],
    splits: dict[str, str],
    summary: ExtractSummary,
    *,
    progress=None,
    on_batch: Callable[[int], None] | None = None,
    queue_size: int = 4,
) -> None:
    """Append each batch (rows, features and failures) to ``store``, one commit per batch.

    The appends run in a writer thread fed through a queue of ``queue_size``
    batches, so producing the next batches (decoding, the forward pass)
    overlaps writing this one; ``queue_size=0`` writes in the calling thread.
    ``on_batch(n_done)`` runs after each commit, in the writer. An exception
    there (or in the append) stops the writer and is raised here; an
    exception here (KeyboardInterrupt) lets the batch being written finish its
    commit and drops the queued ones. Either way the store holds only whole,
    committed batches, and returns with no thread writing to it.
    """

    def write_one(b: FeatureBatch) -> None:
        finite = np.isfinite(b.features).all(axis=1) if len(b.photos) else np.zeros(0, dtype=bool)
        if not finite.all():  # a NaN or inf in the cache would be read as damage: record the photo instead
            bad = [(p, "the backbone gave non-finite features (NaN or inf; float16 overflow?)") for p, ok in zip(b.photos, finite) if not ok]
            b = FeatureBatch([p for p, ok in zip(b.photos, finite) if ok], b.features[finite], b.failed + bad)
        rows = {
            "photo_id": [p.photo_id for p in b.photos],
            "city": [p.city for p in b.photos],
            "split": [splits[p.photo_id] for p in b.photos],
            "path": [path_text(p.path) for p in b.photos],
            "owner": [p.owner for p in b.photos],
        }
        store.append(rows, b.features, [_failure(p, reason) for p, reason in b.failed])
        summary.n_extracted += len(b.photos)
        summary.n_skipped += len(b.failed)
        if progress is not None:
            progress.update(len(b.photos) + len(b.failed))
        if on_batch is not None:
            on_batch(summary.n_extracted + summary.n_skipped)

    if queue_size <= 0:
        for b in batches:
            write_one(b)
        return
    writer = _Writer(write_one, queue_size)
    writer.start()
    try:
        for b in batches:
            writer.put(b)
        writer.put(_DONE)
        writer.join()
    except BaseException:
        writer.stop()
        raise
    if writer.error is not None:
        raise writer.error


def split_protocol(options: ExtractOptions) -> dict:
    """The options that decide the splits, as recorded in the cache (``seed`` is the split seed: the key
    older caches recorded when one seed drove everything, read the same way)."""
    return {"seed": options.split_seed, "test_size": options.test_size, "val_size": options.val_size}


def check_split_protocol(store: FeatureStore, options: ExtractOptions) -> None:
    """Refuse to add photos to a cache under another split protocol than the one it records
    (the recorded splits would win, silently ignoring the new options)."""
    recorded, wanted = store.split_protocol, split_protocol(options)
    if recorded is not None and store.n_rows and recorded != wanted:
        rec, want = protocol_text(recorded), protocol_text(wanted)
        raise FeatkitError(
            f"cache {store.path} holds splits made with {rec}, not {want}; pass the recorded values to add photos, "
            "or change the splits of the cached photos without re-extracting them: featkit split --cache DIR "
            "--test-size T --val-size V --split-seed S"
        )


def protocol_text(protocol: dict) -> str:
    """A recorded split protocol as the options that repeat it: ``split_seed=0 test_size=0.125 val_size=0.1``."""
    return " ".join(f"{'split_seed' if k == 'seed' else k}={v}" for k, v in sorted(protocol.items()))


def resplit(stores: list[FeatureStore], options: ExtractOptions) -> dict[str, dict[str, int]]:
    """Draw the splits of the cached photos again under ``options``' split seed, test and val sizes (no re-extraction).

    ``stores``: every backbone of one cache folder; they get one split, drawn once over all their photos.
    Returns the counts of the store with the most photos.
    """
    photos: dict[str, Photo] = {}
    for store in stores:
        cols = {k: store.column(k) for k in ("photo_id", "city", "path", "owner")}
        for pid, city, path, owner in zip(*cols.values()):
            photos.setdefault(pid, Photo(pid, city, Path(path), owner))
    splits = assign_splits(list(photos.values()), seed=options.split_seed, test_size=options.test_size, val_size=options.val_size)
    for store in stores:
        store.rewrite_splits(splits, split_protocol(options))
    largest = max(stores, key=lambda s: s.n_rows)
    return split_counts(list(largest.column("city")), [splits[p] for p in largest.column("photo_id")])


def shared_split(cache_path: str | Path, options: ExtractOptions) -> dict[str, str]:
    """The split the other backbones of ``cache_path``'s folder hold (``photo_id -> split``; empty when there
    are none), refused when they were drawn under another protocol than ``options``' (checked before a new
    backbone's file is created, so a refused run leaves nothing behind)."""
    shared, protocol = shared_splits(cache_path)
    if protocol is not None and protocol != split_protocol(options):
        rec = protocol_text(protocol)
        raise FeatkitError(
            f"the other backbones in {Path(cache_path).parent} hold splits made with {rec}; pass the same values "
            "(--split-seed, --test-size, --val-size: every backbone of a cache shares one split), or re-draw them all with featkit split"
        )
    return shared


def plan(
    store: FeatureStore, photos: list[Photo], options: ExtractOptions, *, summary: ExtractSummary | None = None
) -> tuple[dict[str, str], list[Photo]]:
    """Splits for the photos that can be read, and the photos to extract now.

    Photos already handled are left alone: those stored, and those recorded as failed unless
    ``options.retry_failed`` or their file changed since it failed (size or modification time:
    :func:`~featkit.store.file_signature`; counted in ``summary.n_retried``). Every other photo is first looked at cheaply (:func:`check_photos`: the file,
    its header, its pixel count, and whether it is the same file as another photo); those that fail are
    recorded in ``store`` now, with their reason, and counted in ``summary.n_skipped``. Only then are the
    splits assigned, over the photos stored or to extract, so an unreadable photo never takes a place in a
    test or val quota. Photos already cached keep their split; so do photos another backbone of the same
    cache folder holds (:func:`featkit.store.shared_splits`), so every backbone is tested on the same photos.
    """
    check_split_protocol(store, options)
    shared = shared_split(store.path, options)
    stored_ids = store.column("photo_id")
    existing = {**shared, **dict(zip(stored_ids, store.column("split")))}
    stored = set(stored_ids.tolist())
    failed_ids = {r["photo_id"] for r in store.failed()}
    signatures = {p.photo_id: file_signature(p.path) for p in photos if p.photo_id in failed_ids}
    done = store.done_ids(retry_failed=options.retry_failed, signatures=signatures)
    pending = [p for p in photos if p.photo_id not in done]
    bad = check_photos(pending, known=[p for p in photos if p.photo_id in stored])
    if bad:
        no_rows = {name: [] for name in ROW_FIELDS}
        store.append(no_rows, np.empty((0, store.n_features), dtype=np.float32), [_failure(p, why) for p, why in bad])
    bad_ids = {p.photo_id for p, _ in bad}
    todo = [p for p in pending if p.photo_id not in bad_ids]
    if summary is not None:
        summary.n_already, summary.n_skipped = len(photos) - len(pending), summary.n_skipped + len(bad)
        summary.n_retried = sum(p.photo_id in failed_ids for p in pending)
    readable = [p for p in photos if p.photo_id in stored] + todo
    readable_ids = {p.photo_id for p in readable}
    unreadable = Counter(p.city for p in photos if p.photo_id not in readable_ids)
    failed_csv = store.path.with_name(FAILED_CSV)
    try:
        splits = assign_splits(
            readable, seed=options.split_seed, test_size=options.test_size, val_size=options.val_size, fixed=existing,
            unreadable=unreadable, failed_csv=str(failed_csv),
        )
    except FeatkitError:
        store.write_failed_csv(failed_csv)  # the message points there
        raise
    if store.n_rows == 0:  # a new cache records its protocol (an old cache's is unknown: left unset)
        store.record_split_protocol(split_protocol(options))
    return splits, todo


def _failure(photo: Photo, reason: str) -> tuple[str, str, str, str]:
    """A failure as the store records it: the photo, its path, why, and its file's signature now."""
    return photo.photo_id, path_text(photo.path), reason, file_signature(photo.path)


CHECK_THREADS = 8  # header checks at once: file system latency overlaps (a network share, a cold disk)


def check_photos(photos: list[Photo], *, known: list[Photo] = ()) -> list[tuple[Photo, str]]:
    """The photos among ``photos`` that cannot be extracted, with why, found without decoding any pixels.

    Each file is looked at (:func:`~featkit.images.check_image_file`: it exists, is a regular non-empty
    file, not a dangling link or a link loop, its header parses and claims at most
    :data:`~featkit.images.MAX_PIXELS` pixels), and it must not be the same file (device and inode: a link,
    a hard link, a city folder linked to another) as a photo before it: one of ``known`` (photos already
    stored), else an earlier one of ``photos`` ("same file as Paris/1.jpg (city Paris)"), so no file is
    stored twice, under one label or two. About 0.1 ms a photo; threads overlap the file system's latency.
    """
    def look(p: Photo) -> tuple[str | None, tuple[int, int] | None]:
        try:
            check_image_file(p.path)
            st = os.stat(p.path)
        except UnreadableImage as e:
            return str(e), None
        except OSError:  # gone since the check: the extraction records why
            return None, None
        return None, (st.st_dev, st.st_ino)

    with warnings.catch_warnings():  # in this thread, before the pool starts: the check refuses those photos itself
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        if len(photos) > 64:
            with ThreadPoolExecutor(max_workers=CHECK_THREADS, thread_name_prefix="featkit-check") as pool:
                looks = list(pool.map(look, photos))
        else:
            looks = [look(p) for p in photos]
    first: dict[tuple[int, int], Photo] = {}
    for p in known:
        try:
            st = os.stat(p.path)
        except OSError:
            continue
        first.setdefault((st.st_dev, st.st_ino), p)
    bad = []
    for p, (why, key) in zip(photos, looks):
        if why is None and key is not None:
            other = first.setdefault(key, p)
            if other is not p:
                why = f"same file as {other.photo_id} (city {other.city})"
        if why is not None:
            bad.append((p, why))
    return bad


def extraction_provenance(
    dev: torch.device, spec: BackboneSpec, options: ExtractOptions, *, weights_source: str | None = None, **extra
) -> dict:
    """The provenance record stored in a cache: who, when, with what, on which device.

    ``weights_source`` says where the backbone's weights can be loaded again
    (see :func:`~featkit.backbones.weights_source`), so ``featkit predict``
    rebuilds the same backbone without being told; when not given it is read
    off the spec where that suffices (``random``, ``torchvision``) and left
    None for a file of unknown place. ``weights_seed`` is the seed of random weights.
    """
    source = weights_source or source_of_spec(spec)
    return provenance(
        device=str(dev), decode=resolve_decode(options.decode, dev), split_seed=options.split_seed, test_size=options.test_size, val_size=options.val_size,
        backbone=spec.describe(), weights_source=source, weights_seed=spec.weights_seed, **extra
    )


def progress_bar(total: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, unit="img", desc="extract", disable=not enabled, dynamic_ncols=True, file=sys.stderr)


def extract_features(
    photos: list[Photo],
    net: FeatureNet,
    spec: BackboneSpec,
    cache_path: str | Path,
    options: ExtractOptions = ExtractOptions(),
    *,
    on_batch: Callable[[int], None] | None = None,
    weights_source: str | None = None,
) -> ExtractSummary:
    """Fill the cache at ``cache_path`` with the features of ``photos`` not yet in it, in this process.

    Splits are assigned here for every photo (photos already cached keep
    theirs) and stored beside the features. ``on_batch(n_done)`` is called
    after each committed batch (progress hooks, tests). ``weights_source`` (where the
    backbone's weights file lies) is recorded in the cache's provenance. Under torchrun,
    :func:`featkit.distributed.extract_distributed` drives the same parts on every rank.
    """
    dev = resolve_device(options.device)
    workers = default_workers() if options.workers is None else options.workers
    cache_path = Path(cache_path)
    summary = ExtractSummary(cache_path=str(cache_path), failed_csv=str(cache_path.with_name(FAILED_CSV)))
    t0 = time.perf_counter()
    prov = extraction_provenance(dev, spec, options, weights_source=weights_source)  # a bad `decode` fails here, before the cache is touched
    with FeatureStore.open_for_append(cache_path, cache_identity(spec, options.dtype), overwrite=options.overwrite, provenance=prov) as store:
        splits, todo = plan(store, photos, options, summary=summary)
        bar = progress_bar(len(todo), options.progress)
        try:
            batches = feature_batches(
                todo, net, spec.image_size, dev, batch_size=options.batch_size, workers=workers, decode=options.decode, dtype=options.dtype,
                interpolation=spec.interpolation,
            )
            write_batches(store, batches, splits, summary, progress=bar, on_batch=on_batch)
        except KeyboardInterrupt:
            summary.interrupted = True
        finally:
            bar.close()
        summary.seconds = time.perf_counter() - t0
        summary.finish(store)
    return summary
