"""What a feature file's features mean (the backbone spec's identity plus the stored dtype), and the one
refusal when a file, a head or a run was made another way: both identities named, with the fix."""

from __future__ import annotations

from featkit.errors import FeatkitError


def cache_identity(spec, dtype: str) -> dict:
    """What a cache's features mean: the backbone spec's identity plus the stored dtype."""
    return {**spec.identity(), "dtype": dtype}


def describe(identity: dict) -> str:
    keys = ("arch", "weights_sha256", "image_size", "pooling", "feature_dim", "dtype")
    parts = []
    for k in keys:
        v = identity.get(k)
        if k == "weights_sha256" and isinstance(v, str):
            v = v[:12]
        elif k == "image_size" and isinstance(v, list):
            v = "x".join(map(str, v))
        parts.append(f"{k}={v}")
    return " ".join(parts)


def check_identity(found: dict, expected: dict, what: str, fix: str) -> None:
    """Refuse, naming both identities and the fix, when two identities differ."""
    if found != expected:
        diff = sorted(k for k in set(found) | set(expected) if found.get(k) != expected.get(k))
        raise FeatkitError(
            f"{what} was built with [{describe(found)}] but this run uses [{describe(expected)}] "
            f"(differs in: {', '.join(diff)}); {fix}"
        )
