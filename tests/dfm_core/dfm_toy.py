"""A tiny target with an exactly known factorised posterior, shared by the sampler and ELBO tests.

D = 2 positions, 3 data tokens (0, 1, 2), so the target q is a random joint over 9 states. A mask
path adds the mask token 3 (never a data token). The exact posterior of eq 10,

    p_{1|t}^i(x1^i | x) = sum_{x1} delta_{x1^i} p_t(x | x1) q(x1) / p_t(x),  p_t(x | x1) = prod_i p_t(x^i | x1^i),

is computed by enumerating the 9 states of x1, from ``path.probs`` alone.
"""

from __future__ import annotations

import numpy as np
import torch

N_DATA = 3
D = 2
MASK = 3


def random_target(seed: int, floor: float = 0.02) -> torch.Tensor:
    """A random joint q[a, b] over the 3 x 3 data states (a Dirichlet draw mixed with a floor)."""
    q = torch.from_numpy(np.random.default_rng(seed).dirichlet(np.ones(N_DATA * N_DATA)))
    q = (1.0 - floor * N_DATA * N_DATA) * q + floor
    return q.reshape(N_DATA, N_DATA)


def exact_posterior(path, q: torch.Tensor, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """p_{1|t}^i(v | x) for v in the path's vocabulary (zero on non-data tokens): (B, 2, V) float64."""
    B = x.shape[0]
    V = path.vocab_size
    t = torch.as_tensor(t, dtype=torch.float64).reshape(-1).expand(B)
    if bool((t == t[0]).all()):  # one time for the whole batch (the sampler): a (v, V) table
        table = path.probs(torch.arange(N_DATA), t[:1].expand(N_DATA)).double()  # p_t(. | v)
        lik = table.T[x]  # lik[b, i, v] = p_t(x^i_b | x1^i = v)
    else:
        cand = torch.arange(N_DATA).expand(B, N_DATA)
        probs = path.probs(cand, t.unsqueeze(-1).expand(B, N_DATA)).double()  # (B, v, V)
        lik = torch.stack(
            [probs.gather(-1, x[:, i, None, None].expand(B, N_DATA, 1)).squeeze(-1) for i in range(D)], 1
        )
    joint = q.unsqueeze(0) * lik[:, 0, :, None] * lik[:, 1, None, :]  # (B, a, b)
    joint = joint / joint.sum((1, 2), keepdim=True).clamp_min(1e-300)
    post = torch.zeros(B, D, V, dtype=torch.float64)
    post[:, 0, :N_DATA] = joint.sum(2)
    post[:, 1, :N_DATA] = joint.sum(1)
    return post


def exact_model(path, q: torch.Tensor, epsilon: float = 0.0):
    """model(x, t) -> log of the exact posterior, optionally mixed with uniform over data tokens."""

    def model(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        post = exact_posterior(path, q, x, t)
        if epsilon > 0:
            uni = torch.zeros_like(post)
            uni[..., :N_DATA] = 1.0 / N_DATA
            post = (1.0 - epsilon) * post + epsilon * uni
        return post.log()

    return model


def chi2_pvalue(tokens: torch.Tensor, q: torch.Tensor) -> tuple[float, float]:
    """Chi-square goodness of fit of samples (N, 2) of data tokens against the joint q (3, 3)."""
    from scipy.stats import chisquare

    assert ((tokens >= 0) & (tokens < N_DATA)).all(), "samples contain non-data tokens"
    idx = tokens[:, 0] * N_DATA + tokens[:, 1]
    counts = torch.bincount(idx, minlength=N_DATA * N_DATA).double()
    expected = q.reshape(-1) * counts.sum()
    res = chisquare(counts.numpy(), expected.numpy())
    return float(res.statistic), float(res.pvalue)
