"""Which torch device a run uses; shared by extraction and the heads."""

from __future__ import annotations

import torch

from featkit.errors import FeatkitError


def resolve_device(device: str = "auto") -> torch.device:
    """``auto`` -> CUDA when a GPU is visible, else CPU; ``cuda`` without a GPU is an error."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise FeatkitError(f"`device` {device} asked for, but no CUDA GPU is visible to torch; use `device` cpu or `device` auto", param="device")
        return torch.device(device)
    if device == "cpu":
        return torch.device("cpu")
    raise FeatkitError(f"unknown `device` {device!r}; choose one of: auto, cpu, cuda (or cuda:N)", param="device")
