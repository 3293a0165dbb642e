"""Where were new photos taken: a fitted head on the features of photos it has never seen.

A head only means something on the features it was trained on, so a
:class:`Predictor` rebuilds the backbone its head's cache was extracted with
(pooling, input size and dtype from the head's record; the weights from the
cache's provenance, or the ``weights`` given) and refuses, naming both, a
backbone whose identity differs from the one the head records. Photos go
through the extraction engine (:func:`featkit.engine.feature_batches`:
the same decoding, resizing, device path and batching), and the features take
the round trip through the cache's stored dtype (float16 by default) before
the head sees them: the numbers it was trained on, not nearly those numbers.

A photo that cannot be read becomes a :class:`Prediction` with ``error`` set;
the others are still predicted.

(The module is ``prediction``, not ``predict``: importing a submodule sets the
package attribute of its name, which would hide the function ``featkit.predict``.)
"""

from __future__ import annotations

import csv
import io
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from featkit.atomic import atomic_write
from featkit.backbone_spec import RANDOM_SOURCE, TORCHVISION_SOURCE
from featkit.backbones import load_backbone
from featkit.devices import resolve_device
from featkit.engine import default_workers, feature_batches
from featkit.errors import FeatkitError
from featkit.escape import csv_cell
from featkit.manifest import IMAGE_SUFFIXES, Photo, path_text, walk_images
from featkit.options import EXTRACT, PREDICT
from featkit.cache.identity import cache_identity, check_identity
from featkit.cache.names import cache_file, heads_dir
from featkit.cache.shelf import choose_head
from featkit.cache.store import FeatureStore
from featkit.naming import head_key, head_name
from featkit.validate import check_int, check_seed, check_workers, require_cache

CSV_COLUMNS = ("source", "rank", "city", "probability", "error")


@dataclass(frozen=True)
class Prediction:
    """Where one photo was probably taken.

    ``source`` is the photo's path, or ``<image K>`` for the K-th input when it
    was an in-memory picture. ``top`` holds ``(city, probability)`` pairs, most
    probable first; ``probabilities`` every city's. When the photo could not be
    read, ``error`` says why and both are empty.
    """

    source: str
    top: list[tuple[str, float]] = field(default_factory=list)
    error: str | None = None
    probabilities: dict[str, float] = field(default_factory=dict)

    @property
    def city(self) -> str | None:
        """The most probable city (None for an unreadable photo)."""
        return self.top[0][0] if self.top else None

    def to_dict(self) -> dict:
        """The JSON form ``featkit predict --json`` prints, one object per photo."""
        return {"source": self.source, "top": [{"city": c, "probability": p} for c, p in self.top], "error": self.error}


@dataclass(frozen=True)
class _Input:
    """One photo to predict: a file, an in-memory picture, or what was wrong with the input."""

    source: str
    path: Path | None = None
    image: object = None
    error: str | None = None


def check_top(top: int) -> None:
    """``top`` is how many cities to give per photo: at least one."""
    if isinstance(top, bool) or not isinstance(top, (int, np.integer)) or top < 1:
        raise FeatkitError(f"`top` must be a whole number of cities, at least 1; got {top!r}", param="top")


def _check_batching(batch_size: int, workers: int | None) -> None:
    check_int("batch_size", batch_size, low=1)
    check_workers(workers)


# -- which weights ---------------------------------------------------------------------------
def resolve_weights(cache_dir: str | Path, weights: str | None, seed: int | None, prov: dict | None, key: str | None = None) -> tuple[str | None, int]:
    """``load_backbone``'s ``weights`` and ``seed`` for a predictor.

    Given ``weights`` win (``torchvision`` names torchvision's ImageNet
    weights); otherwise the cache's provenance says where its weights came
    from (``weights_source``, recorded by extraction): a file that must still
    be there, ``random`` with the recorded seed, or torchvision's.
    """
    recorded_seed = (prov or {}).get("weights_seed", (prov or {}).get("seed"))
    if seed is None:
        seed = EXTRACT.weights_seed if recorded_seed is None else int(recorded_seed)
    if weights is not None:
        return (None if str(weights) == TORCHVISION_SOURCE else str(weights)), seed
    where = cache_file(cache_dir, key)
    if prov is None:
        raise FeatkitError(f"no feature cache at {where} to say which weights its heads' backbone had; pass `weights` PATH", param="weights")
    source = prov.get("weights_source")
    if source is None:
        raise FeatkitError(
            f"cache {where} does not record where its backbone's weights are (extracted before featkit recorded it; "
            f"built with {prov.get('backbone', 'unknown weights')}); pass `weights` PATH to the weights it was extracted with",
            param="weights",
        )
    if source == RANDOM_SOURCE:
        return RANDOM_SOURCE, seed
    if source == TORCHVISION_SOURCE:
        return None, seed
    if not Path(source).is_file():
        raise FeatkitError(
            f"cache {where} was extracted with the weights file {source}, which is not there any more; pass `weights` PATH to it",
            param="weights",
        )
    return source, seed


# -- what to predict -------------------------------------------------------------------------
def _image_files(folder: Path) -> list[_Input]:
    """The photos of ``folder`` by extract's rule (:func:`~featkit.manifest.walk_images`: recursively, sorted,
    hidden files and folders left out, links followed but never round a loop); a sub-folder that could not
    be walked becomes an input with its error, so it is reported, not silently missing."""
    files, left_out = walk_images(folder)
    return [_Input(path_text(p), path=p) for p in files] + [_Input(path_text(p), error=f"folder left out: {why}") for p, why in left_out]


def _expand(inputs) -> list[_Input]:
    """Paths, folders (walked), PIL images and arrays, or a list of them -> one :class:`_Input` per photo, in order."""
    if isinstance(inputs, (str, os.PathLike, Image.Image, np.ndarray)):
        inputs = [inputs]
    try:
        inputs = list(inputs)
    except TypeError:
        raise FeatkitError(f"cannot predict from a {type(inputs).__name__}; give a path, a folder, a PIL image, a uint8 array or a list of them", param="inputs") from None
    if not inputs:
        raise FeatkitError("nothing to predict: give photos or folders of photos", param="inputs")
    out: list[_Input] = []
    for k, x in enumerate(inputs):
        if isinstance(x, (Image.Image, np.ndarray)):
            out.append(_Input(f"<image {k}>", image=x))
        elif isinstance(x, (str, os.PathLike)):
            out.extend(_path_inputs(Path(x)))
        else:
            raise FeatkitError(
                f"input {k} is a {type(x).__name__}; give a path, a folder, a PIL image or a uint8 array", param="inputs"
            )
    return out


def _path_inputs(path: Path) -> list[_Input]:
    if path.is_dir():
        inputs = _image_files(path)
        if not any(i.path is not None for i in inputs):
            return [_Input(path_text(path), error=f"folder holds no image files ({', '.join(sorted(IMAGE_SUFFIXES))})")] + inputs
        return inputs
    if not path.exists():
        return [_Input(path_text(path), error="file not found")]
    return [_Input(path_text(path), path=path)]


# -- the predictor ---------------------------------------------------------------------------
class Predictor:
    """A fitted head of a cache and the backbone its features came from, ready for new photos.

    ``head=None`` takes the head with the best validation accuracy;
    ``weights=None`` the weights the cache records (``weights`` given are
    still checked against the head's backbone); ``seed`` matters for
    ``random`` weights only (default: the cache's). Refuses, with one
    :class:`~featkit.errors.FeatkitError` naming both, a backbone that is
    not the one the head's features came from.
    """

    def __init__(
        self,
        cache_dir: str | Path = "cache",
        head: str | None = PREDICT.head,
        *,
        weights: str | None = PREDICT.weights,
        seed: int | None = PREDICT.seed,
        device: str = PREDICT.device,
        batch_size: int = PREDICT.batch_size,
        workers: int | None = PREDICT.workers,
    ):
        _check_batching(batch_size, workers)
        check_seed(seed, optional=True)
        self.cache_dir, self.batch_size, self.workers = Path(cache_dir), batch_size, workers
        require_cache(cache_dir, heads=True)
        self.dev = resolve_device(device)  # a missing GPU fails before anything loads
        self.head_name, self.key, self.head_path, self.head, self.record = choose_head(cache_dir, head)
        identity = self.record.get("cache_identity")
        if not identity:
            raise FeatkitError(f"head file {self.head_path} does not record its backbone; refit it with `featkit fit`")
        self.dtype = identity["dtype"]
        self.cities = [str(c) for c in self.head.classes_]
        prov = self._check_same_cache()
        load_weights, load_seed = resolve_weights(cache_dir, weights, seed, prov, self.key)
        self.net, self.spec = load_backbone(
            load_weights, arch=identity["arch"], pooling=identity["pooling"], image_size=identity["image_size"], seed=load_seed,
            flip=bool(identity.get("flip", False)),
        )
        self._check_backbone(identity, prov, given=weights is not None)

    def _check_same_cache(self) -> dict:
        """Refuse a head that this cache's fit did not make: copied in (with its manifest) from another cache,
        or from an earlier build of this one; it would answer with places this cache may not hold. Returns the
        cache's provenance (read in the same open)."""
        with FeatureStore.open(cache_file(self.cache_dir, self.key)) as store:
            cache_id, cities, prov = store.cache_id, store.cities(), store.provenance
        if self.record.get("cache_id") != cache_id:
            raise FeatkitError(
                f"head file {self.head_path} was not fitted on this cache ({cache_file(self.cache_dir, self.key)}: "
                "copied from another cache, or fitted before this one was rebuilt); it is not used: refit with `featkit fit`",
                param="head")
        if self.cities != cities:
            extra = sorted(set(self.cities) - set(cities))
            raise FeatkitError(
                f"head file {self.head_path} answers with places this cache does not hold ({', '.join(extra) or 'another set'}); "
                "refit it with `featkit fit`", param="head")
        return prov

    def _check_backbone(self, identity: dict, prov: dict | None, *, given: bool) -> None:
        """Refuse a backbone whose features are not the ones the head was trained on."""
        was = (prov or {}).get("backbone", "unknown weights")
        if given:
            fix = (f"its cache was extracted with {was}, the `weights` given are {self.spec.weights}; "
                   "pass the weights the cache was extracted with, or fit a head on a cache of these")
        else:
            fix = (f"the weights the cache records ({self.spec.weights}) are not the head's any more (changed on disk, "
                   f"or the head predates a rebuilt cache; it was {was}); pass `weights` PATH, or refit with `featkit fit`")
        try:
            check_identity(identity, cache_identity(self.spec, self.dtype), f"head {self.head_name!r} ({self.head_path})", fix)
        except FeatkitError as e:
            raise FeatkitError(str(e), param="weights") from None

    def describe(self) -> str:
        """Which head and which backbone, for a summary line."""
        score = self.record.get("val_score")
        val = "" if score is None else f" (val accuracy {score:.3f})"
        return f"head {self.head_name}{val}, backbone {self.spec.describe()}"

    def probabilities(self, features: np.ndarray) -> np.ndarray:
        """The head's probabilities (columns: :attr:`cities`) for backbone features, after the round trip
        through the cache's dtype: the same numbers the head was trained on."""
        X = np.asarray(features).astype(self.dtype, copy=False).astype(np.float32, copy=False)
        return self.head.predict_proba(X)

    def predict(self, inputs, top: int = PREDICT.top) -> list[Prediction]:
        """One :class:`Prediction` per photo of ``inputs``, in order: a path (a folder is walked
        recursively for image files), a PIL image, a uint8 array (HxW or HxWx3), or a list mixing them.

        ``top`` cities each (at most the head's number of cities). Missing and
        unreadable photos get ``error`` set; the others are still predicted.
        """
        check_top(top)
        items = _expand(inputs)
        k = min(int(top), len(self.cities))
        out: dict[int, Prediction] = {i: Prediction(it.source, error=it.error) for i, it in enumerate(items) if it.error}
        files = [i for i, it in enumerate(items) if it.path is not None]
        memory = [i for i, it in enumerate(items) if it.image is not None]
        out.update(self._run(items, files, None, k))
        out.update(self._run(items, memory, [items[i].image for i in memory], k))
        return [out[i] for i in range(len(items))]

    def _run(self, items: list[_Input], which: list[int], images: list | None, k: int) -> dict[int, Prediction]:
        """Predictions of ``items[which]`` through the extraction engine (files, or the in-memory ``images``)."""
        photos = [Photo(photo_id=str(i), city="", path=items[i].path or Path(items[i].source)) for i in which]
        workers = self.workers
        if workers is None:  # worker processes pay off only on more than a batch of files
            workers = default_workers() if images is None and len(photos) > self.batch_size else 0
        out = {}
        batches = feature_batches(
            photos, self.net, self.spec.image_size, self.dev, batch_size=self.batch_size, workers=workers, decode="cpu",
            dtype=self.dtype, images=images, interpolation=self.spec.interpolation,
        )
        for batch in batches:
            for photo, reason in batch.failed:
                out[int(photo.photo_id)] = Prediction(items[int(photo.photo_id)].source, error=reason)
            if batch.photos:
                for photo, row in zip(batch.photos, self.probabilities(batch.features)):
                    out[int(photo.photo_id)] = self._prediction(items[int(photo.photo_id)].source, row, k)
        return out

    def _prediction(self, source: str, row: np.ndarray, k: int) -> Prediction:
        order = np.argsort(-row, kind="stable")
        probs = {c: float(p) for c, p in zip(self.cities, row)}
        return Prediction(source, [(self.cities[j], float(row[j])) for j in order[:k]], None, probs)


def write_predictions_csv(path: str | Path, predictions: list[Prediction]) -> None:
    """The predictions as CSV (``source, rank, city, probability, error``; one row per city shown, one
    row with the reason for an unreadable photo), written atomically."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(CSV_COLUMNS)
    for p in predictions:
        if p.error is not None:
            w.writerow([csv_cell(p.source), "", "", "", csv_cell(p.error)])
        for rank, (city, prob) in enumerate(p.top, start=1):
            w.writerow([csv_cell(p.source), rank, csv_cell(city), f"{prob:.6f}", ""])
    try:
        atomic_write(path, buf.getvalue())
    except OSError as e:
        raise FeatkitError(f"cannot write the predictions to {path} ({e.strerror or type(e).__name__})") from None
