"""The frozen feature extractor: VGG16's conv base, any torchvision classifier or any timm model,
with its preprocessing and identity.

Like torchvision's ``Weights`` enums, a backbone is described by a small frozen
dataclass (:class:`BackboneSpec`) that travels into the feature cache, so a
cache built with one set of weights, input size, pooling, resampling filter or
flip averaging is never read as another. The preprocessing (scale to [0, 1],
normalise with the weights' mean/std) lives inside the module, so nobody re-types it.

Backbones (``arch``):

- ``vgg16``: the study's VGG16 conv base; pooling ``flatten`` (default, 25,088
  values at 224) or ``avg`` (512); any input size that is a multiple of 32.
  At a non-square W x H (both multiples of 32), ``flatten`` average-pools the
  conv map adaptively to the 7x7 grid the study's heads expect (25,088 values
  whatever the aspect); a square S keeps its own (S/32)x(S/32) grid.
- a torchvision classification model name (``resnet50``, ``efficientnet_b0``,
  ``convnext_tiny``, ``vit_b_16``...): the input of its final classifier
  ``Linear`` (globally average-pooled features, pooling ``avg``, for CNNs; the
  class token, pooling ``cls``, for ViTs). Mean, std, input size (the crop size)
  and interpolation come from the model's default weights' transforms.
- ``timm:NAME``: ``timm.create_model(NAME, num_classes=0)``, its own pooled
  output (pooling: the model's own ``global_pool``, e.g. ``avg`` or ``token``;
  ``avg`` is accepted too). Mean, std, input size and interpolation come from
  ``timm.data.resolve_model_data_config``. timm is imported only for these.

Preprocessing, whatever the backbone: the whole photo is resized to
``image_size`` x ``image_size`` (an int), or to W x H (``image_size`` a
``(W, H)`` pair or ``"WxH"``: photos fed at their own aspect ratio, e.g. the
study's 320x229 photos as 320x224) with the backbone's interpolation (no
resize of the short side and centre crop, unlike torchvision's and timm's eval
transforms, so nothing at the borders is cut off), then normalised with the
backbone's mean and std. CNNs take any W x H (their global pooling fixes the
feature width); ViTs only their own square size.
``flip`` averages the features of each photo and of its mirror image.
"""

from __future__ import annotations

import functools
import hashlib
import json
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from featkit.errors import FeatkitError
from featkit.images import INTERPOLATIONS, size_wh
from featkit.options import BACKBONE, EXTRACT

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
VGG16_GRID = (7, 7)  # the conv map at 224: what the study's heads expect of ``flatten``


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


class FeatureNet(nn.Module):
    """uint8 RGB batch (B, 3, H, W) -> float features (B, feature_dim).

    Normalisation happens here, on the device, so data-loader workers ship
    compact uint8 tensors and never re-implement the weights' preprocessing.
    ``body`` (kept as ``self.features``) is VGG16's conv base, pooled here
    (``flatten`` or ``avg``), or a model that returns pooled features itself.
    ``flip``: the mean of the features of the batch and of its left-right mirror.
    ``grid``: for VGG16's ``flatten``, the (rows, columns) its conv map is adaptively average-pooled
    to before flattening (7x7 at a non-square input size); None flattens the map as it is.
    """

    def __init__(self, body: nn.Module, mean, std, pooling: str, flip: bool = False, grid: tuple[int, int] | None = None):
        super().__init__()
        self.features = body
        self.pooling = pooling
        self.flip = flip
        self.grid = None if grid is None else tuple(grid)
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1) * 255.0)
        self.register_buffer("inv_std", 1.0 / (torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1) * 255.0))

    @property
    def body(self) -> nn.Module:
        return self.features

    def _embed(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        if x.ndim == 4 and self.pooling == "avg":  # VGG16's conv base (other bodies pool themselves)
            x = torch.nn.functional.adaptive_avg_pool2d(x, 1)
        elif x.ndim == 4 and self.grid is not None:  # VGG16's flatten at W x H: the heads' fixed grid
            x = torch.nn.functional.adaptive_avg_pool2d(x, self.grid)
        return torch.flatten(x, 1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = (images.float() - self.mean) * self.inv_std
        f = self._embed(x)
        if self.flip:
            f = (f + self._embed(x.flip(-1))) * 0.5
        return f


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


def vgg16_grid(pooling: str, image_size) -> tuple[int, int] | None:
    """The grid VGG16's ``flatten`` adaptively pools its conv map to: 7x7 at a non-square size, None
    (the map as it is, (S/32)x(S/32)) at a square one S."""
    w, h = size_wh(image_size)
    return VGG16_GRID if pooling == "flatten" and w != h else None


def feature_dim(pooling: str, image_size) -> int:
    """VGG16's: 512 channels, times the spatial grid for ``flatten`` (7x7 at 224: 25,088; (S/32)^2 at
    another square S; 7x7 at any non-square W x H, pooled to it)."""
    if pooling == "avg":
        return 512
    w, h = size_wh(image_size)
    rows, cols = vgg16_grid(pooling, image_size) or (h // 32, w // 32)
    return 512 * rows * cols


def weights_sha256(state_dict: dict[str, torch.Tensor]) -> str:
    """A hash of the tensors themselves (names, shapes, float32 values), independent of file format."""
    h = hashlib.sha256()
    for key in sorted(state_dict):
        t = state_dict[key].detach().to(torch.float32).contiguous().cpu()
        h.update(key.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()


def _torchvision_state_dict() -> dict[str, torch.Tensor]:
    from torchvision.models import VGG16_Weights

    try:
        full = VGG16_Weights.IMAGENET1K_V1.get_state_dict(progress=True, check_hash=True)
    except Exception as e:  # URLError, OSError, hash mismatch: all mean "cannot have them"
        raise FeatkitError(
            "cannot get torchvision's VGG16 ImageNet weights (no internet and nothing in the torch hub "
            f"cache: {type(e).__name__}); pass --weights PATH to a state_dict file for vgg16().features or vgg16()"
        ) from None
    return full


def _file_state_dict(path: Path, what: str = "vgg16().features or vgg16()") -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise FeatkitError(f"weights file {path} does not exist; give a state_dict file for {what}", param="weights")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise FeatkitError(f"weights file {path} is not a torch state_dict ({type(e).__name__}); save one with torch.save(model.state_dict(), PATH)", param="weights") from None
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise FeatkitError(f"weights file {path} does not hold a state_dict (a dict of tensors)", param="weights")
    return obj


def _conv_base_state(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Accept a state_dict for ``vgg16().features`` or for the whole ``vgg16()``."""
    if any(k.startswith("features.") for k in sd):
        sd = {k[len("features.") :]: v for k, v in sd.items() if k.startswith("features.")}
    return sd


# -- which backbone ----------------------------------------------------------------------------
def _timm_name(arch: str) -> str | None:
    return arch[len(TIMM_PREFIX) :] if arch.startswith(TIMM_PREFIX) else None


@functools.lru_cache(maxsize=1)
def _torchvision_names() -> frozenset[str]:
    import torchvision

    return frozenset(torchvision.models.list_models(module=torchvision.models))


def _check_arch(arch: str) -> None:
    name = _timm_name(arch)
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


def _is_torchvision_vit(name: str) -> bool:
    return name.startswith("vit_")


def _torchvision_preprocessing(name: str) -> tuple[tuple, tuple, int, str]:
    """(mean, std, input size, interpolation) of the model's default weights' eval transforms."""
    from torchvision.models import get_model_weights

    t = get_model_weights(name).DEFAULT.transforms()
    crop = t.crop_size[0] if isinstance(t.crop_size, (list, tuple)) else int(t.crop_size)
    interpolation = getattr(t.interpolation, "value", str(t.interpolation))
    return tuple(float(v) for v in t.mean), tuple(float(v) for v in t.std), int(crop), str(interpolation)


def _timm_pool(model: nn.Module) -> str:
    """The global pooling a timm model applies before its classifier: ``avg``, ``token``, ``max``..."""
    for owner in (model, getattr(model, "head", None)):
        gp = getattr(owner, "global_pool", None) if owner is not None else None
        if isinstance(gp, str):
            return gp or "none"
        if gp is not None and hasattr(gp, "pool_type"):
            return str(gp.pool_type) or "none"
    return "own"


def _timm_model(name: str, *, pretrained: bool = False, meta: bool = False) -> nn.Module:
    import timm

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        if meta:
            with torch.device("meta"):
                return timm.create_model(name, pretrained=False, num_classes=0)
        return timm.create_model(name, pretrained=pretrained, num_classes=0)


def _timm_preprocessing(model: nn.Module) -> tuple[tuple, tuple, int, str]:
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
    name = _timm_name(arch)
    if name is not None:
        try:
            model = _timm_model(name, meta=True)
        except Exception:  # a model that cannot be built on the meta device: build it for real
            model = _timm_model(name)
        return _timm_pool(model), _timm_preprocessing(model)[2]
    return ("cls" if _is_torchvision_vit(arch) else "avg"), _torchvision_preprocessing(arch)[2]


_TORCHVISION_HEADS = ("fc", "heads.head", "head", "classifier")


def _strip_torchvision_classifier(model: nn.Module) -> tuple[str, int]:
    """Replace the model's final classifier ``Linear`` by ``nn.Identity``; returns its path and in_features."""
    for path in _TORCHVISION_HEADS:
        parent, attr, mod = None, None, model
        try:
            for part in path.split("."):
                parent, attr, mod = mod, part, getattr(mod, part)
        except AttributeError:
            continue
        if isinstance(mod, nn.Linear):
            setattr(parent, attr, nn.Identity())
            return path, mod.in_features
        if isinstance(mod, nn.Sequential) and len(mod) and isinstance(mod[-1], nn.Linear):
            dim = mod[-1].in_features
            mod[-1] = nn.Identity()
            return f"{path}.{len(mod) - 1}", dim
    raise FeatkitError(f"cannot find the final classifier Linear of {type(model).__name__} (looked at {', '.join(_TORCHVISION_HEADS)}); use another backbone")


def _fit_state(body: nn.Module, sd: dict[str, torch.Tensor], classifier: str | None, label: str, what: str) -> dict[str, torch.Tensor]:
    """``sd`` without the removed classifier's tensors (``classifier``: its module path, None when none was
    removed); a missing key or any other extra key is refused, naming the first."""
    expected = body.state_dict().keys()
    extra = [k for k in sd if k not in expected and not (classifier and k.startswith(classifier + "."))]
    missing = [k for k in expected if k not in sd]
    if missing or extra:
        first = f"missing key {missing[0]!r}" if missing else f"unexpected key {extra[0]!r}"
        n = len(missing) + len(extra)
        optional = f" (classifier {classifier!r} included or not)" if classifier else ""
        raise FeatkitError(f"weights {label} do not fit {what} ({first}{f', and {n - 1} more' if n > 1 else ''}); expected a state_dict of {what}{optional}", param="weights")
    return {k: v for k, v in sd.items() if k in expected}


def _load_fitting(body: nn.Module, sd: dict[str, torch.Tensor], label: str, what: str) -> None:
    try:
        body.load_state_dict(sd, strict=True)
    except RuntimeError as e:
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        first = lines[1] if len(lines) > 1 else lines[0] if lines else type(e).__name__
        raise FeatkitError(f"weights {label} do not fit {what} ({first}); expected a state_dict of {what}", param="weights") from None


def _cannot_download(what: str, e: BaseException) -> FeatkitError:
    return FeatkitError(
        f"cannot get {what}'s pretrained weights (no internet and nothing in the local cache: {type(e).__name__}); "
        "pass --weights PATH to a state_dict file of the model, or --weights random"
    )


def _build_torchvision(arch: str, weights, seed: int) -> tuple[nn.Module, str, int, tuple[tuple, tuple, int, str]]:
    """The model without its classifier, its weights' label, the feature dim and its preprocessing."""
    from torchvision.models import get_model, get_model_weights

    mean, std, size, interp = _torchvision_preprocessing(arch)
    kwargs = {"image_size": size} if _is_torchvision_vit(arch) else {}
    if arch in ("googlenet", "inception_v3"):  # as torchvision builds them for their ImageNet weights
        kwargs.update(transform_input=True, aux_logits=True, init_weights=False)
    with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        torch.manual_seed(seed)
        model = get_model(arch, weights=None, **kwargs)
    classifier, dim = _strip_torchvision_classifier(model)
    what = f"torchvision's {arch}()"
    if weights is None:
        enum = get_model_weights(arch).DEFAULT
        try:
            sd = enum.get_state_dict(progress=True, check_hash=True)
        except Exception as e:  # URLError, OSError, hash mismatch: all mean "cannot have them"
            raise _cannot_download(f"torchvision's {arch}", e) from None
        label = f"torchvision:{type(enum).__name__}.{enum.name}"
    elif str(weights) == RANDOM_SOURCE:
        return model, f"random:seed={seed}", dim, (mean, std, size, interp)
    else:
        path = Path(weights)
        sd, label = _file_state_dict(path, what), f"file:{path.name}"
    _load_fitting(model, _fit_state(model, sd, classifier, label, what), label, what)
    return model, label, dim, (mean, std, size, interp)


def _build_timm(arch: str, weights, seed: int) -> tuple[nn.Module, str, None, tuple[tuple, tuple, int, str]]:
    """As :func:`_build_torchvision`; the feature dim is found later, by a forward pass at the chosen size and pooling."""
    name = _timm_name(arch)
    what = f"timm.create_model({name!r})"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if weights is None:
            try:
                model = _timm_model(name, pretrained=True)
            except Exception as e:  # no internet, no HF cache, no pretrained weights for this name
                raise _cannot_download(f"timm's {name}", e) from None
        else:
            model = _timm_model(name)
    classifier = str(model.pretrained_cfg.get("classifier") or "classifier")
    if weights is None:
        label = f"timm:{model.pretrained_cfg.get('architecture', name)}.{model.pretrained_cfg.get('tag') or 'default'}"
    elif str(weights) == RANDOM_SOURCE:
        label = f"random:seed={seed}"
    else:
        path = Path(weights)
        sd, label = _file_state_dict(path, what), f"file:{path.name}"
        _load_fitting(model, _fit_state(model, sd, classifier, label, what), label, what)
    return model, label, None, _timm_preprocessing(model)


def load_backbone(
    weights: str | Path | None = BACKBONE.weights,
    *,
    arch: str = BACKBONE.backbone,
    pooling: str | None = BACKBONE.pooling,
    image_size: int | tuple[int, int] | str | None = BACKBONE.image_size,
    seed: int = EXTRACT.weights_seed,
    flip: bool = BACKBONE.flip,
) -> tuple[FeatureNet, BackboneSpec]:
    """Build the frozen feature model in eval mode and the spec that identifies its features.

    ``arch``: ``vgg16``, a torchvision classification model name or ``timm:NAME``
    (see the module's docstring). ``weights``: None for the library's own
    pretrained weights (torchvision's, or timm's; downloaded on a machine with
    internet), a path to a state_dict file (the whole model's, its classifier
    included or not; for VGG16 also ``vgg16().features``'), or ``"random"`` for
    random weights drawn from ``seed`` (tests and offline demos). ``pooling`` and
    ``image_size``: None for the backbone's own; ``image_size`` an int (a
    square), a ``(W, H)`` pair or ``"WxH"`` text (see :func:`parse_image_size`).
    ``flip``: average the features of each photo and of its mirror image.
    """
    image_size = parse_image_size(image_size)
    _check_arch(arch)
    if arch == "vgg16":
        return _load_vgg16(weights, pooling="flatten" if pooling is None else pooling, image_size=224 if image_size is None else image_size, seed=seed, flip=flip)
    timm_name = _timm_name(arch)
    body, label, dim, (mean, std, own_size, interp) = (_build_timm if timm_name else _build_torchvision)(arch, weights, seed)
    if timm_name:
        own_pool = _timm_pool(body)
        choices = (own_pool,) if own_pool == "avg" else (own_pool, "avg")
    else:
        own_pool = "cls" if _is_torchvision_vit(arch) else "avg"
        choices = (own_pool,)
    pooling = own_pool if pooling is None else pooling
    if pooling not in choices:
        raise FeatkitError(f"unknown pooling {pooling!r} for {arch}; choose one of: {', '.join(choices)}", param="pooling")
    if pooling != own_pool:
        body.reset_classifier(0, pooling)
    image_size = own_size if image_size is None else image_size
    vit = _is_torchvision_vit(arch) or (timm_name is not None and hasattr(body, "patch_embed"))
    if vit and image_size != own_size:
        raise FeatkitError(f"{arch} takes only its own input size, {own_size} (a ViT's position embeddings are made for it); got image size {format_image_size(image_size)}", param="image_size")
    width, height = size_wh(image_size)
    if min(width, height) < 32:
        raise FeatkitError(f"image size {format_image_size(image_size)} is too small for {arch}; use at least 32 a side (its own is {own_size})", param="image_size")
    if interp not in INTERPOLATIONS:
        raise FeatkitError(f"{arch} asks for {interp!r} interpolation, which featkit does not support (it does {', '.join(INTERPOLATIONS)})")
    body.eval()
    if dim is None:  # timm: whatever its pooled output is (pre-logits layers included)
        with torch.inference_mode():
            dim = int(body(torch.zeros(1, 3, height, width)).flatten(1).shape[1])
    return _finish(body, arch, label, image_size, mean, std, pooling, dim, interp, flip)


def _finish(body, arch, label, image_size, mean, std, pooling, dim, interpolation, flip, grid=None) -> tuple[FeatureNet, BackboneSpec]:
    net = FeatureNet(body, mean, std, pooling, flip=flip, grid=grid).eval()
    for p in net.parameters():
        p.requires_grad_(False)
    spec = BackboneSpec(
        arch=arch,
        weights=label,
        weights_sha256=weights_sha256(body.state_dict()),
        image_size=image_size,
        mean=tuple(mean),
        std=tuple(std),
        pooling=pooling,
        feature_dim=dim,
        interpolation=interpolation,
        flip=bool(flip),
    )
    return net, spec


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


def _load_vgg16(weights, *, pooling: str, image_size: int | tuple[int, int], seed: int, flip: bool) -> tuple[FeatureNet, BackboneSpec]:
    if pooling not in POOLINGS:
        raise FeatkitError(f"unknown pooling {pooling!r}; choose one of: {', '.join(POOLINGS)}", param="pooling")
    check_vgg16_size(image_size)
    from torchvision.models import vgg16

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        features = vgg16(weights=None).features
    if weights is None:
        label, sd = TORCHVISION_DEFAULT, _conv_base_state(_torchvision_state_dict())
    elif str(weights) == RANDOM_SOURCE:
        label, sd = f"random:seed={seed}", features.state_dict()
    else:
        path = Path(weights)
        label, sd = f"file:{path.name}", _conv_base_state(_file_state_dict(path))
    what = "VGG16's conv base, vgg16().features or vgg16()"
    _load_fitting(features, _fit_state(features, sd, None, label, what), label, what)
    return _finish(
        features, "vgg16", label, image_size, IMAGENET_MEAN, IMAGENET_STD, pooling, feature_dim(pooling, image_size), DEFAULT_INTERPOLATION, flip,
        grid=vgg16_grid(pooling, image_size),
    )


def backbone_gmacs(net: FeatureNet, spec: BackboneSpec) -> float:
    """Multiply-accumulates per photo, in GMAC (flip averaging included: twice the forward passes),
    counted by ``torch.utils.flop_counter.FlopCounterMode`` on one input of the spec's size, (1, 3, H, W)."""
    from torch.utils.flop_counter import FlopCounterMode

    dev = next((b.device for b in net.buffers()), torch.device("cpu"))
    w, h = spec.width_height
    x = torch.zeros(1, 3, h, w, dtype=torch.uint8, device=dev)
    counter = FlopCounterMode(display=False)
    mha = getattr(torch.backends, "mha", None)
    fastpath = mha.get_fastpath_enabled() if mha is not None else None
    try:
        if mha is not None:  # nn.MultiheadAttention's fused inference kernel is invisible to the counter
            mha.set_fastpath_enabled(False)
        with torch.inference_mode(), counter:
            net(x)
    finally:
        if mha is not None:
            mha.set_fastpath_enabled(fastpath)
    return counter.get_total_flops() / 2 / 1e9
