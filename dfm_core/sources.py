"""Source distributions p(x) of mixture paths: mask, uniform, the data-statistics family (eq 38), any PMF.

A source is a PMF over the vocabulary, shape (V,), shared by all positions (eq 38 factorises).
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = [
    "mask_source",
    "uniform_source",
    "data_statistics_source",
    "token_statistics",
    "pmf_source",
    "sample_source",
]


def mask_source(vocab_size: int, mask_id: int) -> Tensor:
    """delta on the mask token: p(x) = delta_m(x)."""
    if not 0 <= mask_id < vocab_size:
        raise ValueError(f"mask_id {mask_id} outside the vocabulary of size {vocab_size}")
    pmf = torch.zeros(vocab_size, dtype=torch.float64)
    pmf[mask_id] = 1.0
    return pmf


def uniform_source(vocab_size: int, support: Tensor | None = None) -> Tensor:
    """Uniform PMF over the vocabulary, or over ``support`` (bool mask or index tensor) if given."""
    pmf = torch.zeros(vocab_size, dtype=torch.float64)
    if support is None:
        pmf[:] = 1.0
    else:
        pmf[support] = 1.0
    if pmf.sum() == 0:
        raise ValueError("uniform source over an empty support")
    return pmf / pmf.sum()


def token_statistics(tokens: Tensor, vocab_size: int, smoothing: float = 1.0) -> Tensor:
    """Empirical token frequencies p_stats with additive smoothing (keeps log p_stats finite)."""
    flat = tokens.reshape(-1).long()
    if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= vocab_size):
        raise ValueError(f"tokens outside [0, {vocab_size}): min {int(flat.min())}, max {int(flat.max())}")
    counts = torch.bincount(flat, minlength=vocab_size).to(torch.float64)
    counts = counts[:vocab_size] + smoothing
    return counts / counts.sum()


def data_statistics_source(p_stats: Tensor, beta0: float) -> Tensor:
    """The single-parameter source family of eq 38: p = softmax(-beta0 log p_stats).

    beta0 = -1 gives p_stats, beta0 = 0 the uniform PMF, and beta0 -> inf a uniform PMF on the least
    probable tokens (behaving like a mask source).
    """
    p_stats = torch.as_tensor(p_stats, dtype=torch.float64)
    if (p_stats <= 0).any():
        raise ValueError("p_stats must be strictly positive (smooth the counts)")
    return torch.softmax(-float(beta0) * torch.log(p_stats), dim=-1)


def pmf_source(pmf: Tensor) -> Tensor:
    """Validate and normalise an arbitrary PMF given as a (V,) tensor."""
    pmf = torch.as_tensor(pmf, dtype=torch.float64)
    if pmf.ndim != 1 or not torch.isfinite(pmf).all() or (pmf < 0).any() or pmf.sum() <= 0:
        raise ValueError("a source PMF must be a finite, non-negative 1-D tensor with positive mass")
    return pmf / pmf.sum()


def sample_source(
    pmf: Tensor,
    shape: tuple[int, ...],
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> Tensor:
    """Draw i.i.d. tokens from a source PMF, returning a long tensor of ``shape``."""
    n = 1
    for s in shape:
        n *= s
    dev = generator.device if generator is not None else (device or "cpu")
    idx = torch.multinomial(pmf.to(device=dev, dtype=torch.float64), n, replacement=True, generator=generator)
    return idx.reshape(shape).to(device if device is not None else dev)
