"""The overlapped extraction engine: same cache as the plain loop, only committed batches on any stop,
the batch halved on out-of-memory, the `decode` option, and the GPU paths (marked ``gpu``)."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import FAST, make_photos
from featkit.backbones import load_backbone
from featkit.cli import app
from featkit.decoding import resize_on_device, resolve_decode
from featkit.engine import feature_batches
from featkit.errors import FeatkitError
from featkit.extraction import ExtractSummary, extract_features, plan, write_batches
from featkit.images import load_image
from featkit.manifest import Photo, scan_photos
from featkit.options import ExtractOptions
from featkit.cache.identity import cache_identity
from featkit.cache.store import FeatureStore

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(scope="module")
def backbone():
    return load_backbone("random", image_size=32)


def _odd_photos(root: Path) -> Path:
    """Generated photos plus the files a decoder may treat differently: PNG, CMYK, progressive,
    EXIF-rotated, truncated, empty, text."""
    make_photos(root, cities=("Paris", "Tokyo"), n=9)
    d = root / "Paris"
    rgb = np.random.default_rng(3).integers(0, 255, (40, 56, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(d / "png.png")
    Image.fromarray(rgb).convert("CMYK").save(d / "cmyk.jpg")
    Image.fromarray(rgb).save(d / "progressive.jpg", progressive=True)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90
    Image.fromarray(rgb).save(d / "rotated.jpg", exif=exif)
    full = (d / "000.jpg").read_bytes()
    (d / "truncated.jpg").write_bytes(full[: len(full) // 2])
    (d / "empty.jpg").write_bytes(b"")
    (d / "text.jpg").write_text("not an image")
    return root


def _plain_extract(photos, net, spec, cache: Path, options: ExtractOptions):
    """The loop as it was before the engine overlapped: decode, compute, write, one after another."""
    with FeatureStore.open_for_append(cache, cache_identity(spec, options.dtype)) as store:
        splits, todo = plan(store, photos, options)
        summary = ExtractSummary()
        batches = feature_batches(todo, net, spec.image_size, torch.device("cpu"), batch_size=options.batch_size, workers=options.workers)
        write_batches(store, batches, splits, summary, queue_size=0)
    return summary


def _contents(cache: Path):
    with FeatureStore.open(cache) as s:
        cols = {name: list(s.column(name)) for name in ("photo_id", "city", "split", "path", "owner")}
        return s.f["features"][: s.n_rows], cols, s.failed(), s.n_rows


@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_overlapped_engine_gives_the_plain_loops_cache_bit_for_bit(tmp_path, backbone, dtype):
    root = _odd_photos(tmp_path / "photos")
    net, spec = backbone
    options = ExtractOptions(batch_size=4, workers=1, dtype=dtype, progress=False)
    photos = scan_photos(root)
    _plain_extract(photos, net, spec, tmp_path / "plain.h5", options)
    s = extract_features(photos, net, spec, tmp_path / "engine.h5", options)
    assert (s.n_extracted, s.n_skipped) == (22, 3)
    X0, cols0, failed0, n0 = _contents(tmp_path / "plain.h5")
    X1, cols1, failed1, n1 = _contents(tmp_path / "engine.h5")
    assert n0 == n1 == 22 and X1.dtype == np.dtype(dtype)
    assert X0.tobytes() == X1.tobytes()
    assert cols0 == cols1 and failed0 == failed1


def _batches_then(n_good: int, exc: BaseException, photos, net, spec):
    """``feature_batches`` for ``n_good`` batches, then ``exc`` raised in the caller's thread (a Ctrl-C)."""
    for k, b in enumerate(feature_batches(photos, net, spec.image_size, torch.device("cpu"), batch_size=4)):
        if k == n_good:
            raise exc
        yield b


def test_interrupt_in_the_caller_leaves_only_committed_batches_and_no_writer(tmp_path, backbone):
    root = make_photos(tmp_path / "photos", n=10)
    net, spec = backbone
    photos = scan_photos(root)
    summary = ExtractSummary()
    with FeatureStore.open_for_append(tmp_path / "c.h5", cache_identity(spec, "float16")) as store:
        splits, todo = plan(store, photos, ExtractOptions())
        committed = []
        with pytest.raises(KeyboardInterrupt):
            write_batches(store, _batches_then(3, KeyboardInterrupt(), todo, net, spec), splits, summary, on_batch=committed.append)
        assert not [t for t in threading.enumerate() if t.name == "featkit-writer"], "the writer outlived write_batches"
        assert not torch.is_inference_mode_enabled(), "an abandoned feature_batches left inference mode on"
        assert store.n_rows == summary.n_extracted == committed[-1] and store.n_rows % 4 == 0 and store.n_rows <= 12
        assert store.f["features"].shape[0] == store.n_rows
    s = extract_features(photos, net, spec, tmp_path / "c.h5", ExtractOptions(batch_size=4, workers=0, progress=False))
    assert s.n_total_rows == 30 and s.n_already == summary.n_extracted


def test_writer_errors_are_raised_in_the_caller_after_the_commits_before(tmp_path, backbone):
    root = make_photos(tmp_path / "photos", n=10)
    net, spec = backbone
    calls = []

    def fail_on_third(n_done):
        calls.append(n_done)
        if len(calls) == 3:
            raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        extract_features(scan_photos(root), net, spec, tmp_path / "c.h5", ExtractOptions(batch_size=4, workers=0, progress=False), on_batch=fail_on_third)
    with FeatureStore.open(tmp_path / "c.h5") as s:
        assert s.n_rows == 12 and calls == [4, 8, 12]


class _SmallDevice(torch.nn.Module):
    """The backbone, on a pretend device that runs out of memory on batches larger than ``limit``."""

    def __init__(self, net, limit: int):
        super().__init__()
        self.net, self.limit, self.sizes = net, limit, []

    def forward(self, x):
        self.sizes.append(len(x))
        if len(x) > self.limit:
            raise torch.OutOfMemoryError("CUDA out of memory (pretend)")
        return self.net(x)


def test_out_of_memory_halves_the_batch_and_goes_on(tmp_path, backbone, capsys):
    root = make_photos(tmp_path / "photos", n=7)
    net, spec = backbone
    photos = scan_photos(root)
    dev = torch.device("cpu")
    want = np.concatenate([b.features for b in feature_batches(photos, net, spec.image_size, dev, batch_size=8)])
    small = _SmallDevice(net, limit=3)
    got = list(feature_batches(photos, small, spec.image_size, dev, batch_size=8))
    assert [len(b.photos) for b in got] == [8, 8, 5]  # the batches keep their size; the forward passes shrink
    np.testing.assert_allclose(np.concatenate([b.features for b in got]), want, rtol=1e-5, atol=1e-5)
    assert small.sizes[:2] == [8, 4] and set(small.sizes[2:]) == {2, 1}  # halved until it fits, then kept (7 + 8 + 5 = 2+2+2+2 ...)
    err = capsys.readouterr().err
    assert "out of memory; batches of 4" in err and "out of memory; batches of 2" in err and "batches of 1" not in err
    with pytest.raises(FeatkitError, match="batch of one photo"):
        list(feature_batches(photos, _SmallDevice(net, limit=0), spec.image_size, dev, batch_size=8))


def test_decode_option_is_checked(runner, photos):
    with pytest.raises(FeatkitError, match="`decode` 'nvjpeg'") as e:
        ExtractOptions(decode="nvjpeg")
    assert e.value.param == "decode"
    assert resolve_decode("auto", torch.device("cpu")) == "cpu"
    assert resolve_decode("cpu", torch.device("cpu")) == "cpu"
    with pytest.raises(FeatkitError, match="`decode` gpu needs the backbone on a CUDA GPU") as e:
        resolve_decode("gpu", torch.device("cpu"))
    assert e.value.param == "decode"
    out = runner.invoke(app, ["extract", str(photos), "--cache", str(photos.parent / "c"), *FAST, "--device", "cpu", "--decode", "gpu"])
    assert out.exit_code == 2 and "--decode gpu needs" in out.output and "Traceback" not in out.output


def test_resize_on_device_matches_pil_bilinear():
    rng = np.random.default_rng(0)
    a = (rng.normal(128, 50, (229, 320, 3))).clip(0, 255).astype(np.uint8)
    want = torch.from_numpy(np.asarray(Image.fromarray(a).resize((224, 224), Image.BILINEAR))).permute(2, 0, 1).int()
    got = resize_on_device([torch.from_numpy(a).permute(2, 0, 1).contiguous()], 224)[0].int()
    assert (got - want).abs().max() <= 1


def test_interpolation_reaches_the_resize_on_the_cpu_and_on_the_device(tmp_path):
    rng = np.random.default_rng(1)
    a = (rng.normal(128, 50, (229, 320, 3))).clip(0, 255).astype(np.uint8)
    pil = {m: torch.from_numpy(np.asarray(Image.fromarray(a).resize((64, 64), f))).permute(2, 0, 1).int() for m, f in (("bilinear", Image.BILINEAR), ("bicubic", Image.BICUBIC))}
    got = resize_on_device([torch.from_numpy(a).permute(2, 0, 1).contiguous()], 64, "bicubic")[0].int()
    assert (got - pil["bicubic"]).abs().float().mean() < 0.5 < (pil["bicubic"] - pil["bilinear"]).abs().float().mean()
    Image.fromarray(a).save(tmp_path / "x.png")
    assert torch.equal(load_image(tmp_path / "x.png", 64, "bicubic").int(), pil["bicubic"])
    assert torch.equal(load_image(tmp_path / "x.png", 64).int(), pil["bilinear"])
    net, spec = load_backbone("random", image_size=64, pooling="avg")
    photo = Photo("x", "Paris", tmp_path / "x.png", "")
    with torch.inference_mode():
        want = net(pil["bicubic"].to(torch.uint8)[None]).numpy()
    got = next(iter(feature_batches([photo], net, 64, torch.device("cpu"), batch_size=1, interpolation="bicubic"))).features
    assert np.allclose(got, want, atol=1e-5)


# -- on a GPU ---------------------------------------------------------------------------------

def _features(photos, net, spec, dev, **kw):
    bs = list(feature_batches(photos, net, spec.image_size, torch.device(dev), batch_size=8, **kw))
    return [p.photo_id for b in bs for p in b.photos], np.concatenate([b.features.astype(np.float32) for b in bs]), [f[0].photo_id for b in bs for f in b.failed]


def _rel(a, b) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.mark.gpu
@needs_cuda
def test_cuda_features_agree_with_cpu_features(tmp_path):
    from conftest import REAL_WEIGHTS
    from featkit.photogen import write_photos

    root = write_photos(tmp_path / "photos", ["Paris", "Tokyo"], 12)
    net, spec = load_backbone(REAL_WEIGHTS if REAL_WEIGHTS.exists() else "random")
    photos = scan_photos(root)
    ids0, X0, _ = _features(photos, net, spec, "cpu")
    ids1, X1, _ = _features(photos, net, spec, "cuda", decode="cpu", dtype="float16")
    assert ids0 == ids1 and X1.shape == X0.shape
    assert _rel(X1, X0) < 1e-2  # fp16 autocast


@pytest.mark.gpu
@needs_cuda
def test_gpu_decode_agrees_with_cpu_decode_and_falls_back(tmp_path):
    from featkit.photogen import write_photos

    root = write_photos(tmp_path / "photos", ["Paris", "Tokyo"], 12)
    _odd_photos(tmp_path / "odd")
    for p in (tmp_path / "odd" / "Paris").iterdir():
        p.rename(root / "Paris" / p.name)
    assert resolve_decode("gpu", torch.device("cuda")) == "gpu"
    # pixels: nvJPEG + resize on the GPU against PIL
    jpegs = sorted((root / "Tokyo").glob("*.jpg"))
    from torchvision.io import decode_jpeg

    datas = [torch.frombuffer(bytearray(p.read_bytes()), dtype=torch.uint8) for p in jpegs]
    gpu = resize_on_device(decode_jpeg(datas, device="cuda"), 224).cpu().int()
    cpu = torch.stack([load_image(p, 224) for p in jpegs]).int()
    diff = (gpu - cpu).abs().float()
    # nvJPEG and libjpeg-turbo upsample chroma differently: small everywhere, larger on sharp colour edges
    q = torch.quantile(diff.flatten()[:1_000_000], torch.tensor([0.5, 0.99, 0.999]))
    assert diff.mean() < 2 and q[0] <= 1 and q[1] <= 12 and q[2] <= 32, (diff.mean(), q, diff.max())
    # features, and the same photos stored or refused as on the CPU path
    net, spec = load_backbone("random", image_size=64)
    photos = scan_photos(root)
    ids0, X0, bad0 = _features(photos, net, spec, "cuda", decode="cpu")
    ids1, X1, bad1 = _features(photos, net, spec, "cuda", decode="gpu")
    assert ids0 == ids1 and bad0 == bad1 and len(bad0) == 3
    assert _rel(X1, X0) < 5e-2


@pytest.mark.gpu
@needs_cuda
def test_extract_on_cuda_end_to_end_stores_float16(tmp_path):
    root = _odd_photos(tmp_path / "photos")
    net, spec = load_backbone("random", image_size=64)
    s = extract_features(scan_photos(root), net, spec, tmp_path / "c.h5", ExtractOptions(device="cuda", batch_size=8, workers=2, progress=False))
    assert (s.n_extracted, s.n_skipped) == (22, 3)
    with FeatureStore.open(tmp_path / "c.h5") as st:
        assert st.f["features"].dtype == np.float16 and np.isfinite(st.read_features(np.arange(st.n_rows))).all()


@pytest.mark.gpu
@needs_cuda
def test_mlp_head_trains_on_cuda():
    from sklearn.datasets import make_blobs

    from featkit.heads import MLPHead

    X, y = make_blobs(600, n_features=64, centers=4, cluster_std=4.0, random_state=0)
    y = np.array(["Paris", "Tokyo", "Venice", "London"])[y]
    h = MLPHead(hidden_layer_sizes=(64,), max_iter=40, learning_rate_init=0.01, device="cuda", random_state=0).fit(X[:500], y[:500])
    assert h.score(X[500:], y[500:]) > 0.9
    assert set(h.predict(X[:5])) <= set(y)
