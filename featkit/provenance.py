"""How an output was made: one record shape for the cache, every saved head, reports and benchmarks."""

from __future__ import annotations

import functools
import platform
import subprocess
import sys
import time
from pathlib import Path

from featkit import __version__


@functools.lru_cache(maxsize=1)
def git_revision() -> str | None:
    """The git commit of the featkit checkout in use (``+dirty`` when it has local changes), or None."""
    root = Path(__file__).resolve().parents[1]
    if not (root / ".git").exists():
        return None
    try:
        rev = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=5)
        if rev.returncode != 0:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root, capture_output=True, text=True, timeout=5)
        return rev.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return None


def _versions() -> dict[str, str]:
    """Versions of the libraries that shape the numbers, where this process has imported them."""
    out = {"featkit": __version__, "python": platform.python_version()}
    for name in ("numpy", "torch", "torchvision", "sklearn", "h5py"):
        mod = sys.modules.get(name)
        if mod is not None and hasattr(mod, "__version__"):
            out[name] = str(mod.__version__)
    return out


def provenance(**extra) -> dict:
    """``argv``, versions, host, time and git revision, plus whatever the caller adds (seed, device, ...).

    Never put secrets in ``extra``: this record is written into caches, heads and reports.
    """
    return {
        "argv": list(sys.argv),
        "versions": _versions(),
        "host": platform.node(),
        "platform": platform.platform(),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "git": git_revision(),
        **extra,
    }
