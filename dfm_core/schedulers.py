"""Schedulers kappa_t of mixture paths (eq 2) and beta_t of metric-induced paths (eq 108).

A mixture scheduler maps time ``t`` (and, for token-dependent schedulers, the target token ``x1``)
to ``kappa_t(x1)`` with ``kappa_0 = 0`` and ``kappa_1 = 1``. Every scheduler here gives kappa, its
time derivative and its inverse in t, all batched: ``t`` broadcasts against ``x1``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = [
    "Scheduler",
    "PolynomialScheduler",
    "LinearScheduler",
    "CosineScheduler",
    "KineticOptimalScheduler",
    "BetaSchedule",
    "make_scheduler",
]

_OMEGA_EPS = 1e-4


class Scheduler:
    """Base class of kappa_t schedulers.

    Subclasses implement :meth:`kappa`, :meth:`d_kappa` and :meth:`t_of_kappa`. ``x1`` is ignored by
    token-independent schedulers; ``token_dependent`` tells callers whether it matters.

    ``t`` and ``x1`` broadcast by torch's rules (trailing dimensions first): a per-sequence time (B,)
    against tokens (B, L) must be given as (B, 1). The paths (:class:`~dfm_core.paths.MixturePath`) align
    a (B,) time with the batch dimension themselves before they call a scheduler.
    """

    token_dependent: bool = False

    def kappa(self, t: Tensor, x1: Tensor | None = None) -> Tensor:
        raise NotImplementedError

    def d_kappa(self, t: Tensor, x1: Tensor | None = None) -> Tensor:
        raise NotImplementedError

    def t_of_kappa(self, kappa: Tensor, x1: Tensor | None = None) -> Tensor:
        raise NotImplementedError

    def rate(self, t: Tensor, x1: Tensor | None = None) -> Tensor:
        """lambda_t(x1) = kappa'_t / (1 - kappa_t), the jump rate of eq 72 (inf at t = 1)."""
        kappa = self.kappa(t, x1)
        rate = self.d_kappa(t, x1) / (1.0 - kappa)
        return rate.masked_fill(kappa >= 1.0, float("inf"))  # 0 / 0 where kappa' vanishes at t = 1 (KO)

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class PolynomialScheduler(Scheduler):
    """kappa_t = t^n (n = 1 is the linear scheduler of DFM), n >= 1: below 1 the jump rate
    kappa'/(1 - kappa) is infinite at t = 0, which the sampler's step (Appendix A, the rate at the step's
    start) cannot take: its first step would move every position at once."""

    def __init__(self, n: float = 1.0) -> None:
        if not n >= 1:  # also refuses NaN
            raise ValueError(
                f"polynomial scheduler exponent must be >= 1 (t^n with n < 1 has an infinite jump rate at "
                f"t = 0, which the sampler cannot step over), got {n}"
            )
        self.n = float(n)

    def kappa(self, t: Tensor, x1: Tensor | None = None) -> Tensor:
        return _broadcast(t, x1).clamp(0.0, 1.0) ** self.n

    def d_kappa(self, t: Tensor, x1: Tensor | None = None) -> Tensor:
        t = _broadcast(t, x1).clamp(0.0, 1.0)
        return self.n * t ** (self.n - 1.0)

    def t_of_kappa(self, kappa: Tensor, x1: Tensor | None = None) -> Tensor:
        return _broadcast(kappa, x1).clamp(0.0, 1.0) ** (1.0 / self.n)

    def __repr__(self) -> str:
        return f"PolynomialScheduler(n={self.n:g})"


class LinearScheduler(PolynomialScheduler):
    """kappa_t = t."""

    def __init__(self) -> None:
        super().__init__(1.0)

    def __repr__(self) -> str:
        return "LinearScheduler()"


class CosineScheduler(Scheduler):
    """kappa_t = 1 - cos^2(pi t / 2) = sin^2(pi t / 2)."""

    def kappa(self, t: Tensor, x1: Tensor | None = None) -> Tensor:
        return torch.sin(0.5 * math.pi * _broadcast(t, x1).clamp(0.0, 1.0)) ** 2

    def d_kappa(self, t: Tensor, x1: Tensor | None = None) -> Tensor:
        return 0.5 * math.pi * torch.sin(math.pi * _broadcast(t, x1).clamp(0.0, 1.0))

    def t_of_kappa(self, kappa: Tensor, x1: Tensor | None = None) -> Tensor:
        return torch.asin(_broadcast(kappa, x1).clamp(0.0, 1.0).sqrt()) * (2.0 / math.pi)


class KineticOptimalScheduler(Scheduler):
    """Kinetic-optimal scheduler of eq 33 (eq 100): the geodesic between sqrt(p) and delta_{x1}.

    .. math::
        \\kappa_t(x_1) = 1 - \\frac{\\sin^2((1-t)\\Omega(x_1))}{\\sin^2 \\Omega(x_1)},\\qquad
        \\Omega(x_1) = \\arccos \\sqrt{p(x_1)}

    Args:
        source_pmf: the source PMF p, shape (V,). ``None`` means a source that gives the target tokens
            zero mass (e.g. the mask source), so Omega = pi/2 and kappa_t = sin^2(pi t / 2) for all x1.
        omega: use this fixed Omega for every token instead (e.g. pi/4 for the reference scheduler of E.1).

    As Omega -> 0 (a token with p(x1) = 1) the scheduler tends to 1 - (1-t)^2, which is used there.
    """

    def __init__(self, source_pmf: Tensor | None = None, omega: float | None = None) -> None:
        if source_pmf is not None and omega is not None:
            raise ValueError("give either source_pmf or omega, not both")
        if omega is not None and not (0.0 <= omega <= math.pi / 2):
            raise ValueError(f"omega must lie in [0, pi/2], got {omega}")
        self.token_dependent = source_pmf is not None
        self._omega_const = math.pi / 2 if omega is None else float(omega)
        self.omega_table = None
        if source_pmf is not None:
            pmf = torch.as_tensor(source_pmf, dtype=torch.float64)
            if pmf.ndim != 1 or (pmf < 0).any() or abs(float(pmf.sum()) - 1.0) > 1e-4:
                raise ValueError("source_pmf must be a 1-D probability vector")
            self.omega_table = torch.arccos(pmf.clamp(0.0, 1.0).sqrt())

    def omega(self, x1: Tensor | None, like: Tensor) -> Tensor:
        """Omega(x1) broadcast to the shape of ``like``."""
        if self.omega_table is None or x1 is None:
            return torch.full_like(like, self._omega_const)
        table = self.omega_table.to(device=like.device, dtype=like.dtype)
        return table[x1].expand_as(like)

    def kappa(self, t: Tensor, x1: Tensor | None = None) -> Tensor:
        t = _broadcast(t, x1).clamp(0.0, 1.0)
        om = self.omega(x1, t)
        small = om < _OMEGA_EPS
        safe = torch.where(small, torch.ones_like(om), om)
        k = 1.0 - torch.sin((1.0 - t) * safe) ** 2 / torch.sin(safe) ** 2
        return torch.where(small, 1.0 - (1.0 - t) ** 2, k)

    def d_kappa(self, t: Tensor, x1: Tensor | None = None) -> Tensor:
        t = _broadcast(t, x1).clamp(0.0, 1.0)
        om = self.omega(x1, t)
        small = om < _OMEGA_EPS
        safe = torch.where(small, torch.ones_like(om), om)
        # d/dt [-sin^2((1-t)W)/sin^2 W] = W sin(2(1-t)W) / sin^2 W
        dk = safe * torch.sin(2.0 * (1.0 - t) * safe) / torch.sin(safe) ** 2
        return torch.where(small, 2.0 * (1.0 - t), dk)

    def t_of_kappa(self, kappa: Tensor, x1: Tensor | None = None) -> Tensor:
        k = _broadcast(kappa, x1).clamp(0.0, 1.0)
        om = self.omega(x1, k)
        small = om < _OMEGA_EPS
        safe = torch.where(small, torch.ones_like(om), om)
        t = 1.0 - torch.asin(((1.0 - k).sqrt() * torch.sin(safe)).clamp(-1.0, 1.0)) / safe
        return torch.where(small, 1.0 - (1.0 - k).sqrt(), t)

    def __repr__(self) -> str:
        if self.token_dependent:
            return "KineticOptimalScheduler(source_pmf=...)"
        return f"KineticOptimalScheduler(omega={self._omega_const:.4f})"


class BetaSchedule:
    """beta_t = c (t / (1 - t))^a of eq 108 for metric-induced paths (beta_0 = 0, beta_1 = inf)."""

    def __init__(self, c: float = 3.0, a: float = 0.9) -> None:
        if c <= 0 or a <= 0:
            raise ValueError(f"beta schedule needs c > 0 and a > 0, got c={c}, a={a}")
        self.c, self.a = float(c), float(a)

    def beta(self, t: Tensor) -> Tensor:
        t = t.clamp(0.0, 1.0)
        return self.c * (t / (1.0 - t)) ** self.a

    def d_beta(self, t: Tensor) -> Tensor:
        t = t.clamp(0.0, 1.0)
        # d/dt c (t/(1-t))^a = c a t^(a-1) / (1-t)^(a+1)
        return self.c * self.a * t ** (self.a - 1.0) / (1.0 - t) ** (self.a + 1.0)

    def __repr__(self) -> str:
        return f"BetaSchedule(c={self.c:g}, a={self.a:g})"


def _broadcast(t: Tensor, x1: Tensor | None) -> Tensor:
    t = torch.as_tensor(t)
    if not t.is_floating_point():
        t = t.to(torch.get_default_dtype())
    if x1 is None:
        return t
    shape = torch.broadcast_shapes(t.shape, x1.shape)
    return t.to(x1.device).expand(shape)


def make_scheduler(name: str, source_pmf: Tensor | None = None, n: float = 1.0) -> Scheduler:
    """Build a scheduler by name: 'linear', 'poly' (t^n), 'cosine' or 'ko' (eq 33 for ``source_pmf``).

    For 'ko', a source that puts no mass on any token other than a single mask token collapses to the
    token-independent case Omega = pi/2 (kappa_t = sin^2(pi t / 2)) for every data token.
    """
    key = name.lower().replace("_", "-")
    if key == "linear":
        return LinearScheduler()
    if key in ("poly", "polynomial"):
        return PolynomialScheduler(n)
    if key == "cosine":
        return CosineScheduler()
    if key in ("ko", "kinetic-optimal"):
        if source_pmf is None or int((torch.as_tensor(source_pmf) > 0).sum()) == 1:
            return KineticOptimalScheduler()
        source_pmf = torch.as_tensor(source_pmf, dtype=torch.float64)
        return KineticOptimalScheduler(source_pmf=source_pmf / source_pmf.sum())  # as MixturePath does
    raise ValueError(f"unknown scheduler {name!r}: choose linear, poly, cosine or ko")
