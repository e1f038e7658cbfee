"""Objectives: cross-entropy (eq 11), the ELBOs of eq 36 / eq 37 / eq 92-93, and the fair evaluation of E.1.

The toy target (D = 2, 3 data tokens) has an exactly known posterior, so the ELBO can be computed by
enumerating x_t and integrating over t, and compared with log q(x1).
"""

import math

import pytest
import torch
from dfm_toy import N_DATA, exact_model, random_target

from dfm_core.objectives import (
    cross_entropy_loss,
    fair_elbo,
    general_elbo_integrand,
    mixture_elbo_integrand,
    mixture_elbo_loss,
    sample_training_time,
)
from dfm_core.paths import MixturePath
from dfm_core.schedulers import KineticOptimalScheduler, LinearScheduler, PolynomialScheduler
from dfm_core.sources import mask_source, uniform_source
from dfm_core.velocities import KineticOptimalVelocity

SRC = torch.tensor([0.6, 0.3, 0.1], dtype=torch.float64)
Q = random_target(0)
X1_ALL = torch.cartesian_prod(torch.arange(N_DATA), torch.arange(N_DATA))  # the 9 states, row-major like Q


def toy_paths():
    return {
        "mask-ko": MixturePath(mask_source(N_DATA + 1, N_DATA), KineticOptimalScheduler()),
        "mask-linear": MixturePath(mask_source(N_DATA + 1, N_DATA), LinearScheduler()),
        "uniform-linear": MixturePath(uniform_source(N_DATA), LinearScheduler()),
        "general-tdko": MixturePath(SRC, KineticOptimalScheduler(SRC)),
    }


TOY = toy_paths()


def enumerated_elbo(path: MixturePath, epsilon: float = 0.0, n: int = 400) -> torch.Tensor:
    """eq 37 integrated exactly over x_t ~ p_t(. | x1) (enumeration) and by the midpoint rule in t.

    Returns the ELBO of each of the 9 states x1 (ordered like Q.reshape(-1)).
    """
    V = path.vocab_size
    xts = torch.cartesian_prod(torch.arange(V), torch.arange(V))
    t = (torch.arange(n, dtype=torch.float64) + 0.5) / n
    it, ix, ixt = torch.meshgrid(torch.arange(n), torch.arange(9), torch.arange(V * V), indexing="ij")
    tt, x1, xt = t[it.reshape(-1)], X1_ALL[ix.reshape(-1)], xts[ixt.reshape(-1)]
    cond = path.probs(x1, tt).double()  # (R, 2, V)
    weight = cond.gather(-1, xt.unsqueeze(-1)).squeeze(-1).prod(-1)  # p_t(x_t | x1)
    logits = exact_model(path, Q, epsilon)(xt, tt)
    integrand = mixture_elbo_integrand(logits, x1, xt, tt.float(), path).double().sum(-1)
    integrand = torch.where(weight > 0, integrand, torch.zeros_like(integrand))  # x_t off the path
    return (weight * integrand).view(n, 9, V * V).sum(-1).mean(0)


# ------------------------------------------------------------------------------------------ eq 37 ELBO


@pytest.mark.parametrize("name", list(TOY))
def test_elbo_bounds_the_exact_log_likelihood_and_tightens(name):
    path = TOY[name]
    log_q = Q.log().reshape(-1)
    elbos = {eps: enumerated_elbo(path, eps) for eps in (0.5, 0.2, 0.0)}
    exact = elbos[0.0]
    assert torch.isfinite(exact).all()
    # a lower bound on log q(x1) for every x1 (quadrature error is far below 1e-3 here)
    assert (exact <= log_q + 1e-3).all(), exact - log_q
    # the expected ELBO under q increases as the model approaches the exact posterior
    avg = {eps: float((Q.reshape(-1) * e).sum()) for eps, e in elbos.items()}
    assert avg[0.5] < avg[0.2] - 0.1 < avg[0.0] - 0.2
    # and stays below the expected log-likelihood (Gibbs) for the imperfect models too
    assert avg[0.2] < float((Q * Q.log()).sum())
    if name.startswith("mask"):
        # masked construction + exact posterior = exact any-order autoregression: the bound is tight
        torch.testing.assert_close(exact, log_q, atol=2e-3, rtol=0)
    else:
        # a non-mask source gives a strictly loose bound, yet not absurdly loose
        assert (exact < log_q - 1e-2).all()
        assert (exact > log_q - 3.0).all()


@pytest.mark.parametrize("name", ["mask-ko", "general-tdko", "uniform-linear"])
def test_fair_elbo_estimates_the_enumerated_elbo(name):
    """fair_elbo (Appendix E.1: stratified kappa points, x_t sampled) agrees with enumeration."""
    path = TOY[name]
    reps = 40
    x1 = X1_ALL.repeat(reps, 1)  # (9 * reps, 2)
    res = fair_elbo(
        exact_model(path, Q), x1, path, n_points=256, generator=torch.Generator().manual_seed(0), chunk=64
    )
    per_seq = -res.nats_per_sequence.view(reps, 9)  # ELBO estimates
    assert res.num_tokens == 9 * reps * 2
    assert res.nats_per_token == pytest.approx(float(res.nats_per_sequence.sum()) / (9 * reps * 2))
    mean, se = per_seq.mean(0), per_seq.std(0) / math.sqrt(reps)
    exact = enumerated_elbo(path)
    assert ((mean - exact).abs() <= 5 * se + 5e-3).all(), (mean, exact, se)
    # averaged over all x1 (many more samples), the estimate is below the log-likelihood
    log_q = Q.log().reshape(-1)
    assert float((mean - log_q).mean()) <= 5 * float(se.pow(2).mean().sqrt() / 3) + 5e-3
    assert res.perplexity_bound == pytest.approx(math.exp(res.nats_per_token))


def test_fair_elbo_respects_valid():
    path = TOY["uniform-linear"]
    x1 = X1_ALL.repeat(4, 1)
    valid = torch.ones_like(x1, dtype=torch.bool)
    valid[:, 1] = False
    res = fair_elbo(
        exact_model(path, Q), x1, path, n_points=16, valid=valid, generator=torch.Generator().manual_seed(1)
    )
    assert res.num_tokens == x1.shape[0]
    assert torch.isfinite(res.nats_per_sequence).all()


# -------------------------------------------------------------------------------- eq 37 vs eq 36


def random_posteriors(shape, V, g, n_allowed=None):
    n_allowed = n_allowed or V
    post = torch.zeros(*shape, V, dtype=torch.float64)
    post[..., :n_allowed] = -torch.log(torch.rand(*shape, n_allowed, generator=g, dtype=torch.float64))
    return post / post.sum(-1, keepdim=True)


def eq36_vs_eq37_paths():
    V = 6
    g = torch.Generator().manual_seed(9)
    src = -torch.log(torch.rand(V, generator=g, dtype=torch.float64))
    src = src / src.sum()
    return {
        "general-tdko": MixturePath(src, KineticOptimalScheduler(src)),
        "general-poly": MixturePath(src, PolynomialScheduler(2.0)),
        "uniform-ko": MixturePath(uniform_source(V), KineticOptimalScheduler(uniform_source(V))),
        "uniform-linear": MixturePath(uniform_source(V), LinearScheduler()),
    }


@pytest.mark.parametrize("name", list(eq36_vs_eq37_paths()))
def test_eq37_equals_eq36_with_the_ko_velocity(name):
    path = eq36_vs_eq37_paths()[name]
    V = path.vocab_size
    g = torch.Generator().manual_seed(17)
    Bb, L = 16, 5
    post = random_posteriors((Bb, L), V, g)
    x1 = torch.randint(0, V, (Bb, L), generator=g)
    t = torch.rand(Bb, generator=g, dtype=torch.float64) * 0.95 + 0.02
    xt = path.sample(x1, t, generator=g)
    # make sure both cases x_t = x1 and x_t != x1 occur
    xt[:, 0] = x1[:, 0]
    xt[:, 1] = (x1[:, 1] + 1) % V
    eq37 = mixture_elbo_integrand(post.log(), x1, xt, t, path).double()
    eq36 = general_elbo_integrand(post, x1, xt, t, path, KineticOptimalVelocity())
    assert eq36.shape == (Bb, L)
    torch.testing.assert_close(eq37, eq36, rtol=1e-4, atol=1e-4 * max(1.0, float(eq36.abs().max())))


def test_eq37_equals_eq36_on_the_mask_path_where_defined():
    """Mask source: eq 37 and eq 36 (eq 26 rates) agree on masked x_t, and on unmasked x_t when the
    model keeps unmasked tokens (off the support of p_t(. | v), eq 26 has no rates while eq 72 has)."""
    V, m = 5, 4
    path = MixturePath(mask_source(V, m), LinearScheduler())
    g = torch.Generator().manual_seed(23)
    Bb, L = 12, 6
    x1 = torch.randint(0, m, (Bb, L), generator=g)
    t = torch.rand(Bb, generator=g, dtype=torch.float64) * 0.9 + 0.05
    xt = path.sample(x1, t, generator=g)
    xt[:, 0], xt[:, 1] = m, x1[:, 1]
    post = random_posteriors((Bb, L), V, g, n_allowed=m)
    unmasked = xt != m
    post[unmasked] = torch.nn.functional.one_hot(xt[unmasked], V).double()
    eq37 = mixture_elbo_integrand(post.log(), x1, xt, t, path).double()
    eq36 = general_elbo_integrand(post, x1, xt, t, path)
    torch.testing.assert_close(eq37, eq36, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    "sched", [LinearScheduler(), KineticOptimalScheduler(), PolynomialScheduler(2.0)], ids=repr
)
def test_eq37_reduces_to_the_masked_elbo_eq92(sched):
    V, m = 6, 5
    path = MixturePath(mask_source(V, m), sched)
    g = torch.Generator().manual_seed(29)
    Bb, L = 10, 8
    x1 = torch.randint(0, m, (Bb, L), generator=g)
    t = torch.rand(Bb, generator=g, dtype=torch.float64) * 0.9 + 0.05
    xt = path.sample(x1, t, generator=g)
    masked = xt == m
    assert masked.any() and (~masked).any()
    post = random_posteriors((Bb, L), V, g, n_allowed=m)  # never predicts the mask token
    post[~masked] = torch.nn.functional.one_hot(xt[~masked], V).double()  # delta on unmasked tokens
    lam = (sched.d_kappa(t) / (1 - sched.kappa(t)))[:, None]  # token-independent rate
    p_x1 = post.gather(-1, x1.unsqueeze(-1)).squeeze(-1)
    eq92 = masked.double() * (-lam * post.sum(-1) + lam * (1 + p_x1.log()))
    eq37 = mixture_elbo_integrand(post.log(), x1, xt, t, path).double()
    torch.testing.assert_close(eq37, eq92, rtol=1e-5, atol=1e-5)
    # unmasked positions contribute nothing
    assert (eq37[~masked].abs() < 1e-6).all()


def test_mixture_elbo_loss_is_the_negative_mean_integrand():
    path = TOY["general-tdko"]
    g = torch.Generator().manual_seed(31)
    x1 = torch.randint(0, 3, (4, 7), generator=g)
    t = torch.rand(4, generator=g)
    xt = path.sample(x1, t, generator=g)
    logits = torch.randn(4, 7, 3, generator=g)
    integ = mixture_elbo_integrand(logits, x1, xt, t, path)
    assert integ.shape == (4, 7)
    torch.testing.assert_close(mixture_elbo_loss(logits, x1, xt, t, path), -integ.mean())
    valid = torch.rand(4, 7, generator=g) > 0.4
    torch.testing.assert_close(mixture_elbo_loss(logits, x1, xt, t, path, valid), -integ[valid].mean())


# ---------------------------------------------------------------------------------- cross-entropy


def test_cross_entropy_matches_manual_and_respects_valid():
    g = torch.Generator().manual_seed(0)
    B, L, V = 3, 5, 7
    logits = torch.randn(B, L, V, generator=g) * 3
    x1 = torch.randint(0, V, (B, L), generator=g)
    manual = torch.stack(
        [-(logits[b, i, x1[b, i]] - torch.logsumexp(logits[b, i], 0)) for b in range(B) for i in range(L)]
    ).view(B, L)
    torch.testing.assert_close(cross_entropy_loss(logits, x1), manual.mean())
    valid = torch.rand(B, L, generator=g) > 0.5
    valid[0, 0] = True
    torch.testing.assert_close(cross_entropy_loss(logits, x1, valid), manual[valid].mean())
    # invalid positions do not matter
    other = logits.clone()
    other[~valid] = torch.randn(int((~valid).sum()), V, generator=g) * 10
    torch.testing.assert_close(cross_entropy_loss(other, x1, valid), cross_entropy_loss(logits, x1, valid))
    # bf16 logits are evaluated in float32
    assert cross_entropy_loss(logits.bfloat16(), x1).dtype == torch.float32
    # a perfect model has zero loss
    perfect = torch.nn.functional.one_hot(x1, V).float() * 1e4
    assert float(cross_entropy_loss(perfect, x1)) < 1e-6


def test_sample_training_time():
    t = sample_training_time(10_000, t_max=1 - 1e-3, generator=torch.Generator().manual_seed(0))
    assert t.shape == (10_000,)
    assert float(t.min()) >= 0 and float(t.max()) < 1 - 1e-3
    assert abs(float(t.mean()) - 0.4995) < 0.02
    again = sample_training_time(10_000, t_max=1 - 1e-3, generator=torch.Generator().manual_seed(0))
    assert torch.equal(t, again)


# ----------------------------------------------------------------------- known posteriors (mask source)


def test_pin_known_tokens_makes_unmasked_posteriors_exact():
    path = TOY["mask-linear"]
    xt = torch.tensor([[0, 3], [3, 2]])
    logits = torch.randn(2, 2, 4, requires_grad=True)
    pinned = path.pin_known_tokens(logits.clone(), xt)
    probs = pinned.softmax(-1)
    assert torch.equal(probs[0, 0], torch.tensor([1.0, 0, 0, 0])) and torch.equal(
        probs[1, 1], torch.eye(4)[2]
    )
    assert torch.equal(pinned[0, 1], logits[0, 1]) and torch.equal(pinned[1, 0], logits[1, 0])  # masked: kept
    pinned.log_softmax(-1)[xt == 3].sum().backward()  # gradients flow through the kept positions only
    assert logits.grad[xt != 3].abs().sum() == 0 and logits.grad[xt == 3].abs().sum() > 0
    full = TOY["uniform-linear"]  # a source of full support knows nothing
    raw = torch.randn(2, 2, 3)
    assert torch.equal(full.pin_known_tokens(raw.clone(), torch.tensor([[0, 1], [2, 0]])), raw)


def test_pinned_posteriors_remove_the_unmasked_error_from_the_elbo():
    """A denoiser exact on masked positions but 1 % off on unmasked ones loses likelihood through the
    lambda (p(x_t | x_t) - 1) terms of eq 37, heavily weighted near t = 1; pinned, it is the exact model."""
    path = TOY["mask-linear"]
    exact = exact_model(path, Q)

    def sloppy(x, t):
        logits = exact(x, t).clone()
        unmasked = x != N_DATA
        post = logits.exp()
        post[unmasked] = 0.99 * post[unmasked] + 0.01 / N_DATA * (torch.arange(N_DATA + 1) < N_DATA)
        return post.log()

    def pinned(x, t):
        return path.pin_known_tokens(sloppy(x, t), x)

    x1 = X1_ALL.repeat(40, 1)

    def estimate(model, seed):
        g = torch.Generator().manual_seed(seed)
        return fair_elbo(model, x1, path, n_points=64, generator=g, chunk=64).nats_per_token

    seeds = range(4)
    exact_nats = [estimate(exact, s) for s in seeds]
    assert [estimate(pinned, s) for s in seeds] == pytest.approx(exact_nats, abs=1e-5)
    sloppy_nats = [estimate(sloppy, s) for s in seeds]
    assert min(sloppy_nats) > max(exact_nats)  # the unpinned model pays for its unmasked error


def test_pinned_loss_equals_the_loss_of_pinned_logits():
    path = TOY["mask-ko"]
    g = torch.Generator().manual_seed(3)
    x1 = torch.randint(N_DATA, (64, 2), generator=g)
    t = torch.rand(64, generator=g) * 0.99
    xt = path.sample(x1, t, generator=g)
    assert path.known_tokens(xt).any() and (~path.known_tokens(xt)).any()
    logits = torch.randn(64, 2, N_DATA + 1, generator=g).index_fill(-1, torch.tensor([N_DATA]), float("-inf"))
    a, b = logits.clone().requires_grad_(True), logits.clone().requires_grad_(True)
    cheap = mixture_elbo_loss(a, x1, xt, t, path, pin_known=True)
    pinned = mixture_elbo_loss(path.pin_known_tokens(b * 1.0, xt), x1, xt, t, path)
    assert cheap.item() == pytest.approx(pinned.item(), rel=1e-6)
    assert cheap.item() != pytest.approx(mixture_elbo_loss(logits, x1, xt, t, path).item(), rel=1e-3)
    cheap.backward()
    pinned.backward()
    unknown = ~path.known_tokens(xt)
    assert torch.allclose(a.grad[unknown], b.grad[unknown], atol=1e-7) and (a.grad[~unknown] == 0).all()
