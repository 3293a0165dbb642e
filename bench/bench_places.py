"""compare with many places: time and peak memory of ``featkit compare`` on a cache of N places.

Builds a cache of N places x K photos (synthetic 64-wide features around a centre per place; split
train/val/test 2/1/1 per place by default), fits a logreg head on it, then runs ``featkit compare`` in a
fresh process and prints its wall time, its peak RSS and the size of each report file. The probe that
found the problem: 1,000 places of 2 photos gave no report after 15 minutes at 7.1 GB.

    python bench/bench_places.py --places 1000 [--places 100 ...] [--work /tmp/places]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def build(cache: Path, n_places: int, per_split=(2, 1, 1), dim: int = 64, seed: int = 0) -> None:
    from featkit.cache.names import cache_file
    from featkit.cache.store import FeatureStore

    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(n_places, dim)).astype(np.float32)
    identity = {"arch": "synthetic", "weights_sha256": "0" * 64, "image_size": 32, "pooling": "avg", "feature_dim": dim, "dtype": "float16", "flip": False}
    with FeatureStore.open_for_append(cache_file(cache), identity) as store:
        store.record_split_protocol({"seed": seed, "test_size": per_split[2], "val_size": per_split[1]})
        rows = {k: [] for k in ("photo_id", "city", "split", "path", "owner")}
        X = []
        for p in range(n_places):
            for split, k in zip(("train", "val", "test"), per_split):
                for i in range(k):
                    pid = f"place{p:05d}/{split}{i}.jpg"
                    for col, v in zip(rows, (pid, f"Place {p:05d}", split, f"/nowhere/{pid}", "")):
                        rows[col].append(v)
                    X.append(centres[p] + 0.8 * rng.normal(size=dim))
        store.append(rows, np.asarray(X, dtype=np.float16))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--places", type=int, action="append", help="number of places (repeatable; default 100 and 1000)")
    ap.add_argument("--work", type=Path, default=Path("/tmp/bench_places"))
    ap.add_argument("--timeout", type=int, default=1200)
    args = ap.parse_args()
    import featkit

    print(f"{'places':>7} {'test photos':>11} {'compare s':>10} {'peak RSS MB':>12}  report files (KB)")
    for n in args.places or [100, 1000]:
        work = args.work / f"p{n}"
        cache = work / "cache"
        if not (cache / "heads").exists():
            build(cache, n)
            featkit.fit(cache, head="logreg", progress=False, log=lambda m: None)
        reports = work / "reports"
        code = ("import resource, sys, time; sys.path.insert(0, sys.argv[3]); import featkit; t = time.perf_counter(); "
                "featkit.compare(sys.argv[1], sys.argv[2], leaks=False); "
                "print(time.perf_counter() - t, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)")
        try:
            out = subprocess.run([sys.executable, "-c", code, str(cache), str(reports), str(REPO)], capture_output=True, text=True, timeout=args.timeout)
            s, mb = (float(v) for v in out.stdout.split()[-2:]) if out.returncode == 0 else (float("nan"), float("nan"))
            if out.returncode:
                print(out.stderr[-2000:])
        except subprocess.TimeoutExpired:
            s, mb = float("inf"), float("nan")
        sizes = ", ".join(f"{p.name} {p.stat().st_size / 1024:.0f}" for p in sorted(reports.glob("compare.*")) if p.exists()) if reports.exists() else "none"
        print(f"{n:>7} {n:>11} {s:>10.1f} {mb:>12.0f}  {sizes}")


if __name__ == "__main__":
    main()
