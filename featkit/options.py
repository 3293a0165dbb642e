"""Every user-facing default, written once.

The library's functions and classes take their defaults from these frozen
dataclasses, and the ``featkit`` command reads them for its options (``--batch-size``
mirrors ``batch_size``), so a default is never typed twice. This module
imports nothing heavy, so ``featkit --help`` stays fast.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

from featkit.errors import FeatkitError
from featkit.validate import MAX_DOWNLOAD_WORKERS, MAX_INTERVAL_S, MAX_JPEG_SIDE, check_choice, check_float, check_head_numbers, check_int, check_mlp_params, check_seed, check_split_size, check_workers

DTYPES = ("float16", "float32")  # how features are stored in the cache
DECODES = ("auto", "cpu", "gpu")  # where JPEGs are decoded: gpu is nvJPEG on the backbone's CUDA device; auto is cpu for now
STREAM_CHOICES = ("auto", "yes", "no")  # fit: train from shuffled blocks of the cache, or load it


@dataclass(frozen=True)
class SplitOptions:
    """How the train / val / test splits are drawn (:func:`featkit.splits.assign_splits`, ``featkit split``).

    ``split_seed`` orders the owner groups; it is recorded in the cache's split protocol as ``seed`` (so a
    cache made before the seeds were separate, whose one ``seed`` drew its splits, is read the same way).
    Sizes are per city: a count (>= 1, e.g. the study's 500) or a fraction (< 1)."""

    split_seed: int = 0
    test_size: float = 0.125
    val_size: float = 0.1

    def __post_init__(self) -> None:
        check_seed(self.split_seed, "split_seed")
        check_split_size("test_size", self.test_size)
        check_split_size("val_size", self.val_size)


SPLIT = SplitOptions()


@dataclass(frozen=True)
class BackboneOptions:
    """Which frozen features: the backbone (``vgg16``, a torchvision model name, or ``timm:NAME``), its weights
    (None: the library's own pretrained weights; a path; ``random``), pooling (None: the backbone's default,
    ``flatten`` for VGG16), input size (None: the backbone's own, 224 for VGG16; an int for a square, a ``(W, H)``
    pair or ``"WxH"`` text such as ``"320x224"`` to keep the photos' aspect ratio) and horizontal-flip averaging."""

    backbone: str = "vgg16"
    weights: str | None = None
    pooling: str | None = None
    image_size: int | tuple[int, int] | str | None = None
    flip: bool = False


@dataclass(frozen=True)
class ExtractOptions:
    """How one extraction runs; the same object drives a single process and every torchrun rank."""

    device: str = "auto"
    batch_size: int = 64
    workers: int | None = None  # image-decoding worker processes; None: cores - 1 (at most 8)
    dtype: str = "float16"
    decode: str = "auto"  # auto | cpu | gpu (nvJPEG on the backbone's CUDA device, CPU for what it cannot take); auto: cpu for now
    split_seed: int = SPLIT.split_seed  # the splits (see SplitOptions); recorded in the cache
    weights_seed: int = 0  # random weights only (``weights="random"``): their initialisation
    test_size: float = SPLIT.test_size
    val_size: float = SPLIT.val_size
    overwrite: bool = False
    retry_failed: bool = False  # read again the photos recorded as failed (not stored), e.g. after fixing their files
    repair: bool = False  # first drop the cached rows that fail their checks (featkit verify), then extract them again
    progress: bool = True

    def __post_init__(self) -> None:
        check_choice("dtype", self.dtype, DTYPES)
        check_choice("decode", self.decode, DECODES)
        check_int("batch_size", self.batch_size, low=1)
        check_workers(self.workers)
        check_seed(self.weights_seed, "weights_seed")
        SplitOptions(self.split_seed, self.test_size, self.val_size)

    @property
    def split(self) -> SplitOptions:
        """The options that draw the splits."""
        return SplitOptions(self.split_seed, self.test_size, self.val_size)


@dataclass(frozen=True)
class MLPOptions:
    """The MLP head's defaults (names as in scikit-learn's ``MLPClassifier``)."""

    hidden_layer_sizes: tuple[int, ...] = (1024,)
    dropout: float = 0.5
    alpha: float = 0.0
    learning_rate_init: float = 1e-4
    batch_size: int = 64
    max_iter: int = 100
    n_iter_no_change: int = 7
    early_stopping: bool = True
    validation_fraction: float = 0.1  # carved from the training data (stratified) when no val split is given
    device: str = "auto"
    verbose: bool = False

    def __post_init__(self) -> None:
        check_mlp_params({f.name: getattr(self, f.name) for f in fields(self)})


@dataclass(frozen=True)
class LogRegOptions:
    """The logistic-regression head's defaults: the C grid swept (strong to weak regularisation), L-BFGS's cap and tolerance."""

    Cs: tuple[float, ...] = (1e-5, 1e-4, 1e-3, 1e-2, 1e-1)
    max_iter: int = 300
    tol: float = 1e-4
    validation_fraction: float = 0.1
    copy: bool = True  # False: scale the training matrix in place (half the memory)

    def __post_init__(self) -> None:
        check_head_numbers({f.name: getattr(self, f.name) for f in fields(self)})


@dataclass(frozen=True)
class SVMOptions:
    """The linear SVM head's defaults: the alpha grid swept (strong to weak regularisation), L-BFGS's cap and tolerance."""

    alphas: tuple[float, ...] = (1e-1, 1e-2, 1e-3, 1e-4)
    max_iter: int = 100
    tol: float = 1e-5
    validation_fraction: float = 0.1

    def __post_init__(self) -> None:
        check_head_numbers({f.name: getattr(self, f.name) for f in fields(self)})


LOGREG = LogRegOptions()
SVM = SVMOptions()


@dataclass(frozen=True)
class FitOptions:
    """``featkit fit``'s defaults (and :func:`featkit.fit`'s, :func:`featkit.training.fit_heads`')."""

    head: str = "all"  # a head name, a comma list, or all
    seed: int = 0  # the heads' training (initial weights, shuffling); splits and random weights have their own
    device: str = "auto"
    stream: str = "auto"  # yes: from shuffled blocks of the cache; no: load it; auto: stream past half the free memory
    block_rows: int = 4096  # rows per shuffled block when streaming
    progress: bool = True

    def __post_init__(self) -> None:
        check_seed(self.seed)
        check_choice("stream", self.stream, STREAM_CHOICES)
        check_int("block_rows", self.block_rows, low=1)


@dataclass(frozen=True)
class PredictOptions:
    """``featkit predict``'s defaults (and :class:`featkit.prediction.Predictor`'s)."""

    head: str | None = None  # None: the fitted head with the best validation accuracy
    weights: str | None = None  # None: the weights the cache records it was extracted with
    seed: int | None = None  # the seed of random weights only; None: the weights seed the cache records
    device: str = "auto"
    top: int = 3
    batch_size: int = 32
    workers: int | None = None  # image-decoding worker processes; None: none for a few photos, else cores - 1

    def __post_init__(self) -> None:
        check_int("top", self.top, low=1)
        check_int("batch_size", self.batch_size, low=1)
        check_workers(self.workers)
        check_seed(self.seed, optional=True)


ENDPOINT_ENV = "FEATKIT_FLICKR_ENDPOINT"  # where `featkit download` finds a non-default Flickr endpoint


@dataclass(frozen=True)
class DownloadOptions:
    """``featkit download``'s defaults."""

    per_city: int = 4000
    query_template: str = "{city} streets"  # the study's search: "<city> streets"
    license: str = "any"
    has_geo: bool = False
    min_size: int = 0
    min_interval_s: float = 1.0  # Flickr allows 3,600 API calls an hour
    workers: int = 4

    def __post_init__(self) -> None:
        check_int("per_city", self.per_city, low=1)
        check_int("min_size", self.min_size, low=0, high=MAX_JPEG_SIDE, why=" pixels (a JPEG's largest side)")
        check_float("min_interval_s", self.min_interval_s, low=0, high=MAX_INTERVAL_S, why=" seconds")
        check_int("workers", self.workers, low=1, high=MAX_DOWNLOAD_WORKERS, why=" concurrent downloads")
        template = self.query_template
        try:
            ok = isinstance(template, str) and "{city}" in template and bool(template.format(city="x").strip())
        except (KeyError, IndexError, ValueError):
            ok = False
        if not ok:
            raise FeatkitError(f"`query_template` {template!r} must contain {{city}} and nothing else in braces, e.g. '{{city}} streets'", param="query_template")


FLICKR_RESULT_CAP = 4000  # Flickr answers at most about this many results per query (later pages repeat)


@dataclass(frozen=True)
class FetchOptions:
    """:func:`featkit.collect.download_photos`' parameters that only the library takes (the command keeps
    these defaults): retries and timeouts of every Flickr call and image download, the search paging, and the
    near-duplicate threshold."""

    max_retries: int = 5  # per API call or image, after the first try
    timeout_s: float = 30.0  # per request
    backoff_s: float = 1.0  # the first retry's wait; doubled each time (with jitter), at most 60 s
    per_page: int = 500  # Flickr's largest page
    result_cap: int = FLICKR_RESULT_CAP  # a date window with more results is halved
    near_dup_bits: int = 6  # dHash bits within which two photos are near-duplicates
    max_image_bytes: int = 20_000_000  # an image's body, decoded (gzip included), is refused past this
    deadline_s: float = 120.0  # an image download is abandoned past this, however the bytes trickle in

    def __post_init__(self) -> None:
        check_int("max_retries", self.max_retries, low=0, high=100)
        check_float("timeout_s", self.timeout_s, low=0, low_open=True, high=3600.0)
        check_float("backoff_s", self.backoff_s, low=0)
        check_int("per_page", self.per_page, low=1, high=500)
        check_int("result_cap", self.result_cap, low=self.per_page, why=" (at least per_page)")
        check_int("near_dup_bits", self.near_dup_bits, low=0, high=64)
        check_int("max_image_bytes", self.max_image_bytes, low=1024)
        check_float("deadline_s", self.deadline_s, low=0, low_open=True, high=86_400.0)


@dataclass(frozen=True)
class DemoOptions:
    """``featkit demo``'s defaults: generated photos of a few cities, random weights (offline), a capped MLP."""

    cities: str = "Paris,Tokyo,London,New York"
    per_city: int = 40
    weights: str | None = "random"
    max_iter: int = 60  # the MLP's epochs: generated photos are easy, and the demo should take minutes
    seed: int = 0  # everything the demo draws: the photos, the random weights, the split and the training


def defaults(cls) -> dict:
    """``{field: default}`` of an options dataclass."""
    return {f.name: f.default for f in fields(cls)}


EXTRACT = ExtractOptions()
BACKBONE = BackboneOptions()
MLP = MLPOptions()
FIT = FitOptions()
DOWNLOAD = DownloadOptions()
FETCH = FetchOptions()
PREDICT = PredictOptions()
DEMO = DemoOptions()
