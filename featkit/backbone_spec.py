"""What identifies a backbone and its features, without building one: the :class:`BackboneSpec` (its
``identity()`` goes into the cache, its ``key`` names the backbone's file in the cache folder), input sizes
(:func:`parse_image_size`, :func:`format_image_size`, :func:`check_vgg16_size`), which backbone names exist
and their defaults (:func:`check_arch`, :func:`arch_defaults`: torchvision's weights transforms, timm's data
config), and where a backbone's weights come from (:func:`weights_source`, :func:`source_of_spec`).

:mod:`featkit.backbones` builds the models these describe. torch, torchvision and timm are imported only
inside the functions that need them, so reading a spec stays light.
"""

from __future__ import annotations

import functools
import json
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from featkit.errors import FeatkitError
from featkit.images import size_wh

if TYPE_CHECKING:
    from torch import nn

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
POOLINGS = ("flatten", "avg")  # VGG16's
ARCHS = ("vgg16",)  # featkit's own; besides these: torchvision classification model names and timm:NAME
TIMM_PREFIX = "timm:"
TORCHVISION_DEFAULT = "torchvision:VGG16_Weights.IMAGENET1K_V1"
DEFAULT_KEY = "vgg16"  # the key of the study's features: vgg16, flatten, 224, no flip
DEFAULT_INTERPOLATION = "bilinear"
MIN_IMAGE_SIZE = 32  # pixels a side: every CNN here halves its input five times (VGG16 flatten needs 32)
MAX_IMAGE_SIZE = 4096  # pixels a side
MAX_IMAGE_PIXELS = 2048 * 2048  # a photo: VGG16's first activations are already 0.5 GB at float16 per photo



def parse_image_size(value) -> int | tuple[int, int] | None:
    """An input size as given (an int, a ``(W, H)`` pair, ``"320x224"``, ``"224"``, or None for the
    backbone's own) -> an int for a square (``"224x224"`` -> 224), a ``(W, H)`` tuple otherwise, or None.
    Bad text, sides below 32 or above 4096, or more than 2048x2048 pixels are a one-line :class:`FeatkitError`
    about `image_size`."""
    if value is None:
        return None
    parts = None
    if isinstance(value, str):
        text = value.strip().lower().replace("\u00d7", "x")
        pieces = [t.strip() for t in text.split("x")] if text else []
        if len(pieces) in (1, 2) and all(t.isdigit() and t.isascii() for t in pieces):
            parts = [int(t) for t in pieces]
    elif isinstance(value, (tuple, list)):
        if len(value) == 2 and all(_is_int(v) for v in value):
            parts = [int(v) for v in value]
    elif _is_int(value):
        parts = [int(value)]
    if parts is None:
        raise FeatkitError(
            f"`image_size` {value!r} is not an input size; give one number for a square (224) or WIDTHxHEIGHT (320x224)",
            param="image_size",
        )
    shown = format_image_size(parts[0] if len(parts) == 1 else tuple(parts))
    if not all(MIN_IMAGE_SIZE <= v <= MAX_IMAGE_SIZE for v in parts):
        raise FeatkitError(
            f"`image_size` {shown} is out of range; each side must be {MIN_IMAGE_SIZE} to {MAX_IMAGE_SIZE} pixels "
            "(the backbones halve their input five times; 224 is VGG16's own)",
            param="image_size",
        )
    width, height = parts[0], parts[-1]
    if width * height > MAX_IMAGE_PIXELS:
        raise FeatkitError(
            f"`image_size` {shown} is {width * height:,} pixels a photo; at most {MAX_IMAGE_PIXELS:,} (2048x2048), e.g. 320x224 or 448",
            param="image_size",
        )
    if len(parts) == 1 or parts[0] == parts[1]:
        return parts[0]
    return parts[0], parts[1]


def _is_int(v) -> bool:
    import numbers

    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def format_image_size(size) -> str:
    """``224`` -> ``"224"``, ``(320, 224)`` or ``[320, 224]`` -> ``"320x224"``."""
    if isinstance(size, (tuple, list)):
        return f"{size[0]}x{size[1]}"
    return str(size)


@dataclass(frozen=True)
class BackboneSpec:
    """Everything that decides what a feature vector means.

    ``weights`` says where the weights came from (for people); ``weights_sha256``
    is what identifies them (a hash over the tensors loaded into the feature
    model, so for VGG16 the same weights saved as a whole-``vgg16()`` file or a
    ``features`` file match). ``arch`` is the backbone's name as given
    (``vgg16``, ``resnet50``, ``timm:tf_efficientnet_lite0``).
    """

    arch: str
    weights: str
    weights_sha256: str
    image_size: int | list[int]  # an int for a square (as every cache before W x H inputs); [W, H] otherwise
    mean: tuple[float, ...]
    std: tuple[float, ...]
    pooling: str
    feature_dim: int
    interpolation: str = DEFAULT_INTERPOLATION
    flip: bool = False

    def __post_init__(self) -> None:
        # one spelling per size, so a spec read back from JSON equals the one written: a square is an int,
        # anything else the JSON-friendly list [W, H]
        w, h = size_wh(self.image_size)
        object.__setattr__(self, "image_size", w if w == h else [w, h])

    @property
    def width_height(self) -> tuple[int, int]:
        """The input size as ``(W, H)``; the tensors the backbone sees are (B, 3, H, W)."""
        return size_wh(self.image_size)

    @property
    def square(self) -> bool:
        return isinstance(self.image_size, int)

    def _dict(self) -> dict:
        """The fields, leaving out ``interpolation`` and ``flip`` at their defaults (so a VGG16
        spec reads, and identifies caches, exactly as before they existed)."""
        d = asdict(self)
        if self.interpolation == DEFAULT_INTERPOLATION:
            d.pop("interpolation")
        if not self.flip:
            d.pop("flip")
        d["mean"], d["std"] = list(self.mean), list(self.std)
        return d

    def identity(self) -> dict:
        """The fields that change feature values (the weights' label and path do not)."""
        d = self._dict()
        d.pop("weights")
        return d

    @property
    def key(self) -> str:
        """A short folder-safe name for this feature set (``features-<key>.h5``): the arch (``:`` -> ``-``),
        then ``-<pooling>`` where not the arch's default, ``-<W>x<H>`` for a non-square input size, and
        ``-flip``: ``vgg16`` (the study's, stored as ``features.h5``), ``vgg16-avg``, ``resnet50``,
        ``timm-tf_efficientnet_lite0-flip``, ``timm-tf_efficientnet_lite0-320x224``. A square size is not part
        of it: one folder holds one square size per key (another is refused as another backbone), and the
        non-square feature sets beside it."""
        default_pooling, _ = arch_defaults(self.arch)
        parts = [self.arch.replace(":", "-")]
        if self.pooling != default_pooling:
            parts.append(self.pooling)
        if not self.square:
            parts.append(format_image_size(self.image_size))
        if self.flip:
            parts.append("flip")
        return "-".join(parts)

    @property
    def weights_seed(self) -> int | None:
        """The seed of random weights (``random:seed=N``), else None."""
        prefix = "random:seed="
        return int(self.weights[len(prefix) :]) if self.weights.startswith(prefix) else None

    def describe(self) -> str:
        s = (
            f"{self.arch} weights={self.weights} (sha256 {self.weights_sha256[:12]}) "
            f"size={format_image_size(self.image_size)} pooling={self.pooling} dim={self.feature_dim}"
        )
        if self.interpolation != DEFAULT_INTERPOLATION:
            s += f" interpolation={self.interpolation}"
        if self.flip:
            s += " flip"
        return s

    def to_json(self) -> str:
        return json.dumps(self._dict(), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "BackboneSpec":
        d = json.loads(text)
        d["mean"], d["std"] = tuple(d["mean"]), tuple(d["std"])
        return cls(**d)


RANDOM_SOURCE, TORCHVISION_SOURCE = "random", "torchvision"  # "torchvision": the library's own pretrained weights (torchvision's or timm's)


def weights_source(weights: str | Path | None) -> str:
    """Where ``load_backbone``'s ``weights`` can be found again later, for the cache's provenance:
    the weights file's absolute path, ``random`` (the seed is in the spec) or ``torchvision``
    (the library's own pretrained weights: torchvision's, or timm's for a ``timm:`` backbone)."""
    if weights is None:
        return TORCHVISION_SOURCE
    if str(weights) == RANDOM_SOURCE:
        return RANDOM_SOURCE
    return str(Path(weights).resolve())


def source_of_spec(spec: BackboneSpec) -> str | None:
    """:func:`weights_source` as far as the spec alone tells it (a file's spec has only its name: None)."""
    if spec.weights_seed is not None:
        return RANDOM_SOURCE
    if spec.weights.startswith(("torchvision:", TIMM_PREFIX)):
        return TORCHVISION_SOURCE
    return None


def check_vgg16_size(image_size) -> int | tuple[int, int]:
    """An input size VGG16 takes (see :func:`parse_image_size`): each side a multiple of 32; None is its own, 224."""
    image_size = parse_image_size(image_size)
    if image_size is None:
        return 224
    if any(side < 32 or side % 32 for side in size_wh(image_size)):
        raise FeatkitError(
            f"image size {format_image_size(image_size)} must be a multiple of 32, at least 32 (VGG16 halves it five times), "
            "each side of a WxH size too; the study used 224",
            param="image_size",
        )
    return image_size



# -- which backbone ----------------------------------------------------------------------------
def timm_name(arch: str) -> str | None:
    return arch[len(TIMM_PREFIX) :] if arch.startswith(TIMM_PREFIX) else None


@functools.lru_cache(maxsize=1)
def _torchvision_names() -> frozenset[str]:
    import torchvision

    return frozenset(torchvision.models.list_models(module=torchvision.models))


def check_arch(arch: str) -> None:
    name = timm_name(arch)
    if name is not None:
        import timm

        if not name or not timm.is_model(name):
            raise FeatkitError(f"unknown timm model {name!r} (backbone {arch!r}); see timm.list_models() for the names", param="backbone")
        return
    if arch in ARCHS or arch in _torchvision_names():
        return
    raise FeatkitError(
        f"unknown backbone {arch!r}; choose one of: {', '.join(ARCHS)}, a torchvision classification model name "
        "(resnet50, efficientnet_b0, convnext_tiny, vit_b_16...: torchvision.models.list_models(module=torchvision.models)) "
        "or timm:NAME (any timm model)",
        param="backbone",
    )


def is_torchvision_vit(name: str) -> bool:
    return name.startswith("vit_")


def torchvision_preprocessing(name: str) -> tuple[tuple, tuple, int, str]:
    """(mean, std, input size, interpolation) of the model's default weights' eval transforms."""
    from torchvision.models import get_model_weights

    t = get_model_weights(name).DEFAULT.transforms()
    crop = t.crop_size[0] if isinstance(t.crop_size, (list, tuple)) else int(t.crop_size)
    interpolation = getattr(t.interpolation, "value", str(t.interpolation))
    return tuple(float(v) for v in t.mean), tuple(float(v) for v in t.std), int(crop), str(interpolation)


def timm_pool(model: nn.Module) -> str:
    """The global pooling a timm model applies before its classifier: ``avg``, ``token``, ``max``..."""
    for owner in (model, getattr(model, "head", None)):
        gp = getattr(owner, "global_pool", None) if owner is not None else None
        if isinstance(gp, str):
            return gp or "none"
        if gp is not None and hasattr(gp, "pool_type"):
            return str(gp.pool_type) or "none"
    return "own"


def timm_model(name: str, *, pretrained: bool = False, meta: bool = False) -> nn.Module:
    import timm
    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        if meta:
            with torch.device("meta"):
                return timm.create_model(name, pretrained=False, num_classes=0)
        return timm.create_model(name, pretrained=pretrained, num_classes=0)


def timm_preprocessing(model: nn.Module) -> tuple[tuple, tuple, int, str]:
    import timm

    cfg = timm.data.resolve_model_data_config(model)
    return tuple(float(v) for v in cfg["mean"]), tuple(float(v) for v in cfg["std"]), int(cfg["input_size"][-1]), str(cfg["interpolation"])


@functools.lru_cache(maxsize=None)
def arch_defaults(arch: str) -> tuple[str, int]:
    """(pooling, image size) a backbone has when not told otherwise: VGG16's ``flatten`` at 224; a
    torchvision model's ``avg`` (``cls`` for ViTs) at its weights' crop size; a timm model's own pooling
    at its data config's input size (read off a model built on the meta device: no weights made)."""
    if arch == "vgg16":
        return "flatten", 224
    name = timm_name(arch)
    if name is not None:
        try:
            model = timm_model(name, meta=True)
        except Exception:  # a model that cannot be built on the meta device: build it for real
            model = timm_model(name)
        return timm_pool(model), timm_preprocessing(model)[2]
    return ("cls" if is_torchvision_vit(arch) else "avg"), torchvision_preprocessing(arch)[2]
