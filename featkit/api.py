"""featkit in a few calls, for notebooks and scripts; the ``featkit`` command calls these too.

    import featkit
    featkit.extract("photos/", "cache", weights="vgg16_features.pth")
    featkit.fit("cache", head="all")
    results = featkit.compare("cache", "reports")
    for p in featkit.predict(["new/cafe.jpg"], cache_dir="cache"):
        print(p.source, p.top)

Defaults come from :mod:`featkit.options` (the CLI shows the same ones).
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from featkit.options import BACKBONE, EXTRACT, FIT, PREDICT, SPLIT, BackboneOptions, ExtractOptions, MLPOptions

if TYPE_CHECKING:
    from featkit.comparison import Comparison


def extract(
    source: str | Path,
    cache_dir: str | Path = "cache",
    *,
    backbone_options: BackboneOptions = BACKBONE,
    options: ExtractOptions = EXTRACT,
    on_batch: Callable[[int], None] | None = None,
    **overrides,
):
    """Run the photos of ``source`` (a folder with one sub-folder per city, or a manifest CSV)
    once through the frozen backbone into ``cache_dir/features.h5`` (VGG16 as the study used it) or
    ``cache_dir/features-<key>.h5`` (any other backbone: ``backbone="resnet50"``, ``"timm:NAME"``;
    its photos keep the splits the folder's other backbones hold); returns an ``ExtractSummary``.

    ``overrides`` set fields of ``backbone_options`` or ``options`` by name
    (``backbone="timm:convnext_tiny", weights=PATH, batch_size=32, device="cuda"``). Two seeds: ``split_seed``
    draws the splits (recorded in the cache; every backbone of a folder shares them) and ``weights_seed`` the
    ``weights="random"`` initialisation, so another random-weights backbone never needs another split.
    Under torchrun every process calls this with the same arguments and the photos are sharded.
    """
    from featkit.backbone_spec import parse_image_size, weights_source
    from featkit.backbones import load_backbone
    from featkit.devices import resolve_device
    from featkit.distributed import extract_distributed, torchrun_env
    from featkit.extraction import extract_features, shared_split
    from featkit.manifest import scan_photos
    from featkit.cache.names import cache_file
    from featkit.validate import ensure_writable_dir

    backbone, options = _split_overrides(backbone_options, options, overrides)
    parse_image_size(backbone.image_size)
    dev = resolve_device(options.device)  # the run's device, resolved once: a missing GPU fails before anything loads
    ensure_writable_dir(cache_dir, "cache_dir")  # before an hour of extraction, not after
    photos = scan_photos(source)
    net, spec = load_backbone(
        backbone.weights, arch=backbone.backbone, pooling=backbone.pooling, image_size=backbone.image_size, seed=options.weights_seed, flip=backbone.flip
    )
    path = cache_file(cache_dir, spec.key)  # one file per backbone; the folder's backbones share one split
    shared = shared_split(path, options)  # read once; another protocol than the other backbones' is refused before anything is written
    repaired = 0
    if options.repair and not options.overwrite and path.exists():
        from featkit.cache.store import verify_cache

        repaired = verify_cache(path, repair=True)[1]  # damaged rows dropped here are extracted again below
    source = weights_source(backbone.weights)  # recorded in the cache, so `predict` finds the same weights
    ranks = torchrun_env()
    if ranks is not None:
        summary = extract_distributed(photos, net, spec, path, options, ranks, on_batch=on_batch, weights_source=source, device=dev, shared=shared)
    else:
        summary = extract_features(photos, net, spec, path, options, on_batch=on_batch, weights_source=source, device=dev, shared=shared)
    summary.n_repaired = repaired
    return summary


def verify(cache_dir: str | Path = "cache", *, backbone: str | None = None, repair: bool = False) -> list:
    """Check every backbone's cache file through (each batch's checksum, finite features, split codes, unique
    photo ids); with ``repair``, drop the rows that fail so the next ``extract`` extracts them again. Returns one
    ``(Damage, rows_dropped)`` per file; damage that only a rebuild mends raises :class:`~featkit.errors.CacheDamaged`.
    ``backbone``: as extract takes it (``timm:NAME``) or its file key (``timm-NAME``)."""
    from featkit.cache import Cache

    return [(damage, dropped) for _, damage, dropped in Cache(cache_dir).verify(backbone, repair=repair)]


def _split_overrides(backbone: BackboneOptions, options: ExtractOptions, overrides: dict):
    from dataclasses import fields

    from featkit.errors import FeatkitError

    b_names = {f.name for f in fields(BackboneOptions)}
    o_names = {f.name for f in fields(ExtractOptions)}
    unknown = sorted(set(overrides) - b_names - o_names)
    if unknown:
        raise FeatkitError(f"unknown option(s) {', '.join(unknown)}; choose from: {', '.join(sorted(b_names | o_names))}")
    backbone = replace(backbone, **{k: v for k, v in overrides.items() if k in b_names})
    options = replace(options, **{k: v for k, v in overrides.items() if k in o_names})
    return backbone, options


def split(
    cache_dir: str | Path = "cache",
    *,
    split_seed: int = SPLIT.split_seed,
    test_size: float = SPLIT.test_size,
    val_size: float = SPLIT.val_size,
) -> dict[str, dict[str, int]]:
    """Re-draw the train / val / test splits of the cached photos (features untouched); returns the counts
    per split and city. Heads fitted on the old splits are refused by ``compare`` until refitted. The new
    protocol is recorded: photos extracted later (any backbone) pass the same ``split_seed`` and sizes,
    whatever their ``weights_seed``."""
    from contextlib import ExitStack

    from featkit.extraction import resplit
    from featkit.cache.names import cache_file, resolve_backbones
    from featkit.cache.store import FeatureStore

    from featkit.validate import require_cache

    options = ExtractOptions(split_seed=split_seed, test_size=test_size, val_size=val_size)
    require_cache(cache_dir)
    with ExitStack() as stack:  # every backbone of the cache gets the same new split
        stores = [stack.enter_context(FeatureStore.open(cache_file(cache_dir, k), writable=True)) for k in resolve_backbones(cache_dir)]
        return resplit(stores, options)


def fit(
    cache_dir: str | Path = "cache",
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
    """Train heads (a name of :data:`featkit.heads.HEADS`, a comma list, or ``all``) on every backbone the cache holds
    (or only ``backbone``, spelt as extract takes it); returns their records. ``seed`` drives the training.

    The MLP's parameters: ``mlp=featkit.MLPOptions(max_iter=50, hidden_layer_sizes=(512,))`` (checked when
    made; the fields not given keep MLPOptions' defaults), or as a dict under the MLP head's registry name in
    ``params``; not both. ``params`` also takes the other heads' parameters, by their names."""
    from featkit.training import fit_heads

    return fit_heads(
        cache_dir, head, backbone=backbone, seed=seed, device=device, params=params, mlp=mlp, stream=stream, block_rows=block_rows,
        progress=progress, log=log,
    )


def compare(
    cache_dir: str | Path = "cache", reports_dir: str | Path = "reports", *, cities: str | None = None, leaks: bool = True
) -> tuple[Comparison, dict[str, Path]]:
    """Evaluate every fitted head on the cache's test split and write the report (compare.md, .json, .html);
    returns ``(results, paths)``: a :class:`~featkit.comparison.Comparison` (``results.heads["mlp"].accuracy``,
    ``results.best``; ``results.to_dict()`` is compare.json, and ``results["heads"]`` still reads that way)
    and the report's files.

    ``cities``: where the cities' coordinates come from for the distance figures (a cities .toml file or
    default names); by default a ``cities.toml`` beside the city folders, then featkit's default cities.
    ``leaks``: check the split for owners and near-duplicates shared by test and train (reads the photo files).
    """
    from featkit.evaluate import evaluate_heads
    from featkit.report import write_report
    from featkit.validate import ensure_writable_dir, require_cache

    require_cache(cache_dir, heads=True)
    ensure_writable_dir(reports_dir, "reports_dir")  # refused before the heads are evaluated
    results = evaluate_heads(cache_dir, cities_spec=cities, leaks=leaks)
    return results, write_report(results, reports_dir)


def predict(
    inputs,
    cache_dir: str | Path = "cache",
    *,
    head: str | None = PREDICT.head,
    weights: str | None = PREDICT.weights,
    seed: int | None = PREDICT.seed,
    device: str = PREDICT.device,
    top: int = PREDICT.top,
    batch_size: int = PREDICT.batch_size,
    workers: int | None = PREDICT.workers,
) -> list:
    """Where were these photos taken? One ``Prediction`` (``source``, ``top`` cities with probabilities,
    ``error``) per photo of ``inputs``: paths, folders (walked), PIL images, uint8 arrays, or a list of them.

    ``head``: a fitted head of ``cache_dir`` (default: the best on validation).
    ``weights``: default, the ones the cache was extracted with; others are
    refused unless they are the same weights. Many calls: build one
    :class:`featkit.prediction.Predictor` and call its ``predict``.
    """
    from featkit.prediction import Predictor, check_top

    check_top(top)
    predictor = Predictor(cache_dir, head, weights=weights, seed=seed, device=device, batch_size=batch_size, workers=workers)
    return predictor.predict(inputs, top=top)
