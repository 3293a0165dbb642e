"""`featkit download` killed with SIGKILL at any moment, then resumed: nothing lost, doubled or half-written.

The real command (``python -m featkit download``) runs as a child process against the
loopback Flickr of tests/fakeflickr.py, served from a thread of this process, and is
killed at moments chosen at random among five kinds:

- ``search``: while the fake is answering a ``flickr.photos.search`` call (slowed down);
- ``image-request``: while the fake is sending an image (slowed down);
- ``image-file``: while an image lies under its temporary name beside its final one;
- ``manifest``: while ``manifest.csv`` or ``skipped.csv`` is being rewritten
  (its temporary file is there; found by polling, no hook in the product);
- ``any``: after a random delay.

A rerun may be killed again (a chain); the last run of a round completes. After every
kill the folder must still be usable as it is: the manifest reads, its rows' files are
there with their SHA-256, every file at a final name decodes, the journal has at most its
last line cut, and files neither listed nor journaled (renamed just before a kill) number
at most one per kill. After every round: every photo id once, one file per row and no
other file (no temporary file, no journal), every photo kept before a kill still kept,
the key and secret in no file and no output, and exactly what an uninterrupted run
keeps and skips (photos of two cities found late in a search are the exception, see
``test_sigkill_chain_with_ambiguous_photos``). The fake serves exact and near duplicates,
photos of two cities and photos broken for good, so skipped.csv is written too.

``test_sigkill_chain`` makes 12 kills (about 15-45 s on 2 cores); the ``slow`` ones
(``pytest -m slow``) 80 and 30. ``FEATKIT_KILL_SEED=N`` replays another sequence of choices.
"""

from __future__ import annotations

import collections
import datetime as dt
import hashlib
import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fakeflickr import FakeFlickr, make_catalog
from featkit.cities import load_cities
from featkit.collect import download_photos
from featkit.images import decoded_size
from featkit.manifest import MANIFEST_COLUMNS, SKIPPED_COLUMNS, read_manifest

KEY = "kfault7c41e9d05ab3"
SECRET = "sfault2e8b6f13c9d7"
REPO = Path(__file__).resolve().parents[1]
CITIES = ("Paris", "Tokyo", "Venice")
PER_CITY = 40
MODES = ("search", "image-request", "image-file", "manifest", "any")
JOURNAL = ".download-journal.jsonl"
API_DELAY_S, IMAGE_DELAY_S = 0.25, 0.03
PERMANENT = ("html", "truncated-jpeg", "404", "garbage", "unavailable")
_FINAL = re.compile(r"^[0-9]+\.jpg$")


def make_fake_catalog(ambiguous: int, ambiguous_newest: bool):
    """50 photos per city for 40 kept, plus exact and near duplicates, photos of two cities
    (``ambiguous`` per pair of cities; with ``ambiguous_newest`` they come first in every search,
    so every run that searches sees them), and a few photos broken for good."""
    catalog = make_catalog(list(CITIES), 50, seed=11, exact_duplicates=3, near_duplicates=3, ambiguous=ambiguous,
                           image_size=(64, 48))
    if ambiguous_newest:
        for i, p in enumerate(p for p in catalog if " or " in p.title):
            p.taken = dt.datetime(2023, 12, 31) - dt.timedelta(hours=i)
    faults = {p.id: PERMANENT[i % len(PERMANENT)] for i, p in enumerate(catalog[5::23])}
    return catalog, faults


class Chain:
    """Drives one cache folder through killed and completed runs, and tallies them."""

    def __init__(self, fake: FakeFlickr, root: Path, rng: random.Random):
        self.fake, self.root, self.rng = fake, root, rng
        fake.api_delay_s, fake.image_delay_s = API_DELAY_S, IMAGE_DELAY_S
        self.kills: collections.Counter[str] = collections.Counter()    # mode -> kills
        self.landed: collections.Counter[str] = collections.Counter()   # mode -> kills that cut a write short
        self.runs = 0
        self.outputs: list[Path] = []
        self.seconds = collections.Counter()  # "killed"/"completed" -> wall seconds of those runs

    def start(self, cache: Path) -> subprocess.Popen:
        self.runs += 1
        log = self.root / "logs" / f"run{self.runs:03d}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        self.outputs.append(log)
        env = dict(os.environ, FLICKR_API_KEY=KEY, FLICKR_API_SECRET=SECRET,
                   FEATKIT_FLICKR_ENDPOINT=self.fake.endpoint, PYTHONPATH=str(REPO))
        env.pop("FEATKIT_CACHE", None)
        with log.open("w") as fh:
            return subprocess.Popen(
                [sys.executable, "-m", "featkit", "download", "--cities", ",".join(CITIES),
                 "--per-city", str(PER_CITY), "--cache", str(cache), "--workers", "2", "--min-interval-s", "0"],
                stdout=fh, stderr=subprocess.STDOUT, cwd=REPO, env=env)

    def complete(self, cache: Path) -> None:
        """Run to the end (at full speed: slow answers only help to aim kills)."""
        t0 = time.monotonic()
        self.fake.api_delay_s = self.fake.image_delay_s = 0
        try:
            child = self.start(cache)
            rc = child.wait(timeout=120)
        finally:
            self.fake.api_delay_s, self.fake.image_delay_s = API_DELAY_S, IMAGE_DELAY_S
        self.seconds["completed"] += time.monotonic() - t0
        assert rc == 0, self.outputs[-1].read_text()
        assert "kept in 3 cities" in self.outputs[-1].read_text()

    def try_kill(self, cache: Path, mode: str) -> bool:
        """Start a run and SIGKILL it at a ``mode`` moment; False if it finished first."""
        t0 = time.monotonic()
        child = self.start(cache)
        try:
            trigger = self._trigger(cache, mode)
            if not _wait(child, trigger, timeout=60):
                child.wait(timeout=60)
                assert child.returncode == 0, self.outputs[-1].read_text()
                return False
            if mode == "search":  # somewhere inside the slow answer
                time.sleep(self.rng.uniform(0, API_DELAY_S * 0.8))
            child.send_signal(signal.SIGKILL)
            child.wait(timeout=30)
        finally:
            if child.poll() is None:
                child.kill()
                child.wait()
            self.seconds["killed"] += time.monotonic() - t0
        if child.returncode != -signal.SIGKILL:  # it ended on its own in the same instant
            assert child.returncode == 0, self.outputs[-1].read_text()
            return False
        self.kills[mode] += 1
        if _tmp_files(cache, mode):
            self.landed[mode] += 1
        return True

    def _trigger(self, cache: Path, mode: str):
        rng, fake = self.rng, self.fake
        if mode == "search":
            return lambda: fake.in_flight["api"] > 0
        if mode == "image-request":
            after = sum(fake.image_requests.values()) + rng.randrange(0, 60)
            return lambda: fake.in_flight["image"] > 0 and sum(fake.image_requests.values()) >= after
        if mode == "image-file":
            after = rng.randrange(0, 60)
            state = {"seen": 0}

            def image_tmp() -> bool:
                names = _names(cache / "images")
                if state["seen"] < after:
                    state["seen"] = sum(1 for n in names if _FINAL.match(n))
                    return False
                return any(n.endswith(".tmp") for n in names)
            return image_tmp
        if mode == "manifest":
            not_before = time.monotonic() + rng.uniform(0, 1.5)
            return lambda: time.monotonic() >= not_before and any(
                n.endswith(".tmp") and n.startswith((".manifest.csv.", ".skipped.csv.")) for n in _listdir(cache))
        not_before = time.monotonic() + rng.uniform(0.2, 2.0)  # any: about as long as a whole run
        return lambda: time.monotonic() >= not_before


def _wait(child: subprocess.Popen, trigger, timeout: float) -> bool:
    """Poll ``trigger`` as fast as the machine allows; False if the child exits first."""
    deadline = time.monotonic() + timeout
    n = 0
    while time.monotonic() < deadline:
        if trigger():
            return True
        n += 1
        if n % 64 == 0:
            if child.poll() is not None:
                return trigger()
            time.sleep(0)  # let the fake's threads answer
    raise AssertionError("the kill moment never came")


def _listdir(folder: Path) -> list[str]:
    try:
        return os.listdir(folder)
    except FileNotFoundError:
        return []


def _names(images: Path) -> list[str]:
    return [n for city in _listdir(images) for n in _listdir(images / city)]


def _tmp_files(cache: Path, mode: str) -> list[str]:
    if mode == "manifest":
        return [n for n in _listdir(cache) if n.endswith(".tmp")]
    return [n for n in _names(cache / "images") if n.endswith(".tmp")]


# --------------------------------------------------------------------------- what must hold

def check_after_kill(cache: Path, kills_in_round: int) -> set[str]:
    """The folder a kill left is usable as it is, and everything in it is accounted for;
    returns the ids it holds as kept (manifest and journal)."""
    rows, skipped = _read(cache)
    for r in rows:  # the manifest never points at a missing or different file
        path = cache / r["path"]
        assert path.is_file(), f"manifest row {r['photo_id']} has no file after a kill"
        assert hashlib.sha256(path.read_bytes()).hexdigest() == r["sha256"]
    assert not {r["photo_id"] for r in rows} & {r["photo_id"] for r in skipped}
    journal = cache / JOURNAL
    kept_in_journal = set()
    if journal.exists():
        lines = journal.read_text(encoding="utf-8").split("\n")
        for i, line in enumerate(lines):
            try:
                entry = json.loads(line)
            except json.JSONDecodeError:
                assert i == len(lines) - 1, f"journal line {i + 1} of {len(lines)} is cut"  # only the last
                continue
            if entry["kind"] == "keep":
                kept_in_journal.add(entry["row"]["photo_id"])
    listed = {r["photo_id"] for r in rows} | kept_in_journal
    orphans = []
    for city in _listdir(cache / "images"):
        for name in _listdir(cache / "images" / city):
            if _FINAL.match(name):  # a file at a final name is always whole
                decoded_size((cache / "images" / city / name).read_bytes())
                if name[:-4] not in listed:
                    orphans.append(name)
    # renamed but not yet journaled when killed: at most one per killed run, adopted or
    # deleted by the next run that completes
    assert len(orphans) <= kills_in_round, orphans
    return listed


def check_complete(cache: Path, reference: Path | None, n_cities: int, ever_kept: set[str] = frozenset(),
                   ) -> tuple[list[dict], list[dict]]:
    """A completed folder: one to one with the disk, nothing left over, as an uninterrupted run,
    and every photo kept at some point (``ever_kept``) still kept, unless found ambiguous since."""
    rows, skipped = _read(cache)
    ids = [r["photo_id"] for r in rows]
    lost = ever_kept - set(ids) - {r["photo_id"] for r in skipped if r["reason"].startswith("ambiguous")}
    assert not lost, f"photos kept before a kill are gone: {sorted(lost)}"
    assert len(ids) == len(set(ids)) == PER_CITY * n_cities
    assert collections.Counter(r["city"] for r in rows) == {c: PER_CITY for c in CITIES}
    assert not set(ids) & {r["photo_id"] for r in skipped}
    for r in rows:
        assert r["path"] == f"images/{r['city']}/{r['photo_id']}.jpg"
        assert hashlib.sha256((cache / r["path"]).read_bytes()).hexdigest() == r["sha256"]
    assert len({r["sha256"] for r in rows}) == len(rows), "an exact duplicate was kept"
    files = {p.relative_to(cache).as_posix() for p in cache.rglob("*") if p.is_file()}
    assert files == {r["path"] for r in rows} | {"manifest.csv", "skipped.csv", ".download.lock"}
    if reference is not None:
        ref_rows, ref_skipped = _read(reference)
        assert sorted(ids) == sorted(r["photo_id"] for r in ref_rows), "kept photos differ from an uninterrupted run"
        assert ({r["photo_id"]: r["reason"] for r in skipped} ==
                {r["photo_id"]: r["reason"] for r in ref_skipped}), "skipped photos differ from an uninterrupted run"
        assert rows == ref_rows  # same order, same cells (the same fake served both)
    return rows, skipped


def _read(cache: Path) -> tuple[list[dict], list[dict]]:
    rows = read_manifest(cache / "manifest.csv", MANIFEST_COLUMNS)[1] if (cache / "manifest.csv").exists() else []
    skipped = read_manifest(cache / "skipped.csv", SKIPPED_COLUMNS)[1] if (cache / "skipped.csv").exists() else []
    return rows, skipped


def leaks(folder: Path) -> list[str]:
    return [str(p) for p in folder.rglob("*") if p.is_file()
            and (KEY.encode() in p.read_bytes() or SECRET.encode() in p.read_bytes())]


# --------------------------------------------------------------------------- the chain

def sigkill_chain(tmp_path: Path, target_kills: int, seed: int, ambiguous: int = 0,
                  ambiguous_newest: bool = True) -> Chain:
    seed = int(os.environ.get("FEATKIT_KILL_SEED", seed))  # to replay a failure's choices
    print(f"\nseed {seed}")
    rng = random.Random(seed)
    catalog, faults = make_fake_catalog(ambiguous, ambiguous_newest)
    with FakeFlickr(catalog, api_key=KEY, api_secret=SECRET) as fake:
        fake.image_faults.update(faults)
        reference = tmp_path / "reference"
        download_photos(load_cities(",".join(CITIES)), reference, PER_CITY, api_key=KEY, api_secret=SECRET,
                        endpoint=fake.endpoint, min_interval_s=0, workers=2, progress=False)
        check_complete(reference, None, len(CITIES))
        reference_requests = sum(fake.image_requests.values())
        round_requests: list[int] = []
        chain = Chain(fake, tmp_path, rng)
        rounds = 0
        while sum(chain.kills.values()) < target_kills:
            rounds += 1
            cache = tmp_path / f"cache{rounds}"
            in_round = 0
            before_round = sum(fake.image_requests.values())
            ever_kept: set[str] = set()
            # The first run is always killed; each rerun is killed again with probability 0.75.
            while sum(chain.kills.values()) < target_kills and (in_round == 0 or rng.random() < 0.75):
                if not chain.try_kill(cache, rng.choice(MODES)):
                    break  # it completed before the moment came
                in_round += 1
                ever_kept |= check_after_kill(cache, in_round)
            chain.complete(cache)
            # The result is exactly an uninterrupted run's, unless photos of two cities are found
            # late in a search: whether both searches saw one then depends on where the runs stopped
            # (a search is not repeated for a city that is already full).
            check_complete(cache, reference if ambiguous_newest or not ambiguous else None, len(CITIES), ever_kept)
            assert leaks(cache) == []
            round_requests.append(sum(fake.image_requests.values()) - before_round)
            # images fetched whole before a kill are adopted, not fetched again: a killed round asks for little more
            # than an uninterrupted run (the image being sent when a kill lands, and what was cut, are asked again)
            assert round_requests[-1] <= reference_requests + 8 * (in_round + 1), (round_requests, reference_requests)
    outputs = [log.read_text() for log in chain.outputs]
    assert not [o for o in outputs if KEY in o or SECRET in o], "the key or secret was printed"
    assert leaks(tmp_path) == []
    print(f"\n{sum(chain.kills.values())} kills in {rounds} rounds, {chain.runs} runs; by moment: "
          + ", ".join(f"{m} {chain.kills[m]} ({chain.landed[m]} mid-write)" for m in MODES)
          + "; seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in chain.seconds.items())
          + f"; image requests: {reference_requests} uninterrupted, per killed round {round_requests}")
    return chain


def test_sigkill_chain(tmp_path):
    chain = sigkill_chain(tmp_path, 12, seed=1, ambiguous=2)
    assert sum(chain.kills.values()) == 12


@pytest.mark.slow
def test_sigkill_chain_long(tmp_path):
    chain = sigkill_chain(tmp_path, 80, seed=2, ambiguous=2)
    assert sum(chain.kills.values()) == 80
    assert all(chain.kills[m] for m in MODES)
    assert chain.landed["manifest"] and chain.landed["image-file"], "no kill landed in the middle of a write"


@pytest.mark.slow
def test_sigkill_chain_with_ambiguous_photos(tmp_path):
    chain = sigkill_chain(tmp_path, 30, seed=3, ambiguous=3, ambiguous_newest=False)
    assert sum(chain.kills.values()) == 30
