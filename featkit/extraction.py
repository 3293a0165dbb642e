"""One pass of the photos through the frozen backbone, into the HDF5 feature cache.

This module owns what an extraction run does around the engine (:func:`featkit.engine.feature_batches`,
which turns photos into feature batches and knows nothing of the store):

- :func:`plan` decides the splits and the photos to extract now: photos already handled are left
  alone, the others are first looked at cheaply (:func:`check_photos`) and those that cannot be read
  are recorded with their reason; photos keep the split the cache, or the folder's other backbones
  (:func:`shared_split`), already gave them. :func:`resplit` draws the splits of a cache again.
- :func:`write_batches` appends the batches to a :class:`~featkit.cache.store.FeatureStore`
  from a writer thread fed by a bounded queue, committing each batch before the
  next, so the slowest stage (decode, forward, write) sets the pace and a killed
  run resumes where it stopped.

:func:`extract_features` drives both for one process; :mod:`featkit.distributed`
drives the same parts on every torchrun rank. Both take one :class:`~featkit.options.ExtractOptions`
and resolve its ``device`` once, at their start (or are handed the device already resolved).
A photo that cannot be read is recorded with its reason and skipped; it never aborts the run."""

from __future__ import annotations

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
from typing import Callable, Iterable

import numpy as np
import torch
from PIL import Image

from featkit.backbone_spec import BackboneSpec, source_of_spec
from featkit.backbones import FeatureNet
from featkit.decoding import resolve_decode
from featkit.devices import resolve_device
from featkit.engine import FeatureBatch, default_workers, feature_batches
from featkit.errors import CacheDamaged, FeatkitError
from featkit.images import UnreadableImage, check_image_file
from featkit.manifest import Photo, path_text
from featkit.options import ExtractOptions
from featkit.provenance import provenance
from featkit.splits import assign_splits, split_counts
from featkit.cache.format import ROW_FIELDS
from featkit.cache.identity import cache_identity
from featkit.cache.names import FAILED_CSV
from featkit.cache.store import FeatureStore, file_signature, shared_splits


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
    store: FeatureStore,
    photos: list[Photo],
    options: ExtractOptions,
    *,
    summary: ExtractSummary | None = None,
    shared: dict[str, str] | None = None,
) -> tuple[dict[str, str], list[Photo]]:
    """Splits for the photos that can be read, and the photos to extract now.

    Photos already handled are left alone: those stored, and those recorded as failed unless
    ``options.retry_failed`` or their file changed since it failed (size or modification time:
    :func:`~featkit.cache.store.file_signature`; counted in ``summary.n_retried``). Every other photo is first looked at cheaply (:func:`check_photos`: the file,
    its header, its pixel count, and whether it is the same file as another photo); those that fail are
    recorded in ``store`` now, with their reason, and counted in ``summary.n_skipped``. Only then are the
    splits assigned, over the photos stored or to extract, so an unreadable photo never takes a place in a
    test or val quota. Photos already cached keep their split; so do photos another backbone of the same
    cache folder holds (:func:`shared_split`), so every backbone is tested on the same photos. ``shared``: that
    split, when the run has read it already (the sibling caches are read once per run); None reads it here.
    """
    check_split_protocol(store, options)
    if shared is None:
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
    (see :func:`~featkit.backbone_spec.weights_source`), so ``featkit predict``
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
    device: torch.device | None = None,
    shared: dict[str, str] | None = None,
) -> ExtractSummary:
    """Fill the cache at ``cache_path`` with the features of ``photos`` not yet in it, in this process.

    Splits are assigned here for every photo (photos already cached keep
    theirs) and stored beside the features. ``on_batch(n_done)`` is called
    after each committed batch (progress hooks, tests). ``weights_source`` (where the
    backbone's weights file lies) is recorded in the cache's provenance. Under torchrun,
    :func:`featkit.distributed.extract_distributed` drives the same parts on every rank.

    ``device``: the run's device when the caller resolved it already (:func:`featkit.api.extract`);
    None resolves ``options.device`` here, once. ``shared``: the split the folder's other backbones
    hold, when the caller read it already (:func:`shared_split`); None: :func:`plan` reads it.
    """
    dev = resolve_device(options.device) if device is None else device
    workers = default_workers() if options.workers is None else options.workers
    cache_path = Path(cache_path)
    summary = ExtractSummary(cache_path=str(cache_path), failed_csv=str(cache_path.with_name(FAILED_CSV)))
    t0 = time.perf_counter()
    prov = extraction_provenance(dev, spec, options, weights_source=weights_source)  # a bad `decode` fails here, before the cache is touched
    existed = cache_path.exists() and not options.overwrite
    with FeatureStore.open_for_append(cache_path, cache_identity(spec, options.dtype), overwrite=options.overwrite, provenance=prov) as store:
        try:
            splits, todo = plan(store, photos, options, summary=summary, shared=shared)
        except FeatkitError:
            if not existed and store.n_rows == 0:
                store.discard()  # refused before anything was stored: no empty cache is left behind
            raise
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
        if existed and not options.repair and not summary.interrupted:
            try:  # the rows it held before: a plain extract never reports success on a damaged cache
                store.check_intact()
            except CacheDamaged as e:
                raise CacheDamaged(f"{summary.n_extracted} photos were extracted and committed, but {e}") from None
    return summary
