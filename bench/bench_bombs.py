"""Peak memory of reading decompression bombs, in a fresh process each, for this checkout (and, with
``--before PATH``, another checkout of featkit side by side in the same run).

Bombs: PNGs whose pixels are all zero, deflated (a few hundred KB on disk), under the 200 Mpx pixel limit:
RGBA 14000 x 14000 (the probe's), RGBA 9000 x 9000, 16-bit grey 12000 x 12000; and, as a control, an
ordinary 4000 x 3000 RGB JPEG. Each is read the way extract and predict read a photo
(``featkit.images.load_image(path, 224)``); the figure is the child's peak RSS (``ru_maxrss``) and the
outcome (read, or the reason it was refused).

    python bench/bench_bombs.py [--before ../other-checkout]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from test_bombs import png  # noqa: E402  (the bombs the tests refuse)

CHILD = r"""
import json, resource, sys, time
sys.path.insert(0, sys.argv[1])
from featkit.images import load_image
t = time.perf_counter()
try:
    load_image(sys.argv[2], 224); outcome = "read"
except Exception as e:
    outcome = f"refused: {str(e)[:70]}"
print(json.dumps({"outcome": outcome, "s": time.perf_counter() - t, "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--before", type=Path, help="another featkit checkout to measure beside this one")
    args = ap.parse_args()
    here = Path(__file__).resolve().parents[1]
    work = Path(tempfile.mkdtemp(prefix="bombs-"))
    from PIL import Image
    import numpy as np

    files = {
        "RGBA 14000x14000 PNG": png(work / "rgba196.png", 14000, 14000, 6, rows=True),
        "RGBA 9000x9000 PNG": png(work / "rgba81.png", 9000, 9000, 6, rows=True),
        "16-bit grey 12000x12000 PNG": png(work / "grey16.png", 12000, 12000, 0, 16, rows=True),
    }
    jpg = work / "camera.jpg"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (3000, 4000, 3), dtype=np.uint8)).save(jpg, quality=90)
    files["RGB 4000x3000 JPEG (control)"] = jpg
    checkouts = {"this checkout": here} | ({"before": args.before.resolve()} if args.before else {})
    print(f"{'bomb':<30} {'file KB':>8}  {'checkout':<14} {'peak RSS MB':>11} {'s':>6}  outcome")
    for name, path in files.items():
        for label, root in checkouts.items():
            out = subprocess.run([sys.executable, "-c", CHILD, str(root), str(path)], capture_output=True, text=True, timeout=600)
            try:
                r = json.loads(out.stdout.strip().splitlines()[-1])
            except (IndexError, ValueError):
                r = {"outcome": f"crashed (rc {out.returncode})", "s": float("nan"), "peak_mb": float("nan")}
            print(f"{name:<30} {path.stat().st_size / 1024:>8.0f}  {label:<14} {r['peak_mb']:>11.0f} {r['s']:>6.2f}  {r['outcome']}")


if __name__ == "__main__":
    main()
