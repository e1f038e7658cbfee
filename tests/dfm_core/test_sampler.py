"""The posterior sampler (section 3) with the always-valid step (Appendix A).

End-to-end: with the exact posterior of a small known target (dfm_toy), the sampler reproduces the
target (chi-square). Step-level: one always-valid step has the transition law of Appendix A, for any h.
"""

import math

import pytest
import torch
from dfm_toy import MASK, N_DATA, chi2_pvalue, exact_model, random_target
from scipy.stats import chisquare

from dfm_core.paths import MetricPath, MixturePath
from dfm_core.sampler import categorical, sample, uniform_grid
from dfm_core.schedulers import BetaSchedule, CosineScheduler, KineticOptimalScheduler, LinearScheduler
from dfm_core.sources import mask_source, uniform_source
from dfm_core.velocities import (
    CampbellVelocity,
    CorrectedVelocity,
    KineticOptimalVelocity,
    PowerInfVelocity,
    PowerVelocity,
)

N_SAMPLES = 20_000
Q = random_target(0)
SRC = torch.tensor([0.6, 0.3, 0.1], dtype=torch.float64)


def run(path, steps, velocity=None, seed=0, float64=True, n=N_SAMPLES):
    g = torch.Generator().manual_seed(seed)
    x0 = path.sample_source((n, 2), generator=g)
    return sample(
        exact_model(path, Q), path, x0, steps=steps, velocity=velocity, generator=g, float64=float64
    )


# (path, velocity, steps, float64) per configuration. The Appendix A step is first order: these step
# counts keep the discretisation bias well below what 20,000 samples detect (measured with 60,000
# samples). The mixtures' closed-form KO step is cheap; the general step (metric path, corrector) is not.
# float32 is exercised on the fast mixture step and on the general step.
CONFIGS = {
    "mask-ko-fast": (
        lambda: MixturePath(mask_source(N_DATA + 1, MASK), KineticOptimalScheduler()),
        None,
        128,
        True,
    ),
    "uniform-linear-fast-f32": (
        lambda: MixturePath(uniform_source(N_DATA), LinearScheduler()),
        None,
        200,
        False,
    ),
    "general-tdko-fast": (lambda: MixturePath(SRC, KineticOptimalScheduler(SRC)), None, 200, True),
    "metric-ko-f32": (lambda: MetricPath.ordinal(N_DATA), KineticOptimalVelocity(), 200, False),
    "general-tdko-corrector": (
        lambda: MixturePath(SRC, KineticOptimalScheduler(SRC)),
        CorrectedVelocity(KineticOptimalVelocity(), 0.3),
        250,
        True,
    ),
    "metric-corrector": (
        lambda: MetricPath.ordinal(N_DATA),
        CorrectedVelocity(KineticOptimalVelocity(), 0.3),
        300,
        True,
    ),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(CONFIGS))
def test_sampler_reproduces_the_target(name):
    make_path, velocity, steps, float64 = CONFIGS[name]
    res = run(make_path(), steps, velocity, float64=float64)
    assert res.tokens.shape == (N_SAMPLES, 2)
    chi2, pvalue = chi2_pvalue(res.tokens, Q)
    assert pvalue > 1e-3, f"{name}: chi2 = {chi2:.1f}"


def test_too_few_steps_are_detected():
    """The chi-square check has power: a coarse grid (first-order error) is rejected."""
    res = run(MixturePath(uniform_source(N_DATA), LinearScheduler()), 20)
    _, pvalue = chi2_pvalue(res.tokens, Q)
    assert pvalue < 1e-6


# ------------------------------------------------------------------------ one always-valid step


def delta_model(x1_value: int, V: int):
    """A model whose posterior is delta_{x1_value} at every position."""

    def model(x, t):
        logits = torch.full((*x.shape, V), float("-inf"), dtype=torch.float64)
        logits[..., x1_value] = 0.0
        return logits

    return model


def one_step_counts(path, velocity, z, x1, t0, t1, n=20_000, seed=0, float64=True):
    x0 = torch.full((n, 1), z)
    grid = torch.tensor([t0, t1], dtype=torch.float64)
    g = torch.Generator().manual_seed(seed)
    out = sample(
        delta_model(x1, path.vocab_size),
        path,
        x0,
        time_grid=grid,
        velocity=velocity,
        generator=g,
        float64=float64,
    )
    return torch.bincount(out.tokens.flatten(), minlength=path.vocab_size).double()


def appendix_a_law(u_col: torch.Tensor, z: int, h: float) -> torch.Tensor:
    """exp(-h lambda) delta_z + (1 - exp(-h lambda)) u(., z) / lambda off z, lambda = -u(z, z)."""
    lam = float(-u_col[z])
    stay = math.exp(-h * lam)
    law = (1 - stay) * u_col.clamp_min(0) / lam
    law[z] = stay
    return law


@pytest.mark.parametrize(
    "velocity",
    [
        KineticOptimalVelocity(),
        CorrectedVelocity(KineticOptimalVelocity(), 1.5),
        PowerVelocity(3.0),
        CampbellVelocity(),
    ],
    ids=repr,
)
@pytest.mark.parametrize("h", [0.05, 0.6])
def test_one_general_step_follows_appendix_a(velocity, h):
    V = 6
    g = torch.Generator().manual_seed(2)
    d = (torch.rand(V, V, generator=g, dtype=torch.float64) + 0.2).fill_diagonal_(0.0)
    path = MetricPath(d, BetaSchedule(c=2.0, a=1.0))
    z, x1, t0 = 4, 1, 0.2
    t = torch.tensor([t0], dtype=torch.float64)
    p, dp = path.probs(torch.tensor([x1]), t), path.probs_dt(torch.tensor([x1]), t)
    u_col = velocity.velocity(p, dp, t)[0, :, z]  # rates out of z, from the full matrix
    law = appendix_a_law(u_col, z, h)
    assert float(law.sum()) == pytest.approx(1.0)
    counts = one_step_counts(path, velocity, z, x1, t0, t0 + h)
    pos = law > 1e-9
    assert (counts[~pos] == 0).all()
    res = chisquare(counts[pos].numpy(), (law[pos] * counts.sum()).numpy())
    assert res.pvalue > 1e-3, (counts, law * counts.sum())


@pytest.mark.parametrize("h", [0.05, 0.6])
@pytest.mark.parametrize("token_dependent", [True, False], ids=["tdko", "cosine"])
def test_one_fast_mixture_step_follows_appendix_a(h, token_dependent):
    """Mixture + KO (closed form eq 72): jump z -> x1 with probability 1 - exp(-h lambda(x1)).

    Covers the closed-form step with a token-dependent scheduler and with a token-independent one (where
    the posterior is only drawn for the positions that jump), and the general step with the same rates.
    """
    V = 5
    g = torch.Generator().manual_seed(4)
    src = torch.rand(V, generator=g, dtype=torch.float64) + 0.1
    src = src / src.sum()
    sched = KineticOptimalScheduler(src) if token_dependent else CosineScheduler()
    path = MixturePath(src, sched)
    z, x1, t0 = 3, 0, 0.25
    lam = float(sched.rate(torch.tensor(t0, dtype=torch.float64), torch.tensor(x1)))
    p_jump = 1 - math.exp(-h * lam)
    n = 20_000
    for velocity in (KineticOptimalVelocity(), CorrectedVelocity(KineticOptimalVelocity(), 0.0)):
        # the second one has the same rates but goes through the general step
        counts = one_step_counts(path, velocity, z, x1, t0, t0 + h, n=n)
        assert counts[z] + counts[x1] == n
        res = chisquare([counts[x1].item(), counts[z].item()], [p_jump * n, (1 - p_jump) * n])
        assert res.pvalue > 1e-3, (counts, p_jump)


# ------------------------------------------------------------------------- robustness and options


def random_logits_model(V: int, seed: int = 0, scale: float = 3.0):
    g = torch.Generator().manual_seed(seed)
    table = torch.randn(64, V, generator=g) * scale

    def model(x, t):
        # depends on the state and time, deterministic
        idx = (x * 7 + (t[:, None] * 50).long()) % 64
        return table[idx]

    return model


@pytest.mark.parametrize(
    "velocity",
    [
        KineticOptimalVelocity(),
        CorrectedVelocity(KineticOptimalVelocity(), 5.0),
        PowerInfVelocity(),
        CampbellVelocity(),
        PowerVelocity(5.0),
    ],
    ids=repr,
)
@pytest.mark.parametrize("float64", [True, False])
def test_huge_steps_and_rates_stay_valid(velocity, float64):
    V, B, L = 9, 64, 6
    model = random_logits_model(V)
    paths = [
        MetricPath.ordinal(V, beta=BetaSchedule(c=1e4, a=1.0)),
        MetricPath.ordinal(V),  # beta'_t diverges at t = 0 for a = 0.9
        MixturePath(mask_source(V, V - 1), LinearScheduler()),
        MixturePath(uniform_source(V), KineticOptimalScheduler(uniform_source(V))),
    ]
    grids = [
        uniform_grid(1),
        uniform_grid(2),
        uniform_grid(1, t_max=0.999999),
        uniform_grid(2, t_max=0.999999),
    ]
    for path in paths:
        for grid in grids:
            g = torch.Generator().manual_seed(0)
            x0 = path.sample_source((B, L), generator=g)
            res = sample(
                model,
                path,
                x0,
                time_grid=grid,
                velocity=velocity,
                generator=g,
                float64=float64,
                return_trajectory=True,
            )
            for x in res.trajectory:
                assert x.dtype == torch.long and x.shape == (B, L)
                assert ((x >= 0) & (x < V)).all()
            if path is paths[0]:
                # beta' = 1e4: from t = 0 the first step jumps unless the drawn x1 is the current token
                moved = (res.trajectory[1] != res.trajectory[0]).double().mean()
                assert float(moved) > 0.5


def test_first_step_of_the_metric_path_has_finite_rates():
    """Regression: beta'_0 = inf for a < 1 (eq 108, a = 0.9) made probs_dt at t = 0 nan/inf; with a
    corrector the first step then jumped deterministically to the last token (inf rates)."""
    V, n = 3, 20_000
    path = MetricPath.ordinal(V)
    for x1 in range(V):
        dp0 = path.probs_dt(torch.tensor([x1]), torch.tensor([0.0], dtype=torch.float64))
        assert torch.isfinite(dp0).all()
    vel = CorrectedVelocity(KineticOptimalVelocity(), 1.0)
    counts = one_step_counts(path, vel, z=1, x1=1, t0=0.0, t1=0.01, n=n)
    # leaving z in [0, 0.01] has probability O(beta_0.01) ~ 0.05: mostly stay, and symmetrically
    assert counts[1] > 0.8 * n
    assert abs(float(counts[0] - counts[2])) < 5 * math.sqrt(float(counts[0] + counts[2])) + 1


def test_allowed_tokens_are_respected():
    V, B, L = 8, 200, 5
    g = torch.Generator().manual_seed(3)
    allowed = torch.rand(L, V, generator=g) < 0.4
    allowed[:, 0] = True
    allowed[:, V - 1] = False  # never the mask token
    model = random_logits_model(V, seed=1)
    for path, velocity in [
        (MixturePath(mask_source(V, V - 1), KineticOptimalScheduler()), None),
        (MetricPath.ordinal(V), CorrectedVelocity(KineticOptimalVelocity(), 1.0)),
    ]:
        x0 = path.sample_source((B, L), generator=g)
        res = sample(model, path, x0, steps=10, velocity=velocity, allowed=allowed, generator=g)
        ok = allowed.unsqueeze(0).expand(B, L, V).gather(-1, res.tokens.unsqueeze(-1)).squeeze(-1)
        assert ok.all()
        # a (B, L, V) mask works too
        res = sample(
            model, path, x0, steps=3, velocity=velocity, allowed=allowed.expand(B, L, V), generator=g
        )
        assert allowed.expand(B, L, V).gather(-1, res.tokens.unsqueeze(-1)).all()
    with pytest.raises(ValueError):
        sample(model, path, x0, steps=3, allowed=torch.ones(L + 1, V, dtype=torch.bool))
    bad = allowed.clone()
    bad[0] = False
    with pytest.raises(ValueError):
        sample(model, path, x0, steps=3, allowed=bad)


def test_clamped_positions_keep_their_values():
    V, B, L = 7, 50, 6
    g = torch.Generator().manual_seed(5)
    clamp_mask = torch.rand(B, L, generator=g) < 0.5
    clamp_values = torch.randint(0, V - 1, (B, L), generator=g)
    model = random_logits_model(V, seed=2)
    for path, velocity in [
        (MixturePath(mask_source(V, V - 1), LinearScheduler()), None),
        (MetricPath.ordinal(V), KineticOptimalVelocity()),
    ]:
        x0 = path.sample_source((B, L), generator=g)
        res = sample(
            model,
            path,
            x0,
            steps=8,
            velocity=velocity,
            clamp_mask=clamp_mask,
            clamp_values=clamp_values,
            generator=g,
            return_trajectory=True,
        )
        for x in res.trajectory:
            assert torch.equal(x[clamp_mask], clamp_values[clamp_mask])
        # free positions do move
        free = ~clamp_mask
        assert (res.tokens[free] != x0[free]).any()
    with pytest.raises(ValueError):
        sample(model, path, x0, steps=2, clamp_mask=clamp_mask)


def test_same_seed_same_output_and_trajectory():
    V, B, L = 6, 40, 4
    model = random_logits_model(V, seed=4)
    for path, velocity in [
        (MixturePath(uniform_source(V), KineticOptimalScheduler()), None),
        (MetricPath.ordinal(V), CorrectedVelocity(KineticOptimalVelocity(), 0.5)),
    ]:
        x0 = path.sample_source((B, L), generator=torch.Generator().manual_seed(0))
        a = sample(
            model,
            path,
            x0,
            steps=7,
            velocity=velocity,
            generator=torch.Generator().manual_seed(9),
            return_trajectory=True,
        )
        b = sample(
            model,
            path,
            x0,
            steps=7,
            velocity=velocity,
            generator=torch.Generator().manual_seed(9),
            return_trajectory=True,
        )
        c = sample(model, path, x0, steps=7, velocity=velocity, generator=torch.Generator().manual_seed(10))
        assert torch.equal(a.tokens, b.tokens)
        assert not torch.equal(a.tokens, c.tokens)
        assert len(a.trajectory) == 8
        assert all(torch.equal(u, v) for u, v in zip(a.trajectory, b.trajectory, strict=True))
        assert torch.equal(a.trajectory[0], x0) and torch.equal(a.trajectory[-1], a.tokens)
        torch.testing.assert_close(a.times, uniform_grid(7))
        assert c.trajectory is None and c.times is None


def test_time_grid_validation():
    path = MetricPath.ordinal(4)
    model = random_logits_model(4)
    x0 = torch.zeros(2, 3, dtype=torch.long)
    with pytest.raises(ValueError):
        sample(model, path, x0)
    with pytest.raises(ValueError):
        sample(model, path, x0, time_grid=torch.tensor([0.0, 0.5, 0.4, 1.0]))
    with pytest.raises(ValueError):
        sample(model, path, x0, time_grid=torch.tensor([0.0, 1.5]))
    with pytest.raises(ValueError):
        uniform_grid(0)
    grid = uniform_grid(4, t_max=0.8)
    torch.testing.assert_close(grid, torch.tensor([0.0, 0.2, 0.4, 0.6, 0.8], dtype=torch.float64))
    res = sample(model, path, x0, time_grid=torch.tensor([0.0, 0.3, 1.0]), return_trajectory=True)
    assert len(res.trajectory) == 3


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_categorical_frequencies(dtype):
    w = torch.tensor([3.0, 0.0, 1.0, 0.5, 0.0, 5.5])
    n = 30_000
    x = categorical(w.expand(n, -1), generator=torch.Generator().manual_seed(0), dtype=dtype)
    counts = torch.bincount(x, minlength=len(w)).double()
    assert (counts[w == 0] == 0).all()
    pos = w > 0
    res = chisquare(counts[pos].numpy(), (w[pos] / w.sum() * n).double().numpy())
    assert res.pvalue > 1e-3


@pytest.mark.parametrize("temperature", [0.0, -1.0, float("nan"), float("inf")])
def test_sampler_refuses_meaningless_temperatures(temperature):
    path = MixturePath(mask_source(4, 3), LinearScheduler())
    x0 = torch.full((2, 4), 3)
    with pytest.raises(ValueError, match="temperature must be a positive number"):
        sample(lambda x, t: torch.zeros(*x.shape, 4), path, x0, steps=2, temperature=temperature)
