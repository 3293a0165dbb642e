"""The backbone: weights by path (features-only or whole vgg16), identity hash, real ImageNet weights."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torchvision.models import vgg16

from conftest import REAL_PHOTOS, REAL_WEIGHTS
from featkit.backbones import BackboneSpec, load_backbone
from featkit.errors import FeatkitError
from featkit.images import load_image


def test_whole_vgg16_and_features_only_files_are_the_same_weights(tmp_path):
    torch.manual_seed(1)
    model = vgg16(weights=None)
    torch.save(model.state_dict(), tmp_path / "whole.pth")
    torch.save(model.features.state_dict(), tmp_path / "features.pth")
    _, a = load_backbone(tmp_path / "whole.pth", image_size=32)
    _, b = load_backbone(tmp_path / "features.pth", image_size=32)
    _, c = load_backbone("random", image_size=32, seed=5)
    assert a.weights_sha256 == b.weights_sha256 != c.weights_sha256
    assert a.identity() == b.identity() and a.weights != b.weights  # the label differs, the identity does not


def test_spec_round_trips_and_sizes():
    net, spec = load_backbone("random", image_size=64, pooling="flatten")
    assert spec.feature_dim == 512 * 2 * 2
    assert BackboneSpec.from_json(spec.to_json()) == spec
    out = net(torch.zeros(2, 3, 64, 64, dtype=torch.uint8))
    assert out.shape == (2, spec.feature_dim)
    assert not any(p.requires_grad for p in net.parameters()) and not net.training


@pytest.mark.parametrize("kw,msg", [({"image_size": 100}, "multiple of 32"), ({"pooling": "max"}, "choose one of: flatten, avg"), ({"arch": "resnet50"}, "unknown backbone")])
def test_bad_backbone_options(kw, msg):
    with pytest.raises(FeatkitError, match=msg):
        load_backbone("random", **kw)


@pytest.mark.real_weights
@pytest.mark.skipif(not REAL_WEIGHTS.exists(), reason="../shared/weights absent")
def test_real_imagenet_weights_give_study_features():
    net, spec = load_backbone(REAL_WEIGHTS)
    assert spec.feature_dim == 25_088 and spec.weights == "file:vgg16_imagenet_features.pth"
    photos = sorted(REAL_PHOTOS.glob("*/*.jpg"))[:2] if REAL_PHOTOS.exists() else []
    if photos:
        batch = torch.stack([load_image(p, 224) for p in photos])
    else:
        batch = torch.randint(0, 255, (2, 3, 224, 224), dtype=torch.uint8)
    with torch.inference_mode():
        f = net(batch).numpy()
        g = net(batch[:1]).numpy()
    assert f.shape == (2, 25_088) and np.isfinite(f).all() and (f >= 0).all()  # after ReLU + max-pool
    assert (f > 0).mean() > 0.05  # ImageNet filters respond to real pixels; not a dead network
    assert np.allclose(f[0], g[0], atol=1e-3)
