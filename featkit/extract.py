"""One pass of the photos through the frozen backbone, into the HDF5 feature cache.

Images are decoded and resized in DataLoader worker processes and travel as
uint8 tensors; batches go through the backbone under ``torch.inference_mode()``
(half-precision autocast, pinned memory and channels-last on CUDA). Every
batch is committed to the cache before the next, so a killed run resumes
where it stopped. A photo that cannot be read is recorded with its reason and
skipped; it never aborts the run.

Started by torchrun (``torchrun --nproc-per-node N --no-python featkit extract
...``), the same call shards the photos across the processes and joins their
parts into one cache; see :mod:`featkit.distributed` (multi-node command included).
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch


from featkit import __version__
from featkit.backbones import BackboneSpec, FeatureNet, resolve_device
from featkit.errors import FeatkitError
from featkit.manifest import Photo
from featkit.splits import assign_splits, split_counts
from featkit.images import UnreadableImage, load_image
from featkit.store import DTYPES, FeatureStore

class _PhotoDataset(torch.utils.data.Dataset):
    def __init__(self, paths: list[str], size: int):
        self.paths, self.size = paths, size

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        try:
            return i, load_image(self.paths[i], self.size), ""
        except UnreadableImage as e:
            return i, None, str(e)


def _collate(items):
    ok = [(i, t) for i, t, _ in items if t is not None]
    bad = [(i, reason) for i, t, reason in items if t is None]
    images = torch.stack([t for _, t in ok]) if ok else None
    return [i for i, _ in ok], images, bad


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
        return s


def default_workers() -> int:
    return max(1, min(8, (os.cpu_count() or 2) - 1))


def cache_identity(spec: BackboneSpec, dtype: str) -> dict:
    return {**spec.identity(), "dtype": dtype}


def extract_features(
    photos: list[Photo],
    net: FeatureNet,
    spec: BackboneSpec,
    cache_path: str | Path,
    *,
    device: str = "auto",
    batch_size: int = 64,
    num_workers: int | None = None,
    dtype: str = "float16",
    seed: int = 0,
    test_size: float = 0.125,
    val_size: float = 0.1,
    overwrite: bool = False,
    progress: bool = True,
    provenance: dict | None = None,
    on_batch: Callable[[int], None] | None = None,
) -> ExtractSummary:
    """Fill the cache at ``cache_path`` with the features of ``photos`` not yet in it.

    Splits are assigned here for every photo (photos already cached keep
    theirs) and stored beside the features. ``on_batch(n_done)`` is called
    after each committed batch (progress hooks, tests).

    Under torchrun with more than one process (``WORLD_SIZE`` > 1) every
    process calls this with the same arguments; it then extracts its share of
    the photos and rank 0 joins them (:func:`featkit.distributed.extract_distributed`).
    """
    if dtype not in DTYPES:
        raise FeatkitError(f"unknown feature dtype {dtype!r}; choose one of: {', '.join(DTYPES)}")
    if batch_size < 1:
        raise FeatkitError("--batch-size must be at least 1")
    from featkit.distributed import extract_distributed, torchrun_env

    ranks = torchrun_env()
    if ranks is not None:
        rank, local_rank, world_size = ranks
        return extract_distributed(
            photos, net, spec, cache_path, rank=rank, local_rank=local_rank, world_size=world_size, device=device,
            batch_size=batch_size, num_workers=num_workers, dtype=dtype, seed=seed, test_size=test_size,
            val_size=val_size, overwrite=overwrite, progress=progress, provenance=provenance, on_batch=on_batch,
        )
    dev = resolve_device(device)
    num_workers = default_workers() if num_workers is None else num_workers
    prov = _provenance(dev, spec, seed, test_size, val_size, provenance)
    summary = ExtractSummary(cache_path=str(cache_path))
    failed_csv = Path(cache_path).with_name("failed.csv")
    summary.failed_csv = str(failed_csv)
    t0 = time.perf_counter()
    with FeatureStore.open_for_append(cache_path, cache_identity(spec, dtype), overwrite=overwrite, provenance=prov) as store:
        existing = dict(zip(store.column("photo_id"), store.column("split")))
        done = store.done_ids()
        splits = assign_splits(photos, seed=seed, test_size=test_size, val_size=val_size, fixed=existing)
        todo = [p for p in photos if p.photo_id not in done]
        summary.n_already = len(photos) - len(todo)
        try:
            _run(todo, splits, net, spec.image_size, dev, store, batch_size, num_workers, progress, summary, on_batch)
        except KeyboardInterrupt:
            summary.interrupted = True
        summary.seconds = time.perf_counter() - t0
        summary.n_total_rows = store.n_rows
        summary.n_total_failed = store.n_failed
        summary.split_counts = split_counts(list(store.column("city")), list(store.column("split")))
        _write_failed_csv(store.failed(), failed_csv)
    return summary


def _provenance(dev, spec: BackboneSpec, seed: int, test_size: float, val_size: float, extra: dict | None) -> dict:
    return {
        "argv": sys.argv,
        "featkit": __version__,
        "torch": torch.__version__,
        "device": str(dev),
        "seed": seed,
        "test_size": test_size,
        "val_size": val_size,
        "backbone": spec.describe(),
        **(extra or {}),
    }


def _run(todo, splits, net, image_size, dev, store, batch_size, num_workers, progress, summary, on_batch) -> None:
    if not todo:
        return
    on_cuda = dev.type == "cuda"
    if on_cuda:
        torch.backends.cudnn.benchmark = True
        net = net.to(dev, memory_format=torch.channels_last)
    else:
        net = net.to(dev)
    loader = torch.utils.data.DataLoader(
        _PhotoDataset([str(p.path) for p in todo], image_size),
        batch_size=batch_size,
        num_workers=num_workers,
        collate_fn=_collate,
        pin_memory=on_cuda,
        prefetch_factor=4 if num_workers else None,
        persistent_workers=False,
    )
    bar = _progress_bar(len(todo), progress)
    try:
        with torch.inference_mode():
            for idx, images, bad in loader:
                feats = np.empty((0, 0), dtype=np.float32)  # a batch of only unreadable photos
                if images is not None:
                    images = images.to(dev, non_blocking=on_cuda)
                    if on_cuda:
                        images = images.contiguous(memory_format=torch.channels_last)
                        with torch.autocast("cuda", dtype=torch.float16):
                            out = net(images)
                    else:
                        out = net(images)
                    feats = out.float().cpu().numpy()
                batch = [todo[i] for i in idx]
                rows = {
                    "photo_id": [p.photo_id for p in batch],
                    "city": [p.city for p in batch],
                    "split": [splits[p.photo_id] for p in batch],
                    "path": [str(p.path) for p in batch],
                    "owner": [p.owner for p in batch],
                }
                failed = [(todo[i].photo_id, str(todo[i].path), reason) for i, reason in bad]
                store.append(rows, feats, failed)
                summary.n_extracted += len(batch)
                summary.n_skipped += len(failed)
                bar.update(len(batch) + len(failed))
                if on_batch is not None:
                    on_batch(summary.n_extracted + summary.n_skipped)
    finally:
        bar.close()


def _progress_bar(total: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, unit="img", desc="extract", disable=not enabled, dynamic_ncols=True, file=sys.stderr)


def _write_failed_csv(failed: list[dict], path: Path) -> None:
    import csv

    if not failed:
        if path.exists():
            path.unlink()
        return
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=["photo_id", "path", "reason"])
        w.writeheader()
        w.writerows(failed)
    tmp.replace(path)
