"""featkit: learn where a photo was taken from frozen-CNN features and classical heads.

The public API (``extract``, ``fit``, ``compare``, ``predict`` with ``Predictor``
and ``Prediction``, ``FeatkitError``, the option classes) is imported lazily, so ``import featkit`` does not import torch.
"""

__version__ = "0.1.0"

_LAZY = {
    "extract": "featkit.api",
    "fit": "featkit.api",
    "split": "featkit.api",
    "compare": "featkit.api",
    "predict": "featkit.api",
    "Predictor": "featkit.prediction",
    "Prediction": "featkit.prediction",
    "FeatkitError": "featkit.errors",
    "ExtractOptions": "featkit.options",
    "BackboneOptions": "featkit.options",
    "MLPOptions": "featkit.options",
}
__all__ = ["__version__", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'featkit' has no attribute {name!r}")


def __dir__():
    return sorted(__all__)
