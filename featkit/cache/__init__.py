"""The cache folder, owned by one package: every file name under it (:mod:`~featkit.cache.names`), the one
lock its writers take (:mod:`~featkit.cache.lock`), the bytes of a feature file
(:mod:`~featkit.cache.format`), the read/write handle (:mod:`~featkit.cache.store`), integrity and the first
layout (:mod:`~featkit.cache.integrity`), what features mean (:mod:`~featkit.cache.identity`), and the
trusted heads shelf (:mod:`~featkit.cache.shelf`). Nothing outside this package imports h5py or fcntl, or
spells a file name under the cache folder (``tests/test_architecture.py`` checks both).

:class:`Cache` is the folder as one object. Importing this package stays light (no h5py, no torch): the
handle is imported when a feature file is opened.
"""

from __future__ import annotations

from pathlib import Path

from featkit.cache.names import FAILED_CSV, HASH_CACHE, backbone_keys, cache_file, heads_dir, shard_files


class Cache:
    """A cache folder: each backbone's feature file and heads folder, opened, checked and listed in one place.

    ``key`` below is a backbone's file key or the name ``extract --backbone`` takes (``timm:NAME``); None is
    the default backbone (VGG16 as the study used it).
    """

    def __init__(self, folder: str | Path):
        self.dir = Path(folder)

    def __repr__(self) -> str:
        return f"Cache({str(self.dir)!r})"

    # -- where things lie --------------------------------------------------------------------------
    def features_path(self, key: str | None = None) -> Path:
        return cache_file(self.dir, key)

    def heads_dir(self, key: str | None = None) -> Path:
        return heads_dir(self.dir, key)

    @property
    def failed_csv(self) -> Path:
        return self.dir / FAILED_CSV

    @property
    def hash_cache(self) -> Path:
        return self.dir / HASH_CACHE

    def backbones(self) -> list[str]:
        """The keys of the backbones whose features the folder holds (the default first)."""
        return backbone_keys(self.dir)

    def resolve(self, backbone: str | None = None) -> list[str]:
        """The keys of ``backbone`` (spelt as extract takes it, or its file key) or of every backbone the folder
        holds; a one-line error, in the user's spelling, when there is none or it is not there."""
        from featkit.naming import select_backbones

        return select_backbones(self.dir, backbone)

    def shards(self, key: str | None = None) -> list[Path]:
        return shard_files(self.features_path(key))

    # -- features ----------------------------------------------------------------------------------
    def open(self, key: str | None = None, *, writable: bool = False):
        """A :class:`~featkit.cache.store.FeatureStore` on one backbone's features (``writable`` takes the lock)."""
        from featkit.cache.store import FeatureStore

        return FeatureStore.open(self.features_path(key), writable=writable)

    def open_for_append(self, key: str | None, identity: dict, *, overwrite: bool = False, provenance: dict | None = None):
        """Create one backbone's feature file, or reopen it for appending after its identity is checked; locked."""
        from featkit.cache.store import FeatureStore

        return FeatureStore.open_for_append(self.features_path(key), identity, overwrite=overwrite, provenance=provenance)

    def verify(self, backbone: str | None = None, *, repair: bool = False) -> list[tuple[str, object, int]]:
        """``(key, Damage, rows dropped)`` for each backbone checked (every one unless ``backbone``)."""
        from featkit.cache.store import verify_cache

        return [(key, *verify_cache(self.features_path(key), repair=repair)) for key in self.resolve(backbone)]

    # -- heads -------------------------------------------------------------------------------------
    def fitted_heads(self) -> dict[str, tuple[str, Path]]:
        """``{name: (backbone key, file)}`` of the trusted heads (:func:`featkit.cache.shelf.fitted_heads`)."""
        from featkit.cache.shelf import fitted_heads

        return fitted_heads(self.dir)

    def choose_head(self, head: str | None = None):
        """:func:`featkit.cache.shelf.choose_head` on this folder."""
        from featkit.cache.shelf import choose_head

        return choose_head(self.dir, head)


__all__ = ["Cache"]
