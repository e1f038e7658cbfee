"""Schedulers kappa_t (eq 2, eq 33) and beta_t (eq 108): boundaries, monotonicity, derivatives, inverses."""

import math

import pytest
import torch

from dfm_core.schedulers import (
    BetaSchedule,
    CosineScheduler,
    KineticOptimalScheduler,
    LinearScheduler,
    PolynomialScheduler,
)

T = torch.linspace(0.0, 1.0, 201, dtype=torch.float64)
T_IN = torch.linspace(0.02, 0.98, 49, dtype=torch.float64)  # interior points for finite differences
FD_H = 1e-6


def random_pmf(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.rand(n, generator=g, dtype=torch.float64) ** 2
    return w / w.sum()


def ko_kappa_reference(t: float, p_x1: float) -> float:
    """Eq 33 written out with the math module: 1 - sin^2((1-t) W) / sin^2 W, W = arccos sqrt(p(x1))."""
    w = math.acos(math.sqrt(p_x1))
    return 1.0 - math.sin((1.0 - t) * w) ** 2 / math.sin(w) ** 2


def token_independent_schedulers():
    return [
        LinearScheduler(),
        PolynomialScheduler(2.0),
        PolynomialScheduler(1.5),
        PolynomialScheduler(3.5),
        CosineScheduler(),
        KineticOptimalScheduler(),
        KineticOptimalScheduler(omega=math.pi / 4),
        KineticOptimalScheduler(omega=0.3),
    ]


@pytest.mark.parametrize("sched", token_independent_schedulers(), ids=repr)
def test_token_independent_boundaries_monotone_and_inverse(sched):
    k = sched.kappa(T)
    assert k.dtype == torch.float64
    assert float(k[0]) == pytest.approx(0.0, abs=1e-12)
    assert float(k[-1]) == pytest.approx(1.0, abs=1e-12)
    assert (k.diff() > 0).all(), "kappa must be strictly increasing"
    assert ((k >= 0) & (k <= 1)).all()
    # t_of_kappa inverts kappa (and kappa inverts t_of_kappa on a kappa grid)
    torch.testing.assert_close(sched.t_of_kappa(k), T, atol=1e-7, rtol=0)
    kk = torch.linspace(0.0, 1.0, 101, dtype=torch.float64)
    torch.testing.assert_close(sched.kappa(sched.t_of_kappa(kk)), kk, atol=1e-10, rtol=0)


@pytest.mark.parametrize("sched", token_independent_schedulers(), ids=repr)
def test_token_independent_derivative_matches_finite_differences(sched):
    fd = (sched.kappa(T_IN + FD_H) - sched.kappa(T_IN - FD_H)) / (2 * FD_H)
    torch.testing.assert_close(sched.d_kappa(T_IN), fd, rtol=1e-6, atol=1e-7)
    # rate = kappa' / (1 - kappa): the jump rate of eq 72
    torch.testing.assert_close(
        sched.rate(T_IN), sched.d_kappa(T_IN) / (1 - sched.kappa(T_IN)), rtol=1e-12, atol=0
    )
    assert (sched.rate(T_IN) > 0).all()


def test_closed_forms_of_the_simple_schedulers():
    for n in (1.0, 2.0, 1.5):
        torch.testing.assert_close(PolynomialScheduler(n).kappa(T), T**n)
    torch.testing.assert_close(LinearScheduler().kappa(T), T)
    torch.testing.assert_close(CosineScheduler().kappa(T), torch.sin(math.pi * T / 2) ** 2)
    for bad in (0.0, 0.5, float("nan")):  # below 1 the rate at t = 0 is infinite (audit of session 11)
        with pytest.raises(ValueError, match="must be >= 1"):
            PolynomialScheduler(bad)


def test_ko_scheduler_with_mask_source_is_sin_squared():
    """source_pmf=None (a source giving no mass to data tokens): Omega = pi/2, kappa = sin^2(pi t / 2)."""
    ko = KineticOptimalScheduler()
    assert not ko.token_dependent
    expected = torch.sin(math.pi * T / 2) ** 2
    torch.testing.assert_close(ko.kappa(T), expected, atol=1e-12, rtol=0)
    torch.testing.assert_close(ko.d_kappa(T), 0.5 * math.pi * torch.sin(math.pi * T), atol=1e-12, rtol=0)
    # the same with an explicit mask PMF: p(x1) = 0 for every data token
    mask_pmf = torch.tensor([0.0, 0.0, 0.0, 1.0], dtype=torch.float64)
    ko_m = KineticOptimalScheduler(source_pmf=mask_pmf)
    x1 = torch.tensor([0, 1, 2]).repeat_interleave(len(T))
    t = T.repeat(3)
    torch.testing.assert_close(ko_m.kappa(t, x1), expected.repeat(3), atol=1e-12, rtol=0)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_token_dependent_ko_scheduler_matches_eq_33(seed):
    V = 6
    pmf = random_pmf(V, seed)
    ko = KineticOptimalScheduler(source_pmf=pmf)
    assert ko.token_dependent
    g = torch.Generator().manual_seed(100 + seed)
    x1 = torch.randint(0, V, (40,), generator=g)
    t = torch.rand(40, generator=g, dtype=torch.float64)
    expected = torch.tensor(
        [ko_kappa_reference(float(ti), float(pmf[xi])) for ti, xi in zip(t, x1, strict=True)],
        dtype=torch.float64,
    )
    torch.testing.assert_close(ko.kappa(t, x1), expected, atol=1e-12, rtol=0)
    # Omega(x1) = arccos sqrt(p(x1))
    torch.testing.assert_close(ko.omega(x1, t), torch.arccos(pmf[x1].sqrt()), atol=1e-12, rtol=0)
    # scalar t broadcasts against x1; the schedule depends on the token (different Omega)
    k_half = ko.kappa(torch.tensor(0.5, dtype=torch.float64), torch.arange(V))
    assert k_half.shape == (V,)
    ref = torch.tensor([ko_kappa_reference(0.5, float(p)) for p in pmf], dtype=torch.float64)
    torch.testing.assert_close(k_half, ref, atol=1e-12, rtol=0)
    assert k_half.max() - k_half.min() > 1e-3


@pytest.mark.parametrize("seed", [0, 1])
def test_token_dependent_ko_scheduler_boundaries_derivative_inverse(seed):
    V = 5
    pmf = random_pmf(V, seed)
    ko = KineticOptimalScheduler(source_pmf=pmf)
    for v in range(V):
        x1 = torch.full(T.shape, v)
        k = ko.kappa(T, x1)
        assert float(k[0]) == pytest.approx(0.0, abs=1e-12)
        assert float(k[-1]) == pytest.approx(1.0, abs=1e-12)
        assert (k.diff() > 0).all()
        torch.testing.assert_close(ko.t_of_kappa(k, x1), T, atol=1e-7, rtol=0)
        xi = torch.full(T_IN.shape, v)
        fd = (ko.kappa(T_IN + FD_H, xi) - ko.kappa(T_IN - FD_H, xi)) / (2 * FD_H)
        torch.testing.assert_close(ko.d_kappa(T_IN, xi), fd, rtol=1e-6, atol=1e-7)


def test_ko_scheduler_omega_to_zero_limit_is_finite_and_continuous():
    """p(x1) -> 1 makes Omega -> 0; kappa -> 1 - (1 - t)^2 (the limit of eq 33) without 0/0."""
    limit_k = 1 - (1 - T) ** 2
    limit_dk = 2 * (1 - T)
    # Omega = 0 exactly, Omega just below the switch to the limit formula, and just above it
    for delta in (0.0, 1e-10, 4e-9, 2e-8, 1e-6):
        pmf = torch.tensor([1.0 - delta, delta / 2, delta / 2], dtype=torch.float64)
        ko = KineticOptimalScheduler(source_pmf=pmf)
        x1 = torch.zeros(T.shape, dtype=torch.long)
        k, dk = ko.kappa(T, x1), ko.d_kappa(T, x1)
        assert torch.isfinite(k).all() and torch.isfinite(dk).all()
        tol = 1e-5 if delta > 0 else 1e-12
        torch.testing.assert_close(k, limit_k, atol=tol, rtol=0)
        torch.testing.assert_close(dk, limit_dk, atol=tol, rtol=0)
        tk = ko.t_of_kappa(limit_k, x1)
        assert torch.isfinite(tk).all()
        torch.testing.assert_close(tk, T, atol=1e-4, rtol=0)
    # the fixed-omega form agrees with the same limit
    torch.testing.assert_close(KineticOptimalScheduler(omega=0.0).kappa(T), limit_k, atol=1e-12, rtol=0)
    # float32 stays finite too
    pmf = torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64)
    k32 = KineticOptimalScheduler(source_pmf=pmf).kappa(T.float(), torch.zeros(len(T), dtype=torch.long))
    assert k32.dtype == torch.float32 and torch.isfinite(k32).all()


def test_ko_scheduler_validation():
    with pytest.raises(ValueError):
        KineticOptimalScheduler(source_pmf=torch.tensor([0.5, 0.6]))
    with pytest.raises(ValueError):
        KineticOptimalScheduler(source_pmf=torch.tensor([0.5, 0.5]), omega=0.2)
    with pytest.raises(ValueError):
        KineticOptimalScheduler(omega=2.0)


@pytest.mark.parametrize("c,a", [(3.0, 0.9), (1.0, 1.0), (0.5, 2.0)])
def test_beta_schedule(c, a):
    bs = BetaSchedule(c=c, a=a)
    t = torch.linspace(0.0, 0.99, 100, dtype=torch.float64)
    b = bs.beta(t)
    assert float(b[0]) == 0.0
    assert (b.diff() > 0).all()
    torch.testing.assert_close(b, c * (t / (1 - t)) ** a)
    assert float(bs.beta(torch.tensor(1.0 - 1e-9, dtype=torch.float64))) > 1e6  # beta_1 = inf
    fd = (bs.beta(T_IN + FD_H) - bs.beta(T_IN - FD_H)) / (2 * FD_H)
    torch.testing.assert_close(bs.d_beta(T_IN), fd, rtol=1e-6, atol=1e-7)
    with pytest.raises(ValueError):
        BetaSchedule(c=-1.0)
