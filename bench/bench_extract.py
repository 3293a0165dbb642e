"""Benchmark 1: how close `featkit extract` comes to the backbone's own speed, and to a naive loop.

Three variants, one run, same device, same batch size, same photos:

  (a) ceiling  the backbone alone on a uint8 batch already on the device (no decoding, no writes)
  (b) featkit  featkit.extraction.extract_features end to end on the JPEGs, whole wall time
               (DataLoader worker start-up, decode, resize, backbone, HDF5 writes)
  (c) naive    one photo at a time: PIL open, torchvision Resize+ToTensor+Normalize,
               unsqueeze, a plain torchvision vgg16().features forward (batch of 1)

Prints images/s of each and the ratios b/a (target on CPU: >= 0.90) and b/c.

    python bench/bench_extract.py --weights ../shared/weights/vgg16_imagenet_features.pth
    python bench/bench_extract.py --quick --weights random
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import add_common_options, default_n, die, machine_info, make_photos, pick_photos, print_table, sync, write_json  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    add_common_options(p, n_help="48 on CPU, 20,000 on CUDA; --quick: 32 / 2,000", batch_size=64, batch_help=", featkit extract's; (c) always uses 1")
    p.add_argument("--photos", type=Path, default=None, help="folder with one sub-folder per city of real JPEGs to sample --n from (default: generate 320x229 JPEGs)")
    p.add_argument("--workers", type=int, default=None, help="extract's decoding workers (default: featkit's, cores - 1)")
    p.add_argument("--repeats", type=int, default=1, help="run (a), (b), (c) this many times in turn and report the median (default: 1)")
    p.add_argument("--keep", type=Path, default=None, help="write the generated photos and cache here instead of a temp dir")
    a = p.parse_args(argv)
    if a.quick:
        a.image_size = 64 if a.image_size == 224 else a.image_size
        a.batch_size = min(a.batch_size, 16)
    return a


def ceiling(net, images_u8: torch.Tensor, n: int, batch_size: int, dev: torch.device) -> float:
    """(a) seconds for ``n`` images through the backbone, the batch already in device memory."""
    on_cuda = dev.type == "cuda"
    batch = images_u8.to(dev)
    if on_cuda:
        batch = batch.contiguous(memory_format=torch.channels_last)
    sizes = [batch_size] * (n // batch_size) + ([n % batch_size] if n % batch_size else [])

    def run(k):
        x = batch[:k]
        if on_cuda:
            with torch.autocast("cuda", dtype=torch.float16):
                out = net(x)
        else:
            out = net(x)
        return out.float().cpu()  # extract copies features back too

    with torch.inference_mode():
        run(sizes[0])  # warm-up (cudnn autotune, allocator, oneDNN primitives)
        sync(dev)
        t0 = time.perf_counter()
        for k in sizes:
            run(k)
        sync(dev)
        return time.perf_counter() - t0


def featkit_extract(photos, net, spec, cache: Path, dev_arg: str, batch_size: int, workers) -> float:
    """(b) seconds of one whole extract_features call into a fresh cache."""
    from featkit.extraction import extract_features
    from featkit.options import ExtractOptions

    # splits do not change the work; 0/0 lets tiny samples through
    options = ExtractOptions(device=dev_arg, batch_size=batch_size, workers=workers, overwrite=True, progress=False, test_size=0, val_size=0)
    t0 = time.perf_counter()
    s = extract_features(photos, net, spec, cache, options)
    seconds = time.perf_counter() - t0
    if s.n_extracted != len(photos):
        die(f"extract stored {s.n_extracted} of {len(photos)} photos ({s.n_skipped} skipped, see {s.failed_csv})")
    return seconds


def naive_model(net, dev):
    from torchvision.models import vgg16

    model = vgg16(weights=None).features
    model.load_state_dict({k: v.detach().cpu() for k, v in net.features.state_dict().items()})
    return model.to(dev).eval()


def naive_loop(photos, model, spec, dev: torch.device) -> float:
    """(c) seconds for the one-photo-at-a-time loop most notebooks write."""
    from PIL import Image
    from torchvision import transforms

    tf = transforms.Compose([
        transforms.Resize((spec.image_size, spec.image_size)),
        transforms.ToTensor(),
        transforms.Normalize(spec.mean, spec.std),
    ])
    feats = []
    sync(dev)
    t0 = time.perf_counter()
    with torch.no_grad():
        for p in photos:
            img = Image.open(p.path).convert("RGB")
            x = tf(img).unsqueeze(0).to(dev)
            feats.append(torch.flatten(model(x), 1).cpu())
    sync(dev)
    return time.perf_counter() - t0


def main(argv=None) -> None:
    args = parse_args(argv)
    from featkit.backbones import load_backbone
    from featkit.devices import resolve_device
    from featkit.errors import FeatkitError
    from featkit.extraction import default_workers
    from featkit.images import load_image

    try:
        dev = resolve_device(args.device)
        net, spec = load_backbone(args.weights, image_size=args.image_size, seed=args.seed)
    except FeatkitError as e:
        die(str(e))
    args.n = default_n(args.n, dev, cpu=32 if args.quick else 48, gpu=2000 if args.quick else 20000)
    workers = default_workers() if args.workers is None else args.workers
    tmp = tempfile.TemporaryDirectory(prefix="featkit-bench-extract-")
    root = args.keep or Path(tmp.name)
    root.mkdir(parents=True, exist_ok=True)
    if args.photos is not None:
        photos = pick_photos(args.photos, args.n, seed=args.seed)
        source = f"{len(photos)} photos sampled from {args.photos}"
    else:
        t0 = time.perf_counter()
        make_photos(root / "photos", args.n, seed=args.seed)
        photos = pick_photos(root / "photos", args.n)
        source = f"{len(photos)} generated 320x229 JPEGs (featkit.photogen, {time.perf_counter() - t0:.0f}s to make)"
    n = len(photos)
    if n < 2:
        die("need at least 2 photos")
    print(f"bench_extract: {n} photos, batch {args.batch_size}, {spec.image_size}px, device {dev}, {workers} workers; warming up...", file=sys.stderr, flush=True)

    images = torch.stack([load_image(photos[i % n].path, spec.image_size) for i in range(args.batch_size)])
    model_c = naive_model(net, dev)
    # Warm-ups: a small extract (worker start-up, HDF5, backbone) and a few naive forwards.
    featkit_extract(photos[: min(n, args.batch_size)], net, spec, root / "warmup" / "features.h5", args.device, args.batch_size, workers)
    naive_loop(photos[:2], model_c, spec, dev)

    secs = {"a": [], "b": [], "c": []}
    for r in range(args.repeats):
        secs["a"].append(ceiling(net, images, n, args.batch_size, dev))
        print(f"  (a) {n / secs['a'][-1]:.2f} images/s", file=sys.stderr, flush=True)
        secs["b"].append(featkit_extract(photos, net, spec, root / "cache" / "features.h5", args.device, args.batch_size, workers))
        print(f"  (b) {n / secs['b'][-1]:.2f} images/s", file=sys.stderr, flush=True)
        secs["c"].append(naive_loop(photos, model_c, spec, dev))
        print(f"  (c) {n / secs['c'][-1]:.2f} images/s", file=sys.stderr, flush=True)
    med = {k: statistics.median(v) for k, v in secs.items()}
    ips = {k: n / v for k, v in med.items()}

    info = machine_info(dev)
    settings = {
        "photos": source,
        "image size": f"{spec.image_size}x{spec.image_size}",
        "batch size": f"{args.batch_size} for (a) and (b); 1 for (c)",
        "extract workers": workers,
        "weights": spec.weights,
        "repeats": f"{args.repeats} (median)",
    }
    rows = [
        ["(a) backbone alone, batch in memory", med["a"], ips["a"]],
        ["(b) featkit extract, end to end", med["b"], ips["b"]],
        ["(c) naive loop, one photo at a time", med["c"], ips["c"]],
    ]
    ratios = {"b/a": ips["b"] / ips["a"], "b/c": ips["b"] / ips["c"]}
    notes = [
        f"b/a = {ratios['b/a']:.2f}  (share of the backbone ceiling extract reaches; CPU target >= 0.90)",
        f"b/c = {ratios['b/c']:.2f}  (extract's speed-up over the naive loop)",
    ]
    if dev.type == "cuda" and spec.image_size == 224:
        notes.append(f"GPU target: (b) >= 5,000 images/s at 224x224 -> {'met' if ips['b'] >= 5000 else 'NOT met'} ({ips['b']:,.0f})")
    text = print_table("Benchmark 1: extraction pipeline efficiency", info, settings, ["variant", "seconds", "images/s"], rows, notes)
    write_json(args.json, {
        "benchmark": "extract", "machine": info, "settings": settings, "n": n,
        "seconds": med, "seconds_all": secs, "images_per_s": ips, "ratios": ratios, "table": text,
    })
    tmp.cleanup()


if __name__ == "__main__":
    main()
