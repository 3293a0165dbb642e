"""Shared bits of the benchmarks: common options, the machine line, photo sets, the table and its JSON.

Benchmarks are scripts, not part of the library: run them as ``python bench/bench_X.py``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import sys
import time
from pathlib import Path

import torch

def _study_cities() -> tuple[str, ...]:
    from featkit.cities import load_cities

    return tuple(c.name for c in load_cities())


CITIES = _study_cities()  # the study's ten, from featkit's cities file
STUDY_PHOTO_SIZE = (320, 229)  # width x height of the study's photos


def add_common_options(p: argparse.ArgumentParser, *, n_help: str, batch_size: int, batch_help: str = "", weights_help: str | None = None) -> None:
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, or cuda[:N] (default: auto)")
    p.add_argument("--n", type=int, default=None, help=f"number of photos (default: {n_help})")
    p.add_argument("--batch-size", type=int, default=batch_size, help=f"batch size (default: {batch_size}{batch_help})")
    p.add_argument(
        "--weights",
        default=None,
        help=weights_help
        or "state_dict file for vgg16().features or vgg16() (e.g. ../shared/weights/vgg16_imagenet_features.pth); "
        "default: torchvision's ImageNet weights; 'random' for seeded random weights (same FLOPs, fine for throughput)",
    )
    p.add_argument("--image-size", type=int, default=224, help="square backbone input size, a multiple of 32 (default: 224, the study's)")
    p.add_argument("--quick", action="store_true", help="a smoke test that runs in about a minute on a 2-core CPU (small n, small images)")
    p.add_argument("--json", type=Path, default=None, help="also write the table as JSON to this path")
    p.add_argument("--seed", type=int, default=0, help="seed for generated photos, weights init, splits and training (default: 0)")


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info(dev: torch.device) -> dict:
    """What the figures were measured on: featkit's provenance record plus CPU, cores, GPU, device."""
    from featkit.provenance import provenance

    return provenance(
        cpu=cpu_name(),
        cpu_cores=os.cpu_count(),
        torch_threads=torch.get_num_threads(),
        gpu=torch.cuda.get_device_name(dev) if dev.type == "cuda" else "none used",
        device=str(dev),
    )


def make_photos(root: Path, n: int, *, seed: int = 0, size: tuple[int, int] = STUDY_PHOTO_SIZE, cities=CITIES) -> Path:
    """Write ``n`` synthetic study-sized JPEGs as ``root/<city>/<i>.jpg``, round-robin over ``cities``."""
    for city in cities[: min(n, len(cities))]:
        (root / city).mkdir(parents=True, exist_ok=True)
    jobs = [(root, cities[i % len(cities)], i, seed, size) for i in range(n)]
    if n < 200:
        for job in jobs:
            _write_photo(job)
    else:  # thousands of photos for GPU runs: use every core
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor() as pool:
            list(pool.map(_write_photo, jobs, chunksize=64))
    return root


def _write_photo(job) -> None:
    from featkit.photogen import render_jpeg

    root, city, i, seed, size = job
    (root / city / f"{i:06d}.jpg").write_bytes(render_jpeg(city, i, seed=seed, size=size))


def default_n(n: int | None, dev: torch.device, cpu: int, gpu: int) -> int:
    """``--n`` when given, else a count that keeps a run to a few minutes on the device."""
    return n if n is not None else (gpu if dev.type == "cuda" else cpu)


def pick_photos(source: Path, n: int, *, seed: int = 0):
    """``n`` photos of a folder-per-city tree (featkit's ``scan_photos``), a seeded sample spread over the cities."""
    from featkit.manifest import scan_photos

    photos = scan_photos(source)
    if n >= len(photos):
        return photos
    by_city: dict[str, list] = {}
    for p in photos:
        by_city.setdefault(p.city, []).append(p)
    rng = random.Random(seed)
    for members in by_city.values():
        rng.shuffle(members)
    picked, k = [], 0
    while len(picked) < n:  # round-robin so every city is represented
        for members in by_city.values():
            if k < len(members) and len(picked) < n:
                picked.append(members[k])
        k += 1
    return sorted(picked, key=lambda p: p.photo_id)


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def fmt(v) -> str:
    if isinstance(v, float):
        if v == 0:
            return "0"
        if abs(v) >= 100:
            return f"{v:,.0f}"
        if abs(v) >= 1:
            return f"{v:.2f}"
        return f"{v:.3f}"
    return str(v)


def print_table(title: str, info: dict, settings: dict, columns: list[str], rows: list[list], notes: list[str] = ()) -> str:
    """A plain-text table: the machine and settings as ``key: value`` lines, then the figures, then notes."""
    lines = [title, "=" * len(title)]
    width = max(len(k) for k in list(info) + list(settings))
    for k, v in {**info, **settings}.items():
        lines.append(f"{k.ljust(width)} : {v}")
    cells = [[fmt(c) for c in r] for r in rows]
    widths = [max(len(columns[i]), *(len(r[i]) for r in cells)) if cells else len(columns[i]) for i in range(len(columns))]
    lines.append("")
    lines.append("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(columns, widths))))
    lines.append("  ".join("-" * w for w in widths))
    for r in cells:
        lines.append("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))))
    if notes:
        lines.append("")
        lines.extend(notes)
    text = "\n".join(lines)
    print(text, flush=True)
    return text


def write_json(path: Path | None, payload: dict) -> None:
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    print(f"\nwrote {path}")


def die(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(2)
