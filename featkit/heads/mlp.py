"""The MLP head: the study's dense head (Linear -> ReLU -> Dropout -> Linear -> softmax) in torch, Adam,
early stopping with the study's patience of 7 and the best epoch restored; trains in memory or streamed
from a block source (:mod:`featkit.blocks`). Its defaults: :class:`featkit.options.MLPOptions`."""

from __future__ import annotations

import copy
import time

import numpy as np
import torch
from sklearn.utils.validation import check_is_fitted, validate_data

from featkit.blocks import ArrayBlocks
from featkit.devices import resolve_device
from featkit.heads.base import BlockTrained, check_two_classes, encode_labels, log_loss, source_rms
from featkit.options import MLP


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


class MLPHead(BlockTrained):
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
        early_stopping=MLP.early_stopping,
        n_iter_no_change=MLP.n_iter_no_change,
        validation_fraction=MLP.validation_fraction,
        device=MLP.device,
        random_state=None,
        verbose=MLP.verbose,
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
        check_two_classes(self.classes_, type(self).__name__)
        dev = resolve_device(self.device)
        hidden = (self.hidden_layer_sizes,) if np.isscalar(self.hidden_layer_sizes) else tuple(self.hidden_layer_sizes)
        t0 = time.perf_counter()
        self.scale_ = source_rms(source)
        self.n_passes_ = 1
        with torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []):
            torch.manual_seed(seed)
            model = _MLP(source.n_features, hidden, len(self.classes_), self.dropout, self.scale_).to(dev)
            self._train(model, source, Xv, None if yv is None else encode_labels(self.classes_, yv), dev, seed, progress)
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
                yb_t = torch.as_tensor(encode_labels(self.classes_, yb), dtype=torch.long, device=dev)
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
        return log_loss(proba, y), float((proba.argmax(1) == y).mean())

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
