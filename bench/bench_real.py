"""Benchmark 4: featkit's heads on hard and easy REAL photos, with intervals, beside a plain baseline.

For each photo set (default: ../shared/data/streetview8, hard, and cityscapes5,
easy), extracts the real VGG16 features once into WORK/<set> (test 0.3, val 0.1
per city; reused when already there), fits every featkit head with its defaults,
and trains the plain transfer baseline on the same train split:

    raw features -> Linear(25,088, 1,024) -> ReLU -> Dropout(0.5) -> Linear -> softmax,
    Adam lr 1e-4, batch 64, 20 epochs, no validation (what a user writes in 20 lines).

Prints per set and head: test accuracy with its 95% bootstrap interval, macro
accuracy, the lowest per-city accuracy, fit seconds, what the head chose, and
McNemar's exact test of each head against the baseline and against the best head.

    python bench/bench_real.py --weights ../shared/weights/vgg16_imagenet_features.pth
    python bench/bench_real.py --weights PATH --sets streetview8 --work /tmp/real
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


def run_set(name: str, args) -> list[dict]:
    import featkit
    from featkit.evaluate import evaluate_heads
    from featkit.metrics import evaluate_predictions, paired_comparison
    from featkit.store import FeatureStore, cache_file

    photos, cache = args.data / name, args.work / name
    if not cache_file(cache).exists():
        if not photos.is_dir():
            die(f"no photo set {photos}; pass --data or --sets")
        print(f"[{name}] extracting {photos} -> {cache}", file=sys.stderr, flush=True)
        featkit.extract(photos, cache, weights=args.weights, device=args.device, test_size=0.3, val_size=0.1, progress=False, seed=args.seed)
    print(f"[{name}] fitting heads ({args.heads})", file=sys.stderr, flush=True)
    featkit.fit(cache, args.heads, seed=args.seed, device=args.device, progress=False, log=lambda m: print(f"[{name}]   {m}", file=sys.stderr))
    results = evaluate_heads(cache)
    cities = results["cities"]
    with FeatureStore.open(cache_file(cache)) as store:
        Xtr, ytr, _ = store.load_split("train")
        Xte, yte, _ = store.load_split("test")
    t0 = time.perf_counter()
    proba = plain_baseline(Xtr, ytr, np.array(cities), epochs=args.baseline_epochs, seed=args.seed, device=args.device)
    base_seconds = time.perf_counter() - t0
    base = evaluate_predictions(cities, yte, proba(Xte), np.array(cities))
    rows = []
    heads = {**results["heads"], "baseline": {**base, "fit_seconds": base_seconds, "chosen": {"epochs": args.baseline_epochs}}}
    best = max(results["heads"], key=lambda h: results["heads"][h]["accuracy"])
    for h, m in heads.items():
        vs_base = paired_comparison(m["correct"], base["correct"]) if h != "baseline" else None
        vs_best = paired_comparison(m["correct"], heads[best]["correct"]) if h != best else None
        worst_city = min(m["per_city"], key=lambda c: m["per_city"][c])
        rows.append({
            "set": name, "head": h, "n_test": m["n"], "accuracy": m["accuracy"], "accuracy_ci": m["accuracy_ci"],
            "macro": m["macro_accuracy"], "worst_city": f"{worst_city} {m['per_city'][worst_city]:.3f}",
            "fit_seconds": m["fit_seconds"], "chosen": m.get("chosen") or {},
            "vs_baseline": vs_base, "vs_best": vs_best, "best": h == best,
        })
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
        [r["set"], r["head"] + (" (best)" if r["best"] else ""), r["n_test"], f"{r['accuracy']:.3f} ({r['accuracy_ci'][0]:.3f}-{r['accuracy_ci'][1]:.3f})",
         f"{r['macro']:.3f}", r["worst_city"], f"{r['fit_seconds']:.1f}", _vs(r["vs_baseline"]), _vs(r["vs_best"]),
         " ".join(f"{k}={v}" for k, v in r["chosen"].items())]
        for r in rows
    ]
    info = machine_info(torch.device(args.device if args.device != "auto" else "cpu"))
    settings = {"sets": args.sets, "weights": args.weights, "splits": "test 0.3, val 0.1 per city (seed %d)" % args.seed, "device": args.device}
    notes = [
        "accuracy: test accuracy (95% percentile bootstrap interval over test photos, 2,000 resamples)",
        "vs baseline / vs best: accuracy difference and McNemar's exact p on the same test photos; * = significant at 0.05",
        "baseline: raw features, Linear(d,1024)-ReLU-Dropout(0.5)-Linear, Adam 1e-4, batch 64, fixed epochs, no validation",
    ]
    text = print_table("Benchmark 4: heads on real photos, with intervals", info, settings,
                       ["set", "head", "n test", "accuracy (95% CI)", "macro", "worst city", "fit s", "vs baseline", "vs best", "chosen"], table, notes)
    write_json(args.json, {"info": info, "settings": settings, "rows": rows, "text": text})


if __name__ == "__main__":
    main()
