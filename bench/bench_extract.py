"""Benchmark 1: how close `featkit extract` comes to the backbone's own speed, and to simpler loops.

Variants, one run, same device, same batch size, same photos (--variants picks; default
a,b,plain,naive on CPU and a,b,cpu,gpu on CUDA):

  (a)     ceiling  the backbone alone on a uint8 batch already on the device (no decoding, no writes;
                   features copied back as extract copies them: float16 on CUDA)
  (b)     featkit  featkit.extraction.extract_features end to end on the JPEGs, whole wall time
                   (DataLoader worker start-up, decode, resize, backbone, HDF5 writes), --decode (auto)
  (cpu)   b with decode=cpu (workers decode with PIL)
  (gpu)   b with decode=gpu (nvJPEG on the device, resize on the device; CUDA only)
  (plain) the plain loop featkit had before the engine overlapped: the same feature_batches,
          written by write_batches(queue_size=0) in the caller, one batch after another
  (naive) one photo at a time: PIL open, torchvision Resize+ToTensor+Normalize,
          unsqueeze, a plain torchvision vgg16().features forward (batch of 1)

Prints images/s of each and the ratios b/a (target on CPU: >= 0.90; on CUDA: >= 0.8), b/plain and b/naive,
with the backbone's GMAC per photo and feature width.

--backbone (repeated, or a comma list; default vgg16) takes featkit's backbone names (vgg16, a torchvision
model name, timm:NAME); with several, each runs the same variants on the same photos and one table puts them
side by side: images/s of the backbone alone (a) and end to end (b), GMAC per photo, feature dim.
--weights is one value for every backbone, or a comma list with one per backbone.

    python bench/bench_extract.py --weights ../shared/weights/vgg16_imagenet_features.pth
    python bench/bench_extract.py --quick --weights random
    python bench/bench_extract.py --quick --backbone vgg16,timm:tf_efficientnet_lite0 --weights random
    python bench/bench_extract.py --backbone vgg16,timm:tf_efficientnet_lite0 \\
        --weights ../shared/weights/vgg16_imagenet_features.pth,../shared/weights/efficientnet_lite0_imagenet_timm.pth
    python bench/bench_extract.py --device cuda --n 20000 --batch-size 256 --workers 15
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


LABELS = {
    "a": "(a) backbone alone, batch on the device",
    "b": "(b) featkit extract, end to end",
    "cpu": "(b) with decode=cpu",
    "gpu": "(b) with decode=gpu",
    "plain": "(plain) pre-overlap loop, writes in the caller",
    "naive": "(naive) one photo at a time",
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    add_common_options(p, n_help="48 on CPU, 20,000 on CUDA; --quick: 32 / 2,000", batch_size=64, batch_help=", featkit extract's; (c) always uses 1")
    p.add_argument("--photos", type=Path, default=None, help="folder with one sub-folder per city of real JPEGs to sample --n from (default: generate 320x229 JPEGs)")
    p.add_argument("--workers", type=int, default=None, help="extract's decoding workers (default: featkit's, cores - 1)")
    p.add_argument("--variants", default=None, help="comma list of a,b,cpu,gpu,plain,naive (default: a,b,plain,naive on CPU; a,b,cpu,gpu on CUDA)")
    p.add_argument("--decode", default="auto", help="(b)'s --decode: auto, cpu or gpu (default: auto)")
    p.add_argument("--repeats", type=int, default=1, help="run (a), (b), (c) this many times in turn and report the median (default: 1)")
    p.add_argument("--keep", type=Path, default=None, help="write the generated photos and cache here instead of a temp dir")
    p.add_argument("--backbone", action="append", default=None, help="featkit backbone(s): vgg16, a torchvision model name or timm:NAME; repeat it or give a comma list to compare (default: vgg16)")
    p.set_defaults(image_size=None)  # each backbone's own input size (224 for VGG16); --quick: 64
    a = p.parse_args(argv)
    a.backbones = [b.strip() for v in (a.backbone or ["vgg16"]) for b in v.split(",") if b.strip()]
    weights = [None] if a.weights is None else [w.strip() or None for w in a.weights.split(",")]
    if len(weights) not in (1, len(a.backbones)):
        p.error(f"--weights: give one value, or one per backbone ({len(a.backbones)}); got {len(weights)}")
    a.weights_list = weights * len(a.backbones) if len(weights) == 1 else weights
    if a.quick:
        a.image_size = 64 if a.image_size in (None, 224) else a.image_size
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
                return net(x).cpu()  # extract copies float16 features back too
        return net(x)

    if on_cuda:
        torch.backends.cudnn.benchmark = True  # as extract sets it
    with torch.inference_mode():
        for k in sorted(set(sizes)):  # warm-up of every batch shape (cuDNN autotunes each), allocator, oneDNN
            run(k)
        sync(dev)
        t0 = time.perf_counter()
        for k in sizes:
            run(k)
        sync(dev)
        return time.perf_counter() - t0


def featkit_extract(photos, net, spec, cache: Path, dev_arg: str, batch_size: int, workers, decode: str = "auto", plain: bool = False) -> float:
    """(b) seconds of one whole extract_features call into a fresh cache; ``plain``: the pre-overlap loop."""
    from featkit.extraction import extract_features
    from featkit.options import ExtractOptions

    # splits do not change the work; 0/0 lets tiny samples through
    options = ExtractOptions(device=dev_arg, batch_size=batch_size, workers=workers, overwrite=True, progress=False, test_size=0, val_size=0, decode=decode)
    t0 = time.perf_counter()
    s = plain_extract(photos, net, spec, cache, options) if plain else extract_features(photos, net, spec, cache, options)
    seconds = time.perf_counter() - t0
    if s.n_extracted != len(photos):
        die(f"extract stored {s.n_extracted} of {len(photos)} photos ({s.n_skipped} skipped, see {s.failed_csv})")
    return seconds


def plain_extract(photos, net, spec, cache: Path, options):
    """(plain) extract_features as it was before the writer thread: the same parts, each batch written in the caller."""
    from featkit.devices import resolve_device
    from featkit.cache.identity import cache_identity
    from featkit.cache.store import FeatureStore
    from featkit.engine import feature_batches
    from featkit.extraction import ExtractSummary, plan, write_batches

    dev = resolve_device(options.device)
    with FeatureStore.open_for_append(cache, cache_identity(spec, options.dtype), overwrite=options.overwrite) as store:
        splits, todo = plan(store, photos, options)
        summary = ExtractSummary()
        batches = feature_batches(
            todo, net, spec.image_size, dev, batch_size=options.batch_size, workers=options.workers, decode="cpu", dtype=options.dtype,
            interpolation=spec.interpolation,
        )
        write_batches(store, batches, splits, summary, queue_size=0)
    return summary


def naive_model(net, spec, dev):
    """A plain torch module with the backbone's weights: vgg16().features for VGG16, else the backbone's own model."""
    if spec.arch != "vgg16":
        return net.features.to(dev).eval()
    from torchvision.models import vgg16

    model = vgg16(weights=None).features
    model.load_state_dict({k: v.detach().cpu() for k, v in net.features.state_dict().items()})
    return model.to(dev).eval()


def naive_loop(photos, model, spec, dev: torch.device) -> float:
    """(c) seconds for the one-photo-at-a-time loop most notebooks write."""
    from PIL import Image
    from torchvision import transforms

    tf = transforms.Compose([
        transforms.Resize((spec.image_size, spec.image_size), interpolation=transforms.InterpolationMode(spec.interpolation)),
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


def load(args, arch: str, weights):
    """One backbone for the bench; --quick's 64px where the backbone takes it (a ViT takes only its own size)."""
    from featkit.backbones import load_backbone
    from featkit.errors import FeatkitError

    try:
        return load_backbone(weights, arch=arch, image_size=args.image_size, seed=args.seed)
    except FeatkitError as e:
        if args.quick and "takes only its own input size" in str(e):
            return load_backbone(weights, arch=arch, image_size=None, seed=args.seed)
        raise


def bench_one(args, net, spec, photos, variants, dev, workers, root: Path) -> dict:
    """Seconds of each variant for one backbone (median over --repeats)."""
    from featkit.images import load_image
    from featkit.cache.names import cache_file

    n = len(photos)
    images = torch.stack([load_image(photos[i % n].path, spec.image_size, spec.interpolation) for i in range(args.batch_size)])
    model_c = naive_model(net, spec, dev) if "naive" in variants else None
    cache = cache_file(root / "cache", spec.key)
    runs = {
        "a": lambda: ceiling(net, images, n, args.batch_size, dev),
        "b": lambda: featkit_extract(photos, net, spec, cache, args.device, args.batch_size, workers, args.decode),
        "cpu": lambda: featkit_extract(photos, net, spec, cache, args.device, args.batch_size, workers, "cpu"),
        "gpu": lambda: featkit_extract(photos, net, spec, cache, args.device, args.batch_size, workers, "gpu"),
        "plain": lambda: featkit_extract(photos, net, spec, cache, args.device, args.batch_size, workers, plain=True),
        "naive": lambda: naive_loop(photos, model_c, spec, dev),
    }
    # Warm-ups: a small extract (worker start-up, HDF5, backbone, nvJPEG) and a few naive forwards.
    warm = photos[: min(n, args.batch_size)]
    featkit_extract(warm, net, spec, root / "warmup" / "features.h5", args.device, args.batch_size, workers, args.decode)
    if "gpu" in variants:
        featkit_extract(warm, net, spec, root / "warmup" / "features.h5", args.device, args.batch_size, workers, "gpu")
    if model_c is not None:
        naive_loop(photos[:2], model_c, spec, dev)

    secs = {k: [] for k in variants}
    for r in range(args.repeats):
        for k in variants:
            secs[k].append(runs[k]())
            print(f"  {spec.arch} ({k}) {n / secs[k][-1]:.2f} images/s", file=sys.stderr, flush=True)
    return secs


def main(argv=None) -> None:
    args = parse_args(argv)
    from featkit.backbones import backbone_gmacs
    from featkit.devices import resolve_device
    from featkit.errors import FeatkitError
    from featkit.decoding import resolve_decode
    from featkit.engine import default_workers

    try:
        dev = resolve_device(args.device)
        nets = [load(args, arch, w) for arch, w in zip(args.backbones, args.weights_list)]
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
    sizes = ", ".join(sorted({f"{spec.image_size}px" for _, spec in nets}))
    print(f"bench_extract: {n} photos, batch {args.batch_size}, {sizes}, device {dev}, {workers} workers; warming up...", file=sys.stderr, flush=True)

    variants = (args.variants or ("a,b,cpu,gpu" if dev.type == "cuda" else "a,b,plain,naive")).split(",")
    unknown = set(variants) - set(LABELS)
    if unknown or "a" not in variants or "b" not in variants:
        die(f"--variants takes a comma list of {', '.join(LABELS)} that includes a and b; got {args.variants}")

    results = []
    for net, spec in nets:
        secs = bench_one(args, net, spec, photos, variants, dev, workers, root)
        med = {k: statistics.median(v) for k, v in secs.items()}
        results.append({"spec": spec, "secs": secs, "med": med, "ips": {k: n / v for k, v in med.items()}, "gmac": backbone_gmacs(net, spec)})

    info = machine_info(dev)
    settings = {
        "photos": source,
        "image size": ", ".join(dict.fromkeys(f"{r['spec'].image_size}x{r['spec'].image_size}" for r in results)),
        "batch size": f"{args.batch_size}" + ("; 1 for (naive)" if "naive" in variants else ""),
        "extract workers": workers,
        "decode for (b)": f"{args.decode} -> {resolve_decode(args.decode, dev)}",
        "weights": ", ".join(r["spec"].weights for r in results),
        "repeats": f"{args.repeats} (median)",
    }
    if len(results) == 1:  # the single-backbone table, as it always was, with the backbone's cost and width
        r = results[0]
        spec, med, ips = r["spec"], r["med"], r["ips"]
        settings["backbone"] = f"{spec.arch} ({spec.key}): {r['gmac']:.2f} GMAC per photo, {spec.feature_dim:,} features"
        rows = [[LABELS[k], med[k], ips[k]] for k in variants]
        ratios = {f"{k}/a": ips[k] / ips["a"] for k in variants if k != "a"}
        for k in ("plain", "naive"):
            if k in variants:
                ratios[f"b/{k}"] = ips["b"] / ips[k]
        notes = [f"{k} = {v:.2f}" for k, v in ratios.items()]
        notes.append(f"b/a: share of the backbone ceiling extract reaches (target: >= 0.90 on CPU, >= 0.8 on CUDA)")
        if dev.type == "cuda" and spec.image_size == 224:
            notes.append(f"GPU target: (b) >= 10,000 images/s at 224x224 -> {'met' if ips['b'] >= 10000 else 'NOT met'} ({ips['b']:,.0f})")
        text = print_table("Benchmark 1: extraction pipeline efficiency", info, settings, ["variant", "seconds", "images/s"], rows, notes)
        write_json(args.json, {
            "benchmark": "extract", "machine": info, "settings": settings, "n": n, "backbone": spec.identity(), "key": spec.key,
            "gmac_per_photo": r["gmac"], "feature_dim": spec.feature_dim,
            "seconds": med, "seconds_all": r["secs"], "images_per_s": ips, "ratios": ratios, "table": text,
        })
    else:
        others = [k for k in variants if k not in ("a", "b")]
        columns = ["backbone", "size", "dim", "GMAC/photo", "(a) images/s", "(b) images/s", "b/a", *[f"({k}) images/s" for k in others]]
        rows = [
            [r["spec"].key, r["spec"].image_size, r["spec"].feature_dim, r["gmac"], r["ips"]["a"], r["ips"]["b"], r["ips"]["b"] / r["ips"]["a"], *[r["ips"][k] for k in others]]
            for r in results
        ]
        notes = [f"{LABELS[k]}" for k in variants]
        notes.append("b/a: share of the backbone ceiling extract reaches (target: >= 0.90 on CPU, >= 0.8 on CUDA)")
        if "naive" in variants:
            notes.append("(naive) runs vgg16().features for VGG16, the backbone's own torch module for the others")
        text = print_table("Benchmark 1: extraction pipeline efficiency, per backbone", info, settings, columns, rows, notes)
        write_json(args.json, {
            "benchmark": "extract", "machine": info, "settings": settings, "n": n, "table": text,
            "backbones": [
                {"key": r["spec"].key, "backbone": r["spec"].identity(), "weights": r["spec"].weights, "gmac_per_photo": r["gmac"],
                 "feature_dim": r["spec"].feature_dim, "seconds": r["med"], "seconds_all": r["secs"], "images_per_s": r["ips"]}
                for r in results
            ],
        })
    tmp.cleanup()


if __name__ == "__main__":
    main()
