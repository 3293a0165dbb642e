"""Extraction spread over the processes torchrun starts, joined into one feature cache.

One node, N GPUs (or N CPU processes)::

    torchrun --nproc-per-node N --no-python featkit extract PHOTOS --cache CACHE
    torchrun --nproc-per-node N -m featkit extract PHOTOS --cache CACHE

Several nodes: the same command on every node, with torchrun's rendezvous
options, and the cache folder on a filesystem all nodes share (NFS, Lustre, ...)::

    torchrun --nnodes 2 --nproc-per-node 8 --rdzv-backend c10d --rdzv-endpoint HOST:29500 \\
        --no-python featkit extract PHOTOS --cache /shared/cache

:func:`featkit.extract.extract_features` notices torchrun from its environment
(``WORLD_SIZE`` > 1, ``RANK``, ``LOCAL_RANK``) and comes here, so the command
line is the same as for one process. The process group uses NCCL on CUDA
(rank r uses ``cuda:LOCAL_RANK``) and gloo on CPU; it only carries small
messages (which photos are done, counts, errors), never features.

1. Rank 0 opens (or creates, or ``--overwrite``\\ s) the cache with the usual
   identity check, and first joins any shard files a killed earlier run left
   behind, so their photos count as done.
2. Every rank assigns the splits of all photos (``assign_splits`` is
   deterministic, so they agree) and takes every ``world_size``-th photo, from
   its own rank on, of the sorted photos not yet in the cache.
3. Each rank writes its photos to ``<cache>.rank<k>-of-<n>.h5``, a
   :class:`~featkit.store.FeatureStore` with the cache's identity, committed
   batch by batch like the cache itself.
4. Rank 0 copies the shards' committed rows and failures into the cache in
   blocks, each block committed, skipping photo ids already there, and deletes a
   shard only once its rows are committed. A run killed at any point resumes
   with the same command (any number of processes): nothing is lost or stored twice.
"""

from __future__ import annotations

import datetime
import glob
import hashlib
import os
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.distributed as dist

from featkit.backbones import BackboneSpec, FeatureNet, resolve_device
from featkit.errors import FeatkitError
from featkit.manifest import Photo
from featkit.splits import assign_splits, split_counts
from featkit.store import ROW_FIELDS, FeatureStore, check_identity

# Long, because the other ranks wait while rank 0 copies a killed run's shards
# into the cache; a rank that dies is noticed by torchrun, not by this timeout.
GROUP_TIMEOUT = datetime.timedelta(hours=12)


def torchrun_env() -> tuple[int, int, int] | None:
    """``(rank, local_rank, world_size)`` when started by torchrun with more than one process, else None."""
    try:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1 or "RANK" not in os.environ or "LOCAL_RANK" not in os.environ:
            return None
        return int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"]), world
    except ValueError:
        raise FeatkitError(
            "WORLD_SIZE, RANK and LOCAL_RANK must be integers (torchrun sets them); "
            "unset them to run in one process, or start the command with torchrun"
        ) from None


def shard_path(cache_path: str | Path, rank: int, world_size: int) -> Path:
    """Where rank ``rank`` of ``world_size`` writes its part: ``<cache>.rank<k>-of-<n>.h5`` beside the cache."""
    p = Path(cache_path)
    return p.with_name(f"{p.name}.rank{rank}-of-{world_size}.h5")


def shard_files(cache_path: str | Path) -> list[Path]:
    """Shard files of this cache that exist now, from runs of any size."""
    p = Path(cache_path)
    return sorted(Path(s) for s in glob.glob(os.path.join(glob.escape(str(p.parent)), glob.escape(p.name) + ".rank*-of-*.h5")))


def join_shards(store: FeatureStore, shards: list[Path], *, block_rows: int = 2048) -> int:
    """Copy the committed rows and failures of ``shards`` into ``store``; return the rows copied.

    Photo ids already in ``store`` are skipped, each block is committed on its
    own, and a shard file is deleted only after all its rows are committed,
    so a join killed half-way is finished by the next one.
    """
    done = store.done_ids()
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
                    failed.append((r["photo_id"], r["path"], r["reason"]))
                    done.add(r["photo_id"])
            if failed:
                store.append({}, np.empty((0, 0), dtype=dtype), failed)
        path.unlink()
    return copied


def extract_distributed(
    photos: list[Photo],
    net: FeatureNet,
    spec: BackboneSpec,
    cache_path: str | Path,
    *,
    rank: int,
    local_rank: int,
    world_size: int,
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
):
    """This rank's part of a torchrun extraction (see the module docstring); the same arguments as ``extract_features``.

    Every rank returns an :class:`~featkit.extract.ExtractSummary` of the whole
    run; only rank 0's has ``reporter`` set, so one process prints it.
    Initialises the process group unless one is already up, and destroys it
    at the end if it made it.
    """
    dev = resolve_device(device)
    if dev.type == "cuda":
        dev = torch.device("cuda", local_rank)
        torch.cuda.set_device(dev)
    if num_workers is None:  # the node's cores shared among the ranks on it
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world_size))
        num_workers = max(1, min(8, (os.cpu_count() or 2) // max(1, local_world) - 1))
    own_group = not dist.is_initialized()
    if own_group:
        try:
            dist.init_process_group("nccl" if dev.type == "cuda" else "gloo", rank=rank, world_size=world_size, timeout=GROUP_TIMEOUT)
        except Exception as e:  # rendezvous problems surface as many exception types
            msg = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise FeatkitError(
                f"rank {rank} of {world_size} could not join torchrun's process group ({msg}); "
                "check torchrun's --rdzv-endpoint (or --master-addr/--master-port) and that every node can reach it"
            ) from None
    try:
        return _extract_rank(
            photos, net, spec, Path(cache_path), rank, world_size, dev, batch_size, num_workers, dtype, seed,
            test_size, val_size, overwrite, progress, provenance, on_batch,
        )
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


def _extract_rank(photos, net, spec, cache_path, rank, world, dev, batch_size, num_workers, dtype, seed, test_size, val_size, overwrite, progress, provenance, on_batch):
    from featkit.extract import ExtractSummary, _provenance, _run, _write_failed_csv, cache_identity

    t0 = time.perf_counter()
    identity = cache_identity(spec, dtype)
    prov = {**_provenance(dev, spec, seed, test_size, val_size, provenance), "world_size": world}
    failed_csv = cache_path.with_name("failed.csv")
    summary = ExtractSummary(cache_path=str(cache_path), failed_csv=str(failed_csv), rank=rank, world_size=world, reporter=rank == 0)
    store = None
    try:
        # 1. Rank 0 readies the cache (and joins a killed run's shards); the others learn what is done.
        plan = None
        if rank == 0:
            try:
                if overwrite:
                    for p in shard_files(cache_path):  # before the cache, so no stale shard outlives it
                        p.unlink()
                store = FeatureStore.open_for_append(cache_path, identity, overwrite=overwrite, provenance=prov)
                join_shards(store, shard_files(cache_path))
                plan = (dict(zip(store.column("photo_id"), store.column("split"))), store.done_ids(), _digest(photos), None)
            except FeatkitError as e:
                plan = (None, None, None, str(e))
        existing, done, digest, error = _from_rank0(plan)
        if error:
            raise FeatkitError(error)
        error = None
        if _digest(photos) != digest:  # a node that sees another photo set would shard wrongly
            error = (
                f"it sees another photo list than rank 0 ({len(photos)} photos); every node must read the same "
                "photo source under the same path (a shared filesystem, or identical copies)"
            )

        # 2. The same splits and the same sharding on every rank.
        splits = assign_splits(photos, seed=seed, test_size=test_size, val_size=val_size, fixed=existing)
        todo = sorted((p for p in photos if p.photo_id not in done), key=lambda p: p.photo_id)
        mine = todo[rank::world] if error is None else []
        summary.n_already = len(photos) - len(todo)

        # 3. Each rank fills its own shard.
        try:
            if mine:
                # overwrite: any shard of an earlier run was joined in step 1
                with FeatureStore.open_for_append(shard_path(cache_path, rank, world), identity, overwrite=True, provenance=prov) as shard:
                    _run(mine, splits, net, spec.image_size, dev, shard, batch_size, num_workers, progress and rank == 0, summary, on_batch)
        except KeyboardInterrupt:
            summary.interrupted = True
        except FeatkitError as e:
            error = str(e)
        reports = [None] * world
        dist.all_gather_object(reports, (summary.n_extracted, summary.n_skipped, summary.interrupted, error, bool(mine)))
        for k, (_, _, _, err, _) in enumerate(reports):
            if err:
                raise FeatkitError(f"rank {k} of {world} failed: {err} (the batches done are saved; rerun the same command to resume)")
        summary.interrupted = any(r[2] for r in reports)

        # 4. Rank 0 joins the shards (an interrupted run leaves them for the next run to join).
        result = None
        if rank == 0:
            try:
                if not summary.interrupted:
                    shards = [shard_path(cache_path, k, world) for k, r in enumerate(reports) if r[4]]
                    for p in shards:
                        if not p.exists():
                            raise FeatkitError(
                                f"shard file {p}, written by another rank, is not visible to rank 0; the cache folder must be "
                                "on a filesystem all nodes share, under the same path; rerun the same command there to resume"
                            )
                    join_shards(store, shards)
                cities, split_col = list(store.column("city")), list(store.column("split"))
                result = (store.n_rows, store.n_failed, split_counts(cities, split_col), None)
                _write_failed_csv(store.failed(), failed_csv)
            except FeatkitError as e:
                result = (0, 0, {}, str(e))
        n_rows, n_failed, counts, error = _from_rank0(result)
        if error:
            raise FeatkitError(error)
        summary.n_total_rows, summary.n_total_failed, summary.split_counts = n_rows, n_failed, counts
        if rank == 0:  # the reporter speaks for the whole run
            summary.n_extracted = sum(r[0] for r in reports)
            summary.n_skipped = sum(r[1] for r in reports)
        summary.seconds = time.perf_counter() - t0
        return summary
    finally:
        if store is not None:
            store.close()
