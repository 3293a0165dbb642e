"""What every head shares: the input scaling, label encoding, the validation carve-out, seeds, and the bases
:class:`Head` (a scikit-learn classifier whose ``predict`` is the most probable of ``predict_proba``) and
:class:`BlockTrained` (a head that trains from a block source, in memory or streamed).

**Input scaling.** Every head divides the features by one number, their
root-mean-square over the training set (:func:`source_rms`), and nothing else.
Frozen conv features are sparse ReLU outputs: many of the 25,088 values are
zero on almost every photo, so standardising each feature by its own standard
deviation blows rare activations up into huge inputs that the heads fit to
noise (on real Street View photos it cost every head 10 to 20 points, and made
the MLP's best epoch its first). One global scale keeps the features' relative
sizes and only sets a convenient unit.
"""

from __future__ import annotations

import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.model_selection import train_test_split
from sklearn.utils import check_random_state
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import validate_data

from featkit.blocks import ArrayBlocks


# -- shared helpers ----------------------------------------------------------------------------
def _sub_blocks(X: np.ndarray, rows: int = 4096):
    for i in range(0, X.shape[0], rows):
        yield X[i : i + rows]


def source_rms(source) -> float:
    """Root-mean-square of every value of a block source (float64 accumulator, one pass, one sub-block at a time)."""
    ss, n = 0.0, 0
    for Xb, _ in source.blocks(None):
        for b in _sub_blocks(Xb):
            b = np.asarray(b, dtype=np.float64)
            ss += float(np.einsum("ij,ij->", b, b))
            n += b.size
    rms = float(np.sqrt(ss / max(n, 1)))
    return rms if rms > 1e-12 else 1.0  # all-zero features: leave them as they are


def array_rms(X: np.ndarray) -> float:
    return source_rms(ArrayBlocks(X, np.zeros(len(X))))


def scale_rows(X: np.ndarray, scale: float, *, out: np.ndarray | None = None) -> np.ndarray:
    """``X / scale`` in float32, sub-block by sub-block (no float64 temporaries); ``out=X`` works in place."""
    out = np.empty(X.shape, dtype=np.float32) if out is None else out
    inv = np.float32(1.0 / scale)
    for i in range(0, X.shape[0], 4096):
        np.multiply(X[i : i + 4096], inv, out=out[i : i + 4096], dtype=np.float32)
    return out


def encode_labels(classes: np.ndarray, y: np.ndarray) -> np.ndarray:
    idx = np.clip(np.searchsorted(classes, y), 0, len(classes) - 1)
    if not np.all(classes[idx] == y):
        unknown = sorted(set(np.asarray(y)[classes[idx] != y].tolist()))[:5]
        raise ValueError(f"labels {unknown} are not among the training classes {list(classes)}")
    return idx


def log_loss(proba: np.ndarray, y_idx: np.ndarray) -> float:
    return float(-np.log(np.clip(proba[np.arange(len(y_idx)), y_idx], 1e-12, 1.0)).mean())


def validation_split(X, y, X_val, y_val, fraction, random_state, enabled=True):
    """The training / validation data a head uses: the given val split, or a stratified carve-out."""
    if X_val is not None and y_val is not None:
        return X, y, X_val, np.asarray(y_val)
    if not enabled or fraction <= 0:
        return X, y, None, None
    n_val = int(round(fraction * len(y)))
    classes, counts = np.unique(y, return_counts=True)
    if n_val < len(classes) or len(y) - n_val < len(classes):
        return X, y, None, None  # too small to hold out a class-covering set
    stratify = y if counts.min() >= 2 else None
    Xt, Xv, yt, yv = train_test_split(X, y, test_size=n_val, random_state=random_state, stratify=stratify)
    return Xt, yt, Xv, yv


def check_two_classes(classes, name):
    if len(classes) < 2:
        raise ValueError(f"{name} needs samples of at least 2 classes; got {len(classes)} class")


def int_seed(random_state) -> int:
    return int(check_random_state(random_state).randint(np.iinfo(np.int32).max))


def grid_edge(choice, grid) -> bool:
    """Whether ``choice`` is the first or last of a grid of more than one value."""
    grid = sorted(grid)
    return len(grid) > 1 and choice in (grid[0], grid[-1])


class BlockTrained(ClassifierMixin, BaseEstimator):
    """A head that trains from a block source: in memory (:meth:`fit`) or streamed (:meth:`fit_blocks`)."""

    def fit(self, X, y, X_val=None, y_val=None, progress=None):
        X, y = validate_data(self, X, y, dtype=np.float32)
        check_classification_targets(y)
        if X_val is not None:
            X_val = validate_data(self, X_val, dtype=np.float32, reset=False)
        seed = int_seed(self.random_state)
        early = getattr(self, "early_stopping", True)
        Xt, yt, Xv, yv = validation_split(X, y, X_val, y_val, self.validation_fraction, seed, early)
        return self._fit_source(self._memory_blocks(Xt, yt), Xv, yv, seed, progress)

    def fit_blocks(self, source, X_val=None, y_val=None, progress=None):
        """Train from ``source.blocks(rng)`` (shuffled blocks, never the whole matrix at once)."""
        self.n_features_in_ = source.n_features
        yv = None if y_val is None else np.asarray(y_val)
        return self._fit_source(source, X_val, yv, int_seed(self.random_state), progress)


class Head(ClassifierMixin, BaseEstimator):
    """The base of a head (see "Adding a head" in ARCHITECTURE.md): a scikit-learn classifier whose
    ``predict`` is the city of highest ``predict_proba``, so a head writes ``fit`` and ``predict_proba``
    and ``score`` (validation accuracy, for the saved record) comes from :class:`~sklearn.base.ClassifierMixin`."""

    def predict(self, X):
        proba = self.predict_proba(X)  # checks fitted-ness first
        return self.classes_[np.asarray(proba).argmax(axis=1)]
