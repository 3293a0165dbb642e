"""Block sources: training data served as blocks, so a head can train on a matrix larger than memory.

A block source is any object with

- ``n_features``: the width of every block;
- ``labels()``: the labels of all its rows, in row order (city names);
- ``blocks(rng)``: an iterator of ``(X, y)`` blocks (float32 ``X``) that together
  cover every row once; with a numpy ``Generator`` the blocks come in a shuffled
  order, with ``None`` in row order.

:class:`ArrayBlocks` serves an in-memory array; :class:`featkit.cache.streaming.StoreBlocks`
serves one split of the HDF5 cache. Heads accept either through ``fit_blocks``.
numpy only: no torch, no h5py.
"""

from __future__ import annotations

from typing import Iterator, Protocol

import numpy as np


class BlockSource(Protocol):
    n_features: int

    def labels(self) -> np.ndarray: ...

    def blocks(self, rng: np.random.Generator | None = None) -> Iterator[tuple[np.ndarray, np.ndarray]]: ...


def shuffled_segments(n: int, block_rows: int, rng: np.random.Generator | None, segment_rows: int = 64):
    """Blocks over ``range(n)``, each a list of ``(start, stop)`` runs of ``segment_rows`` consecutive
    rows, the runs in a shuffled order, about ``block_rows`` rows a block.

    Rows on disk are in extraction order, often sorted by city; a block of
    consecutive rows would hold one city, which wrecks stochastic training.
    Gathering short runs from all over the data mixes cities in every block
    while each run stays one contiguous (fast) read.
    """
    starts = np.arange(0, n, segment_rows)
    if rng is not None:
        starts = rng.permutation(starts)
    per_block = max(1, block_rows // segment_rows)
    for i in range(0, len(starts), per_block):
        yield [(int(s), int(min(s + segment_rows, n))) for s in starts[i : i + per_block]]


class ArrayBlocks:
    """Training data held in memory, served as a block source.

    With ``block_rows=None`` the whole array is one block (no copy); heads
    then shuffle within it, which is a full shuffle.
    """

    def __init__(self, X: np.ndarray, y: np.ndarray, block_rows: int | None = None):
        self.X, self.y, self.block_rows = X, np.asarray(y), block_rows

    @property
    def n_features(self) -> int:
        return self.X.shape[1]

    def labels(self) -> np.ndarray:
        return self.y

    def blocks(self, rng: np.random.Generator | None = None):
        if self.block_rows is None or self.block_rows >= len(self.y):
            yield self.X, self.y
            return
        for runs in shuffled_segments(len(self.y), self.block_rows, rng):
            idx = np.concatenate([np.arange(a, b) for a, b in runs])
            yield self.X[idx], self.y[idx]
