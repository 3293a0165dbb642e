"""Classifier heads on cached features, all following scikit-learn's estimator contract.

- :class:`MLPHead`: the study's head (Linear -> ReLU -> Dropout -> Linear ->
  softmax) in torch, Adam, early stopping with the study's patience of 7 and
  the best epoch restored.
- :class:`LogRegHead`: multinomial logistic regression, its regularisation
  chosen on the validation split.
- :class:`LinearSVMHead`: a linear SVM (hinge loss, SGD, balanced class
  weights), its regularisation chosen on the validation split, probabilities
  from one temperature fitted on it. Why linear and why SGD: see the class.

**Input scaling.** Every head divides the features by one number, their
root-mean-square over the training set (:func:`source_rms`), and nothing else.
Frozen conv features are sparse ReLU outputs: many of the 25,088 values are
zero on almost every photo, so standardising each feature by its own standard
deviation blows rare activations up into huge inputs that the heads fit to
noise (on real Street View photos it cost every head 10 to 20 points, and made
the MLP's best epoch its first). One global scale keeps the features' relative
sizes and only sets a convenient unit.

The MLP and the SVM also train from a block source (:meth:`fit_blocks`, see
:mod:`featkit.blocks`), so a cache larger than memory streams from disk in
shuffled blocks.

Every head's ``fit(X, y, X_val=None, y_val=None, progress=None)`` uses the given
validation split for early stopping / model selection, and carves
``validation_fraction`` of the training data (stratified) when none is given.
Nothing here touches the test split. ``progress(step, total, **figures)`` is
called after each epoch or candidate (the class attribute ``progress_unit``
says which). After fitting, every head has
``chosen_`` (what it chose), ``validation_curve_`` (validation accuracy per
candidate or epoch) and ``at_grid_edge_`` (whether the choice sat at the end of
its range). This module imports neither h5py nor torchvision.
"""

from __future__ import annotations

import copy
import os
import time
import warnings

import joblib
import numpy as np
import torch
from scipy.optimize import minimize, minimize_scalar
from scipy.special import log_softmax, softmax
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import train_test_split
from sklearn.utils import check_random_state
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import check_is_fitted, validate_data

from featkit.atomic import atomic_path
from featkit.blocks import ArrayBlocks
from featkit.devices import resolve_device
from featkit.errors import FeatkitError, UntrustedHeadWarning
from featkit.options import MLP


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


def _encode(classes: np.ndarray, y: np.ndarray) -> np.ndarray:
    idx = np.clip(np.searchsorted(classes, y), 0, len(classes) - 1)
    if not np.all(classes[idx] == y):
        unknown = sorted(set(np.asarray(y)[classes[idx] != y].tolist()))[:5]
        raise ValueError(f"labels {unknown} are not among the training classes {list(classes)}")
    return idx


def _log_loss(proba: np.ndarray, y_idx: np.ndarray) -> float:
    return float(-np.log(np.clip(proba[np.arange(len(y_idx)), y_idx], 1e-12, 1.0)).mean())


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


def _edge(choice, grid) -> bool:
    """Whether ``choice`` is the first or last of a grid of more than one value."""
    grid = sorted(grid)
    return len(grid) > 1 and choice in (grid[0], grid[-1])


class _BlockTrained(ClassifierMixin, BaseEstimator):
    """A head that trains from a block source: in memory (:meth:`fit`) or streamed (:meth:`fit_blocks`)."""

    def fit(self, X, y, X_val=None, y_val=None, progress=None):
        X, y = validate_data(self, X, y, dtype=np.float32)
        check_classification_targets(y)
        if X_val is not None:
            X_val = validate_data(self, X_val, dtype=np.float32, reset=False)
        seed = _seed(self.random_state)
        early = getattr(self, "early_stopping", True)
        Xt, yt, Xv, yv = _validation(X, y, X_val, y_val, self.validation_fraction, seed, early)
        return self._fit_source(self._memory_blocks(Xt, yt), Xv, yv, seed, progress)

    def fit_blocks(self, source, X_val=None, y_val=None, progress=None):
        """Train from ``source.blocks(rng)`` (shuffled blocks, never the whole matrix at once)."""
        self.n_features_in_ = source.n_features
        yv = None if y_val is None else np.asarray(y_val)
        return self._fit_source(source, X_val, yv, _seed(self.random_state), progress)


# -- the MLP head ------------------------------------------------------------------------------
class _MLP(torch.nn.Module):
    def __init__(self, n_in, hidden, n_out, dropout, scale):
        super().__init__()
        self.register_buffer("inv_scale", torch.tensor(1.0 / scale, dtype=torch.float32))
        layers, prev = [], n_in
        for h in hidden:
            layers += [torch.nn.Linear(prev, h), torch.nn.ReLU(), torch.nn.Dropout(dropout)]
            prev = h
        layers.append(torch.nn.Linear(prev, n_out))
        self.net = torch.nn.Sequential(*layers)

    def forward(self, x):  # logits; softmax is applied in predict_proba and inside the loss
        return self.net(x * self.inv_scale)


class MLPHead(_BlockTrained):
    """The study's dense head: Linear(d, 1024) -> ReLU -> Dropout -> Linear(1024, n_cities) -> softmax.

    Trained with Adam on cross-entropy. With ``early_stopping`` it scores the
    validation split after each epoch, stops after ``n_iter_no_change`` epochs
    without a better one (the study's patience of 7) and restores the best
    epoch's weights. "Better" is scikit-learn's ``MLPClassifier`` rule, higher
    validation accuracy, with ties (frequent on a small validation split) going
    to the lower validation loss. Watching the loss alone stops too early on
    real features: it rises as soon as the head grows confident on the photos
    it gets wrong, while accuracy is still climbing.

    The defaults (:class:`featkit.options.MLPOptions`: learning rate 1e-4,
    batch 64, dropout 0.5) were chosen on validation splits of real Street View
    and web photos. Inputs are divided by the training set's RMS (see the
    module docstring). Parameter names follow ``sklearn.neural_network.MLPClassifier``.
    """

    progress_unit = "epoch"  # what one progress step is, for fit's bar

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

    def _fit_source(self, source, Xv, yv, seed, progress=None):
        self.classes_ = np.unique(source.labels())
        _check_two_classes(self.classes_, type(self).__name__)
        dev = resolve_device(self.device)
        hidden = (self.hidden_layer_sizes,) if np.isscalar(self.hidden_layer_sizes) else tuple(self.hidden_layer_sizes)
        t0 = time.perf_counter()
        self.scale_ = source_rms(source)
        self.n_passes_ = 1
        with torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []):
            torch.manual_seed(seed)
            model = _MLP(source.n_features, hidden, len(self.classes_), self.dropout, self.scale_).to(dev)
            self._train(model, source, Xv, None if yv is None else _encode(self.classes_, yv), dev, seed, progress)
        self.fit_seconds_ = time.perf_counter() - t0
        self.model_ = model.cpu().eval()
        best = getattr(self, "best_epoch_", self.n_iter_)
        self.chosen_ = {"epochs": self.n_iter_, "best_epoch": best}
        self.validation_curve_ = list(self.validation_scores_)
        self.at_grid_edge_ = bool(self.validation_scores_) and best == self.max_iter  # still improving when stopped
        return self

    def _train(self, model, source, Xv, yv, dev, seed, progress):
        # The fused kernel: the default per-tensor Adam costs more than the matmuls on 25,088 x 1,024 weights.
        opt = torch.optim.Adam(model.parameters(), lr=self.learning_rate_init, weight_decay=self.alpha, fused=True)
        loss_fn = torch.nn.CrossEntropyLoss()
        rng = np.random.default_rng(seed)
        self.loss_curve_, self.validation_loss_curve_, self.validation_scores_ = [], [], []
        best, best_state, stale = None, None, 0
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
                if progress is not None:
                    progress(epoch + 1, self.max_iter, train_loss=self.loss_curve_[-1])
                continue
            v_loss, v_acc = self._evaluate(model, Xv, yv, dev)
            self.validation_loss_curve_.append(v_loss)
            self.validation_scores_.append(v_acc)
            if progress is not None:
                progress(epoch + 1, self.max_iter, train_loss=self.loss_curve_[-1], val_loss=v_loss, val_acc=v_acc)
            if self.verbose:
                print(f"epoch {epoch + 1}: train loss {self.loss_curve_[-1]:.4f} val loss {v_loss:.4f} val acc {v_acc:.4f}")
            key = (v_acc, -v_loss)  # accuracy first; ties go to the lower loss
            if best is None or key > best:
                best, stale = key, 0
                best_state = copy.deepcopy(model.state_dict())
                self.best_epoch_ = epoch + 1
            else:
                stale += 1
                if self.early_stopping and stale >= self.n_iter_no_change:
                    break
        if best_state is not None:
            model.load_state_dict(best_state)
            self.best_validation_score_, self.best_validation_loss_ = best[0], -best[1]

    def _evaluate(self, model, X, y, dev):
        proba = self._proba(model, X, dev)
        return _log_loss(proba, y), float((proba.argmax(1) == y).mean())

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
    """Shared by the linear heads: inputs divided by the training RMS (``scale_``)."""

    def predict(self, X):
        proba = self.predict_proba(X)  # checks fitted-ness first
        return self.classes_[proba.argmax(axis=1)]


class LogRegHead(_LinearHead):
    """Multinomial logistic regression (L2, L-BFGS); C chosen on the validation split.

    The C grid (1e-5 to 1e-1, strong to weak regularisation) is swept with each
    fit warm-started from the previous one, so later fits take few iterations;
    the C with the lowest validation log-loss wins (on a validation split of a
    few dozen photos, accuracy ties and jumps by whole photos; the loss ranks
    candidates smoothly). scikit-learn's L-BFGS keeps float32 input in float32;
    with ``copy=False`` the training matrix is scaled in place (half the
    memory at the study's size).
    """

    progress_unit = "candidate"

    def __init__(self, Cs=(1e-5, 1e-4, 1e-3, 1e-2, 1e-1), max_iter=300, tol=1e-4, validation_fraction=0.1, copy=True, random_state=None):
        self.Cs = Cs
        self.max_iter = max_iter
        self.tol = tol
        self.validation_fraction = validation_fraction
        self.copy = copy
        self.random_state = random_state

    def fit(self, X, y, X_val=None, y_val=None, progress=None):
        X, y = validate_data(self, X, y, dtype=np.float32)
        check_classification_targets(y)
        self.classes_ = np.unique(y)
        _check_two_classes(self.classes_, type(self).__name__)
        if X_val is not None:
            X_val = validate_data(self, X_val, dtype=np.float32, reset=False)
        Xt, yt, Xv, yv = _validation(X, y, X_val, y_val, self.validation_fraction, self.random_state)
        t0 = time.perf_counter()
        self.scale_ = array_rms(Xt)
        in_place = not self.copy and Xt is X and X.flags.writeable
        Xt = scale_rows(Xt, self.scale_, out=Xt if in_place else None)
        Xv = None if Xv is None else scale_rows(Xv, self.scale_)
        Cs = sorted(self.Cs)
        if Xv is None or len(Cs) == 1:  # nothing to select on: the middle of the grid
            Cs = [Cs[len(Cs) // 2]]
        m = LogisticRegression(C=Cs[0], max_iter=self.max_iter, tol=self.tol, warm_start=True, random_state=self.random_state)
        self.validation_scores_, self.validation_losses_, self.n_iter_, best = {}, {}, 0, None
        for i, C in enumerate(Cs):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", ConvergenceWarning)  # a capped fit is still a valid candidate
                m.set_params(C=C).fit(Xt, yt)
            self.n_iter_ += int(np.max(m.n_iter_))
            if Xv is not None:
                proba = m.predict_proba(Xv)
                score = float((m.classes_[proba.argmax(1)] == yv).mean())
                loss = _log_loss(proba, _encode(m.classes_, yv))
                self.validation_scores_[C], self.validation_losses_[C] = score, loss
                if progress is not None:
                    progress(i + 1, len(Cs), C=C, val_loss=loss, val_acc=score)
            else:
                loss = 0.0
            if best is None or loss < best:  # the lowest validation log-loss; ties keep the stronger C
                best, self.C_, self.model_ = loss, C, copy.deepcopy(m)
        self.n_passes_ = 1 + self.n_iter_  # the RMS, then one gradient pass per L-BFGS iteration
        self.best_validation_score_ = self.validation_scores_.get(self.C_)
        self.chosen_ = {"C": self.C_}
        self.validation_curve_ = dict(self.validation_scores_)
        self.at_grid_edge_ = _edge(self.C_, self.Cs) and Xv is not None
        self.fit_seconds_ = time.perf_counter() - t0
        return self

    def predict_proba(self, X):
        check_is_fitted(self, "model_")
        X = validate_data(self, X, dtype=np.float32, reset=False)
        return self.model_.predict_proba(scale_rows(X, self.scale_))


class LinearSVMHead(_BlockTrained, _LinearHead):
    """A linear SVM: one-vs-rest squared hinge loss with L2, class-weighted, solved to convergence by L-BFGS.

    The objective per city k is the mean over photos of ``w_ik * max(0, 1 - y_ik f_k(x_i))**2``
    plus ``alpha / 2 * ||W_k||**2``, where ``y_ik`` is +1 for photos of city k and -1
    otherwise, and ``w_ik`` gives city k's photos and all the others half the weight
    each: every one-vs-rest problem is balanced, so a small city's problem is not won
    by always answering "no" (how a city vanished from the predictions before) and
    the cities' scores share one scale for the argmax. ``alpha`` is
    chosen on the validation split's accuracy, sweeping strong to weak
    regularisation with each fit warm-started from the last.

    Why L-BFGS on the squared hinge rather than SGD on the hinge: SGD stopped
    after a few epochs far from the optimum, and which city lost out changed
    with the seed (0.29 to 0.40 on the same Street View split); the squared
    hinge is smooth, so a quasi-Newton solver converges, deterministically, in
    about a hundred passes. Each pass is one float32 matrix product over the
    training blocks, so :meth:`fit_blocks` trains from a cache larger than memory
    (one pass over the cache per iteration). Why not a kernel SVC: its fit grows
    quadratically to cubically with the number of photos and each kernel value
    costs 25,088 multiply-adds; nor liblinear's LinearSVC: it copies the data into
    float64 sparse nodes, about 13 GB at the study's size.

    Probabilities are ``softmax(decision / T)`` with one temperature ``T`` fitted
    on the validation log-loss: it keeps the SVM's ranking of cities, where
    per-city Platt sigmoids fitted on a handful of validation photos reorder them.
    """

    progress_unit = "candidate"

    def __init__(self, alphas=(1e-1, 1e-2, 1e-3, 1e-4), max_iter=100, tol=1e-5, validation_fraction=0.1, random_state=None):
        self.alphas = alphas
        self.max_iter = max_iter
        self.tol = tol
        self.validation_fraction = validation_fraction
        self.random_state = random_state

    def _memory_blocks(self, X, y):
        return ArrayBlocks(X, y)  # the whole matrix as one block: each pass is one matrix product

    def _objective(self, source, alpha, weight, n):
        """Loss and gradient of the weighted one-vs-rest squared hinge (float32 products, float64 sums)."""
        k, d = len(self.classes_), source.n_features

        inv = np.float32(1.0 / self.scale_)

        def f(theta):
            # (X / s) @ W == X @ (W / s): the scale is folded into the weights, so no scaled copy of X is made
            W = theta[: d * k].reshape(d, k).astype(np.float32)
            b = theta[d * k :].astype(np.float32)
            loss, gW, gb = 0.0, np.zeros((d, k), np.float64), np.zeros(k, np.float64)
            for Xb, yb in source.blocks(None):
                idx = _encode(self.classes_, yb)
                Y = -np.ones((len(idx), k), np.float32)
                Y[np.arange(len(idx)), idx] = 1.0
                viol = np.maximum(0.0, 1.0 - Y * (Xb @ (W * inv) + b))
                w = np.where(Y > 0, weight[0], weight[1])  # each city's problem: its photos against the rest, balanced
                loss += float((w * viol * viol).sum())
                G = (-2.0 * w * viol * Y).astype(np.float32)
                gW += (Xb.T @ G) * inv
                gb += G.sum(0)
            self.n_passes_ += 1
            Wd = theta[: d * k]
            value = loss / n + 0.5 * alpha * float(Wd @ Wd)
            grad = np.concatenate([(gW / n).ravel() + alpha * Wd, gb / n])
            return value, grad

        return f

    def _fit_source(self, source, Xv, yv, seed, progress=None):
        labels = source.labels()
        self.classes_, counts = np.unique(labels, return_counts=True)
        _check_two_classes(self.classes_, type(self).__name__)
        t0 = time.perf_counter()
        self.scale_ = source_rms(source)
        self.n_passes_ = 1
        n, k, d = len(labels), len(self.classes_), source.n_features
        # In city k's one-vs-rest problem its photos and the others' weigh half each, so every problem is
        # balanced and the k scores share one scale (a small city is not a "no" by default).
        weight = np.stack([n / (2.0 * counts), n / (2.0 * (n - counts))]).astype(np.float32)[:, None, :]
        Xv = None if Xv is None else scale_rows(Xv, self.scale_)
        alphas = sorted(self.alphas, reverse=True)
        if Xv is None:
            alphas = [alphas[len(alphas) // 2]]
        theta = np.zeros(d * k + k)
        self.validation_scores_, best_score, self.n_iter_ = {}, -1.0, 0
        for i, alpha in enumerate(alphas):
            res = minimize(self._objective(source, alpha, weight, n), theta, jac=True, method="L-BFGS-B",
                           options={"maxiter": self.max_iter, "gtol": self.tol})
            theta = res.x  # warm start for the next, weaker alpha
            self.n_iter_ += int(res.nit)
            self.coef_, self.intercept_ = theta[: d * k].reshape(d, k).astype(np.float32), theta[d * k :].astype(np.float32)
            score = float((self.classes_[self._decision(Xv).argmax(1)] == yv).mean()) if Xv is not None else float("nan")
            self.validation_scores_[alpha] = score
            if progress is not None:
                progress(i + 1, len(alphas), alpha=alpha, val_acc=score, iterations=int(res.nit))
            if Xv is None or score > best_score:  # ties keep the larger alpha (stronger regularisation)
                best_score, self.alpha_, best = score, alpha, (self.coef_, self.intercept_)
        self.coef_, self.intercept_ = best
        self.temperature_ = self._temperature(Xv, yv)
        self.best_validation_score_ = self.validation_scores_.get(self.alpha_)
        self.chosen_ = {"alpha": self.alpha_, "temperature": round(self.temperature_, 4)}
        self.validation_curve_ = dict(self.validation_scores_)
        self.at_grid_edge_ = _edge(self.alpha_, self.alphas) and Xv is not None
        self.fit_seconds_ = time.perf_counter() - t0
        return self

    def _decision(self, X_scaled: np.ndarray) -> np.ndarray:
        """One score per city (one-vs-rest); the predicted city has the largest.

        In float64, a block of rows at a time: a photo's scores then do not depend on which
        other photos share its batch (float32 matrix kernels sum in batch-dependent orders).
        """
        W, b = self.coef_.astype(np.float64), self.intercept_.astype(np.float64)
        out = np.empty((X_scaled.shape[0], W.shape[1]), dtype=np.float64)
        for i in range(0, X_scaled.shape[0], 1024):
            out[i : i + 1024] = X_scaled[i : i + 1024].astype(np.float64) @ W + b
        return out

    def _temperature(self, Xv, yv) -> float:
        """The T that minimises the validation log-loss of softmax(decision / T) (1 without a validation split)."""
        if Xv is None or len(yv) == 0:
            return 1.0
        d = self._decision(Xv)
        y = _encode(self.classes_, yv)
        res = minimize_scalar(lambda lt: -log_softmax(d / np.exp(lt), axis=1)[np.arange(len(y)), y].mean(), bounds=(-8, 8), method="bounded")
        return float(np.exp(res.x))

    def predict_proba(self, X):
        check_is_fitted(self, "coef_")
        X = validate_data(self, X, dtype=np.float32, reset=False)
        return softmax(self._decision(scale_rows(X, self.scale_)) / self.temperature_, axis=1)


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
