"""What the checksums cost: `verify` (every batch's CRC-32, finiteness, split codes, unique ids) against a
plain read of the same features, side by side in one run, on a synthetic float16 cache written with
featkit's own FeatureStore in batches of 64 (as `extract` writes it).

    python bench/bench_verify.py                 # 8,000 x 25,088 float16 (about 400 MB)
    python bench/bench_verify.py --rows 41000    # the study's size (about 2 GB)

Prints rows, size, seconds and MB/s for a plain read and for verify, and their ratio (best of --repeat).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

from featkit.cache.store import FeatureStore


def build(path: Path, rows: int, dim: int, batch: int = 64) -> None:
    ident = {"arch": "synthetic", "feature_dim": dim, "dtype": "float16", "image_size": 224, "pooling": "flatten", "weights_sha256": "none"}
    rng = np.random.default_rng(0)
    with FeatureStore.open_for_append(path, ident) as store:
        for start in range(0, rows, batch):
            k = min(batch, rows - start)
            X = np.maximum(rng.standard_normal((k, dim), dtype=np.float32), 0).astype(np.float16)
            ids = [f"photo{start + i:07d}" for i in range(k)]
            store.append({"photo_id": ids, "city": ["Paris"] * k, "split": ["train"] * k, "path": [f"/p/{i}.jpg" for i in ids], "owner": [""] * k}, X)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=8000)
    p.add_argument("--dim", type=int, default=25088)
    p.add_argument("--repeat", type=int, default=3)
    a = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "features.h5"
        build(path, a.rows, a.dim)
        mb = a.rows * a.dim * 2 / 1e6
        read, verify = [], []
        for _ in range(a.repeat):  # alternate, so both see the same (warm) page cache and machine load
            with FeatureStore.open(path) as s:
                t = time.perf_counter()
                for lo in range(0, s.n_rows, 4096):
                    s.f["features"][lo : lo + 4096]
                read.append(time.perf_counter() - t)
                t = time.perf_counter()
                d = s.verify()
                verify.append(time.perf_counter() - t)
                assert d.ok, d.line()
        r, v = min(read), min(verify)
        print(f"rows {a.rows} x {a.dim} float16 = {mb:.0f} MB, {d.n_batches} batches")
        print(f"plain read: {r:.2f} s ({mb / r:.0f} MB/s)")
        print(f"verify:     {v:.2f} s ({mb / v:.0f} MB/s)")
        print(f"verify / plain read: {v / r:.2f}x")


if __name__ == "__main__":
    main()
