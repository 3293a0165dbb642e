"""Benchmark: long runs with flat memory. `featkit extract` and `featkit download` over 20,000 photos each.

Parts (--parts, default extract,download), each the real command run as a child process whose
resident memory (VmRSS summed over it and its child processes, from /proc) is sampled every
--interval seconds:

  extract   --n generated JPEGs (48x48, four cities; --corrupt of them zero-byte, cut, or not
            images at all) through `featkit extract` with a random-weight backbone on tiny inputs.
            Progress is read from its progress bar.
  download  the loopback Flickr of tests/fakeflickr.py serving --n photos over four cities, with
            --faults of the image requests failing for a moment (HTTP 500/503, reset, hang, body
            cut short: retried) and --faults/2 of the photos broken for good (an HTML page, a cut
            JPEG, bytes that are no image, 404, "unavailable"), plus a few failing API calls;
            `featkit download --per-city N/4 --min-interval-s 0`. The photos are 64x48 JPEGs padded
            to --photo-bytes (32 kB, about what Flickr's 320-px images weigh). Progress: images on disk.

For each: photos/s, RSS at 10%, 50% and 90% of the photos and the peak, and the slope of RSS
between 20% and 100% (MB per 1,000 photos: flat memory is a slope near 0). Then every photo is
accounted for: extract's rows stored + failures recorded == N with no photo id twice; download's
kept + skipped (with a reason) == photos offered, none twice, none lost, and the API key and
secret in no file and no output.

    nice .venv/bin/python bench/bench_long.py                       # both parts, 20,000 photos each
    .venv/bin/python bench/bench_long.py --parts download --n 2000  # a quick look
    .venv/bin/python bench/bench_long.py --parts extract --n 500 --backbone resnet18
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import os
import random
import re
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(REPO / "tests"))  # fakeflickr: the loopback Flickr
from _common import cpu_name, die, print_table, write_json  # noqa: E402

CITIES = ("Paris", "Tokyo", "London", "Venice")
KEY, SECRET = "benchkey-3f9a1c07d2e5", "benchsecret-8b4e6d2a91f0"
PHOTO_SIZE = (48, 48)


# --------------------------------------------------------------------------- memory of a process tree

def _children(pid: int) -> list[int]:
    out: list[int] = []
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    for tid in tasks:
        try:
            with open(f"/proc/{pid}/task/{tid}/children") as fh:
                out.extend(int(c) for c in fh.read().split())
        except OSError:
            pass
    return out


def _status_kb(pid: int, field: str) -> int:
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return 0


def tree_rss_mb(pid: int) -> tuple[float, float, int]:
    """VmRSS of ``pid`` and all its descendants, and of ``pid`` alone, in MB, and how many
    processes that was. (A sum of RSS counts pages the processes share once per process.)"""
    stack, seen = [pid], []
    while stack:
        p = stack.pop()
        seen.append(p)
        stack.extend(_children(p))
    own = _status_kb(pid, "VmRSS")
    return (own + sum(_status_kb(p, "VmRSS") for p in seen[1:])) / 1024, own / 1024, len(seen)


class Sampler(threading.Thread):
    """Every ``interval`` s: (seconds since start, tree RSS in MB, photos done, the main process's
    own RSS in MB) of a running child."""

    def __init__(self, pid: int, done, interval: float):
        super().__init__(daemon=True)
        self.pid, self.done, self.interval = pid, done, interval
        self.samples: list[tuple[float, float, int, float]] = []
        self.max_procs = 0
        self.hwm_mb = 0.0  # the main process's own peak (VmHWM), as the kernel saw it
        self.t0 = time.monotonic()
        self._halt = threading.Event()

    def run(self) -> None:
        while not self._halt.is_set():
            rss, own, procs = tree_rss_mb(self.pid)
            if rss:
                self.samples.append((time.monotonic() - self.t0, rss, self.done(), own))
                self.max_procs = max(self.max_procs, procs)
                self.hwm_mb = max(self.hwm_mb, _status_kb(self.pid, "VmHWM") / 1024)
            self._halt.wait(self.interval)

    def stop(self) -> None:
        self._halt.set()
        self.join()


def memory_figures(samples: list[tuple[float, float, int, float]], n: int, column: int = 1) -> dict:
    """RSS at 10/50/90% of ``n`` photos, the peak, and the least-squares slope from 20% to 100%
    (``column`` 1: the process tree, 3: the main process alone)."""
    out: dict = {"samples": len(samples), "peak_mb": max((s[column] for s in samples), default=0.0)}
    for frac in (0.1, 0.5, 0.9):
        hit = next((s for s in samples if s[2] >= frac * n), None)
        out[f"rss_{int(frac * 100)}pct_mb"] = hit[column] if hit else None
    tail = [(s[2], s[column]) for s in samples if s[2] >= 0.2 * n]
    if len(tail) >= 2 and tail[-1][0] > tail[0][0]:
        mx = sum(x for x, _ in tail) / len(tail)
        my = sum(y for _, y in tail) / len(tail)
        sxx = sum((x - mx) ** 2 for x, _ in tail)
        out["slope_mb_per_1000"] = 1000 * sum((x - mx) * (y - my) for x, y in tail) / sxx if sxx else None
    else:
        out["slope_mb_per_1000"] = None
    return out


def run_sampled(cmd: list[str], *, env: dict, done, interval: float, timeout_s: float, log: Path,
                progress_stream: bool = False) -> tuple[int, float, Sampler, str, str]:
    """Run ``cmd``, sampling its memory; returns exit status, seconds, the sampler, stdout and
    stderr (also written to ``log`` + ``.out`` / ``.err``).

    With ``progress_stream`` its stderr is read here, and ``done`` is given each chunk to parse.
    """
    out_path, err_path = log.with_suffix(".out"), log.with_suffix(".err")
    with out_path.open("wb") as out, err_path.open("wb") as err:
        t0 = time.monotonic()
        child = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out,
                                 stderr=subprocess.PIPE if progress_stream else err)
        sampler = Sampler(child.pid, done, interval)
        sampler.start()
        reader = None
        if progress_stream:
            def pump() -> None:
                for chunk in iter(lambda: child.stderr.read1(4096), b""):
                    err.write(chunk)
                    done.feed(chunk)
            reader = threading.Thread(target=pump, daemon=True)
            reader.start()
        try:
            rc = child.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            child.kill()
            rc = child.wait()
        wall = time.monotonic() - t0
        sampler.stop()
        if reader is not None:
            reader.join(timeout=10)
    return rc, wall, sampler, out_path.read_text(errors="replace"), err_path.read_text(errors="replace")


# --------------------------------------------------------------------------- part 1: extract

class BarProgress:
    """The latest ``done/total`` of a tqdm bar written to a pipe."""

    _COUNT = re.compile(rb"(\d+)/(\d+) \[")

    def __init__(self):
        self.value = 0
        self._tail = b""

    def feed(self, chunk: bytes) -> None:
        text = self._tail + chunk
        found = self._COUNT.findall(text)
        if found:
            self.value = int(found[-1][0])
        self._tail = text[-64:]

    def __call__(self) -> int:
        return self.value


def make_extract_photos(root: Path, n: int, corrupt: float, seed: int) -> dict[str, str]:
    """``n`` JPEGs as ``root/<city>/<i>.jpg``; returns the corrupt ones (relative path -> how)."""
    from featkit.photogen import render_jpeg

    rng = random.Random(seed)
    kinds = ("zero-byte", "cut in half", "text", "random bytes")
    bad = set(rng.sample(range(n), round(n * corrupt)))
    broken: dict[str, str] = {}
    for city in CITIES:
        (root / city).mkdir(parents=True, exist_ok=True)
    for i in range(n):
        city = CITIES[i % len(CITIES)]
        rel = f"{city}/{i:06d}.jpg"
        data = render_jpeg(city, i, seed=seed, size=PHOTO_SIZE)
        if i in bad:
            how = kinds[len(broken) % len(kinds)]
            data = {"zero-byte": b"", "cut in half": data[: len(data) // 2],
                    "text": b"<html>not a photo</html>\n",
                    "random bytes": hashlib.sha256(data).digest() * 40}[how]
            broken[rel] = how
        (root / rel).write_bytes(data)
    return broken


def part_extract(a, work: Path) -> dict:
    photos, cache = work / "photos", work / "extract-cache"
    t = time.monotonic()
    marker = photos / f".complete-n{a.n}-corrupt{a.corrupt}-seed{a.seed}"  # the set --work already holds
    if not marker.exists() or a.fresh:
        if photos.exists():
            import shutil

            shutil.rmtree(photos)
        broken = make_extract_photos(photos, a.n, a.corrupt, a.seed)
        marker.write_text("\n".join(f"{k}\t{v}" for k, v in sorted(broken.items())) + "\n")
    broken = dict(line.split("\t") for line in marker.read_text().splitlines() if line)
    gen_s = time.monotonic() - t
    cmd = [sys.executable, "-m", "featkit", "extract", str(photos), "--cache", str(cache), "--overwrite",
           "--backbone", a.backbone, "--weights", "random", "--image-size", str(a.image_size),
           "--workers", str(a.workers), "--batch-size", str(a.batch_size), "--device", "cpu", "--progress"]
    if a.pooling:
        cmd += ["--pooling", a.pooling]
    bar = BarProgress()
    rc, wall, sampler, output, errors = run_sampled(cmd, env=dict(os.environ, PYTHONPATH=str(REPO)), done=bar,
                                                    interval=a.interval, timeout_s=a.timeout_s,
                                                    log=work / "extract.log", progress_stream=True)
    if rc != 0:
        die(f"featkit extract exited {rc}:\n{output[-2000:]}\n{errors[-2000:]}")
    from featkit.cache.store import FeatureStore

    h5 = sorted(cache.glob("features*.h5"))
    if len(h5) != 1:
        die(f"expected one features*.h5 in {cache}, found {[p.name for p in h5]}")
    store = FeatureStore.open(h5[0])
    try:
        ids = [str(v) for v in store.column("photo_id")]
        failed = store.failed() if hasattr(store, "failed") else None
    finally:
        close = getattr(store, "close", None)
        if close:
            close()
    if failed is None:
        with (cache / "failed.csv").open(newline="") as fh:
            failed = list(csv.DictReader(fh))
    failed_ids = [str(r["photo_id"]) for r in failed]
    stored, n_failed = len(ids), len(failed_ids)
    doubled = len(ids) - len(set(ids)) + len(failed_ids) - len(set(failed_ids)) + len(set(ids) & set(failed_ids))
    failed_rel = {Path(str(r.get("path", ""))).as_posix().split("/photos/", 1)[-1] for r in failed}
    reasons = Counter(str(r.get("reason", "")).split(":")[0][:40] for r in failed)
    mem = memory_figures(sampler.samples, a.n)
    main_mem = memory_figures(sampler.samples, a.n, column=3)
    checks = {
        "rows stored + failures == N": stored + n_failed == a.n,
        "no photo id twice": doubled == 0,
        "every failure has a reason": all(str(r.get("reason", "")).strip() for r in failed),
        "every corrupt file failed or was read": set(broken) >= failed_rel or not failed_rel,
    }
    return dict(part="extract", n=a.n, wall_s=wall, rate=stored / wall, gen_s=gen_s, mem=mem, main_mem=main_mem,
                sampler=sampler,
                counts=dict(stored=stored, failed=n_failed, corrupt_injected=len(broken),
                            corrupt_failed=len(set(broken) & failed_rel), doubled=doubled,
                            lost=a.n - stored - n_failed),
                reasons=dict(reasons), checks=checks,
                settings=f"{a.backbone}{'/' + a.pooling if a.pooling else ''}, random weights, "
                         f"{a.image_size}px, batch {a.batch_size}, {a.workers} decode worker(s), cpu",
                last=output.strip().splitlines()[-2:])


# --------------------------------------------------------------------------- part 2: download

def start_fake_flickr(n: int, faults: float, seed: int, *, photo_bytes: int = 0, api_faults: float = 0.05):
    """A loopback Flickr serving ``n`` photos over :data:`CITIES` (started; ``.stop()`` it), and
    the ids of photos broken for good (id -> fault). Photos are 64x48 JPEGs, padded to
    ``photo_bytes``; ``faults`` of the image requests fail for a moment, ``faults / 2`` of the
    photos for good, ``api_faults`` of the API calls for a moment."""
    from fakeflickr import TRANSIENT_API_FAULTS, TRANSIENT_IMAGE_FAULTS, FakeFlickr, make_catalog

    per_city = n // len(CITIES)
    catalog = make_catalog(list(CITIES), per_city, seed=seed, image_size=(64, 48))
    rng = random.Random(seed)
    permanent = ("html", "truncated-jpeg", "garbage", "404", "unavailable")
    broken = {p.id: permanent[i % len(permanent)]
              for i, p in enumerate(rng.sample(catalog, round(len(catalog) * faults / 2)))}
    fake = FakeFlickr(catalog, api_key=KEY, api_secret=SECRET, hang_s=0.5, keep_bytes=False, pad_to=photo_bytes,
                      seed=seed)
    fake.image_faults.update(broken)
    fake.random_faults["image"] = (faults, TRANSIENT_IMAGE_FAULTS)
    fake.random_faults["api"] = (api_faults, TRANSIENT_API_FAULTS)
    return fake.start(), broken


def part_download(a, work: Path) -> dict:
    cache = work / "download-cache"
    if cache.exists():
        import shutil

        shutil.rmtree(cache)
    fake, broken = start_fake_flickr(a.n, a.faults, a.seed, photo_bytes=a.photo_bytes)
    offered = len(fake.photos)
    per_city = offered // len(CITIES)
    images = cache / "images"

    def on_disk() -> int:
        n = 0
        for city in CITIES:
            try:
                n += sum(1 for e in os.scandir(images / city) if e.name.endswith(".jpg"))
            except OSError:
                pass
        return n

    env = dict(os.environ, FLICKR_API_KEY=KEY, FLICKR_API_SECRET=SECRET, FEATKIT_FLICKR_ENDPOINT=fake.endpoint,
               PYTHONPATH=str(REPO))
    cmd = [sys.executable, "-m", "featkit", "download", "--cities", ",".join(CITIES), "--per-city", str(per_city),
           "--cache", str(cache), "--min-interval-s", "0", "--workers", str(a.download_workers)]
    try:
        rc, wall, sampler, output, errors = run_sampled(cmd, env=env, done=on_disk, interval=a.interval,
                                                        timeout_s=a.timeout_s, log=work / "download.log")
    finally:
        fake.stop()
    if rc != 0:
        die(f"featkit download exited {rc}:\n{output[-2000:]}\n{errors[-2000:]}")
    from featkit.manifest import MANIFEST_COLUMNS, SKIPPED_COLUMNS, read_manifest

    _, rows = read_manifest(cache / "manifest.csv", MANIFEST_COLUMNS)
    _, skipped = read_manifest(cache / "skipped.csv", SKIPPED_COLUMNS)
    kept_ids, skipped_ids = [r["photo_id"] for r in rows], [r["photo_id"] for r in skipped]
    all_ids = {p.id for p in fake.photos}
    doubled = len(set(kept_ids) & set(skipped_ids))  # read_manifest already refuses an id twice in one file
    lost = sorted(all_ids - set(kept_ids) - set(skipped_ids))
    files = {p.relative_to(cache).as_posix() for p in images.rglob("*") if p.is_file()}
    sha_ok = all(hashlib.sha256((cache / r["path"]).read_bytes()).hexdigest() == r["sha256"] for r in rows)
    leaked = [str(p) for p in cache.rglob("*") if p.is_file()
              and (KEY.encode() in p.read_bytes() or SECRET.encode() in p.read_bytes())]
    leaked += [name for name, text in (("stdout", output), ("stderr", errors)) if KEY in text or SECRET in text]
    reason_of = {r["photo_id"]: r["reason"] for r in skipped}
    reasons = Counter(re.sub(r" of \d+$", " of <id>", r["reason"]) for r in skipped)
    served = Counter(f"{kind} {f}" for kind, f in fake.faults_served)
    checks = {
        "kept + skipped == offered": len(kept_ids) + len(skipped_ids) == offered,
        "none kept and skipped": doubled == 0,
        "none lost": not lost,
        "broken photos skipped with a reason": all(reason_of.get(pid) for pid in broken),
        "files == manifest rows, sha256 right": files == {r["path"] for r in rows} and sha_ok,
        "key and secret nowhere": not leaked,
    }
    mem = memory_figures(sampler.samples, len(kept_ids))
    return dict(part="download", n=offered, wall_s=wall, rate=len(kept_ids) / wall, mem=mem, main_mem=None,
                sampler=sampler,
                counts=dict(offered=offered, kept=len(kept_ids), skipped=len(skipped_ids), doubled=doubled,
                            lost=len(lost), broken_for_good=len(broken),
                            transient_faults_served=sum(v for k, v in served.items()
                                                        if k.split()[1] not in ("html", "truncated-jpeg",
                                                                                "garbage", "404", "unavailable")),
                            api_calls=len(fake.api_calls), image_requests=sum(fake.image_requests.values())),
                reasons=dict(reasons), served=dict(served), checks=checks,
                settings=f"{len(CITIES)} cities x {per_city}, 64x48 JPEGs padded to {a.photo_bytes:,} bytes, "
                         f"{a.faults:.0%} transient image faults, "
                         f"{a.faults / 2:.1%} photos broken, {a.download_workers} workers",
                last=output.strip().splitlines()[-1:], lost_ids=lost[:10])


# --------------------------------------------------------------------------- main

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--parts", default="extract,download", help="comma list of extract, download (default: both)")
    p.add_argument("--n", type=int, default=20_000, help="photos per part (default: 20,000)")
    p.add_argument("--work", type=Path, default=None, help="keep photos and caches here (default: a temporary folder)")
    p.add_argument("--fresh", action="store_true", help="regenerate the extract photos even if --work holds them")
    p.add_argument("--backbone", default="vgg16", help="extract's backbone (default: vgg16)")
    p.add_argument("--pooling", default=None, help="extract's --pooling (default: the backbone's)")
    p.add_argument("--image-size", type=int, default=32, help="extract's input size (default: 32)")
    p.add_argument("--batch-size", type=int, default=256, help="extract's batch size (default: 256)")
    p.add_argument("--workers", type=int, default=1, help="extract's decoding workers (default: 1)")
    p.add_argument("--download-workers", type=int, default=4, help="download's concurrent image downloads (default: 4)")
    p.add_argument("--photo-bytes", type=int, default=32_000,
                   help="download: the fake's JPEGs padded to this size, as Flickr's 320-px ones weigh (default: 32,000)")
    p.add_argument("--corrupt", type=float, default=0.01, help="fraction of extract's photos made unreadable (default: 0.01)")
    p.add_argument("--faults", type=float, default=0.01,
                   help="fraction of image requests failing for a moment; half as many photos broken for good (default: 0.01)")
    p.add_argument("--interval", type=float, default=0.5, help="seconds between memory samples (default: 0.5)")
    p.add_argument("--timeout-s", type=float, default=1800, help="give up on a part after this long (default: 1800)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, default=None, help="also write the figures as JSON to this path")
    a = p.parse_args(argv)
    a.parts = [x.strip() for x in a.parts.split(",") if x.strip()]
    if not set(a.parts) <= {"extract", "download"}:
        p.error(f"--parts: choose from extract, download; got {','.join(a.parts)}")
    if a.n < 2 * len(CITIES):
        p.error(f"--n must be at least {2 * len(CITIES)}")
    return a


def report(r: dict) -> str:
    m = r["mem"]
    mb = lambda v: "-" if v is None else f"{v:,.0f}"  # noqa: E731
    info = {"part": r["part"], "machine": f"{cpu_name()}, {os.cpu_count()} cores", "settings": r["settings"],
            "photos": f"{r['n']:,}", "wall": f"{r['wall_s']:.1f} s", "photos/s": f"{r['rate']:.1f}",
            "memory": f"{m['samples']} samples of the process tree's VmRSS (up to {r['sampler'].max_procs} processes); "
                      f"main process's own VmHWM {r['sampler'].hwm_mb:,.0f} MB"}
    rows = []
    for label, m in (("RSS", r["mem"]), ("main process RSS", r.get("main_mem"))):
        if m is None or (label != "RSS" and r["sampler"].max_procs < 2):
            continue
        slope = "-" if m["slope_mb_per_1000"] is None else f"{m['slope_mb_per_1000']:+.2f}"
        rows += [[f"{label} at 10% / 50% / 90% (MB)",
                  f"{mb(m['rss_10pct_mb'])} / {mb(m['rss_50pct_mb'])} / {mb(m['rss_90pct_mb'])}"],
                 [f"{label} peak (MB)", mb(m["peak_mb"])],
                 [f"{label} slope 20%-100% (MB per 1,000 photos)", slope]]
    rows += [[k.replace("_", " "), f"{v:,}"] for k, v in r["counts"].items()]
    rows += [[f"reason: {k}", f"{v:,}"] for k, v in sorted(r["reasons"].items())]
    rows += [[f"check: {k}", "ok" if v else "FAILED"] for k, v in r["checks"].items()]
    notes = [f"last output: {line}" for line in r["last"]]
    if r.get("served"):
        notes.append("faults served: " + ", ".join(f"{k} {v}" for k, v in sorted(r["served"].items())))
    if r.get("lost_ids"):
        notes.append(f"lost (first 10): {', '.join(r['lost_ids'])}")
    return print_table(f"bench_long: {r['part']}", info, {}, ["figure", "value"], rows, notes)


def main(argv=None) -> int:
    a = parse_args(argv)
    tmp = None
    if a.work is None:
        tmp = tempfile.TemporaryDirectory(prefix="bench_long-")
        work = Path(tmp.name)
    else:
        work = a.work
        work.mkdir(parents=True, exist_ok=True)
    results = []
    try:
        for part in a.parts:
            r = part_extract(a, work) if part == "extract" else part_download(a, work)
            report(r)
            print()
            results.append(r)
    finally:
        if tmp is not None:
            tmp.cleanup()
    write_json(a.json, {"args": {k: str(v) for k, v in vars(a).items()},
                        "results": [{k: v for k, v in r.items() if k != "sampler"} |
                                    {"samples": r["sampler"].samples} for r in results]})
    return 0 if all(all(r["checks"].values()) for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
