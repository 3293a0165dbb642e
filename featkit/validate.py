"""Checks of values a user gives, shared by the options dataclasses, the public API and the CLI.

Each check raises one :class:`~featkit.errors.FeatkitError` whose ``param`` is the
Python name at fault (the CLI shows the option instead: `batch_size` -> ``--batch-size``),
and the callers run them before anything is read or written. Bounds are written
here once; the README lists them. Light: the standard library only.
"""

from __future__ import annotations

import math
import numbers
import os
import tempfile
from pathlib import Path

from featkit.errors import FeatkitError

MAX_SEED = 2**32 - 1  # numpy's and scikit-learn's seeds are 0 .. 2**32 - 1
WORKERS_FLOOR = 64  # decode workers allowed on any machine
WORKERS_PER_CPU = 4  # beyond this, more processes only add memory and start-up time
MAX_HIDDEN = 65_536  # units in one MLP layer: 25,088 x 65,536 float32 weights are already 6.6 GB
MAX_LEARNING_RATE = 1.0  # Adam above 1 only diverges
MAX_JPEG_SIDE = 65_535  # JPEG's largest side: a larger --min-size would reject every photo
MAX_INTERVAL_S = 3600.0  # an hour between two API calls would stall a download for days
MAX_DOWNLOAD_WORKERS = 32  # concurrent image downloads (threads; featkit.collect refuses more too)


def cpu_count() -> int:
    """CPUs this process may run on (its affinity, not the host's total)."""
    try:
        return len(os.sched_getaffinity(0)) or 1
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def max_workers() -> int:
    """The most decode worker processes featkit starts: max(64, 4 per CPU)."""
    return max(WORKERS_FLOOR, WORKERS_PER_CPU * cpu_count())


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def check_int(name: str, value, *, low: int, high: int | None = None, why: str = "") -> int:
    """``value`` is a whole number in ``low .. high`` (no upper bound when ``high`` is None)."""
    if not _is_int(value):
        raise FeatkitError(f"`{name}` must be a whole number; got {value!r}", param=name)
    if value < low or (high is not None and value > high):
        bound = f"at least {low}" if high is None else f"{low} to {high}"
        raise FeatkitError(f"`{name}` must be {bound}{why}; got {value}", param=name)
    return int(value)


def check_float(
    name: str, value, *, low: float | None = None, high: float | None = None, low_open: bool = False, high_open: bool = False, why: str = ""
) -> float:
    """``value`` is a finite number within the bounds given (``*_open``: the bound itself is excluded)."""
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (low is None or (value > low if low_open else value >= low)) and (high is None or (value < high if high_open else value <= high))
    if not ok:
        parts = []
        if low is not None:
            parts.append(f"{'above' if low_open else 'at least'} {low:g}")
        if high is not None:
            parts.append(f"{'below' if high_open else 'at most'} {high:g}")
        raise FeatkitError(f"`{name}` must be a finite number{' ' + ' and '.join(parts) if parts else ''}{why}; got {value!r}", param=name)
    return float(value)


def check_seed(value, name: str = "seed", *, optional: bool = False) -> int | None:
    """A seed is 0 .. 2**32 - 1 (what numpy and scikit-learn take); None only where ``optional``."""
    if value is None and optional:
        return None
    return check_int(name, value, low=0, high=MAX_SEED, why=" (numpy seeds are non-negative 32-bit numbers)")


def check_workers(value, name: str = "workers", *, optional: bool = True) -> int | None:
    """Decode worker processes: 0 (decode in the main process) to :func:`max_workers`; None: featkit picks."""
    if value is None and optional:
        return None
    if _is_int(value) and value < 0:
        raise FeatkitError(f"`{name}` must be 0 (decode in the main process) or more; got {value}", param=name)
    top = max_workers()
    return check_int(name, value, low=0, high=top, why=f" (at most max({WORKERS_FLOOR}, {WORKERS_PER_CPU} x this machine's {cpu_count()} CPUs))")


def check_choice(name: str, value, choices) -> str:
    if value not in choices:
        raise FeatkitError(f"unknown `{name}` {value!r}; choose one of: {', '.join(choices)}", param=name)
    return value


def check_split_size(name: str, value) -> float:
    """A split size per city: a whole count (500, the study's) or a fraction below 1; 0 for none."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) or value < 0 or (value >= 1 and value != int(value)):
        raise FeatkitError(f"`{name}` must be a count (e.g. 500) or a fraction below 1; got {value}", param=name)
    return float(value)


def check_mlp_params(params: dict) -> None:
    """The MLP head's numbers (scikit-learn's names), checked before any training, whichever heads run."""
    if "hidden_layer_sizes" in params:
        sizes = params["hidden_layer_sizes"]
        sizes = (sizes,) if _is_int(sizes) else sizes
        if not isinstance(sizes, (tuple, list)) or not sizes:
            raise FeatkitError(f"`hidden_layer_sizes` must be a number of units or a tuple of them; got {sizes!r}", param="hidden_layer_sizes")
        for s in sizes:
            check_int("hidden_layer_sizes", s, low=1, high=MAX_HIDDEN, why=" units a layer")
    if "dropout" in params:
        check_float("dropout", params["dropout"], low=0, high=1, high_open=True, why=" (the share of units dropped)")
    if "alpha" in params:
        check_float("alpha", params["alpha"], low=0)
    if "learning_rate_init" in params:
        check_float("learning_rate_init", params["learning_rate_init"], low=0, low_open=True, high=MAX_LEARNING_RATE)
    for name in ("batch_size", "max_iter", "n_iter_no_change"):
        if name in params:
            check_int(name, params[name], low=1)
    if "validation_fraction" in params:
        check_float("validation_fraction", params["validation_fraction"], low=0, high=1, low_open=True, high_open=True)


def check_head_params(name: str, params: dict, accepted) -> None:
    """``params`` for head ``name``: only names it takes (``accepted``), and sane numbers."""
    if not isinstance(params, dict):
        raise FeatkitError(f"`params` of the {name} head must be a dict of its parameters; got {params!r}", param="params")
    unknown = sorted(set(params) - set(accepted) - {"random_state"})
    if unknown:
        raise FeatkitError(
            f"`params` of the {name} head: unknown parameter(s) {', '.join(unknown)}; it takes: {', '.join(sorted(set(accepted) - {'random_state'}))}",
            param="params",
        )
    check_head_numbers(params)


def check_head_numbers(params: dict) -> None:
    """The numbers of any head, checked by parameter name whichever head takes them (scikit-learn's names:
    the MLP's of :func:`check_mlp_params`, ``tol``, and the ``Cs`` / ``alphas`` grids); others are the head's own."""
    check_mlp_params(params)
    if "tol" in params:
        check_float("tol", params["tol"], low=0, low_open=True)
    for key in ("Cs", "alphas"):
        if key in params:
            grid = params[key]
            if not isinstance(grid, (tuple, list)) or not grid:
                raise FeatkitError(f"`{key}` must be a non-empty list of positive numbers; got {grid!r}", param=key)
            for v in grid:
                check_float(key, v, low=0, low_open=True)


def check_url(name: str, value: str | None) -> str | None:
    """An http(s) URL (or None: the default)."""
    if value is not None and not (isinstance(value, str) and value.startswith(("http://", "https://")) and len(value) > len("https://")):
        raise FeatkitError(f"`{name}` {value!r} must be an http(s) URL such as https://api.flickr.com/services/rest/", param=name)
    return value


def _nearest_existing(path: Path) -> Path:
    for p in (path, *path.parents):
        if p.exists() or p.is_symlink():
            return p
    return Path(".")


def ensure_writable_dir(path: str | Path, param: str) -> Path:
    """``path`` is, or can become, a folder featkit can write into: refused (one line naming ``param``) when it
    is a file, lies under a file, or its nearest existing folder is not writable. Writes nothing that stays."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise FeatkitError(f"`{param}` {path} is a file, not a folder; give a folder (it is created if missing)", param=param)
    base = _nearest_existing(path)
    if not base.is_dir():
        raise FeatkitError(f"`{param}` {path} cannot be created: {base} is a file, not a folder", param=param)
    if not os.access(base, os.W_OK | os.X_OK):
        raise FeatkitError(f"`{param}` {path} is not writable ({base} does not let this user write in it); give a folder you can write to", param=param)
    try:  # what the permission bits cannot tell (root, read-only mounts, /proc): make and remove an empty folder
        os.rmdir(tempfile.mkdtemp(prefix=".featkit-probe-", dir=base))
    except OSError as e:
        raise FeatkitError(f"`{param}` {path} is not writable ({base}: {e.strerror or type(e).__name__}); give a folder you can write to", param=param) from None
    return path


def ensure_writable_file(path: str | Path, param: str) -> Path:
    """``path`` can be written as a file: not a folder, and its folder writable (see :func:`ensure_writable_dir`)."""
    path = Path(path)
    if path.is_dir():
        raise FeatkitError(f"`{param}` {path} is a folder; give a file name", param=param)
    if path.exists() and not os.access(path, os.W_OK):
        raise FeatkitError(f"`{param}` {path} is not writable", param=param)
    ensure_writable_dir(path.parent if str(path.parent) else Path("."), param)
    return path


def require_dir(path: str | Path, param: str, missing: str, fix: str) -> Path:
    """``path`` is an existing folder, else one line: ``missing`` (what is not there), why, and ``fix``."""
    path = Path(path)
    if not path.exists():
        raise FeatkitError(f"{missing}: `{param}` {path} does not exist; {fix}", param=param)
    if not path.is_dir():
        raise FeatkitError(f"{missing}: `{param}` {path} is a file, not a folder; {fix}", param=param)
    return path


def require_cache(cache_dir: str | Path, *, heads: bool = False) -> Path:
    """The cache folder ``fit``, ``split`` (features) or ``compare``, ``predict`` (``heads``) read exists,
    else one line naming it and the fix."""
    fix = f"run `featkit extract PHOTOS --cache {cache_dir}`"
    if heads:
        return require_dir(cache_dir, "cache_dir", "no fitted heads", f"{fix}, then run `featkit fit`, or point `cache_dir` at an existing cache")
    return require_dir(cache_dir, "cache_dir", "no feature cache", f"{fix} first, or point `cache_dir` at an existing cache")
