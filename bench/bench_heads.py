"""Benchmark 3: the three heads on a synthetic cache of the study's size.

Builds a float16 feature cache with featkit's own FeatureStore (default 41,000 x 25,088, about
2 GB; ten cities; ~80/10/10 train/val/test; ReLU-like sparse nonnegative features with a weak
per-city signal), then fits each head with featkit.training.fit_heads in a fresh subprocess,
so each head's peak resident memory is its own (read with os.wait4's rusage of that child).

Prints per head: fit time, wall time of the whole fit_heads call (reading the cache included),
peak RSS, the float32 feature matrix's size and peak/matrix, and the passes over the data.

    python bench/bench_heads.py                              # study size, all three heads
    python bench/bench_heads.py --scale 4 --heads mlp,svm --stream   # 4x, the streaming heads
    python bench/bench_heads.py --cache-dir /big/disk/synth  # keep the cache and reuse it next time
    python bench/bench_heads.py --quick
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import CITIES, die, machine_info, print_table, write_json  # noqa: E402

STUDY_ROWS = 41_000
GB = 1e9
BASELINE = "(imports only)"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--device", default="cpu", help="device for the MLP head: auto, cpu or cuda[:N] (default: cpu; the targets are for 2 CPU cores)")
    p.add_argument("--rows", "--n", dest="rows", type=int, default=STUDY_ROWS, help=f"rows (photos) of the synthetic cache before --scale (default: {STUDY_ROWS:,}, the study's)")
    p.add_argument("--scale", type=float, default=1.0, help="multiply --rows by this (e.g. 4 for 4x the study's size)")
    p.add_argument("--heads", default="mlp,logreg,svm", help="comma list of heads to fit, each in its own process (default: mlp,logreg,svm)")
    p.add_argument("--stream", action=argparse.BooleanOptionalAction, default=None,
                   help="--stream / --no-stream force featkit's streaming from HDF5 blocks on or off (default: featkit's own choice)")
    p.add_argument("--epochs", type=int, default=None, help="cap on the MLP's epochs (default: featkit's, early stopping decides)")
    p.add_argument("--batch-size", type=int, default=None, help="MLP mini-batch size (default: featkit's)")
    p.add_argument("--weights", default="random", help="backbone weights the synthetic cache's identity is built from (default: random; values are synthetic anyway)")
    p.add_argument("--image-size", type=int, default=224, help="decides the feature width 512 x (size/32)^2 (default: 224 -> 25,088)")
    p.add_argument("--cache-dir", type=Path, default=None, help="build the cache here and keep it; reused when it already holds the same rows and width (default: a temp dir, deleted)")
    p.add_argument("--seed", type=int, default=0, help="seed for the synthetic data and the heads (default: 0)")
    p.add_argument("--quick", action="store_true", help="a smoke test: 2,000 rows of 4,608 features, MLP capped at 2 epochs")
    p.add_argument("--json", type=Path, default=None, help="also write the table as JSON to this path")
    p.add_argument("--child", nargs=3, metavar=("CACHE_DIR", "HEAD", "OUT_JSON"), help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.quick:
        a.rows = 2000 if a.rows == STUDY_ROWS else a.rows
        a.image_size = 96 if a.image_size == 224 else a.image_size
        a.epochs = 2 if a.epochs is None else a.epochs
    return a


# -- the synthetic cache -------------------------------------------------------------------------
def build_cache(path: Path, n_rows: int, identity: dict, seed: int, block_rows: int = 1024) -> float:
    """Write ``n_rows`` ReLU-like float16 rows with a weak city signal; returns seconds taken."""
    from featkit.provenance import provenance
    from featkit.cache.store import FeatureStore

    dim = int(identity["feature_dim"])
    rng = np.random.default_rng(seed)
    # Each city shifts every feature a little (0.05 std): learnable, not trivially separable per feature.
    city_shift = (0.05 * rng.standard_normal((len(CITIES), dim), dtype=np.float32)) - 0.7
    feature_scale = rng.gamma(2.0, 0.5, dim).astype(np.float32)  # features of unequal scale, as after ReLU
    cities = np.array(CITIES)
    t0 = time.perf_counter()
    z = np.empty((block_rows, dim), dtype=np.float32)
    with FeatureStore.open_for_append(path, identity, overwrite=True, provenance=provenance(synthetic=True, seed=seed)) as store:
        for start in range(0, n_rows, block_rows):
            k = min(block_rows, n_rows - start)
            c = rng.integers(0, len(CITIES), k)
            split = rng.choice(np.array(["train", "val", "test"]), size=k, p=[0.8, 0.1, 0.1])
            x = z[:k]
            rng.standard_normal(out=x, dtype=np.float32)
            x += city_shift[c]
            np.maximum(x, 0.0, out=x)  # ~25% nonzero, like ReLU outputs
            x *= feature_scale
            ids = [f"{cities[ci].replace(' ', '_')}/{start + i:08d}.jpg" for i, ci in enumerate(c)]
            store.append(
                {"photo_id": ids, "city": cities[c].tolist(), "split": split.tolist(), "path": ids, "owner": [""] * k},
                x.astype(np.float16),
            )
            if (start // block_rows) % 8 == 0:
                print(f"  cache: {start + k:,}/{n_rows:,} rows, {time.perf_counter() - t0:.0f}s", file=sys.stderr, flush=True)
    return time.perf_counter() - t0


def existing_rows(path: Path, dim: int) -> int:
    from featkit.cache.store import FeatureStore

    if not path.exists():
        return -1
    try:
        with FeatureStore.open(path) as store:
            return store.n_rows if int(store.f["features"].shape[1]) == dim else -1
    except Exception:
        return -1


# -- one head, in its own process -------------------------------------------------------------------
def passes_of(est, record: dict) -> str:
    """Passes over the training data as the head reports them, with where the number came from."""
    for attr in ("n_passes_", "passes_"):
        v = getattr(est, attr, None)
        if v is not None:
            return f"{int(v)} ({attr})"
    if record.get("passes"):
        return f"{record['passes']} (record)"
    v = getattr(est, "n_iter_", None)
    if v is not None:
        return f"{int(np.max(v))} (n_iter_)"
    model = getattr(est, "model_", None)
    for m in (model, getattr(model, "estimator", None)):
        v = getattr(m, "n_iter_", None)
        if v is not None:
            return f"{int(np.max(v))} (model_.n_iter_, final C)"
    return "n/a"


def vm_hwm() -> int | None:
    """This process's peak resident set since exec (VmHWM), in bytes; None where /proc is missing.

    Not ru_maxrss: Linux carries that over from the parent across fork + exec, so every child
    would report at least the parent's size.
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def child_fit(cache_dir: Path, head: str, out_json: Path, args) -> None:
    import featkit.training as training

    if head == BASELINE:  # what the interpreter and featkit's imports alone hold
        import featkit.heads  # noqa: F401
        import featkit.cache.store  # noqa: F401

        out_json.write_text(json.dumps({"head": BASELINE, "vmhwm_bytes": vm_hwm()}))
        return

    captured = {}
    original_save = training.save_head

    def save_and_capture(path, est, record):  # see the fitted estimator without loading it back
        captured["est"] = est
        return original_save(path, est, record)

    training.save_head = save_and_capture
    mlp = {}
    if args.epochs is not None:
        mlp["max_iter"] = args.epochs
    if args.batch_size is not None:
        mlp["batch_size"] = args.batch_size
    t0 = time.perf_counter()
    stream = "auto" if args.stream is None else ("yes" if args.stream else "no")
    records = training.fit_heads(cache_dir, head, seed=args.seed, device=args.device, params={"mlp": mlp}, stream=stream)
    wall = time.perf_counter() - t0
    rec = records[0]
    est = captured["est"]
    out = {
        "head": head,
        "fit_seconds": rec.get("fit_seconds"),
        "wall_seconds": wall,
        "val_score": rec.get("val_score"),
        "chosen": rec.get("chosen"),
        "training": rec.get("training", "in memory"),
        "passes": passes_of(est, rec),
        "vmhwm_bytes": vm_hwm(),
    }
    out_json.write_text(json.dumps(out, default=str))


def run_child(cache_dir: Path, head: str, args, argv_extra: list[str]) -> dict:
    """Fit one head in a fresh interpreter; its peak RSS comes from the kernel's rusage for that child."""
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        out_json = Path(f.name)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", str(cache_dir), head, str(out_json), *argv_extra]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=sys.stderr)  # the child's log lines go to stderr, the table to stdout
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    process_seconds = time.perf_counter() - t0
    peak = usage.ru_maxrss * 1024  # kB on Linux; an upper bound (see vm_hwm), used only if the child died
    try:
        res = json.loads(out_json.read_text()) if proc.returncode == 0 else {}
    finally:
        out_json.unlink(missing_ok=True)
    if not res:
        res = {"head": head, "error": f"exit {proc.returncode}" + (" (killed: out of memory?)" if proc.returncode < 0 else "")}
    res.update(peak_rss_bytes=res.get("vmhwm_bytes") or peak, process_seconds=process_seconds,
               peak_source="VmHWM" if res.get("vmhwm_bytes") else "ru_maxrss (upper bound)")
    return res


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.child:
        cache_dir, head, out_json = args.child
        child_fit(Path(cache_dir), head, Path(out_json), args)
        return
    from featkit.backbones import load_backbone
    from featkit.devices import resolve_device
    from featkit.errors import FeatkitError
    from featkit.cache.identity import cache_identity
    from featkit.cache.names import CACHE_FILE
    from featkit.training import resolve_heads

    try:
        heads = resolve_heads(args.heads)
        dev = resolve_device(args.device)
        _, spec = load_backbone(args.weights, image_size=args.image_size, seed=args.seed)
    except FeatkitError as e:
        die(str(e))
    n_rows = int(round(args.rows * args.scale))
    identity = cache_identity(spec, "float16")
    dim = int(identity["feature_dim"])
    tmp = tempfile.TemporaryDirectory(prefix="featkit-bench-heads-") if args.cache_dir is None else None
    cache_dir = Path(tmp.name) if tmp else args.cache_dir
    cache = cache_dir / CACHE_FILE
    f16_gb, f32_bytes = n_rows * dim * 2 / GB, n_rows * dim * 4
    if existing_rows(cache, dim) == n_rows:
        build = f"reused {cache}"
        print(f"bench_heads: reusing {cache} ({n_rows:,} x {dim:,})", file=sys.stderr, flush=True)
    else:
        print(f"bench_heads: building {n_rows:,} x {dim:,} float16 ({f16_gb:.2f} GB) at {cache}", file=sys.stderr, flush=True)
        build = f"built in {build_cache(cache, n_rows, identity, args.seed):.0f}s at {cache}"

    extra = ["--device", args.device, "--seed", str(args.seed)]
    if args.epochs is not None:
        extra += ["--epochs", str(args.epochs)]
    if args.batch_size is not None:
        extra += ["--batch-size", str(args.batch_size)]
    if args.stream is not None:
        extra += ["--stream" if args.stream else "--no-stream"]
    stream_note = "featkit default" if args.stream is None else ("on" if args.stream else "off")

    results = [run_child(cache_dir, BASELINE, args, extra)]
    for head in heads:
        print(f"bench_heads: fitting {head} in a fresh process...", file=sys.stderr, flush=True)
        results.append(run_child(cache_dir, head, args, extra))

    info = machine_info(dev)
    settings = {
        "cache": f"{n_rows:,} x {dim:,} float16 ({f16_gb:.2f} GB), 10 cities, ~80/10/10 splits, synthetic; {build}",
        "float32 matrix": f"{f32_bytes / GB:.2f} GB (all rows; the targets' yardstick)",
        "stream": stream_note,
        "MLP": f"epochs {'featkit default (early stopping)' if args.epochs is None else f'<= {args.epochs}'}, batch {args.batch_size or 'featkit default'}",
    }
    rows = []
    for r in results:
        if r["head"] == BASELINE and "error" not in r:
            rows.append([BASELINE, "", "", "", f"{r['peak_rss_bytes'] / GB:.2f}", f"{r['peak_rss_bytes'] / f32_bytes:.2f}", "", ""])
            continue
        if "error" in r:
            rows.append([r["head"], "failed", r["error"], "", f"{r['peak_rss_bytes'] / GB:.2f}", f"{r['peak_rss_bytes'] / f32_bytes:.2f}", "", ""])
            continue
        chosen = ", ".join(f"{k}={v}" for k, v in (r.get("chosen") or {}).items())
        val = "n/a" if r.get("val_score") is None else f"{r['val_score']:.3f}"
        rows.append([r["head"], r.get("training", ""), r.get("fit_seconds") or float("nan"), r["wall_seconds"],
                     f"{r['peak_rss_bytes'] / GB:.2f}", f"{r['peak_rss_bytes'] / f32_bytes:.2f}", r["passes"], f"{val} ({chosen})"])
    notes = []
    fitted = [r for r in results if r["head"] != BASELINE]
    total = sum(r.get("wall_seconds", 0) for r in fitted)
    study = n_rows == STUDY_ROWS and dim == 25088
    if study:
        ok_each = all(r.get("wall_seconds", 1e9) <= 900 for r in fitted)
        ok_mem = all(r["peak_rss_bytes"] <= 2 * f32_bytes for r in fitted)
        notes.append(f"targets (study size, 2 CPU cores): each head <= 15 min: {'met' if ok_each else 'NOT met'}; "
                     f"all <= 30 min: {'met' if total <= 1800 else 'NOT met'} ({total / 60:.1f} min); "
                     f"peak <= 2x float32 matrix ({2 * f32_bytes / GB:.1f} GB): {'met' if ok_mem else 'NOT met'}")
    else:
        notes.append(f"total wall {total / 60:.1f} min; the targets are stated for the study's {STUDY_ROWS:,} x 25,088 cache")
    notes.append("fit s: the head's own fit; wall s: the whole fit_heads call (reading the cache, scoring val, saving); "
                 "peak RSS: the child process's VmHWM at exit, interpreter and libraries included")
    text = print_table("Benchmark 3: heads at full size", info, settings,
                       ["head", "training", "fit s", "wall s", "peak GB", "peak/f32", "passes", "val acc (chosen)"], rows, notes)
    write_json(args.json, {"benchmark": "heads", "machine": info, "settings": settings, "n_rows": n_rows, "dim": dim,
                           "float32_bytes": f32_bytes, "results": results, "table": text})
    if tmp:
        tmp.cleanup()


if __name__ == "__main__":
    main()
