"""Conditional paths: mixture (eq 2) and metric-induced (eq 27) PMFs, boundary conditions, sampling."""

import math

import pytest
import torch
from scipy.stats import chisquare

from dfm_core.paths import MetricPath, MixturePath
from dfm_core.schedulers import (
    BetaSchedule,
    CosineScheduler,
    KineticOptimalScheduler,
    LinearScheduler,
    PolynomialScheduler,
)
from dfm_core.sources import mask_source, uniform_source

V = 6


def random_pmf(n: int, g: torch.Generator, zeros: int = 0) -> torch.Tensor:
    w = torch.rand(n, generator=g, dtype=torch.float64) + 0.02
    if zeros:
        w[torch.randperm(n, generator=g)[:zeros]] = 0.0
    return w / w.sum()


def random_distance(n: int, g: torch.Generator) -> torch.Tensor:
    d = torch.rand(n, n, generator=g, dtype=torch.float64) * 2 + 0.1
    return d.fill_diagonal_(0.0)


def mixture_paths(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    src = random_pmf(V, g)
    sparse = random_pmf(V, g, zeros=2)
    return {
        "mask-ko": MixturePath(mask_source(V, V - 1), KineticOptimalScheduler()),
        "mask-linear": MixturePath(mask_source(V, V - 1), LinearScheduler()),
        "uniform-cosine": MixturePath(uniform_source(V), CosineScheduler()),
        "general-tdko": MixturePath(src, KineticOptimalScheduler(src)),
        "general-poly": MixturePath(src, PolynomialScheduler(2.0)),
        "sparse-tdko": MixturePath(sparse, KineticOptimalScheduler(sparse)),
    }


def metric_paths(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    emb = torch.randn(V, 3, generator=g, dtype=torch.float64)
    return {
        "random-d": MetricPath(random_distance(V, g), BetaSchedule(c=2.0, a=1.2)),
        "ordinal": MetricPath.ordinal(V),
        "embeddings": MetricPath.from_embeddings(emb, power=2.0, beta=BetaSchedule(c=1.5, a=0.9)),
    }


MIXTURES = mixture_paths()
METRICS = metric_paths()
ALL = {**MIXTURES, **METRICS}


def assert_pmfs(p: torch.Tensor) -> None:
    assert torch.isfinite(p).all()
    assert (p >= 0).all()
    torch.testing.assert_close(p.sum(-1), torch.ones(p.shape[:-1], dtype=p.dtype), atol=1e-12, rtol=0)


@pytest.mark.parametrize("name", list(ALL))
def test_probs_are_pmfs(name):
    path = ALL[name]
    g = torch.Generator().manual_seed(1)
    x1 = torch.randint(0, V - 1, (8, 5), generator=g)
    t = torch.rand(8, 5, generator=g, dtype=torch.float64)
    p = path.probs(x1, t)
    assert p.shape == (8, 5, V)
    assert_pmfs(p)
    # probs_dt of a PMF path sums to zero
    torch.testing.assert_close(
        path.probs_dt(x1, t).sum(-1), torch.zeros(8, 5, dtype=torch.float64), atol=1e-10, rtol=0
    )
    # a (B,) time is aligned with the batch dimension of (B, L) tokens
    tb = torch.rand(8, generator=g, dtype=torch.float64)
    torch.testing.assert_close(path.probs(x1, tb), path.probs(x1, tb[:, None].expand(8, 5)))


@pytest.mark.parametrize("name", list(MIXTURES))
def test_mixture_boundary_conditions_and_form(name):
    path = MIXTURES[name]
    x1 = torch.arange(V - 1)  # data tokens (the mask token is V - 1 for the mask sources)
    p0 = path.probs(x1, torch.zeros(V - 1, dtype=torch.float64))
    torch.testing.assert_close(p0, path.source.expand(V - 1, V), atol=1e-12, rtol=0)
    p1 = path.probs(x1, torch.ones(V - 1, dtype=torch.float64))
    torch.testing.assert_close(p1, torch.eye(V, dtype=torch.float64)[x1], atol=1e-12, rtol=0)
    # eq 2 at an interior time, with kappa from the scheduler
    t = torch.full((V - 1,), 0.37, dtype=torch.float64)
    k = path.scheduler.kappa(t, x1)
    expected = (1 - k)[:, None] * path.source + k[:, None] * torch.eye(V, dtype=torch.float64)[x1]
    torch.testing.assert_close(path.probs(x1, t), expected)


def test_token_dependent_mixture_uses_eq_33_per_target_token():
    g = torch.Generator().manual_seed(3)
    src = random_pmf(V, g)
    path = MixturePath(src, KineticOptimalScheduler(src))
    t = 0.6
    for v in range(V):
        w = math.acos(math.sqrt(float(src[v])))
        kappa = 1 - math.sin((1 - t) * w) ** 2 / math.sin(w) ** 2
        p = path.probs(torch.tensor([v]), torch.tensor([t], dtype=torch.float64))[0]
        assert float(p[v]) == pytest.approx((1 - kappa) * float(src[v]) + kappa, abs=1e-12)


@pytest.mark.parametrize("name", list(METRICS))
def test_metric_boundary_conditions_and_softmax_form(name):
    path = METRICS[name]
    x1 = torch.arange(V)
    p0 = path.probs(x1, torch.zeros(V, dtype=torch.float64))
    torch.testing.assert_close(p0, torch.full((V, V), 1 / V, dtype=torch.float64), atol=1e-12, rtol=0)
    p1 = path.probs(x1, torch.ones(V, dtype=torch.float64))
    torch.testing.assert_close(p1, torch.eye(V, dtype=torch.float64), atol=1e-12, rtol=0)
    # close to t = 1 the path concentrates on x1 (d(x, x1) = 0 only at x = x1)
    p_near = path.probs(x1, torch.full((V,), 0.999, dtype=torch.float64))
    assert (p_near.diagonal() > 0.99).all()
    # eq 27 written out: exp(-beta_t d(x, x1)) / Z, the nearer a state to x1 the likelier
    t = torch.full((V,), 0.3, dtype=torch.float64)
    d = path.distances(x1, torch.float64)
    w = torch.exp(-path.beta.beta(t)[:, None] * d)
    torch.testing.assert_close(path.probs(x1, t), w / w.sum(-1, keepdim=True))


def test_metric_float32_rows_and_mixed_times_in_one_batch():
    """float32 times gather a float32 copy of the matrix (equal to casting the float64 rows), and a batch
    mixing t < 1 with t = 1 gets softmax rows and exact deltas side by side."""
    path = METRICS["random-d"]
    x1 = torch.tensor([[0, 3, 5], [2, 2, 1]])
    assert torch.equal(path.distances(x1, torch.float32), path.distances(x1).to(torch.float32))
    assert path.distances(x1).dtype == torch.float64  # no dtype asked: the matrix's own
    t = torch.tensor([0.4, 1.0])
    p = path.probs(x1, t)
    assert p.dtype == torch.float32
    torch.testing.assert_close(p[1], torch.eye(V)[x1[1]], atol=0, rtol=0)
    w = torch.exp(-path.beta.beta(torch.tensor(0.4, dtype=torch.float64)) * path.distances(x1[0]))
    torch.testing.assert_close(p[0], (w / w.sum(-1, keepdim=True)).float())


def test_metric_distance_validation_and_callable():
    with pytest.raises(ValueError):
        MetricPath(torch.ones(3, 3))  # non-zero diagonal
    with pytest.raises(ValueError):
        MetricPath(torch.zeros(2, 3))
    with pytest.raises(ValueError):
        MetricPath(lambda x1: x1)  # callable without vocab_size
    emb = torch.randn(V, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    path = MetricPath.from_embeddings(emb)
    x1 = torch.tensor([[0, 3], [5, 1]])
    d = path.distances(x1)
    torch.testing.assert_close(d, (emb[x1][..., None, :] - emb).norm(dim=-1))


def _chi2_rows(x: torch.Tensor, probs: torch.Tensor) -> None:
    """x: (R, N) draws whose rows should follow probs (R, V)."""
    for r in range(x.shape[0]):
        counts = torch.bincount(x[r], minlength=V).double()
        expected = probs[r] * x.shape[1]
        assert (counts[expected == 0] == 0).all(), f"row {r}: drew a zero-probability token"
        pos = expected > 0
        if int(pos.sum()) == 1:  # a delta: every draw is that token (checked above)
            continue
        res = chisquare(counts[pos].numpy(), expected[pos].numpy())
        assert res.pvalue > 1e-3, (r, counts, expected)


@pytest.mark.parametrize(
    "name", ["mask-ko", "general-tdko", "sparse-tdko", "uniform-cosine", "random-d", "ordinal"]
)
def test_sample_frequencies_match_probs(name):
    path = ALL[name]
    n = 6000
    x1 = torch.arange(V - 1)[:, None].expand(V - 1, n)
    for i, t in enumerate((0.15, 0.55, 0.85)):
        tt = torch.full((V - 1,), t, dtype=torch.float64)  # (B,) time for (B, n) tokens
        g = torch.Generator().manual_seed(10 + i)
        x = path.sample(x1, tt, generator=g)
        assert x.shape == x1.shape and x.dtype == torch.long
        probs = path.probs(torch.arange(V - 1), tt)
        _chi2_rows(x, probs)


@pytest.mark.parametrize("name", list(ALL))
def test_sample_source_is_p0(name):
    path = ALL[name]
    g = torch.Generator().manual_seed(5)
    n = 12_000
    x0 = path.sample_source((3, n // 3), generator=g)
    assert x0.shape == (3, n // 3) and x0.dtype == torch.long
    p0 = path.probs(torch.zeros(1, dtype=torch.long), torch.zeros(1, dtype=torch.float64))
    _chi2_rows(x0.reshape(1, -1), p0)
