"""Velocities: Rate Conditions (eq 5), the Continuity Equation (eq 14-15), closed forms (eq 24, 26, 29, 72-75).

Convention: ``u[..., x, z]`` is the rate z -> x. The continuity checks take dp/dt from central finite
differences of ``path.probs`` (never from ``probs_dt``), so a wrong ``probs_dt`` or a wrong velocity
both fail them.
"""

import math
import zlib

import pytest
import torch

from dfm_core.paths import MetricPath, MixturePath
from dfm_core.schedulers import (
    BetaSchedule,
    CosineScheduler,
    KineticOptimalScheduler,
    LinearScheduler,
    PolynomialScheduler,
)
from dfm_core.sources import mask_source, uniform_source
from dfm_core.velocities import (
    CampbellVelocity,
    CorrectedVelocity,
    KineticOptimalVelocity,
    PowerInfVelocity,
    PowerVelocity,
    flux_divergence,
    make_velocity,
    mixture_kinetic_optimal_velocity,
    mixture_marginal_velocity,
    velocity_from_flux,
)

V = 7
B = 48
FD_H = 1e-6


def velocities():
    return {
        "ko": KineticOptimalVelocity(),
        "power-0.5": PowerVelocity(0.5),
        "power-2": PowerVelocity(2.0),
        "power-5": PowerVelocity(5.0),
        "power-inf": PowerInfVelocity(),
        "campbell": CampbellVelocity(),
        "ko+corrector": CorrectedVelocity(KineticOptimalVelocity(), 0.7),
        "power2+corrector(t)": CorrectedVelocity(PowerVelocity(2.0), lambda t: 1.0 + 3.0 * t),
    }


VELOCITIES = velocities()


def random_pmf(n, g, zeros=0):
    w = -torch.log(torch.rand(n, generator=g, dtype=torch.float64))  # Dirichlet(1) up to normalisation
    if zeros:
        w[torch.randperm(n, generator=g)[:zeros]] = 0.0
    return w / w.sum()


def random_mixture(seed: int) -> MixturePath:
    """A random mixture path: random source (sometimes sparse) and a random token-dependent KO scheduler."""
    g = torch.Generator().manual_seed(seed)
    src = random_pmf(V, g, zeros=seed % 3)
    return MixturePath(src, KineticOptimalScheduler(source_pmf=src))


def random_metric(seed: int) -> MetricPath:
    g = torch.Generator().manual_seed(1000 + seed)
    d = (torch.rand(V, V, generator=g, dtype=torch.float64) * 2 + 0.05).fill_diagonal_(0.0)
    c = float(torch.rand((), generator=g)) * 2.5 + 0.5
    a = float(torch.rand((), generator=g)) * 0.9 + 0.6
    return MetricPath(d, BetaSchedule(c=c, a=a))


def other_mixtures():
    g = torch.Generator().manual_seed(77)
    src = random_pmf(V, g)
    return {
        "mask-ko": MixturePath(mask_source(V, V - 1), KineticOptimalScheduler()),
        "mask-linear": MixturePath(mask_source(V, V - 1), LinearScheduler()),
        "uniform-cosine": MixturePath(uniform_source(V), CosineScheduler()),
        "general-poly": MixturePath(src, PolynomialScheduler(1.7)),
    }


PATHS = {
    **{f"mixture{s}": random_mixture(s) for s in range(4)},
    **other_mixtures(),
    **{f"metric{s}": random_metric(s) for s in range(3)},
    "ordinal": MetricPath.ordinal(V),
}


def draw(path, seed: int, t_lo: float = 0.03, t_hi: float = 0.93):
    """Random targets (data tokens, never the mask) and times; p_t(. | x1), dp_t from probs_dt."""
    g = torch.Generator().manual_seed(seed)
    n_data = V - 1 if isinstance(path, MixturePath) and path.mask_id is not None else V
    x1 = torch.randint(0, n_data, (B,), generator=g)
    t = torch.rand(B, generator=g, dtype=torch.float64) * (t_hi - t_lo) + t_lo
    return x1, t, path.probs(x1, t), path.probs_dt(x1, t)


def seed_of(*names: str) -> int:
    """A deterministic seed per test case (str hashes are salted per process)."""
    return zlib.crc32("/".join(names).encode()) % 100_000


def fd_dpdt(path, x1, t):
    return (path.probs(x1, t + FD_H) - path.probs(x1, t - FD_H)) / (2 * FD_H)


def assert_close_scaled(a, b, rtol=1e-5):
    scale = max(float(b.abs().max()), 1.0)
    torch.testing.assert_close(a, b, atol=rtol * scale, rtol=rtol)


def apply_flux(u, p):
    """The flux of a velocity, j(x, z) = u(x, z) p(z)."""
    return u * p.unsqueeze(-2)


# ----------------------------------------------------------------------------- Rate Conditions (eq 5)


@pytest.mark.parametrize("vname", list(VELOCITIES))
@pytest.mark.parametrize("pname", list(PATHS))
def test_rate_conditions(pname, vname):
    path, vel = PATHS[pname], VELOCITIES[vname]
    x1, t, p, dp = draw(path, seed=seed_of(pname, vname))
    u = vel.velocity(p, dp, t)
    assert u.shape == (B, V, V)
    assert torch.isfinite(u).all()
    off = ~torch.eye(V, dtype=torch.bool).expand(B, V, V)
    scale = float(u.abs().max())
    assert float(u[off].min()) >= -1e-12 * scale, "negative off-diagonal rate"
    torch.testing.assert_close(u.sum(-2), torch.zeros(B, V, dtype=torch.float64), atol=1e-10 * scale, rtol=0)
    # the velocity does move mass somewhere (the checks above are not vacuous)
    assert float(u[off].max()) > 0
    # rates_from(p, dp, z) is column z of the full matrix, for every z
    for z in range(V):
        zz = torch.full((B,), z)
        col = vel.rates_from(p, dp, zz, t)
        torch.testing.assert_close(col, u[..., :, z], atol=1e-10 * scale, rtol=1e-10)
    # and with a random z per row
    zr = torch.randint(0, V, (B,), generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(
        vel.rates_from(p, dp, zr, t), u[torch.arange(B), :, zr], atol=1e-10 * scale, rtol=1e-10
    )


def test_rate_conditions_batched_shapes_and_float32():
    path = random_mixture(1)
    g = torch.Generator().manual_seed(0)
    x1 = torch.randint(0, V, (3, 5), generator=g)
    t = torch.rand(3, generator=g)  # (B,) float32 time aligned with (B, L) tokens
    p, dp = path.probs(x1, t), path.probs_dt(x1, t)
    assert p.dtype == torch.float32
    for vel in VELOCITIES.values():
        u = vel.velocity(p, dp, t[:, None].expand(3, 5))
        assert u.shape == (3, 5, V, V) and u.dtype == torch.float32
        torch.testing.assert_close(u.sum(-2), torch.zeros(3, 5, V), atol=1e-4, rtol=0)
        z = torch.randint(0, V, (3, 5), generator=g)
        col = vel.rates_from(p, dp, z, t[:, None].expand(3, 5))
        torch.testing.assert_close(
            col, u.gather(-1, z[..., None, None].expand(3, 5, V, 1)).squeeze(-1), atol=1e-4, rtol=1e-4
        )


# ----------------------------------------------------------------------- Continuity Equation (eq 14-15)


@pytest.mark.parametrize("pname", list(PATHS))
def test_probs_dt_matches_finite_differences(pname):
    path = PATHS[pname]
    x1, t, _, dp = draw(path, seed=11)
    assert_close_scaled(dp, fd_dpdt(path, x1, t), rtol=1e-6)


@pytest.mark.parametrize("vname", list(VELOCITIES))
@pytest.mark.parametrize("pname", list(PATHS))
def test_continuity_equation(pname, vname):
    """div_x(u p) = -dp/dt with dp/dt from finite differences of p_t: u generates the path."""
    path, vel = PATHS[pname], VELOCITIES[vname]
    x1, t, p, dp = draw(path, seed=seed_of(vname, pname))
    minus_dpdt = -fd_dpdt(path, x1, t)
    u = vel.velocity(p, dp, t)
    assert_close_scaled(flux_divergence(apply_flux(u, p)), minus_dpdt)
    # the flux itself satisfies it too, and is non-negative
    j = vel.flux(p, dp, t)
    assert (j >= 0).all()
    assert_close_scaled(flux_divergence(j), minus_dpdt)


@pytest.mark.parametrize("pname", list(PATHS))
def test_corrector_flux_is_divergence_free(pname):
    path = PATHS[pname]
    x1, t, p, dp = draw(path, seed=5)
    for base in (KineticOptimalVelocity(), PowerVelocity(2.0), CampbellVelocity()):
        corr = CorrectedVelocity(base, 1.0)
        jp = corr.corrector_flux(p, dp)
        assert (jp >= 0).all() and float(jp.max()) > 0
        torch.testing.assert_close(jp, jp.transpose(-1, -2))  # symmetric
        scale = float(jp.abs().max())
        torch.testing.assert_close(
            flux_divergence(jp), torch.zeros(B, V, dtype=torch.float64), atol=1e-12 * scale, rtol=0
        )
        # so adding it changes the velocity but not its divergence
        u_base = base.velocity(p, dp, t)
        u_corr = corr.velocity(p, dp, t)
        assert float((u_corr - u_base).abs().max()) > 1e-3
        assert_close_scaled(flux_divergence(apply_flux(u_corr, p)), flux_divergence(apply_flux(u_base, p)))


def test_flux_divergence_is_eq_15():
    g = torch.Generator().manual_seed(0)
    j = torch.rand(4, V, V, generator=g, dtype=torch.float64)
    div = flux_divergence(j)
    for x in range(V):
        out = sum(j[:, z, x] for z in range(V) if z != x)
        inn = sum(j[:, x, z] for z in range(V) if z != x)
        torch.testing.assert_close(div[:, x], out - inn)


# ------------------------------------------------------------------- closed forms of the flux family


@pytest.mark.parametrize("pname", ["mixture0", "metric1", "ordinal"])
def test_fluxes_match_the_paper_formulas(pname):
    """eq 26 (KO), eq 75 (power alpha), eq 24 (Campbell, positive paths), eq 35 (corrector)."""
    path = PATHS[pname]
    x1, t, p, dp = draw(path, seed=21)
    P, DP = p.unsqueeze(-1), dp.unsqueeze(-1)  # indexed by x
    Pz, DPz = p.unsqueeze(-2), dp.unsqueeze(-2)  # indexed by z
    off = 1.0 - torch.eye(V, dtype=torch.float64)
    eq26 = (Pz * DP - DPz * P).clamp_min(0) * off
    torch.testing.assert_close(KineticOptimalVelocity().flux(p, dp), eq26)
    for alpha in (0.5, 2.0, 5.0):
        pa = p**alpha / (p**alpha).sum(-1, keepdim=True)
        eq75 = (DP * pa.unsqueeze(-2) - DPz * pa.unsqueeze(-1)).clamp_min(0) * off
        torch.testing.assert_close(PowerVelocity(alpha).flux(p, dp), eq75)
    torch.testing.assert_close(PowerVelocity(1.0).velocity(p, dp), KineticOptimalVelocity().velocity(p, dp))
    if (p > 0).all():
        eq24 = (DP - DPz).clamp_min(0) / V * off
        torch.testing.assert_close(CampbellVelocity().flux(p, dp), eq24)
    eq35 = (Pz * DP - DPz * P).abs() * off
    torch.testing.assert_close(CorrectedVelocity(KineticOptimalVelocity(), 1.0).corrector_flux(p, dp), eq35)
    # eq 77: the power-inf flux uses delta_{argmax p}
    am = torch.nn.functional.one_hot(p.argmax(-1), V).double()
    eq77 = (DP * am.unsqueeze(-2) - DPz * am.unsqueeze(-1)).clamp_min(0) * off
    torch.testing.assert_close(PowerInfVelocity().flux(p, dp), eq77)
    # and it is the alpha -> inf limit of the power family (eq 76)
    gap = p.topk(2, -1).values
    ok = (gap[:, 1] / gap[:, 0] < 0.9) & (p.min(-1).values > 1e-6)
    u_big = PowerVelocity(400.0).velocity(p[ok], dp[ok])
    u_inf = PowerInfVelocity().velocity(p[ok], dp[ok])
    assert ok.sum() > 5
    assert_close_scaled(u_big, u_inf, rtol=1e-6)


def test_velocity_from_flux_is_eq_16():
    g = torch.Generator().manual_seed(4)
    p = random_pmf(V, g, zeros=2)
    j = torch.rand(V, V, generator=g, dtype=torch.float64)
    u = velocity_from_flux(j, p)
    for z in range(V):
        for x in range(V):
            if x != z:
                expected = float(j[x, z] / p[z]) if p[z] > 0 else 0.0
                assert float(u[x, z]) == pytest.approx(expected, rel=1e-12)
        assert float(u[:, z].sum()) == pytest.approx(0.0, abs=1e-9)


# -------------------------------------------------------------- mixture paths: eq 72, eq 24 vs eq 26


MIXTURE_NAMES = [n for n, pth in PATHS.items() if isinstance(pth, MixturePath)]


@pytest.mark.parametrize("pname", MIXTURE_NAMES)
def test_eq72_equals_eq26_on_mixture_paths(pname):
    path = PATHS[pname]
    x1, t, p, dp = draw(path, seed=31)
    u26 = KineticOptimalVelocity().velocity(p, dp, t)
    u72 = mixture_kinetic_optimal_velocity(path.scheduler, x1, t, V)
    assert u72.shape == (B, V, V)
    support = (p > 0).unsqueeze(-2).expand(B, V, V)  # columns z with p_t(z) > 0
    torch.testing.assert_close(u72[support], u26[support], rtol=1e-8, atol=1e-10)
    # eq 72 by hand: only jumps z -> x1, at rate kappa' / (1 - kappa)
    lam = path.scheduler.d_kappa(t, x1) / (1 - path.scheduler.kappa(t, x1))
    for b in range(0, B, 7):
        for z in range(V):
            if z != int(x1[b]):
                assert float(u72[b, x1[b], z]) == pytest.approx(float(lam[b]), rel=1e-10)
                assert float(u72[b, z, z]) == pytest.approx(-float(lam[b]), rel=1e-10)
    off_target = torch.ones(B, V, V, dtype=torch.bool)
    off_target[torch.arange(B), x1] = False
    off_target &= ~torch.eye(V, dtype=torch.bool)
    assert (u72[off_target] == 0).all()


def test_eq72_with_token_dependent_scheduler_depends_on_x1():
    path = random_mixture(0)
    t = torch.full((V,), 0.5, dtype=torch.float64)
    x1 = torch.arange(V)
    u72 = mixture_kinetic_optimal_velocity(path.scheduler, x1, t, V)
    rates = u72[torch.arange(V), x1, (x1 + 1) % V]
    assert float(rates.max() - rates.min()) > 1e-3
    # and matches eq 26 column by column where p_t(z) > 0
    p, dp = path.probs(x1, t), path.probs_dt(x1, t)
    u26 = KineticOptimalVelocity().velocity(p, dp)
    sup = (p > 0).unsqueeze(-2).expand_as(u26)
    torch.testing.assert_close(u72[sup], u26[sup])


@pytest.mark.parametrize("pname", ["mask-ko", "mask-linear", "uniform-cosine"])
def test_campbell_equals_ko_on_mask_and_uniform_mixtures(pname):
    path = PATHS[pname]
    x1, t, p, dp = draw(path, seed=41)
    torch.testing.assert_close(CampbellVelocity().velocity(p, dp), KineticOptimalVelocity().velocity(p, dp))


@pytest.mark.parametrize("pname", ["general-poly", "mixture1"])
def test_campbell_differs_from_ko_on_general_mixtures(pname):
    path = PATHS[pname]
    x1, t, p, dp = draw(path, seed=43)
    u24 = CampbellVelocity().velocity(p, dp)
    u26 = KineticOptimalVelocity().velocity(p, dp)
    assert float((u24 - u26).abs().max()) > 1e-2
    # eq 68: eq 24 moves mass between two non-target states when p(z) > p(x); eq 26 never does
    b = 0
    src = path.source
    xs = [v for v in range(V) if v != int(x1[b]) and src[v] > 0]
    lo, hi = min(xs, key=lambda v: float(src[v])), max(xs, key=lambda v: float(src[v]))
    assert float(u24[b, lo, hi]) > 0 and float(u26[b, lo, hi]) == 0


# ---------------------------------------------------------------------------- metric paths: eq 28-29


@pytest.mark.parametrize("pname", ["metric0", "metric1", "metric2", "ordinal"])
def test_eq29_closed_form_on_metric_paths(pname):
    path = PATHS[pname]
    x1, t, p, dp = draw(path, seed=51)
    d = path.distances(x1, torch.float64)  # d(x, x1): (B, V)
    db = path.beta.d_beta(t)
    eq29 = p.unsqueeze(-1) * db[:, None, None] * (d.unsqueeze(-2) - d.unsqueeze(-1)).clamp_min(0)
    u = KineticOptimalVelocity().velocity(p, dp, t)
    off = ~torch.eye(V, dtype=torch.bool).expand(B, V, V)
    assert_close_scaled(u[off], eq29[off], rtol=1e-8)
    # only moves toward states closer to x1: u(x, z) > 0 => d(x, x1) < d(z, x1)
    closer = d.unsqueeze(-1) < d.unsqueeze(-2)  # [b, x, z]: d(x) < d(z)
    moves = (u > 0) & off
    assert moves.any()
    assert not (moves & ~closer).any()
    # the flow ends at x1: from x1 nothing moves
    assert (u[torch.arange(B), :, x1] == 0).all()


def test_metric_path_velocities_coincide_at_t0_and_differ_later():
    """p_0 is uniform on a metric path (beta_0 = 0), so tau = p, p^alpha, 1[p > 0] and the argmax
    indicator are all uniform there and every velocity of the family is the same. A 2-step sampler
    takes one step from t = 0 and then the exact last step, so it gives the same samples for every
    velocity; from t > 0 on the velocities differ (the low-NFE effect of the paper's Figure 2)."""
    path = MetricPath.ordinal(64, beta=BetaSchedule(c=3.0, a=0.9))
    g = torch.Generator().manual_seed(5)
    x1 = torch.randint(64, (32,), generator=g)
    z = torch.randint(64, (32,), generator=g)
    velocities = [
        make_velocity(n, alpha=2.0 if n == "power" else None)
        for n in ("ko", "power", "power-inf", "campbell")
    ]
    for t, same in ((0.0, True), (0.5, False)):
        tt = torch.full((32,), t, dtype=torch.float64)
        p, dp = path.probs(x1, tt), path.probs_dt(x1, tt)
        rates = [v.rates_from(p, dp, z, tt) for v in velocities]
        gaps = [float((r - rates[0]).abs().max()) for r in rates[1:]]
        assert all(g < 1e-9 for g in gaps) == same, (t, gaps)
        for r in rates:
            assert torch.allclose(r.sum(-1), torch.zeros(32, dtype=torch.float64), atol=1e-9)


# --------------------------------------------------------------------------------- eq 73 (marginal)


@pytest.mark.parametrize("pname", MIXTURE_NAMES)
def test_eq73_marginal_is_posterior_average_of_eq72(pname):
    path = PATHS[pname]
    g = torch.Generator().manual_seed(61)
    n_data = V - 1 if path.mask_id is not None else V
    post = torch.zeros(B, V, dtype=torch.float64)
    post[:, :n_data] = -torch.log(torch.rand(B, n_data, generator=g, dtype=torch.float64))
    post[: B // 2, 0] = 0.0  # some zero posterior entries
    post = post / post.sum(-1, keepdim=True)
    z = torch.randint(0, V, (B,), generator=g)
    t = torch.rand(B, generator=g, dtype=torch.float64) * 0.9 + 0.05
    u73 = mixture_marginal_velocity(post, z, path.scheduler, t)
    expected = torch.zeros(B, V, dtype=torch.float64)
    for v in range(n_data):
        u72 = mixture_kinetic_optimal_velocity(path.scheduler, torch.full((B,), v), t, V)  # (B, V, V)
        expected += post[:, v, None] * u72[torch.arange(B), :, z]
    torch.testing.assert_close(u73, expected, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(u73.sum(-1), torch.zeros(B, dtype=torch.float64), atol=1e-10, rtol=0)
    # (B, L) shapes with a (B,) time
    u2 = mixture_marginal_velocity(post.view(4, 12, V), z.view(4, 12), path.scheduler, t.view(4, 12)[:, 0])
    assert u2.shape == (4, 12, V)


def test_eq73_equals_general_marginal_from_eq26_on_positive_mixtures():
    """On a positive source, eq 9 with the general eq 26 rates gives eq 73 too."""
    path = random_mixture(0)  # seed 0: no zeros in the source
    assert (path.source > 0).all()
    g = torch.Generator().manual_seed(62)
    post = -torch.log(torch.rand(B, V, generator=g, dtype=torch.float64))
    post = post / post.sum(-1, keepdim=True)
    z = torch.randint(0, V, (B,), generator=g)
    t = torch.rand(B, generator=g, dtype=torch.float64) * 0.9 + 0.05
    expected = torch.zeros(B, V, dtype=torch.float64)
    for v in range(V):
        x1 = torch.full((B,), v)
        p, dp = path.probs(x1, t), path.probs_dt(x1, t)
        expected += post[:, v, None] * KineticOptimalVelocity().rates_from(p, dp, z)
    torch.testing.assert_close(mixture_marginal_velocity(post, z, path.scheduler, t), expected)


def test_make_velocity():
    assert isinstance(make_velocity("ko"), KineticOptimalVelocity)
    assert isinstance(make_velocity("kinetic_optimal"), KineticOptimalVelocity)
    pv = make_velocity("power", alpha=3.0)
    assert isinstance(pv, PowerVelocity) and pv.alpha == 3.0
    assert isinstance(make_velocity("power-inf"), PowerInfVelocity)
    assert isinstance(make_velocity("campbell"), CampbellVelocity)
    with pytest.raises(ValueError, match="alpha applies to the power velocity, not 'ko'"):
        make_velocity("ko", alpha=2.0)  # would be ignored
    cv = make_velocity("ko", corrector=0.5)
    assert isinstance(cv, CorrectedVelocity) and isinstance(cv.base, KineticOptimalVelocity)
    with pytest.raises(ValueError):
        make_velocity("power")
    with pytest.raises(ValueError):
        make_velocity("nope")
    for bad in (-0.1, float("nan")):  # a negative weight would give negative off-diagonal rates (eq 35)
        with pytest.raises(ValueError, match="non-negative"):
            make_velocity("ko", corrector=bad)
    with pytest.raises(ValueError):
        PowerVelocity(0.0)
    # a negative corrector weight is refused
    p = torch.full((V,), 1 / V, dtype=torch.float64)
    with pytest.raises(ValueError):
        CorrectedVelocity(KineticOptimalVelocity(), -1.0).velocity(p, torch.zeros(V, dtype=torch.float64))
    assert math.isfinite(
        float(make_velocity("ko").velocity(p, torch.zeros(V, dtype=torch.float64)).abs().sum())
    )
