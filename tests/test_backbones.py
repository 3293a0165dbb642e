"""The backbone: weights by path (features-only or whole vgg16), identity hash, real ImageNet weights;
torchvision and timm backbones (preprocessing from their configs, identity and key, weight files,
flip averaging, GMAC); non-square W x H input sizes (parsing, resize, VGG16's adaptive 7x7 grid, keys,
an extraction and a prediction at 96x64 beside a square one)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torchvision.models import vgg16

from PIL import Image

import featkit
from conftest import LOGREG, REAL_PHOTOS, REAL_WEIGHTS, SHARED, make_photos
from featkit.backbone_spec import DEFAULT_KEY, IMAGENET_MEAN, IMAGENET_STD, BackboneSpec, parse_image_size
from featkit.backbones import backbone_gmacs, load_backbone
from featkit.errors import FeatkitError
from featkit.images import image_tensor, load_image

LITE0 = "timm:tf_efficientnet_lite0"
LITE0_WEIGHTS = SHARED / "weights" / "efficientnet_lite0_imagenet_timm.pth"


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


@pytest.mark.parametrize("kw,msg", [({"image_size": 100}, "multiple of 32"), ({"pooling": "max"}, "choose one of: flatten, avg"), ({"arch": "resnet_nope"}, "unknown backbone"),
     ({"arch": "timm:no_such_model"}, "unknown timm model"), ({"arch": "resnet18", "pooling": "cls"}, "choose one of: avg"),
     ({"arch": "vit_b_16", "image_size": 64}, "takes only its own input size, 224")])
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


# -- beyond VGG16 ------------------------------------------------------------------------------

def test_vgg16_identity_json_and_key_are_unchanged():
    _, spec = load_backbone("random", image_size=64)
    ident = spec.identity()
    assert set(ident) == {"arch", "weights_sha256", "image_size", "mean", "std", "pooling", "feature_dim"}  # as before flip/interpolation
    assert {k: v for k, v in ident.items() if k != "weights_sha256"} == {
        "arch": "vgg16", "image_size": 64, "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225], "pooling": "flatten", "feature_dim": 2048,
    }
    assert "interpolation" not in spec.to_json() and "flip" not in spec.to_json()
    old = {k: v for k, v in json.loads(spec.to_json()).items()}  # JSON written before the new fields
    assert BackboneSpec.from_json(json.dumps(old)) == spec and spec.interpolation == "bilinear" and spec.flip is False
    _, default = load_backbone("random", image_size=None, pooling=None)
    assert default.key == DEFAULT_KEY == "vgg16" and (default.image_size, default.pooling) == (224, "flatten")
    assert spec.key == "vgg16"  # the input size is not part of the key: the study's file, at another size
    assert "flip" not in spec.describe() and "interpolation" not in spec.describe()


def _spec(arch, pooling, size=224, flip=False):
    return BackboneSpec(arch, "random:seed=0", "0" * 64, size, IMAGENET_MEAN, IMAGENET_STD, pooling, 8, flip=flip)


@pytest.mark.parametrize(
    "arch,pooling,size,flip,key",
    [
        ("vgg16", "flatten", 224, False, "vgg16"),
        ("vgg16", "avg", 224, False, "vgg16-avg"),
        ("vgg16", "flatten", 64, True, "vgg16-flip"),
        ("resnet50", "avg", 224, False, "resnet50"),
        ("resnet18", "avg", 64, False, "resnet18"),
        ("vit_b_16", "cls", 224, False, "vit_b_16"),
        (LITE0, "avg", 224, False, "timm-tf_efficientnet_lite0"),
        (LITE0, "avg", 224, True, "timm-tf_efficientnet_lite0-flip"),
        ("timm:vit_tiny_patch16_224", "token", 224, False, "timm-vit_tiny_patch16_224"),
        ("timm:vit_tiny_patch16_224", "avg", 224, False, "timm-vit_tiny_patch16_224-avg"),
        ("vgg16", "flatten", (96, 64), False, "vgg16-96x64"),
        ("vgg16", "flatten", [320, 224], False, "vgg16-320x224"),
        ("vgg16", "avg", (320, 224), True, "vgg16-avg-320x224-flip"),
        (LITE0, "avg", (320, 224), False, "timm-tf_efficientnet_lite0-320x224"),
        (LITE0, "avg", (224, 224), False, "timm-tf_efficientnet_lite0"),  # a square pair is the square
    ],
)
def test_keys(arch, pooling, size, flip, key):
    assert _spec(arch, pooling, size, flip).key == key


def test_preprocessing_comes_from_each_backbones_config():
    _, lite = load_backbone("random", arch=LITE0, image_size=64)
    assert lite.mean == (0.5, 0.5, 0.5) and lite.std == (0.5, 0.5, 0.5)  # timm's config, not ImageNet's
    assert (lite.interpolation, lite.pooling, lite.feature_dim, lite.arch) == ("bicubic", "avg", 1280, LITE0)
    from torchvision.models import ResNet18_Weights

    _, res = load_backbone("random", arch="resnet18")
    t = ResNet18_Weights.DEFAULT.transforms()
    assert res.mean == tuple(t.mean) and res.std == tuple(t.std) and res.image_size == t.crop_size[0] == 224
    assert res.interpolation == t.interpolation.value == "bilinear" and (res.pooling, res.feature_dim) == ("avg", 512)
    _, eff = load_backbone("random", arch="efficientnet_b0", image_size=64)
    assert eff.interpolation == "bicubic" and eff.feature_dim == 1280  # torchvision's efficientnet resizes bicubic
    assert "interpolation=bicubic" in lite.describe()


def test_identity_differs_across_backbones_and_flip():
    specs = [
        load_backbone("random", image_size=64)[1],
        load_backbone("random", image_size=64, flip=True)[1],
        load_backbone("random", arch="resnet18", image_size=64)[1],
        load_backbone("random", arch=LITE0, image_size=64)[1],
        load_backbone("random", arch=LITE0, image_size=64, flip=True)[1],
    ]
    idents = [json.dumps(s.identity(), sort_keys=True) for s in specs]
    assert len(set(idents)) == len(idents)
    assert specs[1].identity()["flip"] is True and specs[3].identity()["interpolation"] == "bicubic"
    assert len({s.key for s in specs}) == len(specs)
    for s in specs:
        assert BackboneSpec.from_json(s.to_json()) == s


@pytest.mark.parametrize("arch,size", [("vgg16", 64), ("resnet18", 64), ("mobilenet_v3_small", 64), (LITE0, 64)])
def test_features_have_the_specs_dim(arch, size):
    net, spec = load_backbone("random", arch=arch, image_size=size, pooling="avg" if arch == "vgg16" else None)
    x = torch.randint(0, 256, (2, 3, size, size), dtype=torch.uint8)
    with torch.inference_mode():
        out = net(x)
    assert out.shape == (2, spec.feature_dim) and torch.isfinite(out).all()
    assert not any(p.requires_grad for p in net.parameters()) and not net.training


@pytest.mark.parametrize("arch", ["resnet18", LITE0])
def test_flip_averages_the_features_of_the_photo_and_its_mirror(arch):
    net, spec = load_backbone("random", arch=arch, image_size=64, seed=2)
    fnet, fspec = load_backbone("random", arch=arch, image_size=64, seed=2, flip=True)
    assert fspec.weights_sha256 == spec.weights_sha256 and fspec.flip and fspec.key.endswith("-flip")
    x = torch.randint(0, 256, (3, 3, 64, 64), dtype=torch.uint8)
    with torch.inference_mode():
        want = (net(x) + net(x.flip(-1))) / 2
        got = fnet(x)
        plain = net(x)
    assert torch.allclose(got, want, atol=1e-6) and not torch.allclose(got, plain, atol=1e-4)


def test_torchvision_files_with_or_without_classifier_load_and_a_wrong_key_is_refused(tmp_path):
    import torchvision

    torch.manual_seed(7)
    model = torchvision.models.resnet18()
    torch.save(model.state_dict(), tmp_path / "whole.pth")
    torch.save({k: v for k, v in model.state_dict().items() if not k.startswith("fc.")}, tmp_path / "body.pth")
    net, a = load_backbone(tmp_path / "whole.pth", arch="resnet18", image_size=64)
    _, b = load_backbone(tmp_path / "body.pth", arch="resnet18", image_size=64)
    _, c = load_backbone("random", arch="resnet18", image_size=64)
    assert a.weights_sha256 == b.weights_sha256 != c.weights_sha256 and a.weights == "file:whole.pth"
    model.fc = torch.nn.Identity()
    x = torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8)
    with torch.inference_mode():
        want = model.eval()((x.float() / 255 - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(IMAGENET_STD).view(1, 3, 1, 1))
        assert torch.allclose(net(x), want, atol=1e-4)
    sd = torch.load(tmp_path / "whole.pth", weights_only=True)
    sd["layer9.weight"] = torch.zeros(1)
    torch.save(sd, tmp_path / "bad.pth")
    with pytest.raises(FeatkitError, match="unexpected key 'layer9.weight'") as e:
        load_backbone(tmp_path / "bad.pth", arch="resnet18", image_size=64)
    assert "\n" not in str(e.value) and "state_dict of torchvision's resnet18()" in str(e.value)


def test_timm_files_with_classifier_load_and_a_missing_key_is_refused(tmp_path):
    import timm

    torch.manual_seed(3)
    model = timm.create_model("tf_efficientnet_lite0", pretrained=False)  # with its 1000-class classifier
    torch.save(model.state_dict(), tmp_path / "lite0.pth")
    net, spec = load_backbone(tmp_path / "lite0.pth", arch=LITE0, image_size=64)
    x = torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8)
    with torch.inference_mode():
        want = model.eval().forward_head(model.forward_features((x.float() / 255 - 0.5) / 0.5), pre_logits=True)
        assert torch.allclose(net(x), want, atol=1e-4)
    sd = model.state_dict()
    del sd["conv_stem.weight"]
    torch.save(sd, tmp_path / "bad.pth")
    with pytest.raises(FeatkitError, match="missing key 'conv_stem.weight'") as e:
        load_backbone(tmp_path / "bad.pth", arch=LITE0, image_size=64)
    assert "\n" not in str(e.value)


def test_library_weights_that_cannot_be_fetched_are_a_one_line_error(monkeypatch):
    import timm.models._builder
    import torchvision.models._api

    def offline(*a, **k):
        raise OSError("network is unreachable")

    monkeypatch.setattr(torchvision.models._api, "load_state_dict_from_url", offline)
    monkeypatch.setattr(timm.models._builder, "load_pretrained", offline)
    for arch in ("resnet18", LITE0):
        with pytest.raises(FeatkitError, match="pass --weights PATH") as e:
            load_backbone(None, arch=arch)
        assert "\n" not in str(e.value)


def test_gmacs():
    vnet, vspec = load_backbone("random", image_size=224)
    assert 15.0 < backbone_gmacs(vnet, vspec) < 16.0  # VGG16's conv base: about 15.4 GMAC
    rnet, rspec = load_backbone("random", arch="resnet18")
    r = backbone_gmacs(rnet, rspec)
    assert 1.7 < r < 1.9  # torchvision's figure: 1.81
    fnet, fspec = load_backbone("random", arch=LITE0, flip=True)
    lnet, lspec = load_backbone("random", arch=LITE0)
    lite = backbone_gmacs(lnet, lspec)
    assert 0.3 < lite < 0.5 and backbone_gmacs(fnet, fspec) == pytest.approx(2 * lite)


def test_timm_is_imported_only_for_a_timm_backbone():
    code = "import sys, featkit.backbones as b; b.load_backbone('random', arch='resnet18', image_size=32); print('timm' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"


@pytest.mark.real_weights
@pytest.mark.skipif(not LITE0_WEIGHTS.exists(), reason="../shared/weights/efficientnet_lite0_imagenet_timm.pth absent")
def test_real_efficientnet_lite0_features_are_timms_pooled_forward_features():
    import timm

    net, spec = load_backbone(LITE0_WEIGHTS, arch=LITE0)
    assert (spec.image_size, spec.mean, spec.std, spec.feature_dim) == (224, (0.5,) * 3, (0.5,) * 3, 1280)
    assert spec.weights == "file:efficientnet_lite0_imagenet_timm.pth" and spec.key == "timm-tf_efficientnet_lite0"
    model = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    model.load_state_dict(torch.load(LITE0_WEIGHTS, map_location="cpu", weights_only=True))
    photos = sorted((REAL_PHOTOS / "Venice").glob("*"))[:1] if (REAL_PHOTOS / "Venice").exists() else []
    if photos:
        x = load_image(photos[0], 224, spec.interpolation)[None]
    else:
        x = torch.randint(0, 256, (1, 3, 224, 224), dtype=torch.uint8)
    with torch.inference_mode():
        want = model.eval().forward_features((x.float() / 255 - 0.5) / 0.5).mean((2, 3))
        got = net(x)
    assert torch.allclose(got, want, atol=1e-4)


# -- non-square input sizes: W x H ---------------------------------------------------------------
@pytest.mark.parametrize(
    "given,size",
    [(224, 224), ("224", 224), ("320x224", (320, 224)), (" 96 X 64 ", (96, 64)), ("224x224", 224), ((96, 64), (96, 64)),
     ([320, 224], (320, 224)), ([64, 64], 64), (np.int64(64), 64), (None, None)],
)
def test_parse_image_size(given, size):
    got = parse_image_size(given)
    assert got == size and type(got) is type(size)


@pytest.mark.parametrize("bad", ["abc", "320x", "x224", "320x224x3", "", "-5", "0x224", "320x0", 0, 5000, "4097x224", True, 1.5, (1, 2, 3)])
def test_a_bad_image_size_is_a_one_line_error_about_image_size(bad):
    with pytest.raises(FeatkitError) as e:
        parse_image_size(bad)
    assert e.value.param == "image_size" and "`image_size`" in str(e.value) and "\n" not in str(e.value)


def test_a_non_square_photo_is_resized_to_w_by_h_and_squares_stay_as_they_were():
    rng = np.random.default_rng(0)
    im = Image.fromarray(rng.integers(0, 256, (229, 320, 3), dtype=np.uint8), "RGB")  # the study's 320x229
    x = image_tensor(im, (320, 224))
    assert x.shape == (3, 224, 320) and x.dtype == torch.uint8
    want = np.asarray(im.resize((320, 224), Image.BILINEAR))
    assert torch.equal(x, torch.from_numpy(want.copy()).permute(2, 0, 1))
    assert torch.equal(image_tensor(im, 64), image_tensor(im, (64, 64)))  # an int is the square it always was
    assert image_tensor(im, [96, 64], "bicubic").shape == (3, 64, 96)


def test_resize_on_device_gives_w_by_h():
    from featkit.decoding import resize_on_device

    images = [torch.randint(0, 256, (3, 50, 70), dtype=torch.uint8), torch.randint(0, 256, (3, 64, 96), dtype=torch.uint8)]
    out = resize_on_device(images, (96, 64))
    assert out.shape == (2, 3, 64, 96) and torch.equal(out[1], images[1])  # already W x H: untouched
    assert resize_on_device(images, 32).shape == (2, 3, 32, 32)


def test_vgg16_flatten_at_w_by_h_pools_the_conv_map_to_the_studys_7x7_grid():
    net, spec = load_backbone("random", image_size="96x64", seed=3)
    assert spec.image_size == [96, 64] and spec.width_height == (96, 64) and spec.feature_dim == 25_088
    assert spec.key == "vgg16-96x64" and "size=96x64" in spec.describe()
    x = torch.randint(0, 256, (2, 3, 64, 96), dtype=torch.uint8)
    with torch.inference_mode():
        got = net(x)
        conv = net.features((x.float() - net.mean) * net.inv_std)  # the (2, 512, 2, 3) map
        want = torch.flatten(torch.nn.functional.adaptive_avg_pool2d(conv, (7, 7)), 1)
    assert conv.shape == (2, 512, 2, 3) and got.shape == (2, 25_088)
    assert torch.allclose(got, want, atol=1e-5)
    _, avg = load_backbone("random", image_size=(96, 64), pooling="avg")
    assert avg.feature_dim == 512 and avg.key == "vgg16-avg-96x64"
    # squares are as they were: the map flattened as it is, no pooling, (S/32)^2 cells
    square_net, square = load_backbone("random", image_size="64x64", seed=3)
    assert square.image_size == 64 and square.feature_dim == 2048 and square.key == "vgg16" and square_net.grid is None
    with torch.inference_mode():
        sx = torch.randint(0, 256, (1, 3, 64, 64), dtype=torch.uint8)
        assert torch.equal(square_net(sx), torch.flatten(square_net.features((sx.float() - square_net.mean) * square_net.inv_std), 1))
    with pytest.raises(FeatkitError, match="multiple of 32"):
        load_backbone("random", image_size=(96, 60))


def test_non_square_specs_round_trip_and_identify_other_features_than_the_square_one():
    _, square = load_backbone("random", arch=LITE0, image_size=64)
    _, wide = load_backbone("random", arch=LITE0, image_size="96x64")
    assert wide.key == "timm-tf_efficientnet_lite0-96x64" and square.key == "timm-tf_efficientnet_lite0"
    assert wide.identity()["image_size"] == [96, 64] and square.identity()["image_size"] == 64
    assert wide.identity() != square.identity() and wide.feature_dim == square.feature_dim == 1280
    for spec in (wide, square):
        assert BackboneSpec.from_json(spec.to_json()) == spec
    assert json.loads(wide.to_json())["image_size"] == [96, 64]
    assert BackboneSpec(**{**square.__dict__, "image_size": (96, 64)}) == wide  # a tuple is stored as the list
    tall_net, tall = load_backbone("random", arch="resnet18", image_size=(64, 96))
    assert tall.key == "resnet18-64x96" and tall_net(torch.zeros(1, 3, 96, 64, dtype=torch.uint8)).shape == (1, 512)
    assert backbone_gmacs(tall_net, tall) > 0
    with pytest.raises(FeatkitError, match="takes only its own input size, 224.*320x224"):
        load_backbone("random", arch="vit_b_16", image_size="320x224")


def test_extract_fit_and_predict_at_w_by_h_beside_a_square_extraction(tmp_path):
    from featkit.cache.names import backbone_keys, cache_file, heads_dir
    from featkit.cache.store import FeatureStore

    photos = make_photos(tmp_path / "photos", n=8, size=(80, 57))
    cache = tmp_path / "cache"
    quick = dict(backbone=LITE0, weights="random", batch_size=8, workers=0, progress=False, test_size=3, val_size=2)
    featkit.extract(photos, cache, image_size=64, **quick)
    s = featkit.extract(photos, cache, image_size="96x64", **quick)
    key = "timm-tf_efficientnet_lite0-96x64"
    assert backbone_keys(cache) == ["timm-tf_efficientnet_lite0", key]
    assert Path(s.cache_path) == cache_file(cache, key) and Path(s.cache_path).name == f"features-{key}.h5"
    splits = []
    for k in backbone_keys(cache):
        with FeatureStore.open(cache_file(cache, k)) as store:
            splits.append(dict(zip(store.column("photo_id"), store.column("split"))))
            size = store.identity["image_size"]
        assert size == ([96, 64] if k == key else 64)
    assert splits[0] == splits[1] and len(splits[0]) == 24
    featkit.fit(cache, head=LOGREG, progress=False, log=lambda m: None)
    files = sorted((photos / "Venice").glob("*.jpg"))[:3]
    preds = featkit.predict(files, cache, head=f"{key}/{LOGREG}", top=2)
    assert len(preds) == 3 and all(p.error is None and len(p.top) == 2 for p in preds)
    from featkit.cache.shelf import load_head
    from featkit.prediction import Predictor

    assert Predictor(cache, f"{key}/{LOGREG}").spec.image_size == [96, 64]  # rebuilt at the head's own size
    est, _ = load_head(heads_dir(cache, key) / f"{LOGREG}.joblib")
    with FeatureStore.open(cache_file(cache, key)) as store:
        ids = list(store.column("path"))
        want = est.predict_proba(store.read_features(np.array([ids.index(str(f)) for f in files])))
    for p, row in zip(preds, want):  # the numbers the head saw in the 96x64 cache
        assert p.probabilities[p.city] == pytest.approx(row.max(), abs=1e-4)


def test_cli_image_size_takes_w_by_h_and_names_the_option_in_errors(tmp_path, runner):
    from featkit.cli import app
    from featkit.cache.names import backbone_keys

    photos = make_photos(tmp_path / "photos", n=6, size=(64, 48))
    cache = tmp_path / "cache"
    common = ["--weights", "random", "--no-progress", "--workers", "0", "--batch-size", "8", "--test-size", "2", "--val-size", "1"]
    r = runner.invoke(app, ["extract", str(photos), "--cache", str(cache), "--image-size", "96x64", *common])
    assert r.exit_code == 0, r.output
    assert backbone_keys(cache) == ["vgg16-96x64"]
    r = runner.invoke(app, ["extract", str(photos), "--cache", str(cache), "--image-size", "96by64", *common])
    assert r.exit_code == 2 and "--image-size '96by64' is not an input size" in r.output


def test_a_vit_gives_its_cls_token_with_its_own_preprocessing():
    net, spec = load_backbone("random", arch="timm:vit_tiny_patch16_224")
    assert (spec.pooling, spec.feature_dim, spec.image_size, spec.interpolation) == ("token", 192, 224, "bicubic")
    assert spec.mean == (0.5, 0.5, 0.5) and spec.key == "timm-vit_tiny_patch16_224"  # timm's augreg config, not ImageNet's
    x = torch.randint(0, 256, (2, 3, 224, 224), dtype=torch.uint8)
    with torch.inference_mode():
        out = net(x)
    assert out.shape == (2, 192) and torch.isfinite(out).all()
