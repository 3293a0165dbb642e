"""Which torch device a run uses; shared by extraction and the heads."""

from __future__ import annotations

import re

import torch

from featkit.errors import FeatkitError

_CUDA = re.compile(r"^cuda(?::(\d+))?$")


def resolve_device(device: str = "auto") -> torch.device:
    """``auto`` -> CUDA when a GPU is visible, else CPU; ``cuda`` without a GPU, or ``cuda:N`` past the
    GPUs there are, is an error."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cpu":
        return torch.device("cpu")
    m = _CUDA.match(device) if isinstance(device, str) else None
    if m is None:
        raise FeatkitError(f"unknown `device` {device!r}; choose one of: auto, cpu, cuda (or cuda:N)", param="device")
    if not torch.cuda.is_available():
        raise FeatkitError(f"`device` {device} asked for, but no CUDA GPU is visible to torch; use `device` cpu or `device` auto", param="device")
    n = torch.cuda.device_count()
    if m.group(1) is not None and int(m.group(1)) >= n:
        raise FeatkitError(f"`device` {device} asked for, but torch sees {n} CUDA GPU(s): {'cuda:0' if n == 1 else f'cuda:0 to cuda:{n - 1}'}", param="device")
    return torch.device(device)
