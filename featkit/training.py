"""Fit heads on a feature cache: the train split to learn, the val split to choose; the test split is never read.

Which heads exist is :data:`featkit.heads.HEADS`; nothing here names a head.
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Callable

from featkit.devices import resolve_device
from featkit.errors import FeatkitError
from featkit.heads import HEADS, MLPHead, can_stream, head_name as registry_name, head_names, make_head, reports_progress
from featkit.cache.shelf import save_head
from featkit.naming import backbone_name, select_backbones
from featkit.options import FIT, STREAM_CHOICES, MLPOptions
from featkit.provenance import provenance
from featkit.cache.names import cache_file, head_file, heads_dir
from featkit.cache.store import FeatureStore
from featkit.validate import check_choice, check_head_params, check_int, check_seed, ensure_writable_dir, require_cache


def resolve_heads(head: str) -> list[str]:
    """``all`` or a comma list of names -> the list of head names; unknown names are refused with the choices."""
    known = head_names()
    if head == "all":
        return list(known)
    names = [h.strip() for h in head.split(",") if h.strip()] if isinstance(head, str) else []
    bad = [h for h in names if h not in known]
    if bad or not names:
        raise FeatkitError(f"unknown head {', '.join(bad) or head!r}; choose one of: {', '.join(known)}, all", param="head")
    return names


def head_params(params: dict | None, mlp: MLPOptions | None = None) -> dict[str, dict]:
    """``params`` with ``mlp`` (the MLP head's parameters as :class:`~featkit.options.MLPOptions`) as the MLP
    head's entry; refused when both name the MLP's parameters."""
    params = {} if params is None else params
    if not isinstance(params, dict) or any(n not in HEADS for n in params):
        raise FeatkitError(f"`params` maps head names ({', '.join(head_names())}) to their parameters; got {params!r}", param="params")
    if mlp is None:
        return params
    if not isinstance(mlp, MLPOptions):
        raise FeatkitError(f"`mlp` is an MLPOptions (featkit.MLPOptions(max_iter=50, ...)); got {mlp!r}", param="mlp")
    name = registry_name(MLPHead)
    if name in params:
        raise FeatkitError(f"give the MLP's parameters once: `mlp` or `params`[{name!r}], not both", param="mlp")
    return {**params, name: asdict(mlp)}


def check_fit_args(cache_dir: str | Path, head: str, *, seed: int, device: str, params: dict | None, stream: str) -> list[str]:
    """Everything ``fit`` is given, checked before a feature is read or a head file written; returns the head names."""
    names = resolve_heads(head)
    check_seed(seed)
    resolve_device(device)  # a missing GPU fails before any head trains (or any saved head is replaced)
    check_choice("stream", stream, STREAM_CHOICES)
    for name, p in head_params(params).items():
        check_head_params(name, p, HEADS[name]().get_params())
    require_cache(cache_dir)
    ensure_writable_dir(heads_dir(cache_dir), "cache_dir")
    return names


def _available_bytes() -> int:
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 1 << 62


def should_stream(n_rows: int, n_features: int, stream: str = FIT.stream) -> bool:
    """``auto``: stream when the float32 training matrix would take over half the available memory."""
    if stream not in STREAM_CHOICES:
        raise FeatkitError(f"unknown `stream` {stream!r}; choose one of: {', '.join(STREAM_CHOICES)}", param="stream")
    if stream != "auto":
        return stream == "yes"
    return n_rows * n_features * 4 > _available_bytes() // 2


def fit_heads(
    cache_dir: str | Path,
    head: str = FIT.head,
    *,
    backbone: str | None = None,
    seed: int = FIT.seed,
    device: str = FIT.device,
    params: dict[str, dict] | None = None,
    mlp: MLPOptions | None = None,
    stream: str = FIT.stream,
    block_rows: int = FIT.block_rows,
    progress: bool = FIT.progress,
    log: Callable[[str], None] = print,
) -> list[dict]:
    """Train the named heads on the cache's train split (val split for early stopping / choices) and save them.

    Heads are fitted for every backbone the cache holds (or only ``backbone``: ``timm:NAME`` as extract
    takes it, or its file key ``timm-NAME``), each saved under that backbone's heads folder. ``params``
    maps a head name to its parameters (``{"mlp": {"max_iter": 50}}``); ``mlp`` gives the MLP's as an
    :class:`~featkit.options.MLPOptions` instead (``mlp=MLPOptions(max_iter=50)``: every field of it,
    so the MLP then has MLPOptions' defaults for the rest). ``seed`` drives the training only (the
    splits and random weights have their own seeds, given to ``extract``).
    In memory (the default when it fits) the float32 training matrix is read
    once and shared; a head that can scale it in place (``copy``) runs
    last and does so. Streaming (``stream="yes"``, or ``auto`` on a cache
    larger than half the free memory) trains the heads that can from shuffled
    blocks of the cache; the others still load it.
    """
    params = head_params(params, mlp)
    names = check_fit_args(cache_dir, head, seed=seed, device=device, params=params, stream=stream)
    check_int("block_rows", block_rows, low=1)
    keys = select_backbones(cache_dir, backbone)
    records = []
    for key in keys:
        label = f"{backbone_name(key)}/" if len(keys) > 1 else ""
        records += _fit_backbone(
            Path(cache_dir), key, names, label=label, seed=seed, device=device, params=params or {}, stream=stream,
            block_rows=block_rows, progress=progress, log=log,
        )
    return records


def _fit_backbone(cache_dir: Path, key: str, names: list[str], *, label: str, seed, device, params, stream, block_rows, progress, log) -> list[dict]:
    """The named heads on one backbone's features, saved under its heads folder."""
    out = heads_dir(cache_dir, key)
    records = []
    with FeatureStore.open(cache_file(cache_dir, key)) as store:
        store.check_intact()  # a damaged cache is refused before any head learns from it (or any saved head is replaced)
        cities, split_id = store.cities(), store.split_id
        train_rows = store.split_rows("train")
        if len(set(store.column("city")[train_rows].tolist())) < 2:
            raise FeatkitError("the cache's train split holds fewer than two cities; extract photos of at least two cities")
        streaming = should_stream(len(train_rows), store.n_features, stream)
        heads = {n: make_head(n, random_state=seed, **params.get(n, {})) for n in names}  # bad parameters fail before any work
        streamed = {n for n, h in heads.items() if streaming and can_stream(h)}
        # One head that can scale the shared training matrix in place (``copy``) does so, and runs last.
        in_place = [n for n in names if n not in streamed and "copy" in heads[n].get_params()][-1:]
        names = [n for n in names if n not in in_place] + in_place
        Xva, yva, _ = store.load_split("val")
        if len(yva) == 0:
            Xva = yva = None
        Xtr = ytr = None
        out.mkdir(parents=True, exist_ok=True)
        for name in names:
            est = heads[name]
            if "device" in est.get_params():
                est.set_params(device=device)
            if name in in_place:
                est.set_params(copy=False)
            if name not in streamed and Xtr is None:
                Xtr, ytr, _ = store.load_split("train")
            t0 = time.perf_counter()
            with _ProgressBar(label + name, progress, getattr(est, "progress_unit", "step")) as bar:
                method = "fit_blocks" if name in streamed else "fit"
                extra = {"progress": bar.update} if reports_progress(est, method) else {}  # an optional capability
                if name in streamed:
                    est.fit_blocks(store.blocks("train", block_rows), Xva, yva, **extra)
                    how = "streamed"
                else:
                    est.fit(Xtr, ytr, Xva, yva, **extra)
                    how = "in memory"
            seconds = time.perf_counter() - t0
            record = {
                **_head_record(name, est, store, cities=cities, split_id=split_id, seed=seed, device=device, Xva=Xva, yva=yva),
                "backbone": key,
                "backbone_name": backbone_name(key),
                "fit_seconds": seconds,
                "training": how,
                "n_train": int(len(train_rows)),
            }
            path = head_file(out, name)
            save_head(path, est, record)
            records.append(record)
            chosen = ", ".join(f"{k}={v}" for k, v in record["chosen"].items())
            log(f"{label}{name}: val accuracy {_pct(record['val_score'])} in {seconds:.1f}s, {how}, {record['passes']} passes ({chosen}) -> {path}")
    return records


def _head_record(name: str, est, store: FeatureStore, *, cities, split_id, seed, device, Xva, yva) -> dict:
    """What a saved head carries besides itself: what it was trained on, what it chose, how it was made."""
    return {
        "head": name,
        "cache_id": store.cache_id,
        "split_id": split_id,
        "cache_identity": store.identity,
        "cities": cities,
        "params": est.get_params(),
        "chosen": dict(est.chosen_),
        # optional capabilities: a head without them has none in its record (and an empty cell in the report)
        "validation_curve": _plain(getattr(est, "validation_curve_", None)),
        "at_grid_edge": None if getattr(est, "at_grid_edge_", None) is None else bool(est.at_grid_edge_),
        "val_score": float(est.score(Xva, yva)) if yva is not None else None,
        "n_val": int(0 if yva is None else len(yva)),
        "seed": seed,
        "passes": int(getattr(est, "n_passes_", 0)),
        "provenance": provenance(seed=seed, device=device),
    }


class _ProgressBar:
    """One tqdm bar per head on stderr: epoch or candidate, losses, validation accuracy, rate and time left."""

    def __init__(self, name: str, enabled: bool, unit: str = "step"):
        self.name, self.enabled, self.unit, self.bar = name, enabled, unit, None

    def __enter__(self) -> "_ProgressBar":
        return self

    def update(self, step: int, total: int, **figures) -> None:
        if not self.enabled:
            return
        if self.bar is None:
            from tqdm.auto import tqdm

            unit = self.unit
            self.bar = tqdm(total=total, desc=f"fit {self.name}", unit=unit, dynamic_ncols=True, file=sys.stderr, leave=False)
        self.bar.set_postfix({k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in figures.items()}, refresh=False)
        self.bar.update(step - self.bar.n)

    def __exit__(self, *exc) -> None:
        if self.bar is not None:
            self.bar.close()


def _plain(curve):
    """A validation curve as JSON-friendly values (grid values as strings: 1e-05, not 1.0000000000000001e-05)."""
    if curve is None:
        return None
    if isinstance(curve, dict):
        return {f"{k:g}": float(v) for k, v in curve.items()}
    return [float(v) for v in curve]


def _pct(x):
    return "n/a" if x is None else f"{x:.3f}"
