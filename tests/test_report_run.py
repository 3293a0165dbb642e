"""The report's files belong to one run: compare.md, compare.json and compare.html name the same run id, and a
compare killed at any moment leaves all of one run (the new or the last), never a mix."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import featkit.atomic
from conftest import REPO, fitted_cache
from featkit.atomic import publish_files
from featkit.cli import app


def run_ids(reports: Path) -> dict[str, str | None]:
    """The run id each of the three files names (None where the file is absent)."""
    out: dict[str, str | None] = {}
    for name in ("compare.json", "compare.md", "compare.html"):
        p = reports / name
        if not p.exists():
            out[name] = None
            continue
        text = p.read_text(encoding="utf-8")
        if name.endswith(".json"):
            out[name] = json.loads(text).get("run_id")
        else:
            m = re.search(r"[Rr]un <?`?(?:code>)?([0-9T]{15}-[0-9a-f]{8})", text)
            out[name] = m.group(1) if m else "unnamed"
    return out


def test_the_three_files_name_one_run_and_a_rerun_replaces_all(tmp_path, runner):
    _, cache = fitted_cache(tmp_path, n=12)
    reports = tmp_path / "reports"
    ids = []
    for _ in range(2):
        r = runner.invoke(app, ["compare", "--cache", str(cache), "--reports", str(reports), "--no-leaks"])
        assert r.exit_code == 0, r.output
        found = run_ids(reports)
        assert len(set(found.values())) == 1 and None not in found.values(), found
        ids.append(found["compare.json"])
    assert ids[0] != ids[1]
    assert [p.name for p in (reports / ".runs").iterdir()] == [ids[1]]  # the earlier run is gone


def test_a_failure_while_the_new_files_are_written_leaves_the_old_set_whole(tmp_path, monkeypatch):
    publish_files(tmp_path, {"a.txt": "old a", "b.txt": "old b"}, "run1")
    calls = {"n": 0}
    real = featkit.atomic.atomic_write

    def failing(path, data, **kw):
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError(28, "No space left on device")
        return real(path, data, **kw)

    monkeypatch.setattr(featkit.atomic, "atomic_write", failing)
    with pytest.raises(OSError):
        publish_files(tmp_path, {"a.txt": "new a", "b.txt": "new b"}, "run2")
    assert (tmp_path / "a.txt").read_text() == "old a" and (tmp_path / "b.txt").read_text() == "old b"
    monkeypatch.setattr(featkit.atomic, "atomic_write", real)
    publish_files(tmp_path, {"a.txt": "new a"}, "run3")  # the next run cleans up, and drops the file it lacks
    assert (tmp_path / "a.txt").read_text() == "new a" and not (tmp_path / "b.txt").exists()
    assert sorted(p.name for p in (tmp_path / ".runs").iterdir()) == ["run3"]


def test_an_older_featkits_plain_files_are_replaced_by_the_set(tmp_path):
    (tmp_path / "compare.html").write_text("from an older run")
    publish_files(tmp_path, {"compare.html": "new"}, "run1")
    assert (tmp_path / "compare.html").is_symlink() and (tmp_path / "compare.html").read_text() == "new"


@pytest.mark.skipif(os.name != "posix", reason="SIGKILL")
def test_compare_killed_at_any_moment_leaves_one_runs_files(tmp_path):
    _, cache = fitted_cache(tmp_path, n=12)
    reports = tmp_path / "reports"
    env = dict(os.environ, PYTHONPATH=str(REPO))
    cmd = [sys.executable, "-m", "featkit", "compare", "--cache", str(cache), "--reports", str(reports), "--no-leaks"]
    t0 = time.monotonic()
    assert subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, timeout=300).returncode == 0
    full = time.monotonic() - t0
    killed = 0
    for i in range(4):  # kills spread over the run, the last ones late (while files are written)
        child = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(full * (0.6 + 0.1 * i))
        if child.poll() is None:
            child.send_signal(signal.SIGKILL)
            killed += 1
        child.wait(timeout=300)
        found = run_ids(reports)
        assert len(set(found.values())) == 1 and None not in found.values(), (i, found)
    assert killed >= 1  # at least one kill landed mid-run
