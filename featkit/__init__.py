"""featkit: learn where a photo was taken from frozen-CNN features and classical heads."""

__version__ = "0.1.0"
