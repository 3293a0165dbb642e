"""Benchmark 2: the study's protocol against featkit's, from photos to a trained MLP head.

Same photos, same splits, same device, same head, same number of epochs E:

  study    a torch training loop that recomputes the frozen VGG16 conv base for every batch of 15
           in every epoch (decode + resize each time, like Keras's flow_from_directory), trains
           Linear(25088,1024) -> ReLU -> Dropout(0.5) -> Linear(1024, n_cities) with Adam on the
           train split, and scores the val split each epoch (its features recomputed too, as
           Keras's validation generator does)
  featkit  extract_features once (all photos, test split included) + featkit.training.fit_heads
           --head mlp with max_iter=E, no early stop, on the cached features

The study's loop is given featkit's own loader (DataLoader workers decoding to uint8, the
backbone normalising on the device, inference mode for the frozen part), so the ratio measures
the protocol, not a slow implementation. It is roughly E x extract / (extract + fit).

    python bench/bench_protocol.py --weights ../shared/weights/vgg16_imagenet_features.pth
    python bench/bench_protocol.py --quick --weights random
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import add_common_options, default_n, die, machine_info, make_photos, pick_photos, print_table, sync, write_json  # noqa: E402

STUDY_BATCH = 15


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    add_common_options(p, n_help="60 on CPU, 2,000 on CUDA; --quick: 40 / 400", batch_size=STUDY_BATCH, batch_help=", the study's: its conv base + head batch")
    p.add_argument("--epochs", type=int, default=None, help="epochs E for both protocols (default: 11, the study's; 2 with --quick)")
    p.add_argument("--extract-batch-size", type=int, default=64, help="featkit extract's batch size (default: 64, featkit's)")
    p.add_argument("--mlp-batch-size", type=int, default=STUDY_BATCH, help=f"featkit MLP mini-batch (default: {STUDY_BATCH}, the study's; featkit's own default is 128)")
    p.add_argument("--photos", type=Path, default=None, help="folder with one sub-folder per city of real JPEGs to sample --n from (default: generate 320x229 JPEGs)")
    p.add_argument("--workers", type=int, default=None, help="decoding workers for both protocols (default: featkit's, cores - 1)")
    p.add_argument("--test-size", type=float, default=0.125, help="per-city test share (featkit's default 0.125)")
    p.add_argument("--val-size", type=float, default=0.1, help="per-city val share (featkit's default 0.1)")
    a = p.parse_args(argv)
    if a.epochs is None:
        a.epochs = 11 if not a.quick else 2
    if a.quick:
        a.image_size = 64 if a.image_size == 224 else a.image_size
    return a


class _Photos(torch.utils.data.Dataset):
    """(uint8 image, label) read from disk on every access: nothing is cached between epochs."""

    def __init__(self, photos, labels, size):
        self.photos, self.labels, self.size = photos, labels, size

    def __len__(self):
        return len(self.photos)

    def __getitem__(self, i):
        from featkit.images import load_image

        return load_image(self.photos[i].path, self.size), self.labels[i]


def study_protocol(train, val, classes, net, spec, dev, *, epochs, batch_size, workers, seed) -> dict:
    """The study's way: conv base recomputed per batch per epoch; returns seconds and the final val accuracy."""
    on_cuda = dev.type == "cuda"
    index = {c: i for i, c in enumerate(classes)}
    t0 = time.perf_counter()
    kw = dict(num_workers=workers, pin_memory=on_cuda, persistent_workers=workers > 0)
    g = torch.Generator().manual_seed(seed)
    train_dl = torch.utils.data.DataLoader(_Photos(train, [index[p.city] for p in train], spec.image_size), batch_size=batch_size, shuffle=True, generator=g, **kw)
    val_dl = torch.utils.data.DataLoader(_Photos(val, [index[p.city] for p in val], spec.image_size), batch_size=batch_size, **kw) if val else None
    net = net.to(dev, memory_format=torch.channels_last) if on_cuda else net.to(dev)
    torch.manual_seed(seed)
    head = torch.nn.Sequential(
        torch.nn.Linear(spec.feature_dim, 1024), torch.nn.ReLU(), torch.nn.Dropout(0.5), torch.nn.Linear(1024, len(classes))
    ).to(dev)
    opt = torch.optim.Adam(head.parameters(), lr=1e-3)
    loss_fn = torch.nn.CrossEntropyLoss()

    def features(images):
        images = images.to(dev, non_blocking=on_cuda)
        with torch.inference_mode():
            if on_cuda:
                with torch.autocast("cuda", dtype=torch.float16):
                    f = net(images.contiguous(memory_format=torch.channels_last))
            else:
                f = net(images)
        return f.float().clone()  # out of inference mode so the head can train on it

    acc = float("nan")
    for epoch in range(epochs):
        head.train()
        for images, labels in train_dl:
            loss = loss_fn(head(features(images)), labels.to(dev))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        if val_dl is not None:
            head.eval()
            right = 0
            with torch.no_grad():
                for images, labels in val_dl:
                    right += int((head(features(images)).argmax(1).cpu() == labels).sum())
            acc = right / len(val)
        print(f"  study epoch {epoch + 1}/{epochs}: {time.perf_counter() - t0:.1f}s", file=sys.stderr, flush=True)
    sync(dev)
    return {"seconds": time.perf_counter() - t0, "val_accuracy": acc}


def featkit_protocol(photos, net, spec, cache_dir: Path, args) -> dict:
    """featkit's way: extract once, then fit the MLP head on the cache for the same epochs."""
    from featkit.extraction import extract_features
    from featkit.options import ExtractOptions
    from featkit.cache.names import cache_file
    from featkit.training import fit_heads

    options = ExtractOptions(device=args.device, batch_size=args.extract_batch_size, workers=args.workers, split_seed=args.seed,
                             test_size=args.test_size, val_size=args.val_size, overwrite=True, progress=False)
    t0 = time.perf_counter()
    s = extract_features(photos, net, spec, cache_file(cache_dir), options)
    t_extract = time.perf_counter() - t0
    if s.n_extracted != len(photos):
        die(f"extract stored {s.n_extracted} of {len(photos)} photos ({s.n_skipped} skipped)")
    # n_iter_no_change=E: validation is still scored each epoch, but no early stop, so all E epochs run.
    mlp = {"max_iter": args.epochs, "early_stopping": False, "n_iter_no_change": args.epochs, "batch_size": args.mlp_batch_size}
    t1 = time.perf_counter()  # a few photos' features fit in memory: the in-memory path
    records = fit_heads(cache_dir, "mlp", seed=args.seed, device=args.device, params={"mlp": mlp}, stream="no", log=lambda m: print("  " + m, file=sys.stderr))
    t_fit = time.perf_counter() - t1
    rec = records[0]
    return {"seconds": t_extract + t_fit, "extract_seconds": t_extract, "fit_seconds": t_fit, "val_accuracy": rec.get("val_score"),
            "epochs_run": rec.get("chosen", {}).get("epochs")}


def _projection(st: dict, fk: dict, epochs: int, target: int = 11) -> list[str]:
    """When fewer epochs than the study's were run, scale the per-epoch parts linearly (labelled as a projection)."""
    if epochs == target:
        return []
    study = st["seconds"] / epochs * target
    featkit = fk["extract_seconds"] + fk["fit_seconds"] / epochs * target
    return [f"projected to {target} epochs (per-epoch parts scaled linearly, not measured): study {study:.0f}s, "
            f"featkit {featkit:.0f}s, ratio {study / featkit:.2f}x"]


def main(argv=None) -> None:
    args = parse_args(argv)
    from featkit.backbones import load_backbone
    from featkit.devices import resolve_device
    from featkit.errors import FeatkitError
    from featkit.engine import default_workers
    from featkit.splits import assign_splits

    try:
        dev = resolve_device(args.device)
        net, spec = load_backbone(args.weights, image_size=args.image_size, seed=args.seed)
    except FeatkitError as e:
        die(str(e))
    args.n = default_n(args.n, dev, cpu=40 if args.quick else 60, gpu=400 if args.quick else 2000)
    args.workers = default_workers() if args.workers is None else args.workers
    tmp = tempfile.TemporaryDirectory(prefix="featkit-bench-protocol-")
    root = Path(tmp.name)
    if args.photos is not None:
        photos = pick_photos(args.photos, args.n, seed=args.seed)
        source = f"{len(photos)} photos sampled from {args.photos}"
    else:
        make_photos(root / "photos", args.n, seed=args.seed)
        photos = pick_photos(root / "photos", args.n)
        source = f"{len(photos)} generated 320x229 JPEGs (featkit.photogen)"
    try:  # the very splits extract will assign, so both protocols train and validate on the same photos
        splits = assign_splits(photos, seed=args.seed, test_size=args.test_size, val_size=args.val_size)
    except FeatkitError as e:
        die(f"{e} (or raise --n)")
    train = [p for p in photos if splits[p.photo_id] == "train"]
    val = [p for p in photos if splits[p.photo_id] == "val"]
    classes = sorted({p.city for p in photos})
    print(f"bench_protocol: {len(photos)} photos ({len(train)} train, {len(val)} val), {len(classes)} cities, {spec.image_size}px, "
          f"{args.epochs} epochs, device {dev}; warming up...", file=sys.stderr, flush=True)

    # Warm-up both code paths on a couple of batches (threads, oneDNN / cudnn, worker start-up code paths).
    with torch.inference_mode():
        from featkit.images import load_image

        x = torch.stack([load_image(p.path, spec.image_size) for p in train[:4]])
        net.to(dev)(x.to(dev))

    fk = featkit_protocol(photos, net, spec, root / "cache", args)
    print(f"  featkit: {fk['seconds']:.1f}s (extract {fk['extract_seconds']:.1f}s + fit {fk['fit_seconds']:.1f}s)", file=sys.stderr, flush=True)
    st = study_protocol(train, val, classes, net, spec, dev, epochs=args.epochs, batch_size=args.batch_size, workers=args.workers, seed=args.seed)
    ratio = st["seconds"] / fk["seconds"]

    info = machine_info(dev)
    settings = {
        "photos": source,
        "splits": f"{len(train)} train / {len(val)} val / {len(photos) - len(train) - len(val)} test (featkit's assign_splits, seed {args.seed})",
        "image size": f"{spec.image_size}x{spec.image_size}",
        "epochs": args.epochs,
        "study batch": f"{args.batch_size} (conv base + head, train and val each epoch)",
        "featkit batches": f"extract {args.extract_batch_size}; MLP {args.mlp_batch_size}",
        "decoding workers": args.workers,
        "weights": spec.weights,
    }
    acc = lambda v: "n/a" if v is None or v != v else f"{v:.3f}"  # noqa: E731
    rows = [
        ["study: conv base every batch, every epoch", st["seconds"], "", "", acc(st["val_accuracy"])],
        ["featkit: extract once + fit --head mlp", fk["seconds"], fk["extract_seconds"], fk["fit_seconds"], acc(fk["val_accuracy"])],
    ]
    per_img = fk["extract_seconds"] / len(photos)
    notes = [
        f"ratio study/featkit = {ratio:.2f}x  (target >= 8x at the study's 11 epochs)",
        f"expected about E x extract / (extract + fit): each study epoch re-runs the backbone on {len(train) + len(val)} photos "
        f"(~{per_img * (len(train) + len(val)):.1f}s at featkit's extract rate); featkit runs it once on all {len(photos)}, test split included",
        *_projection(st, fk, args.epochs),
        f"featkit's MLP ran {fk['epochs_run']} epochs; val accuracy on {len(val)} photos is a sanity check, not a result",
    ]
    text = print_table("Benchmark 2: the study's protocol vs featkit's (photos -> trained MLP head)", info, settings,
                       ["protocol", "seconds", "extract s", "fit s", "val acc"], rows, notes)
    write_json(args.json, {"benchmark": "protocol", "machine": info, "settings": settings, "study": st, "featkit": fk, "ratio": ratio, "table": text})
    tmp.cleanup()


if __name__ == "__main__":
    main()
