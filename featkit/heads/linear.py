"""The linear heads: :class:`LogRegHead` (multinomial logistic regression) and :class:`LinearSVMHead`
(a linear SVM), each choosing its regularisation on the validation split. Their defaults:
:class:`featkit.options.LogRegOptions`, :class:`featkit.options.SVMOptions`."""

from __future__ import annotations

import copy
import time
import warnings

import numpy as np
from scipy.optimize import minimize, minimize_scalar
from scipy.special import log_softmax, softmax
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import check_is_fitted, validate_data

from featkit.blocks import ArrayBlocks
from featkit.heads.base import (
    BlockTrained, Head, array_rms, check_two_classes, encode_labels, grid_edge, log_loss, scale_rows, source_rms, validation_split,
)
from featkit.options import LOGREG, SVM


class _LinearHead(Head):
    """Shared by the linear heads: inputs divided by the training RMS (``scale_``)."""


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

    def __init__(
        self,
        Cs=LOGREG.Cs,
        max_iter=LOGREG.max_iter,
        tol=LOGREG.tol,
        validation_fraction=LOGREG.validation_fraction,
        copy=LOGREG.copy,
        random_state=None,
    ):
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
        check_two_classes(self.classes_, type(self).__name__)
        if X_val is not None:
            X_val = validate_data(self, X_val, dtype=np.float32, reset=False)
        Xt, yt, Xv, yv = validation_split(X, y, X_val, y_val, self.validation_fraction, self.random_state)
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
                loss = log_loss(proba, encode_labels(m.classes_, yv))
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
        self.at_grid_edge_ = grid_edge(self.C_, self.Cs) and Xv is not None
        self.fit_seconds_ = time.perf_counter() - t0
        return self

    def predict_proba(self, X):
        check_is_fitted(self, "model_")
        X = validate_data(self, X, dtype=np.float32, reset=False)
        return self.model_.predict_proba(scale_rows(X, self.scale_))


class LinearSVMHead(BlockTrained, _LinearHead):
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

    def __init__(
        self,
        alphas=SVM.alphas,
        max_iter=SVM.max_iter,
        tol=SVM.tol,
        validation_fraction=SVM.validation_fraction,
        random_state=None,
    ):
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
                idx = encode_labels(self.classes_, yb)
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
        check_two_classes(self.classes_, type(self).__name__)
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
        self.at_grid_edge_ = grid_edge(self.alpha_, self.alphas) and Xv is not None
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
        y = encode_labels(self.classes_, yv)
        res = minimize_scalar(lambda lt: -log_softmax(d / np.exp(lt), axis=1)[np.arange(len(y)), y].mean(), bounds=(-8, 8), method="bounded")
        return float(np.exp(res.x))

    def predict_proba(self, X):
        check_is_fitted(self, "coef_")
        X = validate_data(self, X, dtype=np.float32, reset=False)
        return softmax(self._decision(scale_rows(X, self.scale_)) / self.temperature_, axis=1)
