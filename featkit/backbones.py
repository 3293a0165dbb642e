"""The frozen feature extractor: VGG16's ImageNet conv base, with its preprocessing and identity.

Like torchvision's ``Weights`` enums, a backbone is described by a small frozen
dataclass (:class:`BackboneSpec`) that travels into the feature cache, so a
cache built with one set of weights, input size or pooling is never read as
another. The preprocessing (scale to [0, 1], normalise with the weights'
mean/std) lives inside the module, so nobody re-types it.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from featkit.errors import FeatkitError
from featkit.options import BACKBONE, EXTRACT

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
POOLINGS = ("flatten", "avg")
ARCHS = ("vgg16",)
TORCHVISION_DEFAULT = "torchvision:VGG16_Weights.IMAGENET1K_V1"


@dataclass(frozen=True)
class BackboneSpec:
    """Everything that decides what a feature vector means.

    ``weights`` says where the weights came from (for people); ``weights_sha256``
    is what identifies them (a hash over the conv base's tensors, so the same
    weights saved as a whole-``vgg16()`` file or a ``features`` file match).
    """

    arch: str
    weights: str
    weights_sha256: str
    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    pooling: str
    feature_dim: int

    def identity(self) -> dict:
        """The fields that change feature values (the weights' label and path do not)."""
        d = asdict(self)
        d.pop("weights")
        d["mean"], d["std"] = list(self.mean), list(self.std)
        return d

    @property
    def weights_seed(self) -> int | None:
        """The seed of random weights (``random:seed=N``), else None."""
        prefix = "random:seed="
        return int(self.weights[len(prefix) :]) if self.weights.startswith(prefix) else None

    def describe(self) -> str:
        return (
            f"{self.arch} weights={self.weights} (sha256 {self.weights_sha256[:12]}) "
            f"size={self.image_size} pooling={self.pooling} dim={self.feature_dim}"
        )

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "BackboneSpec":
        d = json.loads(text)
        d["mean"], d["std"] = tuple(d["mean"]), tuple(d["std"])
        return cls(**d)


class FeatureNet(nn.Module):
    """uint8 RGB batch (B, 3, S, S) -> float features (B, feature_dim).

    Normalisation happens here, on the device, so data-loader workers ship
    compact uint8 tensors and never re-implement the weights' preprocessing.
    """

    def __init__(self, features: nn.Module, mean, std, pooling: str):
        super().__init__()
        self.features = features
        self.pooling = pooling
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1) * 255.0)
        self.register_buffer("inv_std", 1.0 / (torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1) * 255.0))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = (images.float() - self.mean) * self.inv_std
        x = self.features(x)
        if self.pooling == "avg":
            x = torch.nn.functional.adaptive_avg_pool2d(x, 1)
        return torch.flatten(x, 1)


RANDOM_SOURCE, TORCHVISION_SOURCE = "random", "torchvision"


def weights_source(weights: str | Path | None) -> str:
    """Where ``load_backbone``'s ``weights`` can be found again later, for the cache's provenance:
    the weights file's absolute path, ``random`` (the seed is in the spec) or ``torchvision``."""
    if weights is None:
        return TORCHVISION_SOURCE
    if str(weights) == RANDOM_SOURCE:
        return RANDOM_SOURCE
    return str(Path(weights).resolve())


def source_of_spec(spec: BackboneSpec) -> str | None:
    """:func:`weights_source` as far as the spec alone tells it (a file's spec has only its name: None)."""
    if spec.weights_seed is not None:
        return RANDOM_SOURCE
    if spec.weights.startswith("torchvision:"):
        return TORCHVISION_SOURCE
    return None


def feature_dim(pooling: str, image_size: int) -> int:
    """512 channels, times the spatial grid for ``flatten`` (7x7 at 224: 25,088)."""
    return 512 if pooling == "avg" else 512 * (image_size // 32) ** 2


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


def _file_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise FeatkitError(f"weights file {path} does not exist; give a state_dict file for vgg16().features or vgg16()")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise FeatkitError(f"weights file {path} is not a torch state_dict ({type(e).__name__}); save one with torch.save(model.state_dict(), PATH)") from None
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise FeatkitError(f"weights file {path} does not hold a state_dict (a dict of tensors)")
    return obj


def _conv_base_state(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Accept a state_dict for ``vgg16().features`` or for the whole ``vgg16()``."""
    if any(k.startswith("features.") for k in sd):
        sd = {k[len("features.") :]: v for k, v in sd.items() if k.startswith("features.")}
    return sd


def load_backbone(
    weights: str | Path | None = BACKBONE.weights,
    *,
    arch: str = "vgg16",
    pooling: str = BACKBONE.pooling,
    image_size: int = BACKBONE.image_size,
    seed: int = EXTRACT.seed,
) -> tuple[FeatureNet, BackboneSpec]:
    """Build the frozen conv base in eval mode and the spec that identifies its features.

    ``weights``: None for torchvision's ImageNet weights (downloaded by
    torchvision on a machine with internet), a path to a state_dict file, or
    ``"random"`` for seeded random weights (tests and offline demos).
    """
    if arch not in ARCHS:
        raise FeatkitError(f"unknown backbone {arch!r}; choose one of: {', '.join(ARCHS)}")
    if pooling not in POOLINGS:
        raise FeatkitError(f"unknown pooling {pooling!r}; choose one of: {', '.join(POOLINGS)}")
    if image_size < 32 or image_size % 32:
        raise FeatkitError(f"image size {image_size} must be a multiple of 32, at least 32 (VGG16 halves it five times); the study used 224")
    from torchvision.models import vgg16

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        features = vgg16(weights=None).features
    if weights is None:
        label, sd = TORCHVISION_DEFAULT, _conv_base_state(_torchvision_state_dict())
    elif str(weights) == "random":
        label, sd = f"random:seed={seed}", features.state_dict()
    else:
        path = Path(weights)
        label, sd = f"file:{path.name}", _conv_base_state(_file_state_dict(path))
    try:
        features.load_state_dict(sd, strict=True)
    except RuntimeError as e:
        first = str(e).splitlines()[1].strip() if len(str(e).splitlines()) > 1 else str(e)
        raise FeatkitError(f"weights {label} do not fit VGG16's conv base ({first}); expected a state_dict for vgg16().features or vgg16()") from None
    net = FeatureNet(features, IMAGENET_MEAN, IMAGENET_STD, pooling).eval()
    for p in net.parameters():
        p.requires_grad_(False)
    spec = BackboneSpec(
        arch=arch,
        weights=label,
        weights_sha256=weights_sha256(features.state_dict()),
        image_size=image_size,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        pooling=pooling,
        feature_dim=feature_dim(pooling, image_size),
    )
    return net, spec
