"""How a backbone is spelt: the one name a user reads and writes, and the key of its files.

A user spells a backbone as ``featkit extract --backbone`` takes it: ``vgg16``, a torchvision model name
(``resnet50``), or ``timm:NAME``; a feature set that is not the backbone's default also carries its variant
(``vgg16-avg``, ``timm:NAME-flip``, ``timm:NAME-320x224``, as :attr:`featkit.backbones.BackboneSpec.key`
adds it). The cache folder names the files with a key that a file system takes everywhere (``:`` -> ``-``:
``features-timm-NAME.h5``, ``heads/timm-NAME/``). Every option that takes a backbone (``--backbone`` of fit
and verify, ``predict --head BACKBONE/HEAD``) reads either spelling; every message, report field and command
output shows the user's. This module is the one mapping between the two; it imports nothing of featkit's
but errors (and the cache folder's names, lazily, in :func:`select_backbones`).
"""

from __future__ import annotations

from pathlib import Path

from featkit.errors import FeatkitError

TIMM_NAME = "timm:"  # how a user spells a timm backbone (BackboneSpec.arch)
TIMM_KEY = "timm-"  # how its files are named


def backbone_key(name: str) -> str:
    """The file key of a backbone spelt either way: ``timm:NAME`` -> ``timm-NAME``; a key is left as it is."""
    return name.replace(":", "-")


def backbone_name(key: str) -> str:
    """The user's spelling of a backbone's file key: ``timm-NAME`` -> ``timm:NAME``; others are already spelt so."""
    return TIMM_NAME + key[len(TIMM_KEY):] if key.startswith(TIMM_KEY) else key


def head_key(name: str) -> str:
    """A head spelt ``BACKBONE/HEAD`` (either spelling of the backbone) -> ``KEY/HEAD``; a bare ``HEAD`` is kept."""
    backbone, sep, head = name.rpartition("/")
    return f"{backbone_key(backbone)}/{head}" if sep else name


def head_name(key: str) -> str:
    """``KEY/HEAD`` (a report's or a predictor's name of a head) -> ``BACKBONE/HEAD`` as the user spells it."""
    backbone, sep, head = key.rpartition("/")
    return f"{backbone_name(backbone)}/{head}" if sep else key


def select_backbones(cache_dir: str | Path, backbone: str | None = None) -> list[str]:
    """The keys of ``backbone`` (either spelling) or of every backbone the cache holds; refused with the
    backbones the cache holds, spelt as the user spells them, when it holds no such one."""
    from featkit.cache.names import backbone_keys, resolve_backbones

    if backbone is not None:
        keys = backbone_keys(cache_dir)
        if keys and backbone_key(backbone) not in keys:
            raise FeatkitError(
                f"the cache {cache_dir} holds no features of backbone {backbone!r}; it holds: {', '.join(map(backbone_name, keys))}",
                param="backbone",
            )
        backbone = backbone_key(backbone)
    return resolve_backbones(cache_dir, backbone)
