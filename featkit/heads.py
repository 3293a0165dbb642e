"""Classifier heads on cached features, all following scikit-learn's estimator contract.

- :class:`MLPHead`: the study's head (Linear -> ReLU -> Dropout -> Linear ->
  softmax) in torch, Adam, early stopping on validation loss with patience 7
  and the best epoch restored.
- :class:`LogRegHead`: multinomial logistic regression on standardised
  features, its regularisation chosen on the validation split.
- :class:`LinearSVMHead`: a linear SVM on standardised features, C chosen on
  the validation split, probabilities calibrated (Platt / sigmoid) on it.
  A kernel SVC is not offered: its fit is quadratic-to-cubic in the number of
  photos and each kernel evaluation costs 25,088 multiply-adds, so at the
  study's 41,000 photos it does not finish in useful time; a linear SVM in
  25,088 dimensions is already highly expressive.

Every head's ``fit(X, y, X_val=None, y_val=None)`` uses the given validation
split for early stopping / model selection, and carves ``validation_fraction``
of the training data (stratified) when none is given. Nothing here touches the
test split. This module imports neither h5py nor torchvision.
"""

from __future__ import annotations

import copy
import os
import time

import joblib
import numpy as np
import torch
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.calibration import CalibratedClassifierCV
from sklearn.frozen import FrozenEstimator
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import train_test_split
from sklearn.svm import LinearSVC
from sklearn.utils import check_random_state
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import check_is_fitted, validate_data

from featkit.errors import FeatkitError

HEAD_NAMES = ("logreg", "mlp", "svm")


# -- shared helpers ----------------------------------------------------------------------------
def column_moments(X: np.ndarray, block_rows: int = 4096) -> tuple[np.ndarray, np.ndarray]:
    """Per-feature mean and std (float32 results, float64 accumulators), block by block.

    ``np.std(X, dtype=float64)`` would allocate a float64 copy of the whole
    matrix (25,088 x 41,000 x 8 bytes = 8 GB); this allocates one block.
    """
    n, d = X.shape
    s, ss = np.zeros(d), np.zeros(d)
    for i in range(0, n, block_rows):
        b = np.asarray(X[i : i + block_rows], dtype=np.float64)
        s += b.sum(0)
        ss += np.einsum("ij,ij->j", b, b)
    mean = s / max(n, 1)
    var = np.maximum(ss / max(n, 1) - mean**2, 0.0)
    std = np.sqrt(var)
    std[std < 1e-6] = 1.0  # constant features (dead ReLUs) pass through unscaled
    return mean.astype(np.float32), std.astype(np.float32)


def standardize(X: np.ndarray, mean: np.ndarray, std: np.ndarray, block_rows: int = 4096) -> np.ndarray:
    """``(X - mean) / std`` as a new float32 array, computed block by block (no float64 temporaries)."""
    out = np.empty(X.shape, dtype=np.float32)
    for i in range(0, X.shape[0], block_rows):
        np.subtract(X[i : i + block_rows], mean, out=out[i : i + block_rows], dtype=np.float32)
        out[i : i + block_rows] /= std
    return out


def _encode(classes: np.ndarray, y: np.ndarray) -> np.ndarray:
    idx = np.searchsorted(classes, y)
    idx = np.clip(idx, 0, len(classes) - 1)
    if not np.all(classes[idx] == y):
        unknown = sorted(set(np.asarray(y)[classes[idx] != y].tolist()))[:5]
        raise ValueError(f"validation labels {unknown} are not among the training classes {list(classes)}")
    return idx


def _validation(X, y, X_val, y_val, fraction, random_state, enabled=True):
    """The training / validation data a head uses: the given val split, or a stratified carve-out."""
    if X_val is not None and y_val is not None:
        return X, y, X_val, y_val
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


def _resolve_torch_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise FeatkitError(f"--device {device} asked for, but no CUDA GPU is visible to torch; use --device cpu or --device auto")
    return torch.device(device)


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


class MLPHead(ClassifierMixin, BaseEstimator):
    """The study's dense head: Linear(d, 1024) -> ReLU -> Dropout -> Linear(1024, n_cities) -> softmax.

    Trained with Adam on cross-entropy; with ``early_stopping`` it watches the
    validation loss each epoch, stops after ``n_iter_no_change`` epochs without
    improvement (the study's patience of 7) and restores the best epoch's
    weights. Inputs are standardised with the training set's moments (stored
    in the model), which makes Adam's default step size work on raw ReLU
    features of any scale. Parameter names follow ``sklearn.neural_network.MLPClassifier``.
    """

    def __init__(
        self,
        hidden_layer_sizes=(1024,),
        dropout=0.5,
        alpha=0.0,
        learning_rate_init=1e-3,
        batch_size=128,
        max_iter=100,
        early_stopping=True,
        n_iter_no_change=7,
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

    def fit(self, X, y, X_val=None, y_val=None):
        X, y = validate_data(self, X, y, dtype=np.float32)
        check_classification_targets(y)
        self.classes_ = np.unique(y)
        _check_two_classes(self.classes_, type(self).__name__)
        rng = check_random_state(self.random_state)
        seed = int(rng.randint(np.iinfo(np.int32).max))
        if X_val is not None:
            X_val = validate_data(self, X_val, dtype=np.float32, reset=False)
        Xt, yt, Xv, yv = _validation(X, y, X_val, y_val, self.validation_fraction, seed, self.early_stopping)
        dev = _resolve_torch_device(self.device)
        hidden = (self.hidden_layer_sizes,) if np.isscalar(self.hidden_layer_sizes) else tuple(self.hidden_layer_sizes)
        mean, std = column_moments(Xt)
        t0 = time.perf_counter()
        with torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []):
            torch.manual_seed(seed)
            model = _MLP(X.shape[1], hidden, len(self.classes_), self.dropout, mean, std).to(dev)
            self._train(model, Xt, _encode(self.classes_, yt), Xv, None if yv is None else _encode(self.classes_, yv), dev, seed)
        self.fit_seconds_ = time.perf_counter() - t0
        self.model_ = model.cpu().eval()
        return self

    def _train(self, model, Xt, yt, Xv, yv, dev, seed):
        opt = torch.optim.Adam(model.parameters(), lr=self.learning_rate_init, weight_decay=self.alpha)
        loss_fn = torch.nn.CrossEntropyLoss()
        gen = torch.Generator().manual_seed(seed)
        # Features go to the device once when they fit comfortably (fast on GPUs); else batch by batch.
        Xt_dev = _maybe_to_device(Xt, dev)
        yt_t = torch.as_tensor(yt, dtype=torch.long, device=dev)
        self.loss_curve_, self.validation_loss_curve_, self.validation_scores_ = [], [], []
        best, best_state, stale = np.inf, None, 0
        self.n_iter_ = 0
        for epoch in range(self.max_iter):
            model.train()
            perm = torch.randperm(len(yt), generator=gen)
            total = 0.0
            for start in range(0, len(yt), self.batch_size):
                idx = perm[start : start + self.batch_size]
                if Xt_dev is not None:
                    xb = Xt_dev[idx.to(dev)]
                else:
                    xb = torch.from_numpy(Xt[idx.numpy()]).to(dev, non_blocking=True)
                loss = loss_fn(model(xb), yt_t[idx.to(dev)])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                total += loss.item() * len(idx)
            self.loss_curve_.append(total / len(yt))
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
        dev = _resolve_torch_device(self.device)
        model = self.model_.to(dev)
        try:
            return self._proba(model, X, dev)
        finally:
            self.model_ = model.cpu()

    def predict(self, X):
        return self.classes_[self.predict_proba(X).argmax(axis=1)]


def _maybe_to_device(X: np.ndarray, dev: torch.device):
    """The whole training matrix on the GPU when it takes under half its free memory; else None."""
    if dev.type != "cuda":
        return None
    free, _ = torch.cuda.mem_get_info(dev)
    if X.nbytes < free // 2:
        return torch.from_numpy(np.ascontiguousarray(X)).to(dev)
    return None


# -- linear heads ------------------------------------------------------------------------------
class _LinearSweepHead(ClassifierMixin, BaseEstimator):
    """Standardise, then sweep C over ``Cs`` (weak -> strong fit, warm-started), keep the best on val."""

    def _make(self, C):
        raise NotImplementedError

    def _fit_common(self, X, y, X_val, y_val):
        X, y = validate_data(self, X, y, dtype=np.float32)
        check_classification_targets(y)
        self.classes_ = np.unique(y)
        _check_two_classes(self.classes_, type(self).__name__)
        if X_val is not None:
            X_val = validate_data(self, X_val, dtype=np.float32, reset=False)
        Xt, yt, Xv, yv = _validation(X, y, X_val, y_val, self.validation_fraction, self.random_state)
        self.mean_, self.std_ = column_moments(Xt)
        Xt = standardize(Xt, self.mean_, self.std_)
        Xv = None if Xv is None else standardize(Xv, self.mean_, self.std_)
        t0 = time.perf_counter()
        Cs = sorted(self.Cs)
        if Xv is None or len(Cs) == 1:  # nothing to select on: the middle of the grid
            self.C_, self.validation_scores_ = Cs[len(Cs) // 2], {}
            model = self._make(self.C_).fit(Xt, yt)
        else:
            m = self._make(Cs[0])
            if "warm_start" in m.get_params():
                m.set_params(warm_start=True)  # each C starts from the previous C's solution
            self.validation_scores_, best_score = {}, -1.0
            for C in Cs:
                m.set_params(C=C).fit(Xt, yt)
                score = float((m.predict(Xv) == yv).mean())
                self.validation_scores_[C] = score
                if score > best_score:  # ties keep the smaller C (stronger regularisation)
                    best_score, self.C_, model = score, C, copy.deepcopy(m)
        self.best_validation_score_ = self.validation_scores_.get(self.C_)
        self.model_ = self._finish(model, Xt, yt, Xv, yv)
        self.fit_seconds_ = time.perf_counter() - t0
        return self

    def _finish(self, model, Xt, yt, Xv, yv):
        return model

    def predict_proba(self, X):
        check_is_fitted(self, "model_")
        X = validate_data(self, X, dtype=np.float32, reset=False)
        return self.model_.predict_proba(standardize(X, self.mean_, self.std_))

    def predict(self, X):
        return self.classes_[self.predict_proba(X).argmax(axis=1)]


class LogRegHead(_LinearSweepHead):
    """Multinomial logistic regression (L2) on standardised features; C chosen on the validation split.

    Float32 throughout (scikit-learn's L-BFGS keeps float32 input as float32),
    and each C warm-starts from the previous solution.
    """

    def __init__(self, Cs=(1e-4, 1e-3, 1e-2, 1e-1), solver="lbfgs", max_iter=300, tol=1e-4, validation_fraction=0.1, random_state=None):
        self.Cs = Cs
        self.solver = solver
        self.max_iter = max_iter
        self.tol = tol
        self.validation_fraction = validation_fraction
        self.random_state = random_state

    def _make(self, C):
        return LogisticRegression(C=C, solver=self.solver, max_iter=self.max_iter, tol=self.tol, random_state=self.random_state)

    def fit(self, X, y, X_val=None, y_val=None):
        return self._fit_common(X, y, X_val, y_val)


class LinearSVMHead(_LinearSweepHead):
    """One-vs-rest linear SVM (squared hinge) on standardised features, sigmoid-calibrated on the validation split."""

    def __init__(self, Cs=(1e-5, 1e-4, 1e-3, 1e-2), max_iter=2000, tol=1e-4, validation_fraction=0.1, random_state=None):
        self.Cs = Cs
        self.max_iter = max_iter
        self.tol = tol
        self.validation_fraction = validation_fraction
        self.random_state = random_state

    def _make(self, C):
        return LinearSVC(C=C, dual="auto", max_iter=self.max_iter, tol=self.tol, random_state=self.random_state)

    def fit(self, X, y, X_val=None, y_val=None):
        return self._fit_common(X, y, X_val, y_val)

    def _finish(self, model, Xt, yt, Xv, yv):
        if Xv is not None and np.array_equal(np.unique(yv), self.classes_):
            # One sigmoid per class fitted on the whole validation split: the SVM is frozen, so the
            # folds only decide which rows each calibrator sees, and ensemble=False pools them.
            folds = max(2, min(5, int(np.unique(yv, return_counts=True)[1].min())))
            if folds <= int(np.unique(yv, return_counts=True)[1].min()):
                return CalibratedClassifierCV(FrozenEstimator(model), method="sigmoid", cv=folds, ensemble=False).fit(Xv, yv)
        # No class-covering validation set: calibrate by cross-validation on the training data.
        cv = max(2, min(3, int(np.unique(yt, return_counts=True)[1].min())))
        return CalibratedClassifierCV(self._make(self.C_), method="sigmoid", cv=cv).fit(Xt, yt)


def make_head(name: str, *, random_state: int | None = 0, **params) -> BaseEstimator:
    """A fresh head by name: ``mlp``, ``logreg`` or ``svm``."""
    heads = {"mlp": MLPHead, "logreg": LogRegHead, "svm": LinearSVMHead}
    if name not in heads:
        raise FeatkitError(f"unknown head {name!r}; choose one of: {', '.join(HEAD_NAMES)} (or all)")
    return heads[name](random_state=random_state, **params)


def save_head(path, head: BaseEstimator, record: dict) -> None:
    """Save a fitted head with joblib, together with what it was trained on (``record``)."""
    tmp = f"{path}.tmp"
    joblib.dump({"head": head, "record": record}, tmp)
    os.replace(tmp, path)  # a killed save never leaves a half-written head under the real name


def load_head(path) -> tuple[BaseEstimator, dict]:
    try:
        obj = joblib.load(path)
        return obj["head"], obj["record"]
    except Exception as e:
        raise FeatkitError(f"head file {path} cannot be read ({type(e).__name__}); refit it with `featkit fit`") from None
