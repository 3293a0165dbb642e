"""Benchmark 4: backbones x heads on hard and easy REAL photos, with intervals, beside a plain baseline.

For each photo set (default: ../shared/data/streetview8, hard, and cityscapes5,
easy), extracts the features of every backbone given into one cache folder
WORK/<set> (one shared split: test 0.3, val 0.1 per city; features reused when
already there), fits every featkit head on every backbone with its defaults,
and trains the plain transfer baseline on VGG16's features:

    raw features -> Linear(25,088, 1,024) -> ReLU -> Dropout(0.5) -> Linear -> softmax,
    Adam lr 1e-4, batch 64, 20 epochs, no validation (what a user writes in 20 lines).

Backbones (``--backbones``, a comma list): ``vgg16`` (the study's flatten),
``vgg16/avg``, any torchvision name, ``timm:NAME``; ``/flip`` adds horizontal-flip
averaging (``timm:tf_efficientnet_lite0/flip``), ``/WxH`` a non-square input
(``timm:tf_efficientnet_lite0/320x224``: photos at about their own aspect). ``vgg16/avg`` is computed from
the cached VGG16 flatten features (the mean of each channel's 7x7 map is exactly
what average pooling computes; only the float16 rounding differs), so it costs
no second pass of VGG16 over the photos.

Prints per set, backbone and head: test accuracy with its 95% bootstrap
interval, macro accuracy, the lowest per-city accuracy, fit seconds, and
McNemar's exact test against the baseline and against the best pair.

    python bench/bench_real.py --weights ../shared/weights/vgg16_imagenet_features.pth \
        --backbones vgg16,vgg16/avg,timm:tf_efficientnet_lite0,timm:tf_efficientnet_lite0/flip \
        --weights-for timm:tf_efficientnet_lite0=../shared/weights/efficientnet_lite0_imagenet_timm.pth
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import die, machine_info, print_table, write_json  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--weights", required=True, help="VGG16 state_dict file (e.g. ../shared/weights/vgg16_imagenet_features.pth)")
    p.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data", help="folder holding the photo sets (default: ../shared/data)")
    p.add_argument("--sets", default="streetview8,cityscapes5", help="comma list of sets under --data (default: streetview8,cityscapes5)")
    p.add_argument("--work", type=Path, default=REPO / "cache" / "bench_real", help="where the caches are kept (default: cache/bench_real)")
    p.add_argument("--heads", default="all", help="featkit heads to fit (default: all)")
    p.add_argument("--backbones", default="vgg16", help="comma list: vgg16, vgg16/avg, a torchvision name, timm:NAME; /flip for flip averaging, /WxH for a non-square input (default: vgg16)")
    p.add_argument("--weights-for", action="append", default=[], metavar="ARCH=PATH", help="weights file of a backbone other than VGG16 (repeatable)")
    p.add_argument("--device", default="cpu", help="device for extraction and the MLPs (default: cpu)")
    p.add_argument("--baseline-epochs", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, default=None, help="also write the results as JSON to this path")
    return p.parse_args(argv)


def plain_baseline(Xtr, ytr, classes, *, epochs: int, seed: int, device: str):
    """The 20-line transfer baseline: raw features, the study's architecture, fixed epochs, no validation."""
    import torch

    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    dev = torch.device(device if device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    model = torch.nn.Sequential(
        torch.nn.Linear(Xtr.shape[1], 1024), torch.nn.ReLU(), torch.nn.Dropout(0.5), torch.nn.Linear(1024, len(classes))
    ).to(dev)
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    X = torch.from_numpy(Xtr).to(dev)
    y = torch.from_numpy(np.searchsorted(classes, ytr)).long().to(dev)
    for _ in range(epochs):
        model.train()
        for idx in np.array_split(rng.permutation(len(y)), max(1, len(y) // 64)):
            loss = torch.nn.functional.cross_entropy(model(X[torch.from_numpy(idx).to(dev)]), y[torch.from_numpy(idx).to(dev)])
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()

    def proba(Xte):
        with torch.no_grad():
            return torch.softmax(model(torch.from_numpy(Xte).to(dev)), 1).cpu().numpy()

    return proba


def parse_backbones(text: str) -> list[dict]:
    """``vgg16,vgg16/avg,timm:X/flip,timm:X/320x224`` -> [{"arch", "pooling", "flip", "image_size", "label"}]."""
    import re

    out = []
    for item in [t.strip() for t in text.split(",") if t.strip()]:
        arch, *mods = item.split("/")
        sizes = [m for m in mods if re.fullmatch(r"\d+x\d+", m)]
        bad = [m for m in mods if m not in ("avg", "flip") and m not in sizes]
        if bad:
            die(f"unknown backbone modifier {bad[0]!r} in {item!r}; use /avg, /flip or /WxH")
        out.append({"arch": arch, "pooling": "avg" if "avg" in mods else None, "flip": "flip" in mods,
                    "image_size": sizes[0] if sizes else None, "label": item})
    return out


def derive_vgg16_avg(cache: Path) -> Path:
    """features-vgg16-avg.h5 from the cached VGG16 flatten features: each channel's spatial mean."""
    from dataclasses import replace

    from featkit.provenance import provenance
    from featkit.cache.format import ROW_FIELDS
    from featkit.cache.names import cache_file
    from featkit.cache.store import FeatureStore

    src_path = cache_file(cache)
    with FeatureStore.open(src_path) as src:
        ident = dict(src.identity)
        if ident.get("arch") != "vgg16" or ident.get("pooling") != "flatten":
            die(f"{src_path} does not hold VGG16 flatten features")
        channels = 512
        ident.update(pooling="avg", feature_dim=channels)
        out = cache_file(cache, "vgg16-avg")
        if out.exists():
            return out
        prov = provenance(derived_from=str(src_path), backbone=src.provenance.get("backbone", "").replace("pooling=flatten", "pooling=avg"))
        with FeatureStore.open_for_append(out, ident, provenance=prov) as dst:
            if src.split_protocol is not None:
                dst.record_split_protocol(src.split_protocol)
            cols = {k: src.column(k) for k in ROW_FIELDS}
            for lo in range(0, src.n_rows, 1024):
                rows = np.arange(lo, min(lo + 1024, src.n_rows))
                X = src.read_features(rows).reshape(len(rows), channels, -1).mean(axis=2)
                dst.append({k: cols[k][rows].tolist() for k in ROW_FIELDS}, X)
    return out


def run_set(name: str, args) -> list[dict]:
    import featkit
    from featkit.evaluate import evaluate_heads
    from featkit.metrics import evaluate_predictions, paired_comparison
    from featkit.cache.names import cache_file
    from featkit.cache.store import FeatureStore

    photos, cache = args.data / name, args.work / name
    weights_for = dict(w.split("=", 1) for w in args.weights_for)
    for b in parse_backbones(args.backbones):
        if b["arch"] == "vgg16" and b["pooling"] == "avg" and not b["flip"] and b["image_size"] is None and cache_file(cache).exists():
            print(f"[{name}] {b['label']}: derived from the cached VGG16 flatten features", file=sys.stderr, flush=True)
            derive_vgg16_avg(cache)
            continue
        if not photos.is_dir():
            die(f"no photo set {photos}; pass --data or --sets")
        weights = args.weights if b["arch"] == "vgg16" else weights_for.get(b["arch"])
        if weights is None:
            die(f"no weights for {b['arch']}; pass --weights-for {b['arch']}=PATH")
        print(f"[{name}] {b['label']}: extracting {photos} -> {cache} (cached photos are skipped)", file=sys.stderr, flush=True)
        t0 = time.perf_counter()
        s = featkit.extract(photos, cache, backbone=b["arch"], pooling=b["pooling"], flip=b["flip"], image_size=b["image_size"], weights=weights, device=args.device,
                            test_size=0.3, val_size=0.1, progress=False, split_seed=args.seed)
        print(f"[{name}]   {s.line()} in {time.perf_counter() - t0:.0f}s", file=sys.stderr, flush=True)
    print(f"[{name}] fitting heads ({args.heads}) on every backbone", file=sys.stderr, flush=True)
    featkit.fit(cache, args.heads, seed=args.seed, device=args.device, progress=False, log=lambda m: print(f"[{name}]   {m}", file=sys.stderr))
    results = evaluate_heads(cache, leaks=False)
    cities = results["cities"]
    with FeatureStore.open(cache_file(cache)) as store:
        Xtr, ytr, _ = store.load_split("train")
        Xte, yte, ids = store.load_split("test")
    ref_ids = [p["photo_id"] for p in results["test_photos"]]
    order = {pid: i for i, pid in enumerate(ids.tolist())}
    rows_in_ref = np.array([order[pid] for pid in ref_ids])  # the baseline judged on the report's photo order
    t0 = time.perf_counter()
    proba = plain_baseline(Xtr, ytr, np.array(cities), epochs=args.baseline_epochs, seed=args.seed, device=args.device)
    base_seconds = time.perf_counter() - t0
    base = evaluate_predictions(cities, yte[rows_in_ref], proba(Xte[rows_in_ref]), np.array(cities))
    rows = []
    heads = {**results["heads"], "baseline": {**base, "backbone": "vgg16", "head": "baseline", "fit_seconds": base_seconds,
                                              "chosen": {"epochs": args.baseline_epochs}}}
    best = results["ranking"]["ranking"][0]
    for h, m in heads.items():
        vs_base = paired_comparison(m["correct"], base["correct"]) if h != "baseline" else None
        vs_best = paired_comparison(m["correct"], heads[best]["correct"]) if h != best else None
        worst_city = min(m["per_city"], key=lambda c: m["per_city"][c])
        rows.append({
            "set": name, "backbone": m.get("backbone") or "vgg16", "head": m.get("head") or h, "n_test": m["n"], "accuracy": m["accuracy"],
            "accuracy_ci": m["accuracy_ci"], "macro": m["macro_accuracy"], "worst_city": f"{worst_city} {m['per_city'][worst_city]:.3f}",
            "fit_seconds": m["fit_seconds"], "chosen": m.get("chosen") or {},
            "vs_baseline": vs_base, "vs_best": vs_best, "best": h == best,
        })
    print(f"[{name}] verdict: {results['ranking']['verdict']}", file=sys.stderr, flush=True)
    return rows


def _vs(c) -> str:
    if c is None:
        return "-"
    return f"{c['difference']:+.3f} p={c['p_value']:.2g}{' *' if c['significant'] else ''}"


def main(argv=None) -> None:
    args = parse_args(argv)
    import torch

    rows = []
    for name in [s.strip() for s in args.sets.split(",") if s.strip()]:
        rows += run_set(name, args)
    table = [
        [r["set"], r["backbone"], r["head"] + (" (best)" if r["best"] else ""), r["n_test"], f"{r['accuracy']:.3f} ({r['accuracy_ci'][0]:.3f}-{r['accuracy_ci'][1]:.3f})",
         f"{r['macro']:.3f}", r["worst_city"], f"{r['fit_seconds']:.1f}", _vs(r["vs_baseline"]), _vs(r["vs_best"]),
         " ".join(f"{k}={v}" for k, v in r["chosen"].items())]
        for r in rows
    ]
    info = machine_info(torch.device(args.device if args.device != "auto" else "cpu"))
    settings = {"sets": args.sets, "backbones": args.backbones, "weights": ", ".join([args.weights, *args.weights_for]), "splits": "test 0.3, val 0.1 per city (seed %d)" % args.seed, "device": args.device}
    notes = [
        "accuracy: test accuracy (95% percentile bootstrap interval over test photos, 2,000 resamples)",
        "vs baseline / vs best: accuracy difference and McNemar's exact p on the same test photos; * = significant at 0.05",
        "vgg16-avg: the channel means of the cached VGG16 flatten features (= average pooling, float16 rounding aside)",
        "baseline: raw features, Linear(d,1024)-ReLU-Dropout(0.5)-Linear, Adam 1e-4, batch 64, fixed epochs, no validation",
    ]
    text = print_table("Benchmark 4: backbones x heads on real photos, with intervals", info, settings,
                       ["set", "backbone", "head", "n test", "accuracy (95% CI)", "macro", "worst city", "fit s", "vs baseline", "vs best", "chosen"], table, notes)
    write_json(args.json, {"info": info, "settings": settings, "rows": rows, "text": text})


if __name__ == "__main__":
    main()
