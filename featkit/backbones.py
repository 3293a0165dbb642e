"""The frozen feature extractor: VGG16's conv base, any torchvision classifier or any timm model,
built with its weights and its preprocessing (:func:`load_backbone`), and its GMAC count.

Like torchvision's ``Weights`` enums, a backbone is described by a small frozen
dataclass (:class:`~featkit.backbone_spec.BackboneSpec`, which :mod:`featkit.backbone_spec`
owns with the input sizes, the backbone names and their defaults) that travels into the feature cache, so a
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

import hashlib
import warnings
from pathlib import Path

import torch
from torch import nn

from featkit.backbone_spec import (
    DEFAULT_INTERPOLATION,
    IMAGENET_MEAN,
    IMAGENET_STD,
    POOLINGS,
    RANDOM_SOURCE,
    TORCHVISION_DEFAULT,
    BackboneSpec,
    check_arch,
    check_vgg16_size,
    format_image_size,
    is_torchvision_vit,
    parse_image_size,
    timm_model,
    timm_name,
    timm_pool,
    timm_preprocessing,
    torchvision_preprocessing,
)
from featkit.errors import FeatkitError
from featkit.images import INTERPOLATIONS, size_wh
from featkit.options import BACKBONE, EXTRACT

VGG16_GRID = (7, 7)  # the conv map at 224: what the study's heads expect of ``flatten``


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

    mean, std, size, interp = torchvision_preprocessing(arch)
    kwargs = {"image_size": size} if is_torchvision_vit(arch) else {}
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
    name = timm_name(arch)
    what = f"timm.create_model({name!r})"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if weights is None:
            try:
                model = timm_model(name, pretrained=True)
            except Exception as e:  # no internet, no HF cache, no pretrained weights for this name
                raise _cannot_download(f"timm's {name}", e) from None
        else:
            model = timm_model(name)
    classifier = str(model.pretrained_cfg.get("classifier") or "classifier")
    if weights is None:
        label = f"timm:{model.pretrained_cfg.get('architecture', name)}.{model.pretrained_cfg.get('tag') or 'default'}"
    elif str(weights) == RANDOM_SOURCE:
        label = f"random:seed={seed}"
    else:
        path = Path(weights)
        sd, label = _file_state_dict(path, what), f"file:{path.name}"
        _load_fitting(model, _fit_state(model, sd, classifier, label, what), label, what)
    return model, label, None, timm_preprocessing(model)


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
    check_arch(arch)
    if arch == "vgg16":
        return _load_vgg16(weights, pooling="flatten" if pooling is None else pooling, image_size=224 if image_size is None else image_size, seed=seed, flip=flip)
    timm_arch = timm_name(arch)
    body, label, dim, (mean, std, own_size, interp) = (_build_timm if timm_arch else _build_torchvision)(arch, weights, seed)
    if timm_arch:
        own_pool = timm_pool(body)
        choices = (own_pool,) if own_pool == "avg" else (own_pool, "avg")
    else:
        own_pool = "cls" if is_torchvision_vit(arch) else "avg"
        choices = (own_pool,)
    pooling = own_pool if pooling is None else pooling
    if pooling not in choices:
        raise FeatkitError(f"unknown pooling {pooling!r} for {arch}; choose one of: {', '.join(choices)}", param="pooling")
    if pooling != own_pool:
        body.reset_classifier(0, pooling)
    image_size = own_size if image_size is None else image_size
    vit = is_torchvision_vit(arch) or (timm_arch is not None and hasattr(body, "patch_embed"))
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
