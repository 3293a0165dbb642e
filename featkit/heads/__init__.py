"""Classifier heads on cached features, all following scikit-learn's estimator contract, and their registry.

- :class:`MLPHead` (:mod:`featkit.heads.mlp`): the study's head (Linear -> ReLU -> Dropout -> Linear ->
  softmax) in torch, Adam, early stopping with the study's patience of 7 and the best epoch restored.
- :class:`LogRegHead` (:mod:`featkit.heads.linear`): multinomial logistic regression, its regularisation
  chosen on the validation split.
- :class:`LinearSVMHead` (:mod:`featkit.heads.linear`): a linear SVM (squared hinge, L-BFGS, balanced
  class weights), its regularisation chosen on the validation split, probabilities from one temperature
  fitted on it.

Every head divides the features by their training RMS and nothing else (why: :mod:`featkit.heads.base`).
The MLP and the SVM also train from a block source (``fit_blocks``, see :mod:`featkit.blocks`), so a
cache larger than memory streams from disk in shuffled blocks.

What ``featkit fit`` and ``compare`` need of a head, and what it may offer besides, is the recipe
"Adding a head" in ARCHITECTURE.md: ``fit(X, y, X_val=None, y_val=None)`` using the given validation
split (never the test split), ``predict_proba``, ``classes_`` and ``chosen_``; optionally a ``progress``
parameter of ``fit`` (``progress(step, total, **figures)`` after each epoch or candidate, the class
attribute ``progress_unit`` saying which), ``validation_curve_`` (validation accuracy per candidate or
epoch), ``at_grid_edge_`` (whether the choice sat at the end of its range), ``n_passes_``, ``fit_blocks``,
and ``device`` / ``copy`` parameters. The built-in heads have all of them.

Saving and loading fitted heads is the cache folder's (:mod:`featkit.cache.shelf`): only files in the heads
folder's ``manifest.json``, with their SHA-256, are unpickled. This package imports neither h5py nor torchvision.
"""

from __future__ import annotations

import inspect

from sklearn.base import BaseEstimator

from featkit.errors import FeatkitError
from featkit.heads.base import BlockTrained, Head, array_rms, scale_rows, source_rms
from featkit.heads.linear import LinearSVMHead, LogRegHead
from featkit.heads.mlp import MLPHead

__all__ = [
    "HEADS", "HEAD_NAMES", "BlockTrained", "Head", "LinearSVMHead", "LogRegHead", "MLPHead",
    "array_rms", "can_stream", "head_name", "head_names", "make_head", "reports_progress",
    "scale_rows", "source_rms",
]

# The registry: a new head is one estimator class plus one line here (ARCHITECTURE.md, "Adding a head").
# Nothing else in featkit names a head: the CLI, training, evaluation and the report read this.
HEADS = {
    "logreg": LogRegHead,
    "mlp": MLPHead,
    "svm": LinearSVMHead,
}


def head_names() -> tuple[str, ...]:
    """The registered head names, in the registry's order (read now: a head registered at run time counts)."""
    return tuple(HEADS)


def __getattr__(name: str):
    if name == "HEAD_NAMES":  # always the registry's names, never a copy taken at import
        return head_names()
    if name == "_MLP":  # an MLP head saved before the heads became a package pickled its network as featkit.heads._MLP
        from featkit.heads import mlp

        return mlp._MLP
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def head_name(cls: type) -> str:
    """The registry name of a head class (the CLI's MLP options go to whichever name :class:`MLPHead` has)."""
    for name, registered in HEADS.items():
        if registered is cls:
            return name
    raise FeatkitError(f"{cls.__name__} is not in the heads registry (featkit.heads.HEADS)")


def make_head(name: str, *, random_state: int | None = 0, **params) -> BaseEstimator:
    """A fresh head by name (one of :data:`HEAD_NAMES`); ``params`` it does not take are refused."""
    if name not in HEADS:
        raise FeatkitError(f"unknown head {name!r}; choose one of: {', '.join(head_names())} (or all)")
    return HEADS[name](random_state=random_state, **params)


def can_stream(head: BaseEstimator) -> bool:
    """Whether ``head`` trains from a block source (a cache larger than memory)."""
    return callable(getattr(head, "fit_blocks", None))


def reports_progress(head: BaseEstimator, method: str = "fit") -> bool:
    """Whether ``head``'s ``fit`` (or ``fit_blocks``) takes a ``progress`` callback (an optional capability)."""
    try:
        params = inspect.signature(getattr(head, method)).parameters
    except (TypeError, ValueError):
        return False
    return "progress" in params or any(p.kind is p.VAR_KEYWORD for p in params.values())
