"""The extraction engine: photos -> feature batches through the frozen backbone, knowing nothing of the store.

:func:`feature_batches` takes photos (files, or pictures already in memory), has them decoded
(:mod:`featkit.decoding`: in DataLoader workers on the CPU, or with nvJPEG on the device with
``decode`` gpu; ``auto`` means cpu for now) and runs them through the backbone under
``torch.inference_mode()`` (half-precision autocast, pinned memory and channels-last on CUDA). On
CUDA the next batch is launched before the last one's features (float16 when the cache is) are
copied back, and an out-of-memory error halves the batch instead of ending the run. It takes an
already resolved ``torch.device``: the run that calls it (:func:`featkit.extraction.extract_features`,
:mod:`featkit.distributed`, :class:`featkit.prediction.Predictor`) resolves the user's ``device`` once.
Each batch is a :class:`FeatureBatch`; :func:`default_workers` is how many decoding workers a process gets.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch

from featkit.backbones import FeatureNet
from featkit.decoding import (
    DEVICE_RESIZE,
    GpuDecoder,
    JpegDataset,
    MemoryDataset,
    PhotoDataset,
    collate,
    collate_jpeg,
    resolve_decode,
)
from featkit.errors import FeatkitError
from featkit.manifest import Photo
from featkit.options import EXTRACT


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
    if mode == "gpu" and interpolation not in DEVICE_RESIZE:
        raise FeatkitError(f"`decode` gpu resizes on the device, which has no {interpolation!r} interpolation (it does {', '.join(DEVICE_RESIZE)}); use `decode` cpu", param="decode")
    workers = 0 if images is not None else workers
    backbone = _Backbone(net, dev, batch_size)
    on_cuda = backbone.on_cuda
    paths = [str(p.path) for p in photos]
    if images is not None:
        dataset = MemoryDataset(images, image_size, interpolation)
    else:
        dataset = (JpegDataset if mode == "gpu" else PhotoDataset)(paths, image_size, interpolation)
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_size=batch_size,
        num_workers=workers,
        collate_fn=collate_jpeg if mode == "gpu" else collate,
        pin_memory=on_cuda and mode == "cpu",
        prefetch_factor=4 if workers else None,
        persistent_workers=False,
    )
    out_dtype = torch.float16 if (on_cuda and dtype == "float16") else torch.float32
    gpu_decoder = GpuDecoder(photos, image_size, dev, interpolation) if mode == "gpu" else None

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
