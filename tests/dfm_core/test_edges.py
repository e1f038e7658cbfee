"""dfm_core at its edges: inputs a library user can get wrong are refused by name, and the boundary cases
of the math (t = 0, t = 1, states of zero mass) give the values the paper's definitions give."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dfm_core.nn import DiT
from dfm_core.objectives import fair_elbo
from dfm_core.paths import MetricPath, MixturePath
from dfm_core.sampler import sample, uniform_grid
from dfm_core.schedulers import KineticOptimalScheduler, LinearScheduler, make_scheduler
from dfm_core.sources import mask_source, token_statistics
from dfm_core.velocities import KineticOptimalVelocity, make_velocity

V = 4
PATH = MixturePath(mask_source(V, V - 1), LinearScheduler())


def uniform_model(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    logits = torch.zeros(*x.shape, V)
    logits[..., V - 1] = float("-inf")
    return logits


def test_sampler_refuses_inputs_it_would_misread() -> None:
    x0 = PATH.sample_source((8, 3))
    assert sample(uniform_model, PATH, x0, steps=3).tokens.max() < V - 1  # the mask is never a result
    for bad, message in (
        (torch.full((8, 3), -1), "outside"),
        (torch.full((8, 3), V), "outside"),
        (x0.float(), "integer token ids"),
        (x0.bool(), "integer token ids"),
        (x0[0], "shape"),
    ):
        with pytest.raises(ValueError, match=message):
            sample(uniform_model, PATH, bad, steps=3)
    assert sample(uniform_model, PATH, x0.int(), steps=3).tokens.dtype == torch.long  # int32 is fine
    with pytest.raises(ValueError, match="bool mask"):
        sample(uniform_model, PATH, x0, steps=3, allowed=torch.ones(3, V, dtype=torch.long))
    for steps in (2.5, 0, True):
        with pytest.raises(ValueError, match="whole number"):
            uniform_grid(steps)
    assert len(uniform_grid(np.int64(4))) == 5


@pytest.mark.parametrize("width", [V + 2, V - 1])
def test_sampler_refuses_logits_of_another_vocabulary(width: int) -> None:
    def model(x, t):
        return torch.zeros(*x.shape, width)

    with pytest.raises(ValueError, match=r"logits of shape .* vocabulary 4"):
        sample(model, PATH, PATH.sample_source((8, 3)), steps=1)


def test_non_finite_logits_are_an_error_not_mask_tokens() -> None:
    def nan_model(x, t):
        return torch.full((*x.shape, V), float("nan"))

    for path in (PATH, MixturePath(torch.ones(V), KineticOptimalScheduler(torch.ones(V) / V))):
        with pytest.raises(FloatingPointError, match="non-finite logits"):
            sample(nan_model, path, path.sample_source((8, 3)), steps=4)


def test_sources_and_distances_are_validated() -> None:
    for bad in ([0.5, -0.1, 0.6], [0.0, 0.0], [float("nan"), 1.0], [[0.5, 0.5]]):
        with pytest.raises(ValueError, match="source PMF"):
            MixturePath(torch.tensor(bad), LinearScheduler())
    assert torch.allclose(
        MixturePath(torch.tensor([2.0, 2.0]), LinearScheduler()).source.sum(), torch.ones(1).double()
    )
    with pytest.raises(ValueError, match="positive off the diagonal"):
        MetricPath(torch.tensor([[0.0, 0.0, 1.0], [0.0, 0.0, 1.0], [1.0, 1.0, 0.0]]))
    emb = 800.0 + torch.randn(16, 8) * 1e-2  # large norms, tightly clustered: the matmul form loses d(x, x)
    d = MetricPath.from_embeddings(emb).distances(torch.arange(16))
    assert torch.equal(d.diagonal(), torch.zeros(16)) and (d + torch.eye(16) > 0).all()
    with pytest.raises(ValueError, match="outside"):
        token_statistics(torch.tensor([0, 1, 5]), vocab_size=4)
    counts = torch.tensor([2.0, 1.0, 1.0])
    assert torch.allclose(
        make_scheduler("ko", counts).kappa(torch.tensor(0.3), torch.tensor(0)),
        make_scheduler("ko", counts / 4).kappa(torch.tensor(0.3), torch.tensor(0)),
    )


def test_rates_are_infinite_at_t1_and_counts_are_checked() -> None:
    for scheduler in (
        LinearScheduler(),
        KineticOptimalScheduler(),
        KineticOptimalScheduler(torch.ones(3) / 3),
    ):
        rate = scheduler.rate(torch.tensor([0.5, 1.0], dtype=torch.float64), torch.tensor([0, 1]))
        assert torch.isfinite(rate[0]) and rate[1] == float("inf")
    with pytest.raises(ValueError, match="n_points"):
        fair_elbo(uniform_model, torch.zeros(2, 3, dtype=torch.long), PATH, n_points=0)
    dit = DiT(vocab_size=V, hidden=16, depth=1, heads=2, max_len=4)
    with pytest.raises(ValueError, match="max_len 4"):
        dit(torch.zeros(1, 5, dtype=torch.long), torch.zeros(1))


def test_the_corrector_preserves_p_t_at_t0_on_the_mask_path() -> None:
    """At t = 0, p(x1) = 0: a corrector flux into x1 could not flow back, so it is not there at all."""
    path = MixturePath(mask_source(3, 2), LinearScheduler())
    corrected, plain = make_velocity("ko", corrector=5.0), KineticOptimalVelocity()
    for t0 in (0.0, 1e-3, 0.5):
        t = torch.tensor([t0], dtype=torch.float64)
        x1 = torch.tensor([0])
        p, dp = path.probs(x1, t), path.probs_dt(x1, t)
        u_perp = corrected.velocity(p, dp, t) - plain.velocity(p, dp, t)
        assert torch.allclose(
            (u_perp * p.unsqueeze(-2)).sum(-1), torch.zeros(1, 3, dtype=torch.float64), atol=1e-9
        )
        rates = corrected.rates_from(p, dp, torch.tensor([2]), t)  # out of the mask
        assert torch.allclose(rates, corrected.velocity(p, dp, t)[..., 2], atol=1e-9)
