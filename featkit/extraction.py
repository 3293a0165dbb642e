"""One pass of the photos through the frozen backbone, into the HDF5 feature cache.

The engine has two public parts that know nothing of each other:

- :func:`feature_batches` turns photos into feature batches. Images are decoded
  and resized in DataLoader worker processes and travel as uint8 tensors;
  batches go through the backbone under ``torch.inference_mode()``
  (half-precision autocast, pinned memory and channels-last on CUDA). It knows
  nothing about the store.
- :func:`write_batches` appends those batches to a :class:`~featkit.store.FeatureStore`,
  committing each batch before the next, so a killed run resumes where it stopped.

:func:`extract_features` drives both for one process; :mod:`featkit.distributed`
drives the same parts on every torchrun rank. Both take one :class:`~featkit.options.ExtractOptions`.
A photo that cannot be read is recorded with its reason and skipped; it never aborts the run.
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np
import torch

from featkit.backbones import BackboneSpec, FeatureNet
from featkit.devices import resolve_device
from featkit.errors import FeatkitError
from featkit.images import UnreadableImage, load_image
from featkit.manifest import Photo
from featkit.options import ExtractOptions
from featkit.provenance import provenance
from featkit.splits import assign_splits, split_counts
from featkit.store import FAILED_CSV, FeatureStore, cache_identity


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
class FeatureBatch:
    """Photos that were read and their features (rows in the same order), and photos that were not."""

    photos: list[Photo]
    features: np.ndarray  # (len(photos), feature_dim) float32
    failed: list[tuple[Photo, str]]  # (photo, reason)


def default_workers(processes_per_node: int = 1) -> int:
    """Decoding workers: the cores left after the main process(es), at most 8 each."""
    return max(1, min(8, (os.cpu_count() or 2) // max(1, processes_per_node) - 1))


def feature_batches(
    photos: list[Photo], net: FeatureNet, image_size: int, dev: torch.device, *, batch_size: int = 64, workers: int = 0
) -> Iterator[FeatureBatch]:
    """Run ``photos`` through ``net`` on ``dev``, ``batch_size`` at a time, in order."""
    if not photos:
        return
    on_cuda = dev.type == "cuda"
    if on_cuda:
        torch.backends.cudnn.benchmark = True
        net = net.to(dev, memory_format=torch.channels_last)
    else:
        net = net.to(dev)
    loader = torch.utils.data.DataLoader(
        _PhotoDataset([str(p.path) for p in photos], image_size),
        batch_size=batch_size,
        num_workers=workers,
        collate_fn=_collate,
        pin_memory=on_cuda,
        prefetch_factor=4 if workers else None,
        persistent_workers=False,
    )
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
            yield FeatureBatch([photos[i] for i in idx], feats, [(photos[i], reason) for i, reason in bad])


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

    def finish(self, store: FeatureStore) -> None:
        """Take the cache's totals after a run, and write ``failed.csv`` beside it."""
        self.n_total_rows, self.n_total_failed = store.n_rows, store.n_failed
        self.split_counts = split_counts(list(store.column("city")), list(store.column("split")))
        store.write_failed_csv(self.failed_csv)


def write_batches(
    store: FeatureStore,
    batches: Iterable[FeatureBatch],
    splits: dict[str, str],
    summary: ExtractSummary,
    *,
    progress=None,
    on_batch: Callable[[int], None] | None = None,
) -> None:
    """Append each batch (rows, features and failures) to ``store``, one commit per batch."""
    for b in batches:
        rows = {
            "photo_id": [p.photo_id for p in b.photos],
            "city": [p.city for p in b.photos],
            "split": [splits[p.photo_id] for p in b.photos],
            "path": [str(p.path) for p in b.photos],
            "owner": [p.owner for p in b.photos],
        }
        store.append(rows, b.features, [(p.photo_id, str(p.path), reason) for p, reason in b.failed])
        summary.n_extracted += len(b.photos)
        summary.n_skipped += len(b.failed)
        if progress is not None:
            progress.update(len(b.photos) + len(b.failed))
        if on_batch is not None:
            on_batch(summary.n_extracted + summary.n_skipped)


def split_protocol(options: ExtractOptions) -> dict:
    """The options that decide the splits, as recorded in the cache."""
    return {"seed": options.seed, "test_size": options.test_size, "val_size": options.val_size}


def check_split_protocol(store: FeatureStore, options: ExtractOptions) -> None:
    """Refuse to add photos to a cache under another split protocol than the one it records
    (the recorded splits would win, silently ignoring the new options)."""
    recorded, wanted = store.split_protocol, split_protocol(options)
    if recorded is not None and store.n_rows and recorded != wanted:
        rec = " ".join(f"{k}={v}" for k, v in sorted(recorded.items()))
        want = " ".join(f"{k}={v}" for k, v in sorted(wanted.items()))
        raise FeatkitError(
            f"cache {store.path} holds splits made with {rec}, not {want}; pass the recorded values to add photos, "
            "or change the splits of the cached photos without re-extracting them: featkit split --cache DIR "
            "--test-size T --val-size V --seed S"
        )


def resplit(store: FeatureStore, options: ExtractOptions) -> dict[str, dict[str, int]]:
    """Draw the splits of the cached photos again under ``options``' seed, test and val sizes (no re-extraction)."""
    cols = {k: store.column(k) for k in ("photo_id", "city", "path", "owner")}
    photos = [Photo(pid, city, Path(path), owner) for pid, city, path, owner in zip(*cols.values())]
    splits = assign_splits(photos, seed=options.seed, test_size=options.test_size, val_size=options.val_size)
    store.rewrite_splits(splits, split_protocol(options))
    return split_counts(list(cols["city"]), [splits[p.photo_id] for p in photos])


def plan(store: FeatureStore, photos: list[Photo], options: ExtractOptions) -> tuple[dict[str, str], list[Photo]]:
    """Splits for every photo (photos already cached keep theirs) and the photos not yet handled."""
    check_split_protocol(store, options)
    existing = dict(zip(store.column("photo_id"), store.column("split")))
    done = store.done_ids()
    splits = assign_splits(photos, seed=options.seed, test_size=options.test_size, val_size=options.val_size, fixed=existing)
    if store.n_rows == 0:  # a new cache records its protocol (an old cache's is unknown: left unset)
        store.record_split_protocol(split_protocol(options))
    return splits, [p for p in photos if p.photo_id not in done]


def extraction_provenance(dev: torch.device, spec: BackboneSpec, options: ExtractOptions, **extra) -> dict:
    """The provenance record stored in a cache: who, when, with what, on which device."""
    return provenance(
        device=str(dev), seed=options.seed, test_size=options.test_size, val_size=options.val_size, backbone=spec.describe(), **extra
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
) -> ExtractSummary:
    """Fill the cache at ``cache_path`` with the features of ``photos`` not yet in it, in this process.

    Splits are assigned here for every photo (photos already cached keep
    theirs) and stored beside the features. ``on_batch(n_done)`` is called
    after each committed batch (progress hooks, tests). Under torchrun,
    :func:`featkit.distributed.extract_distributed` drives the same parts on every rank.
    """
    dev = resolve_device(options.device)
    workers = default_workers() if options.workers is None else options.workers
    cache_path = Path(cache_path)
    summary = ExtractSummary(cache_path=str(cache_path), failed_csv=str(cache_path.with_name(FAILED_CSV)))
    t0 = time.perf_counter()
    prov = extraction_provenance(dev, spec, options)
    with FeatureStore.open_for_append(cache_path, cache_identity(spec, options.dtype), overwrite=options.overwrite, provenance=prov) as store:
        splits, todo = plan(store, photos, options)
        summary.n_already = len(photos) - len(todo)
        bar = progress_bar(len(todo), options.progress)
        try:
            batches = feature_batches(todo, net, spec.image_size, dev, batch_size=options.batch_size, workers=workers)
            write_batches(store, batches, splits, summary, progress=bar, on_batch=on_batch)
        except KeyboardInterrupt:
            summary.interrupted = True
        finally:
            bar.close()
        summary.seconds = time.perf_counter() - t0
        summary.finish(store)
    return summary
