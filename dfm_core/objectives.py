"""Training objectives and likelihood bounds.

* :func:`cross_entropy_loss`: eq 11, for any path.
* :func:`mixture_elbo_integrand` / :func:`mixture_elbo_loss`: the mixture-path ELBO of eq 37, usable as a
  training loss with t ~ U[0, 1 - 1e-3] (Appendix E.1).
* :func:`general_elbo_integrand`: the ELBO of eq 36 for any path and velocity; costs O(V^2) per position,
  meant for small vocabularies.
* :func:`fair_elbo`: the evaluation of Appendix E.1: change of variables to a reference kappa
  (itself for token-independent schedulers, the KO scheduler with Omega = pi/4 otherwise) and 1024
  stratified points (eq 98-106); returns nats per token.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from dfm_core.paths import MixturePath, ProbabilityPath
from dfm_core.sampler import whole_number
from dfm_core.schedulers import KineticOptimalScheduler, Scheduler
from dfm_core.velocities import KineticOptimalVelocity, ProbabilityVelocity

__all__ = [
    "cross_entropy_loss",
    "mixture_elbo_integrand",
    "mixture_elbo_loss",
    "general_elbo_integrand",
    "fair_elbo",
    "FairELBOResult",
    "sample_training_time",
]

ModelFn = Callable[[Tensor, Tensor], Tensor]


def sample_training_time(
    batch_size: int,
    t_max: float = 1.0,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> Tensor:
    """t ~ U[0, t_max] per sequence (t_max = 1 - 1e-3 for the ELBO loss, E.1)."""
    return torch.rand(batch_size, generator=generator, device=device) * t_max


def cross_entropy_loss(logits: Tensor, x1: Tensor, valid: Tensor | None = None) -> Tensor:
    """Eq 11: mean over (valid) positions of -log p_{1|t}(x1 | x_t).

    Args:
        logits: (B, L, V); x1: (B, L) long; valid: (B, L) bool (padding excluded) or None.
    """
    logp = torch.log_softmax(logits.float(), dim=-1)
    nll = -logp.gather(-1, x1.unsqueeze(-1)).squeeze(-1)
    if valid is None:
        return nll.mean()
    valid = valid.to(nll.dtype)
    return (nll * valid).sum() / valid.sum().clamp_min(1.0)


def _token_rates(scheduler: Scheduler, t: Tensor, pos_ndim: int, V: int, device, dtype) -> Tensor:
    """lambda_t(y) = kappa'_t(y) / (1 - kappa_t(y)) for every token y.

    Shaped to broadcast against (B, L, V) without materialising it: a (B,) time gives (B, 1, V).
    """
    tt = t.to(device=device, dtype=dtype)
    while tt.ndim < pos_ndim:
        tt = tt.unsqueeze(-1)
    tt = tt.unsqueeze(-1)
    tt = tt.expand(*tt.shape[:-1], V)
    if scheduler.token_dependent:
        return scheduler.rate(tt, torch.arange(V, device=device).expand(tt.shape))
    return scheduler.rate(tt)


def mixture_elbo_integrand(logits: Tensor, x1: Tensor, xt: Tensor, t: Tensor, path: MixturePath) -> Tensor:
    """Integrand of eq 37 per position (B, L); its integral over t lower-bounds log p_1(x1).

    .. math::
        \\lambda(x_t) p(x_t|x_t) - \\sum_y \\lambda(y) p(y|x_t)
        + (1 - \\delta_{x_1}(x_t)) \\lambda(x_1) (1 + \\log p(x_1|x_t)),\\quad \\lambda = \\dot\\kappa / (1-\\kappa)

    Args:
        logits: model logits (B, L, V); x1, xt: (B, L) long; t: (B,) times in [0, 1).
    """
    logp = torch.log_softmax(logits.float(), dim=-1)
    post = logp.exp()
    B, L, V = logits.shape
    lam = _token_rates(path.scheduler, t, 2, V, logits.device, torch.float32)
    lam_post = torch.where(post > 0, lam * post, torch.zeros_like(post))
    lam = lam.expand(B, L, V)
    at = lambda m: m.gather(-1, xt.unsqueeze(-1)).squeeze(-1)  # noqa: E731
    lam_x1 = lam.gather(-1, x1.unsqueeze(-1)).squeeze(-1)
    logp_x1 = logp.gather(-1, x1.unsqueeze(-1)).squeeze(-1)
    moved = (xt != x1).to(post.dtype)
    return at(lam_post) - lam_post.sum(-1) + moved * lam_x1 * (1.0 + logp_x1)


def mixture_elbo_loss(
    logits: Tensor,
    x1: Tensor,
    xt: Tensor,
    t: Tensor,
    path: MixturePath,
    valid: Tensor | None = None,
    pin_known: bool = False,
) -> Tensor:
    """Negative eq 37 integrand averaged over (valid) positions: an unbiased training loss (nats/token).

    ``pin_known``: the loss of the model whose posterior is exact where the path knows it
    (:meth:`MixturePath.known_tokens`, e.g. unmasked tokens): the integrand is 0 there, and those
    positions still count in the average. The same value as pinning the logits, without touching them.
    """
    neg = -mixture_elbo_integrand(logits, x1, xt, t, path)
    if pin_known:
        neg = neg.masked_fill(path.known_tokens(xt), 0.0)
    if valid is None:
        return neg.mean()
    valid = valid.to(neg.dtype)
    return (neg * valid).sum() / valid.sum().clamp_min(1.0)


def general_elbo_integrand(
    posterior: Tensor,
    x1: Tensor,
    xt: Tensor,
    t: Tensor,
    path: ProbabilityPath,
    velocity: ProbabilityVelocity | None = None,
) -> Tensor:
    """Integrand of eq 36 per position (...), for any path and conditional velocity.

    The marginal velocity u(y, x_t) = sum_v u(y, x_t | v) p_{1|t}(v | x_t) (eq 9) is formed for every
    candidate v, so this costs O(V^2) per position: use it for small vocabularies.

    Args:
        posterior: p_{1|t}(. | x_t), shape (..., V); x1, xt: (...) long; t: broadcastable to xt.
    """
    velocity = velocity or KineticOptimalVelocity()
    V = posterior.shape[-1]
    dtype = torch.float64
    post = posterior.to(dtype)
    tt = torch.as_tensor(t, device=xt.device, dtype=dtype)
    while tt.ndim < xt.ndim:
        tt = tt.unsqueeze(-1)
    tt = tt.expand(xt.shape)
    # conditional rates out of x_t for every possible x1 = v: (..., V[v], V[y])
    cand = torch.arange(V, device=xt.device).expand(*xt.shape, V)
    t_c = tt.unsqueeze(-1).expand(*xt.shape, V)
    p_c = path.probs(cand, t_c).to(dtype)
    dp_c = path.probs_dt(cand, t_c).to(dtype)
    z_c = xt.unsqueeze(-1).expand(*xt.shape, V)
    rates_c = velocity.rates_from(p_c, dp_c, z_c, t_c)
    marginal = (post.unsqueeze(-1) * rates_c).sum(-2)
    cond = rates_c.gather(-2, x1[..., None, None].expand(*xt.shape, 1, V)).squeeze(-2)
    zi = xt.unsqueeze(-1)
    diag = marginal.gather(-1, zi).squeeze(-1) - cond.gather(-1, zi).squeeze(-1)
    off = torch.ones_like(cond, dtype=torch.bool).scatter(-1, zi, False) & (cond > 0)
    safe_c = torch.where(off, cond, torch.ones_like(cond))
    safe_m = torch.where(off, marginal, torch.ones_like(marginal))
    logs = torch.where(off, safe_c * (torch.log(safe_m) - torch.log(safe_c)), torch.zeros_like(cond))
    return diag + logs.sum(-1)


@dataclass
class FairELBOResult:
    """Negative ELBO of Appendix E.1: total nats per sequence (B,) and nats per token (scalar)."""

    nats_per_sequence: Tensor
    nats_per_token: float
    num_tokens: int

    @property
    def perplexity_bound(self) -> float:
        return math.exp(self.nats_per_token)


@torch.no_grad()
def fair_elbo(
    model: ModelFn,
    x1: Tensor,
    path: MixturePath,
    n_points: int = 1024,
    kappa_max: float = 1 - 1e-4,
    reference: Scheduler | None = None,
    valid: Tensor | None = None,
    generator: torch.Generator | None = None,
    chunk: int | None = None,
) -> FairELBOResult:
    """Fair ELBO evaluation of Appendix E.1 (eq 98-106) for a mixture path (a :class:`FairELBOResult`:
    nats per sequence and per token).

    The time integral of eq 37 is taken in the variable kappa of a reference scheduler: the path's own
    scheduler when it is token-independent (eq 98-99), else the KO scheduler with Omega = pi/4
    (eq 101-105). Stratified points kappa_j = (j + eps) kappa_max / n (eq 106), t_j = t(kappa_j), and
    dt = dkappa / kappa'(t_j).

    Args:
        model: ``model(x_t (B, L), t (B,)) -> logits (B, L, V)``.
        x1: data (B, L); valid: (B, L) bool positions that count (padding excluded).
        chunk: evaluate this many kappa points per model call batch (default: one point per call).
    """
    if reference is None:
        reference = (
            path.scheduler
            if not path.scheduler.token_dependent
            else KineticOptimalScheduler(omega=math.pi / 4)
        )
    n_points = whole_number(n_points, "n_points")
    B, L = x1.shape
    device = x1.device
    eps = torch.rand(n_points, generator=generator, device=device, dtype=torch.float64)
    kappa = (torch.arange(n_points, device=device, dtype=torch.float64) + eps) * (kappa_max / n_points)
    t = reference.t_of_kappa(kappa)
    weight = (kappa_max / n_points) / reference.d_kappa(t)
    total = torch.zeros(B, dtype=torch.float64, device=device)
    valid_f = torch.ones(B, L, device=device) if valid is None else valid.to(torch.float32)
    chunk = chunk or 1
    for start in range(0, n_points, chunk):
        idx = torch.arange(start, min(start + chunk, n_points), device=device)
        n = len(idx)
        tb = t[idx].to(torch.float32).repeat_interleave(B)
        xb = x1.repeat(n, 1)
        xt = path.sample(xb, tb, generator=generator)
        logits = model(xt, tb)
        integ = mixture_elbo_integrand(logits, xb, xt, tb, path) * valid_f.repeat(n, 1)
        per_seq = integ.sum(-1).double().view(n, B)
        total += (weight[idx].unsqueeze(-1) * per_seq).sum(0)
    num_tokens = int(valid_f.sum().item())
    nats = -total
    return FairELBOResult(
        nats_per_sequence=nats, nats_per_token=float(nats.sum() / max(num_tokens, 1)), num_tokens=num_tokens
    )
