"""One split of a feature file as a block source (:mod:`featkit.blocks`), for heads that train from a cache
larger than memory (``fit --stream yes``)."""

from __future__ import annotations

import numpy as np

from featkit.blocks import shuffled_segments


class StoreBlocks:
    """One split of the cache as a block source (see :mod:`featkit.blocks`).

    Each pass reads the split once, in blocks gathered from short runs of rows
    in a shuffled order (:func:`featkit.blocks.shuffled_segments`); only one
    block (``block_rows`` x features, float32) is in memory at a time.
    """

    def __init__(self, store, split: str, block_rows: int = 4096):
        self.store, self.block_rows = store, block_rows
        self.rows = store.split_rows(split)
        self.y = store.column("city")[self.rows]
        self.n_features = store.n_features

    def labels(self) -> np.ndarray:
        return self.y

    def blocks(self, rng: np.random.Generator | None = None):
        for runs in shuffled_segments(len(self.rows), self.block_rows, rng):
            X = np.concatenate([self.store.read_features(self.rows[a:b]) for a, b in runs])
            yield X, np.concatenate([self.y[a:b] for a, b in runs])


