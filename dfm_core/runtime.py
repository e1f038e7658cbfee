"""Where code runs and how it is seeded: :func:`resolve_device`, :func:`seed_everything`, and
:func:`keeps_global_rng`, which gives a caller its global random states back after a seeded run."""

from __future__ import annotations

import functools
import hashlib
import random
from collections.abc import Callable
from typing import ParamSpec, TypeVar

import numpy as np
import torch

__all__ = ["batch_seed", "keeps_global_rng", "resolve_device", "seed_everything"]

P = ParamSpec("P")
R = TypeVar("R")


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


def keeps_global_rng(fn: Callable[P, R]) -> Callable[P, R]:
    """Decorate a function that seeds the global RNGs (a training run seeds python's, numpy's and torch's
    from its own seed) so that its caller gets their states back, also after an exception: a notebook's
    ``torch.rand`` after training goes on from where the user's stream was. A run keeps its own RNG
    state in its checkpoints, so resuming is unaffected."""

    @functools.wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        py_state, np_state = random.getstate(), np.random.get_state()
        cuda = list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []
        try:
            with torch.random.fork_rng(devices=cuda):
                return fn(*args, **kwargs)
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)

    return wrapper


def batch_seed(seed: int, batch: int, salt: str = "") -> int:
    """A 63-bit seed for batch ``batch`` of a run seeded with ``seed``: each batch draws from a generator of
    its own, so a resumed run (or one batch alone) reproduces exactly what an uninterrupted run draws.
    ``salt`` keeps two apps' streams apart for the same seed."""
    digest = hashlib.sha256(f"{salt}{seed}:{batch}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)
