"""Classifier heads on cached features, all following scikit-learn's estimator contract.

- :class:`MLPHead`: the study's head (Linear -> ReLU -> Dropout -> Linear ->
  softmax) in torch, Adam, early stopping on validation loss with patience 7
  and the best epoch restored.
- :class:`LogRegHead`: multinomial logistic regression on standardised
  features, its regularisation chosen on the validation split.
- :class:`LinearSVMHead`: a linear SVM (hinge loss, SGD) on standardised
  features, its regularisation chosen on the validation split, probabilities
  calibrated (Platt / sigmoid) on it. Why linear and why SGD: see the class.

The MLP and the SVM also train from a block source (:meth:`fit_blocks`), so a
cache larger than memory streams from disk in shuffled blocks.

Every head's ``fit(X, y, X_val=None, y_val=None)`` uses the given validation
split for early stopping / model selection, and carves ``validation_fraction``
of the training data (stratified) when none is given. Nothing here touches the
test split. This module imports neither h5py nor torchvision.
"""

from __future__ import annotations

import copy
import time
import warnings

import joblib
import numpy as np
import torch
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.calibration import CalibratedClassifierCV
from sklearn.frozen import FrozenEstimator
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression, SGDClassifier
from sklearn.model_selection import train_test_split
from sklearn.utils import check_random_state
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import check_is_fitted, validate_data

from featkit.atomic import atomic_path
from featkit.blocks import ArrayBlocks
from featkit.devices import resolve_device
from featkit.errors import FeatkitError
from featkit.options import MLP

# -- shared helpers ----------------------------------------------------------------------------
def _sub_blocks(X: np.ndarray, rows: int = 4096):
    for i in range(0, X.shape[0], rows):
        yield X[i : i + rows]


def source_moments(source) -> tuple[np.ndarray, np.ndarray]:
    """Per-feature mean and std of a block source (float64 accumulators, one pass, one sub-block at a time).

    ``np.std(X, dtype=float64)`` would allocate a float64 copy of the whole
    matrix (32,800 x 25,088 x 8 bytes = 6.6 GB at the study's size).
    """
    d = source.n_features
    s, ss, n = np.zeros(d), np.zeros(d), 0
    for Xb, _ in source.blocks(None):
        for b in _sub_blocks(Xb):
            b = np.asarray(b, dtype=np.float64)
            s += b.sum(0)
            ss += np.einsum("ij,ij->j", b, b)
            n += b.shape[0]
    mean = s / max(n, 1)
    std = np.sqrt(np.maximum(ss / max(n, 1) - mean**2, 0.0))
    std[std < 1e-6] = 1.0  # constant features (dead ReLUs) pass through unscaled
    return mean.astype(np.float32), std.astype(np.float32)


def column_moments(X: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return source_moments(ArrayBlocks(X, np.zeros(len(X))))


def standardize(X: np.ndarray, mean: np.ndarray, std: np.ndarray, *, out: np.ndarray | None = None) -> np.ndarray:
    """``(X - mean) / std`` in float32, sub-block by sub-block (no float64 temporaries); ``out=X`` works in place."""
    out = np.empty(X.shape, dtype=np.float32) if out is None else out
    for i in range(0, X.shape[0], 4096):
        np.subtract(X[i : i + 4096], mean, out=out[i : i + 4096], dtype=np.float32)
        out[i : i + 4096] /= std
    return out


def _encode(classes: np.ndarray, y: np.ndarray) -> np.ndarray:
    idx = np.clip(np.searchsorted(classes, y), 0, len(classes) - 1)
    if not np.all(classes[idx] == y):
        unknown = sorted(set(np.asarray(y)[classes[idx] != y].tolist()))[:5]
        raise ValueError(f"labels {unknown} are not among the training classes {list(classes)}")
    return idx


def _validation(X, y, X_val, y_val, fraction, random_state, enabled=True):
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


def _check_two_classes(classes, name):
    if len(classes) < 2:
        raise ValueError(f"{name} needs samples of at least 2 classes; got {len(classes)} class")


def _seed(random_state) -> int:
    return int(check_random_state(random_state).randint(np.iinfo(np.int32).max))


class _BlockTrained(ClassifierMixin, BaseEstimator):
    """A head that trains from a block source: in memory (:meth:`fit`) or streamed (:meth:`fit_blocks`)."""

    def fit(self, X, y, X_val=None, y_val=None):
        X, y = validate_data(self, X, y, dtype=np.float32)
        check_classification_targets(y)
        if X_val is not None:
            X_val = validate_data(self, X_val, dtype=np.float32, reset=False)
        seed = _seed(self.random_state)
        early = getattr(self, "early_stopping", True)
        Xt, yt, Xv, yv = _validation(X, y, X_val, y_val, self.validation_fraction, seed, early)
        return self._fit_source(self._memory_blocks(Xt, yt), Xv, yv, seed)

    def fit_blocks(self, source, X_val=None, y_val=None):
        """Train from ``source.blocks(rng)`` (shuffled blocks, never the whole matrix at once)."""
        self.n_features_in_ = source.n_features
        return self._fit_source(source, X_val, None if y_val is None else np.asarray(y_val), _seed(self.random_state))


# -- the MLP head ------------------------------------------------------------------------------
class _MLP(torch.nn.Module):
    def __init__(self, n_in, hidden, n_out, dropout, mean, std):
        super().__init__()
        self.register_buffer("mean", torch.as_tensor(mean))
        self.register_buffer("std", torch.as_tensor(std))
        layers, prev = [], n_in
        for h in hidden:
            layers += [torch.nn.Linear(prev, h), torch.nn.ReLU(), torch.nn.Dropout(dropout)]
            prev = h
        layers.append(torch.nn.Linear(prev, n_out))
        self.net = torch.nn.Sequential(*layers)

    def forward(self, x):  # logits; softmax is applied in predict_proba and inside the loss
        return self.net((x - self.mean) / self.std)


class MLPHead(_BlockTrained):
    """The study's dense head: Linear(d, 1024) -> ReLU -> Dropout -> Linear(1024, n_cities) -> softmax.

    Trained with Adam on cross-entropy; with ``early_stopping`` it watches the
    validation loss each epoch, stops after ``n_iter_no_change`` epochs without
    improvement (the study's patience of 7) and restores the best epoch's
    weights. Inputs are standardised with the training set's moments (stored
    in the model), which makes Adam's default step size work on raw ReLU
    features of any scale. Parameter names follow ``sklearn.neural_network.MLPClassifier``.

    :meth:`fit_blocks` trains from a block source (a cache larger than memory,
    streamed in shuffled blocks) instead of an in-memory matrix.
    """

    def __init__(
        self,
        hidden_layer_sizes=MLP.hidden_layer_sizes,
        dropout=MLP.dropout,
        alpha=MLP.alpha,
        learning_rate_init=MLP.learning_rate_init,
        batch_size=MLP.batch_size,
        max_iter=MLP.max_iter,
        early_stopping=True,
        n_iter_no_change=MLP.n_iter_no_change,
        validation_fraction=0.1,
        device="auto",
        random_state=None,
        verbose=False,
    ):
        self.hidden_layer_sizes = hidden_layer_sizes
        self.dropout = dropout
        self.alpha = alpha
        self.learning_rate_init = learning_rate_init
        self.batch_size = batch_size
        self.max_iter = max_iter
        self.early_stopping = early_stopping
        self.n_iter_no_change = n_iter_no_change
        self.validation_fraction = validation_fraction
        self.device = device
        self.random_state = random_state
        self.verbose = verbose

    def _memory_blocks(self, X, y):
        return ArrayBlocks(X, y)  # one block: a full shuffle each epoch

    def _fit_source(self, source, Xv, yv, seed):
        self.classes_ = np.unique(source.labels())
        _check_two_classes(self.classes_, type(self).__name__)
        dev = resolve_device(self.device)
        hidden = (self.hidden_layer_sizes,) if np.isscalar(self.hidden_layer_sizes) else tuple(self.hidden_layer_sizes)
        t0 = time.perf_counter()
        mean, std = source_moments(source)
        self.n_passes_ = 1
        with torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []):
            torch.manual_seed(seed)
            model = _MLP(source.n_features, hidden, len(self.classes_), self.dropout, mean, std).to(dev)
            self._train(model, source, Xv, None if yv is None else _encode(self.classes_, yv), dev, seed)
        self.fit_seconds_ = time.perf_counter() - t0
        self.model_ = model.cpu().eval()
        self.chosen_ = {"epochs": self.n_iter_, "best_epoch": getattr(self, "best_epoch_", self.n_iter_)}
        return self

    def _train(self, model, source, Xv, yv, dev, seed):
        # The fused kernel: the default per-tensor Adam costs more than the matmuls on 25,088 x 1,024 weights.
        opt = torch.optim.Adam(model.parameters(), lr=self.learning_rate_init, weight_decay=self.alpha, fused=True)
        loss_fn = torch.nn.CrossEntropyLoss()
        rng = np.random.default_rng(seed)
        self.loss_curve_, self.validation_loss_curve_, self.validation_scores_ = [], [], []
        best, best_state, stale = np.inf, None, 0
        self.n_iter_ = 0
        for epoch in range(self.max_iter):
            model.train()
            total, seen = 0.0, 0
            for Xb, yb in source.blocks(rng):
                yb_t = torch.as_tensor(_encode(self.classes_, yb), dtype=torch.long, device=dev)
                Xb_dev = torch.from_numpy(np.ascontiguousarray(Xb)).to(dev) if dev.type == "cuda" else None
                perm = rng.permutation(len(yb))
                for start in range(0, len(yb), self.batch_size):
                    idx = perm[start : start + self.batch_size]
                    if Xb_dev is not None:
                        xb = Xb_dev[torch.from_numpy(idx).to(dev)]
                    else:
                        xb = torch.from_numpy(Xb[idx])
                    loss = loss_fn(model(xb), yb_t[torch.from_numpy(idx).to(dev)])
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    total += loss.item() * len(idx)
                    seen += len(idx)
            self.n_passes_ += 1
            self.loss_curve_.append(total / max(seen, 1))
            self.n_iter_ = epoch + 1
            if Xv is None:
                continue
            v_loss, v_acc = self._evaluate(model, Xv, yv, dev)
            self.validation_loss_curve_.append(v_loss)
            self.validation_scores_.append(v_acc)
            if self.verbose:
                print(f"epoch {epoch + 1}: train loss {self.loss_curve_[-1]:.4f} val loss {v_loss:.4f} val acc {v_acc:.4f}")
            if v_loss < best - 1e-6:
                best, stale = v_loss, 0
                best_state = copy.deepcopy(model.state_dict())
                self.best_epoch_ = epoch + 1
            else:
                stale += 1
                if stale >= self.n_iter_no_change:
                    break
        if best_state is not None:
            model.load_state_dict(best_state)
            self.best_validation_loss_ = best
            self.best_validation_score_ = self.validation_scores_[self.best_epoch_ - 1]

    def _evaluate(self, model, X, y, dev):
        proba = self._proba(model, X, dev)
        p = np.clip(proba[np.arange(len(y)), y], 1e-12, 1.0)
        return float(-np.log(p).mean()), float((proba.argmax(1) == y).mean())

    def _proba(self, model, X, dev, block_rows=2048):
        model.eval()
        out = np.empty((X.shape[0], len(self.classes_)), dtype=np.float64)
        with torch.inference_mode():
            for i in range(0, X.shape[0], block_rows):
                xb = torch.from_numpy(np.ascontiguousarray(X[i : i + block_rows], dtype=np.float32)).to(dev)
                out[i : i + block_rows] = torch.softmax(model(xb).double(), dim=1).cpu().numpy()
        return out

    def predict_proba(self, X):
        check_is_fitted(self, "model_")
        X = validate_data(self, X, dtype=np.float32, reset=False)
        dev = resolve_device(self.device)
        model = self.model_.to(dev)
        try:
            return self._proba(model, X, dev)
        finally:
            self.model_ = model.cpu()

    def predict(self, X):
        proba = self.predict_proba(X)  # checks fitted-ness first
        return self.classes_[proba.argmax(axis=1)]


# -- linear heads ------------------------------------------------------------------------------
class _LinearHead(ClassifierMixin, BaseEstimator):
    """Shared by the linear heads: standardised inputs, probabilities from ``model_``."""

    def predict_proba(self, X):
        check_is_fitted(self, "model_")
        X = validate_data(self, X, dtype=np.float32, reset=False)
        return self.model_.predict_proba(standardize(X, self.mean_, self.std_))

    def predict(self, X):
        proba = self.predict_proba(X)  # checks fitted-ness first
        return self.classes_[proba.argmax(axis=1)]


class LogRegHead(_LinearHead):
    """Multinomial logistic regression (L2) on standardised features; C chosen on the validation split.

    scikit-learn's L-BFGS solver keeps float32 input in float32, and each C in
    the sweep (strong to weak regularisation) warm-starts from the previous
    solution, so later fits take few iterations. With ``copy=False`` the
    training matrix is standardised in place (half the memory at the study's size).
    """

    def __init__(self, Cs=(1e-4, 1e-3, 1e-2, 1e-1), max_iter=200, tol=1e-4, validation_fraction=0.1, copy=True, random_state=None):
        self.Cs = Cs
        self.max_iter = max_iter
        self.tol = tol
        self.validation_fraction = validation_fraction
        self.copy = copy
        self.random_state = random_state

    def fit(self, X, y, X_val=None, y_val=None):
        X, y = validate_data(self, X, y, dtype=np.float32)
        check_classification_targets(y)
        self.classes_ = np.unique(y)
        _check_two_classes(self.classes_, type(self).__name__)
        if X_val is not None:
            X_val = validate_data(self, X_val, dtype=np.float32, reset=False)
        Xt, yt, Xv, yv = _validation(X, y, X_val, y_val, self.validation_fraction, self.random_state)
        t0 = time.perf_counter()
        self.mean_, self.std_ = column_moments(Xt)
        in_place = not self.copy and Xt is X and X.flags.writeable
        Xt = standardize(Xt, self.mean_, self.std_, out=Xt if in_place else None)
        Xv = None if Xv is None else standardize(Xv, self.mean_, self.std_)
        Cs = sorted(self.Cs)
        m = LogisticRegression(C=Cs[0], max_iter=self.max_iter, tol=self.tol, warm_start=True, random_state=self.random_state)
        self.validation_scores_, self.n_iter_, best_score = {}, 0, (-1.0, -np.inf)
        if Xv is None or len(Cs) == 1:  # nothing to select on: the middle of the grid
            Cs = [Cs[len(Cs) // 2]]
        for C in Cs:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", ConvergenceWarning)  # a capped fit is still a valid candidate
                m.set_params(C=C).fit(Xt, yt)
            self.n_iter_ += int(np.max(m.n_iter_))
            if Xv is not None:
                proba = m.predict_proba(Xv)
                score = float((m.classes_[proba.argmax(1)] == yv).mean())
                loss = float(-np.log(np.clip(proba[np.arange(len(yv)), _encode(m.classes_, yv)], 1e-12, 1)).mean())
            else:
                score, loss = float("nan"), 0.0
            self.validation_scores_[C] = score
            if Xv is None or (score, -loss) > best_score:  # accuracy first; ties go to the lower val log-loss
                best_score, self.C_, self.model_ = (score, -loss), C, copy.deepcopy(m)
        self.n_passes_ = 1 + self.n_iter_  # moments, then one gradient pass per L-BFGS iteration
        self.best_validation_score_ = self.validation_scores_.get(self.C_)
        self.chosen_ = {"C": self.C_}
        self.fit_seconds_ = time.perf_counter() - t0
        return self


class LinearSVMHead(_BlockTrained, _LinearHead):
    """A linear SVM (hinge loss, L2, one-vs-rest) trained by SGD on standardised features.

    ``alpha`` (the L2 strength, 1 / (C n)) is chosen on the validation split,
    sweeping strong to weak with each fit warm-started from the last; the
    chosen SVM's decision values are calibrated to probabilities with a
    sigmoid (Platt) per city on the validation split. SGD reads the data in
    shuffled blocks, so :meth:`fit_blocks` trains on a cache larger than
    memory. Why not a kernel SVC: its fit grows quadratically to cubically
    with the number of photos and each kernel value costs 25,088
    multiply-adds, so at the study's 41,000 photos it does not finish in
    useful time; nor liblinear's LinearSVC: it copies the data into float64
    sparse nodes, about 13 GB at the study's size.
    """

    def __init__(self, alphas=(1e-2, 1e-3, 1e-4), epochs=5, block_rows=4096, validation_fraction=0.1, n_jobs=None, random_state=None):
        self.alphas = alphas
        self.epochs = epochs
        self.block_rows = block_rows
        self.validation_fraction = validation_fraction
        self.n_jobs = n_jobs
        self.random_state = random_state

    def _memory_blocks(self, X, y):
        return ArrayBlocks(X, y, self.block_rows)  # SGD takes sub-blocks; shuffled runs mix the cities

    def _fit_source(self, source, Xv, yv, seed):
        self.classes_ = np.unique(source.labels())
        _check_two_classes(self.classes_, type(self).__name__)
        t0 = time.perf_counter()
        self.mean_, self.std_ = source_moments(source)
        self.n_passes_ = 1
        rng = np.random.default_rng(seed)
        Xv = None if Xv is None else standardize(Xv, self.mean_, self.std_)
        m = SGDClassifier(loss="hinge", alpha=max(self.alphas), random_state=seed, n_jobs=self.n_jobs)
        alphas = sorted(self.alphas, reverse=True)
        if Xv is None:
            alphas = [alphas[len(alphas) // 2]]
        self.validation_scores_, best_score = {}, -1.0
        for alpha in alphas:
            m.set_params(alpha=alpha)  # partial_fit continues from the current weights: a warm start
            for _ in range(self.epochs):
                for Xb, yb in source.blocks(rng):
                    perm = rng.permutation(len(yb))
                    for i in range(0, len(yb), 4096):
                        idx = np.sort(perm[i : i + 4096])
                        m.partial_fit(standardize(Xb[idx], self.mean_, self.std_), np.asarray(yb)[idx], classes=self.classes_)
                self.n_passes_ += 1
            score = float((m.predict(Xv) == yv).mean()) if Xv is not None else float("nan")
            self.validation_scores_[alpha] = score
            if Xv is None or score > best_score:  # ties keep the larger alpha (stronger regularisation)
                best_score, self.alpha_, best = score, alpha, copy.deepcopy(m)
        self.best_validation_score_ = self.validation_scores_.get(self.alpha_)
        self.chosen_ = {"alpha": self.alpha_}
        self.svm_ = best
        self.model_ = self._calibrate(best, source, Xv, yv)
        self.fit_seconds_ = time.perf_counter() - t0
        return self

    def _calibrate(self, svm, source, Xv, yv):
        """Platt scaling per city on the validation split (the SVM itself is frozen)."""
        if Xv is None or not np.array_equal(np.unique(yv), self.classes_):
            # No class-covering validation split (tiny data): calibrate on a block of training data.
            Xb, yb = next(iter(source.blocks(np.random.default_rng(0))))
            Xv, yv = standardize(Xb, self.mean_, self.std_), np.asarray(yb)
        # The SVM is frozen, so there is nothing to cross-validate: one split that uses every row
        # for the sigmoids gives one calibrator per city, fitted on the whole validation split.
        everything = np.arange(len(yv))
        return CalibratedClassifierCV(FrozenEstimator(svm), method="sigmoid", cv=[(everything, everything)]).fit(Xv, yv)


# The registry: a new head is one estimator class above plus one line here. A head that also has
# ``fit_blocks(source, X_val, y_val)`` can train from a cache larger than memory; every head sets
# ``chosen_`` (the hyper-parameters its fit chose, for the saved record and the report).
HEADS = {
    "logreg": LogRegHead,
    "mlp": MLPHead,
    "svm": LinearSVMHead,
}
HEAD_NAMES = tuple(HEADS)


def make_head(name: str, *, random_state: int | None = 0, **params) -> BaseEstimator:
    """A fresh head by name (one of :data:`HEAD_NAMES`); ``params`` it does not take are refused."""
    if name not in HEADS:
        raise FeatkitError(f"unknown head {name!r}; choose one of: {', '.join(HEAD_NAMES)} (or all)")
    return HEADS[name](random_state=random_state, **params)


def can_stream(head: BaseEstimator) -> bool:
    """Whether ``head`` trains from a block source (a cache larger than memory)."""
    return callable(getattr(head, "fit_blocks", None))


def save_head(path, head: BaseEstimator, record: dict) -> None:
    """Save a fitted head with joblib, together with what it was trained on (``record``).

    Atomic: a killed save never leaves a half-written head under the real name.
    """
    with atomic_path(path) as tmp:
        joblib.dump({"head": head, "record": record}, tmp)


def load_head(path) -> tuple[BaseEstimator, dict]:
    try:
        obj = joblib.load(path)
        return obj["head"], obj["record"]
    except Exception as e:
        raise FeatkitError(f"head file {path} cannot be read ({type(e).__name__}); refit it with `featkit fit`") from None
