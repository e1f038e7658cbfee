"""Probability velocities (rate matrices) that generate a given conditional path.

Convention: ``u[..., x, z]`` is the rate from state z to state x, so the Rate Conditions (eq 5) read
``u[x, z] >= 0`` for x != z and ``sum_x u[x, z] = 0``.

All kinetic-optimal velocities here come from the closed form of eq 22-23 with the weighting
``w_t(x, z) = p_t(z) / (tau_t(x) tau_t(z))``, which gives the flux

.. math::
    j_t(x, z) = \\frac{[\\dot p_t(x) \\tau_t(z) - \\dot p_t(z) \\tau_t(x)]_+}{\\sum_s \\tau_t(s)}

and the velocity ``u = j / p_t(z)`` (eq 16). The choice of tau gives the family:

* ``tau = p``: the kinetic-optimal velocity of eq 26 (eq 28-29 on metric paths, eq 72 on mixtures);
* ``tau = p^alpha``: the power-alpha family of eq 74-75;
* ``tau = delta_argmax p``: the power-infinity limit of eq 76-77;
* ``tau = 1[p > 0]``: the velocity of Campbell et al. (eq 24).

The probability-preserving corrector of eq 35 uses the same f_t with an absolute value in place of the
ReLU, giving a symmetric, divergence-free flux.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from dfm_core.schedulers import Scheduler

__all__ = [
    "ProbabilityVelocity",
    "KineticOptimalVelocity",
    "PowerVelocity",
    "PowerInfVelocity",
    "CampbellVelocity",
    "CorrectedVelocity",
    "velocity_from_flux",
    "flux_divergence",
    "mixture_kinetic_optimal_velocity",
    "mixture_marginal_velocity",
    "make_velocity",
]


class ProbabilityVelocity:
    """A probability-advancing velocity defined by a choice of tau_t (see module docstring)."""

    name = "velocity"

    def tau(self, p: Tensor) -> Tensor:
        raise NotImplementedError

    def flux(self, p: Tensor, dp: Tensor, t: Tensor | None = None) -> Tensor:
        """Full flux matrix j[..., x, z] (eq 22), shape (..., V, V), with zero diagonal."""
        tau = self.tau(p)
        norm = tau.sum(-1, keepdim=True).unsqueeze(-1).clamp_min(1e-30)
        a = dp.unsqueeze(-1) * tau.unsqueeze(-2) - tau.unsqueeze(-1) * dp.unsqueeze(-2)
        j = a.clamp_min(0.0) / norm
        return _zero_diagonal(j)

    def velocity(self, p: Tensor, dp: Tensor, t: Tensor | None = None) -> Tensor:
        """Full rate matrix u[..., x, z] (eq 16), shape (..., V, V)."""
        return velocity_from_flux(self.flux(p, dp, t), p)

    def rates_from(self, p: Tensor, dp: Tensor, z: Tensor, t: Tensor | None = None) -> Tensor:
        """Rates u(., z) out of the current state z: (..., V), with u(z, z) = -sum of the others.

        Costs O(V) per position (no V x V matrix): what the sampler uses.
        """
        j = self._flux_from(p, dp, z, absolute=False)
        return _rates_from_flux(j, p, z)

    def _flux_from(self, p: Tensor, dp: Tensor, z: Tensor, absolute: bool) -> Tensor:
        tau = self.tau(p)
        norm = tau.sum(-1, keepdim=True).clamp_min(1e-30)
        zi = z.unsqueeze(-1)
        tau_z = tau.gather(-1, zi)
        dp_z = dp.gather(-1, zi)
        a = (dp * tau_z - dp_z * tau) / norm
        return a.abs() if absolute else a.clamp_min(0.0)

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class KineticOptimalVelocity(ProbabilityVelocity):
    """tau = p: the kinetic-optimal velocity of eq 26, u(x,z) = [p(z) dp(x) - dp(z) p(x)]_+ / p(z)."""

    name = "ko"

    def tau(self, p: Tensor) -> Tensor:
        return p


class PowerVelocity(ProbabilityVelocity):
    """tau = p^alpha: the power-alpha family of eq 74-75 (alpha = 1 is eq 26)."""

    name = "power"

    def __init__(self, alpha: float) -> None:
        if alpha <= 0:
            raise ValueError(f"alpha must be > 0, got {alpha}")
        self.alpha = float(alpha)

    def tau(self, p: Tensor) -> Tensor:
        # Normalise by the max first so p^alpha does not underflow for large alpha.
        m = p.amax(-1, keepdim=True).clamp_min(1e-30)
        return (p / m).clamp_min(0.0) ** self.alpha

    def __repr__(self) -> str:
        return f"PowerVelocity(alpha={self.alpha:g})"


class PowerInfVelocity(ProbabilityVelocity):
    """tau = the alpha -> inf limit of p^alpha / sum p^alpha: uniform on argmax p (eq 76-77)."""

    name = "power-inf"

    def tau(self, p: Tensor) -> Tensor:
        return (p >= p.amax(-1, keepdim=True)).to(p.dtype)


class CampbellVelocity(ProbabilityVelocity):
    """tau = 1[p > 0]: the flux of eq 24, i.e. the velocity of Campbell et al. (2024).

    Not a safe flux (eq 18): on paths with tiny but positive p_t(z) it can give large rates.
    """

    name = "campbell"

    def tau(self, p: Tensor) -> Tensor:
        return (p > 0).to(p.dtype)


class CorrectedVelocity(ProbabilityVelocity):
    """u = u* + omega_t u_perp: a probability-advancing velocity plus the corrector of eq 35.

    ``u_perp(x, z) = |dp(x) tau(z) - dp(z) tau(x)| / (sum tau p(z))`` reuses the f_t of the base
    velocity; its flux is symmetric, hence divergence-free, so p_t is preserved. The corrector flux is
    kept to the support of p_t: into a state of zero mass (x1 at t = 0 on the mask path) no velocity
    can carry the symmetric flux back out, so there it would add mass instead of preserving p_t.

    Args:
        base: the probability-advancing velocity (its tau is reused).
        weight: omega_t >= 0, a float or a callable of t (tensor broadcastable to the positions).
    """

    def __init__(self, base: ProbabilityVelocity, weight: float | Callable[[Tensor], Tensor]) -> None:
        self.base = base
        self.weight = weight
        self.name = f"{base.name}+corrector"

    def tau(self, p: Tensor) -> Tensor:
        return self.base.tau(p)

    def omega(self, t: Tensor | None, like: Tensor) -> Tensor:
        if callable(self.weight):
            if t is None:
                raise ValueError("a time-dependent corrector weight needs t")
            w = torch.as_tensor(self.weight(t), dtype=like.dtype, device=like.device)
        else:
            w = torch.as_tensor(float(self.weight), dtype=like.dtype, device=like.device)
        if (w < 0).any():
            raise ValueError("the corrector weight must be non-negative")
        while w.ndim < like.ndim:
            w = w.unsqueeze(-1)
        return w

    def corrector_flux(self, p: Tensor, dp: Tensor) -> Tensor:
        """The divergence-free flux j_perp[..., x, z] of eq 35."""
        tau = self.tau(p)
        norm = tau.sum(-1, keepdim=True).unsqueeze(-1).clamp_min(1e-30)
        a = dp.unsqueeze(-1) * tau.unsqueeze(-2) - tau.unsqueeze(-1) * dp.unsqueeze(-2)
        support = (p.unsqueeze(-1) > 0) & (p.unsqueeze(-2) > 0)
        return _zero_diagonal(torch.where(support, a.abs() / norm, torch.zeros_like(a)))

    def flux(self, p: Tensor, dp: Tensor, t: Tensor | None = None) -> Tensor:
        w = self.omega(t, p).unsqueeze(-1)
        return self.base.flux(p, dp, t) + w * self.corrector_flux(p, dp)

    def rates_from(self, p: Tensor, dp: Tensor, z: Tensor, t: Tensor | None = None) -> Tensor:
        corrector = self._flux_from(p, dp, z, True).masked_fill(p <= 0, 0.0)  # on the support of p_t
        j = self.base._flux_from(p, dp, z, absolute=False) + self.omega(t, p) * corrector
        return _rates_from_flux(j, p, z)

    def __repr__(self) -> str:
        return f"CorrectedVelocity({self.base!r}, weight={self.weight!r})"


def velocity_from_flux(j: Tensor, p: Tensor) -> Tensor:
    """Eq 16: u(x, z) = j(x, z) / p(z) where p(z) > 0 (else 0), and the diagonal from eq 5."""
    pz = p.unsqueeze(-2)
    u = torch.where(
        pz > 0, j / pz.clamp_min(1e-300 if p.dtype == torch.float64 else 1e-30), torch.zeros_like(j)
    )
    u = _zero_diagonal(u)
    return u - torch.diag_embed(u.sum(-2))


def flux_divergence(j: Tensor) -> Tensor:
    """Eq 15: div_x(j) = sum_{z != x} j(z, x) - sum_{z != x} j(x, z); shape (..., V)."""
    j = _zero_diagonal(j)
    return j.sum(-2) - j.sum(-1)


def mixture_kinetic_optimal_velocity(scheduler: Scheduler, x1: Tensor, t: Tensor, vocab_size: int) -> Tensor:
    """Eq 72: u(x, z | x1) = kappa'/(1 - kappa) (delta_{x1}(x) - delta_z(x)), as a (..., V, V) matrix."""
    lam = scheduler.rate(_expand_t(t, x1), x1)
    onehot = torch.nn.functional.one_hot(x1, vocab_size).to(lam.dtype)
    eye = torch.eye(vocab_size, dtype=lam.dtype, device=x1.device)
    return lam[..., None, None] * (onehot.unsqueeze(-1) - eye)


def mixture_marginal_velocity(posterior: Tensor, z: Tensor, scheduler: Scheduler, t: Tensor) -> Tensor:
    """Eq 73: closed-form marginal velocity of a mixture path from the factorised posterior.

    u(x, z) = lambda(x) p_{1|t}(x | z) - delta_z(x) sum_y lambda(y) p_{1|t}(y | z), lambda = kappa'/(1-kappa).

    Args:
        posterior: p_{1|t}(. | z), shape (..., V).
        z: current tokens, shape (...).
        t: time, broadcastable to z.
    Returns:
        rates out of z, shape (..., V).
    """
    V = posterior.shape[-1]
    tokens = torch.arange(V, device=posterior.device)
    tt = _expand_t(t, z).unsqueeze(-1).expand(*z.shape, V)
    lam = scheduler.rate(tt.to(posterior.dtype), tokens.expand(*z.shape, V))
    w = torch.where(posterior > 0, lam * posterior, torch.zeros_like(posterior))
    out = w.clone()
    out.scatter_add_(-1, z.unsqueeze(-1), -w.sum(-1, keepdim=True))
    return out


def make_velocity(
    name: str, alpha: float | None = None, corrector: float | Callable[[Tensor], Tensor] = 0.0
) -> ProbabilityVelocity:
    """Build a velocity by name: 'ko', 'power' (needs alpha), 'power-inf', 'campbell'; optional corrector.
    An ``alpha`` with any velocity but 'power' is refused: it would be ignored without a word."""
    key = name.strip().lower().replace("_", "-")
    if alpha is not None and key != "power":
        raise ValueError(f"alpha applies to the power velocity, not {name!r}")
    if key in ("ko", "kinetic-optimal"):
        base: ProbabilityVelocity = KineticOptimalVelocity()
    elif key == "power":
        if alpha is None:
            raise ValueError("the power velocity needs alpha")
        base = PowerVelocity(alpha)
    elif key in ("power-inf", "powerinf"):
        base = PowerInfVelocity()
    elif key == "campbell":
        base = CampbellVelocity()
    else:
        raise ValueError(f"unknown velocity {name!r}: choose ko, power, power-inf or campbell")
    if callable(corrector):
        return CorrectedVelocity(base, corrector)
    if not float(corrector) >= 0:  # also refuses NaN
        raise ValueError(f"the corrector weight must be non-negative (eq 35), got {corrector}")
    return CorrectedVelocity(base, corrector) if float(corrector) > 0 else base


def _rates_from_flux(j: Tensor, p: Tensor, z: Tensor) -> Tensor:
    zi = z.unsqueeze(-1)
    pz = p.gather(-1, zi)
    tiny = 1e-300 if p.dtype == torch.float64 else 1e-30
    u = torch.where(pz > 0, j / pz.clamp_min(tiny), torch.zeros_like(j))
    u = u.scatter(-1, zi, torch.zeros_like(pz))
    return u.scatter(-1, zi, -u.sum(-1, keepdim=True))


def _zero_diagonal(m: Tensor) -> Tensor:
    V = m.shape[-1]
    eye = torch.eye(V, dtype=torch.bool, device=m.device)
    return m.masked_fill(eye, 0.0)


def _expand_t(t: Tensor | float, like: Tensor) -> Tensor:
    t = torch.as_tensor(t, device=like.device)
    if not t.is_floating_point():
        t = t.to(torch.get_default_dtype())
    while t.ndim < like.ndim:
        t = t.unsqueeze(-1)
    return t.expand(like.shape)
