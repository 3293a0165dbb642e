"""Extraction spread over the processes torchrun starts, joined into one feature cache.

One node, N GPUs (or N CPU processes)::

    torchrun --nproc-per-node N --no-python featkit extract PHOTOS --cache CACHE
    torchrun --nproc-per-node N -m featkit extract PHOTOS --cache CACHE

Several nodes: the same command on every node, with torchrun's rendezvous
options, and the cache folder on a filesystem all nodes share (NFS, Lustre, ...)::

    torchrun --nnodes 2 --nproc-per-node 8 --rdzv-backend c10d --rdzv-endpoint HOST:29500 \\
        --no-python featkit extract PHOTOS --cache /shared/cache

:func:`featkit.api.extract` notices torchrun from its environment
(:func:`torchrun_env`: ``WORLD_SIZE`` > 1, ``RANK``, ``LOCAL_RANK``) and comes here,
so the command line is the same as for one process. Each rank drives the
public parts of :mod:`featkit.extraction` (``plan``, ``write_batches``) and of
:mod:`featkit.engine` (``feature_batches``) with the same :class:`~featkit.options.ExtractOptions`. The process group uses NCCL on CUDA
(rank r uses ``cuda:LOCAL_RANK``) and gloo on CPU; it only carries small
messages (which photos are done, counts, errors), never features.

1. Rank 0 opens (or creates, or ``--overwrite``\\ s) the cache with the usual
   identity check, and first joins any shard files a killed earlier run left
   behind, so their photos count as done.
2. Every rank assigns the splits of all photos (``assign_splits`` is
   deterministic, so they agree) and takes every ``world_size``-th photo, from
   its own rank on, of the sorted photos not yet in the cache.
3. Each rank writes its photos to ``<cache>.rank<k>-of-<n>.h5``, a
   :class:`~featkit.cache.store.FeatureStore` with the cache's identity, committed
   batch by batch like the cache itself.
4. Rank 0 copies the shards' committed rows and failures into the cache in
   blocks, each block committed, skipping photo ids already there, and deletes a
   shard only once its rows are committed. A run killed at any point resumes
   with the same command (any number of processes): nothing is lost or stored twice.
"""

from __future__ import annotations

import datetime
import hashlib
import os
import time
from pathlib import Path
from typing import Callable, NamedTuple

import numpy as np
import torch
import torch.distributed as dist

from featkit.backbone_spec import BackboneSpec
from featkit.backbones import FeatureNet
from featkit.devices import resolve_device
from featkit.engine import default_workers, feature_batches
from featkit.errors import FeatkitError
from featkit.extraction import ExtractSummary, extraction_provenance, plan, progress_bar, write_batches
from featkit.manifest import Photo
from featkit.options import ExtractOptions
from featkit.cache.format import ROW_FIELDS
from featkit.cache.identity import cache_identity, check_identity
from featkit.cache.names import FAILED_CSV, lock_file, shard_files, shard_path
from featkit.cache.store import FeatureStore
# into the cache; a rank that dies is noticed by torchrun, not by this timeout.
GROUP_TIMEOUT = datetime.timedelta(hours=12)


class Ranks(NamedTuple):
    """Where this process stands in a torchrun job."""

    rank: int
    local_rank: int
    world_size: int


def torchrun_env() -> Ranks | None:
    """This process's :class:`Ranks` when started by torchrun with more than one process, else None."""
    try:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1 or "RANK" not in os.environ or "LOCAL_RANK" not in os.environ:
            return None
        return Ranks(int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"]), world)
    except ValueError:
        raise FeatkitError(
            "WORLD_SIZE, RANK and LOCAL_RANK must be integers (torchrun sets them); "
            "unset them to run in one process, or start the command with torchrun"
        ) from None


def join_shards(store: FeatureStore, shards: list[Path], *, block_rows: int = 2048) -> int:
    """Copy the committed rows and failures of ``shards`` into ``store``; return the rows copied.

    Photo ids already in ``store`` are skipped, each block is committed on its
    own, and a shard file is deleted only after all its rows are committed,
    so a join killed half-way is finished by the next one.
    """
    # Skip rows stored already; not failures recorded already: a photo retried (--retry-failed) may work now.
    done = set(store.column("photo_id").tolist())
    dtype = np.dtype(store.identity["dtype"])
    copied = 0
    for path in shards:
        with FeatureStore.open(path) as shard:
            check_identity(
                shard.identity,
                store.identity,
                f"shard file {path}",
                "delete that file (its photos are extracted again) or rerun with --overwrite",
            )
            cols = {name: shard.column(name) for name in ROW_FIELDS}
            keep = []
            for i, pid in enumerate(cols["photo_id"]):
                if pid not in done:
                    keep.append(i)
                    done.add(pid)
            keep = np.asarray(keep, dtype=np.int64)
            for start in range(0, len(keep), block_rows):
                sel = keep[start : start + block_rows]
                rows = {name: cols[name][sel].tolist() for name in ROW_FIELDS}
                store.append(rows, shard.read_features(sel, dtype=dtype), [])
                copied += len(sel)
            failed = []
            for r in shard.failed():
                if r["photo_id"] not in done:
                    failed.append((r["photo_id"], r["path"], r["reason"], r["signature"]))
                    done.add(r["photo_id"])
            if failed:
                store.append({}, np.empty((0, 0), dtype=dtype), failed)
        path.unlink()
        lock_file(path).unlink(missing_ok=True)  # a shard has one writer, its rank, long gone: no one waits on this lock
    return copied


def extract_distributed(
    photos: list[Photo],
    net: FeatureNet,
    spec: BackboneSpec,
    cache_path: str | Path,
    options: ExtractOptions,
    ranks: Ranks,
    *,
    on_batch: Callable[[int], None] | None = None,
    weights_source: str | None = None,
    device: torch.device | None = None,
    shared: dict[str, str] | None = None,
) -> ExtractSummary:
    """This rank's part of a torchrun extraction (see the module docstring).

    Every rank returns an :class:`~featkit.extraction.ExtractSummary` of the whole
    run; only rank 0's has ``reporter`` set, so one process prints it.
    Initialises the process group unless one is already up, and destroys it
    at the end if it made it. ``weights_source`` goes into the cache's provenance
    as in :func:`~featkit.extraction.extract_features`; so do ``device`` (the run's device, resolved
    by the caller; None resolves ``options.device`` here, once) and ``shared`` (the split the folder's
    other backbones hold, read by the caller; None: rank 0's :func:`~featkit.extraction.plan` reads it).
    On CUDA, rank r then runs on ``cuda:LOCAL_RANK``.
    """
    dev = resolve_device(options.device) if device is None else device
    if dev.type == "cuda":
        dev = torch.device("cuda", ranks.local_rank)
        torch.cuda.set_device(dev)
    own_group = not dist.is_initialized()
    if own_group:
        try:
            backend = "nccl" if dev.type == "cuda" else "gloo"
            dist.init_process_group(backend, rank=ranks.rank, world_size=ranks.world_size, timeout=GROUP_TIMEOUT)
        except Exception as e:  # rendezvous problems surface as many exception types
            msg = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise FeatkitError(
                f"rank {ranks.rank} of {ranks.world_size} could not join torchrun's process group ({msg}); "
                "check torchrun's --rdzv-endpoint (or --master-addr/--master-port) and that every node can reach it"
            ) from None
    try:
        return _RankRun(photos, net, spec, Path(cache_path), options, ranks, dev, on_batch, weights_source, shared).run()
    finally:
        if own_group and dist.is_initialized():
            dist.destroy_process_group()


def _digest(photos: list[Photo]) -> str:
    """A fingerprint of the photo list (ids and cities), to check every rank shards the same photos."""
    h = hashlib.sha256()
    for p in sorted(photos, key=lambda p: p.photo_id):
        h.update(f"{p.photo_id}\t{p.city}\n".encode())
    return h.hexdigest()


def _from_rank0(obj):
    """Rank 0's ``obj``, on every rank."""
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


class _RankRun:
    """One rank's run, in the four steps of the module docstring."""

    def __init__(self, photos, net, spec, cache_path: Path, options: ExtractOptions, ranks: Ranks, dev, on_batch, weights_source=None, shared=None):
        self.photos, self.net, self.spec, self.cache_path, self.shared = photos, net, spec, cache_path, shared
        self.options, self.rank, self.world, self.dev, self.on_batch = options, ranks.rank, ranks.world_size, dev, on_batch
        self.identity = cache_identity(spec, options.dtype)
        self.prov = extraction_provenance(dev, spec, options, weights_source=weights_source, world_size=ranks.world_size)
        self.summary = ExtractSummary(
            cache_path=str(cache_path), failed_csv=str(cache_path.with_name(FAILED_CSV)),
            rank=ranks.rank, world_size=ranks.world_size, reporter=ranks.rank == 0,
        )
        self.store: FeatureStore | None = None

    def run(self) -> ExtractSummary:
        t0 = time.perf_counter()
        try:
            splits, mine, error = self._plan()
            reports = self._extract_own_shard(splits, mine, error)
            self._join(reports)
            self.summary.seconds = time.perf_counter() - t0
            return self.summary
        finally:
            if self.store is not None:
                self.store.close()

    def _plan(self):
        """1-2. Rank 0 readies the cache (joining a killed run's shards); every rank learns the splits and its share."""
        ready = None
        if self.rank == 0:
            try:
                if self.options.overwrite:
                    for p in shard_files(self.cache_path):  # before the cache, so no stale shard outlives it
                        p.unlink()
                self.store = FeatureStore.open_for_append(self.cache_path, self.identity, overwrite=self.options.overwrite, provenance=self.prov)
                join_shards(self.store, shard_files(self.cache_path))
                splits, todo = plan(self.store, self.photos, self.options, summary=self.summary, shared=self.shared)
                ready = (splits, {p.photo_id for p in todo}, _digest(self.photos), None)
            except FeatkitError as e:
                ready = (None, None, None, str(e))
        splits, todo_ids, digest, error = _from_rank0(ready)
        if error:
            raise FeatkitError(error)
        error = None
        if _digest(self.photos) != digest:  # a node that sees another photo set would shard wrongly
            error = (
                f"it sees another photo list than rank 0 ({len(self.photos)} photos); every node must read the same "
                "photo source under the same path (a shared filesystem, or identical copies)"
            )
        todo = sorted((p for p in self.photos if p.photo_id in todo_ids), key=lambda p: p.photo_id)
        self.summary.n_already = len(self.photos) - len(todo) - self.summary.n_skipped  # rank 0: less those plan found unreadable
        return splits, (todo[self.rank :: self.world] if error is None else []), error

    def _extract_own_shard(self, splits, mine, error):
        """3. Each rank fills its own shard; then every rank learns how the others did."""
        opts = self.options
        if opts.workers is None:  # the node's cores shared among the ranks on it
            workers = default_workers(int(os.environ.get("LOCAL_WORLD_SIZE", self.world)))
        else:
            workers = opts.workers
        try:
            if mine:
                # overwrite: any shard of an earlier run was joined in step 1
                path = shard_path(self.cache_path, self.rank, self.world)
                with FeatureStore.open_for_append(path, self.identity, overwrite=True, provenance=self.prov) as shard:
                    bar = progress_bar(len(mine), opts.progress and self.rank == 0)
                    try:
                        batches = feature_batches(
                            mine, self.net, self.spec.image_size, self.dev,
                            batch_size=opts.batch_size, workers=workers, decode=opts.decode, dtype=opts.dtype,
                            interpolation=self.spec.interpolation,
                        )
                        write_batches(shard, batches, splits, self.summary, progress=bar, on_batch=self.on_batch)
                    finally:
                        bar.close()
        except KeyboardInterrupt:
            self.summary.interrupted = True
        except FeatkitError as e:
            error = str(e)
        s = self.summary
        reports = [None] * self.world
        dist.all_gather_object(reports, (s.n_extracted, s.n_skipped, s.interrupted, error, bool(mine)))
        for k, (_, _, _, err, _) in enumerate(reports):
            if err:
                raise FeatkitError(f"rank {k} of {self.world} failed: {err} (the batches done are saved; rerun the same command to resume)")
        s.interrupted = any(r[2] for r in reports)
        return reports

    def _join(self, reports) -> None:
        """4. Rank 0 joins the shards (an interrupted run leaves them for the next run to join)."""
        result = None
        if self.rank == 0:
            try:
                if not self.summary.interrupted:
                    shards = [shard_path(self.cache_path, k, self.world) for k, r in enumerate(reports) if r[4]]
                    for p in shards:
                        if not p.exists():
                            raise FeatkitError(
                                f"shard file {p}, written by another rank, is not visible to rank 0; the cache folder must be "
                                "on a filesystem all nodes share, under the same path; rerun the same command there to resume"
                            )
                    join_shards(self.store, shards)
                self.summary.finish(self.store)
                result = (self.summary.n_total_rows, self.summary.n_total_failed, self.summary.split_counts, None)
            except FeatkitError as e:
                result = (0, 0, {}, str(e))
        n_rows, n_failed, counts, error = _from_rank0(result)
        if error:
            raise FeatkitError(error)
        s = self.summary
        s.n_total_rows, s.n_total_failed, s.split_counts = n_rows, n_failed, counts
        if self.rank == 0:  # the reporter speaks for the whole run
            s.n_extracted = sum(r[0] for r in reports)
            s.n_skipped = sum(r[1] for r in reports)
