"""Drawing one index per row of a (..., V) table of non-negative weights (a categorical distribution).

Shared by the sampler (posterior and jump draws, Algorithm 1) and the paths (x_t ~ p_t(. | x1), eq 1).
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["categorical"]


def categorical(
    probs: Tensor, generator: torch.Generator | None = None, dtype: torch.dtype = torch.float64
) -> Tensor:
    """Draw one index per row of unnormalised non-negative weights (..., V) by inverse CDF.

    ``dtype`` sets the precision of the draw: float64 avoids the truncation bias of low-precision
    Gumbel/categorical sampling noted for masked models (Zheng et al., 2024).
    """
    cdf = probs.cumsum(-1, dtype=dtype)
    total = cdf[..., -1:]
    u = torch.rand(total.shape, generator=generator, device=probs.device, dtype=dtype) * total
    idx = torch.searchsorted(cdf, u, right=True)
    return idx.clamp_max(probs.shape[-1] - 1).squeeze(-1)
