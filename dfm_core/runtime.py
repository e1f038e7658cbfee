"""Where code runs and how it is seeded: :func:`resolve_device` and :func:`seed_everything`."""

from __future__ import annotations

import random

import numpy as np
import torch

__all__ = ["resolve_device", "seed_everything"]


def seed_everything(seed: int) -> None:
    """Seed python's ``random``, numpy and torch (CPU and all CUDA devices)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """``"auto"`` (or None) -> CUDA if available else CPU; otherwise ``torch.device(device)``.

    Raises:
        ValueError: an unknown device string, or a CUDA device on a machine that has none.
    """
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise ValueError(f"unknown device {device!r}: use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            why = "this torch build has no CUDA" if torch.version.cuda is None else "no GPU is visible"
            raise ValueError(
                f"device {device!r} asked for, but CUDA is not available ({why}); use cpu or auto"
            )
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(
                f"device {device!r} asked for, but only {torch.cuda.device_count()} GPU(s) exist"
            )
    return dev
