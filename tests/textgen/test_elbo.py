"""The fair ELBO of Appendix E.1 bounds an exactly known likelihood, and the AR perplexity is exact.

Toy: 2 positions over 3 data tokens with a random joint q (9 states), plus a MASK token (id 3). The
exact posterior p_{1|t}(x1^i | x_t) is computed by enumerating the 9 states through ``path.probs``,
so the model is the true denoiser and log q(x1) is the exact likelihood the ELBO must bound.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from dfm_core.objectives import fair_elbo
from dfm_core.paths import MixturePath
from dfm_core.schedulers import make_scheduler
from textgen.checkpoint import TextModel
from textgen.evaluate import sequence_nats
from textgen.model import TextARModel, TextModelConfig

N_DATA, MASK = 3, 3


def _target(seed: int = 0) -> torch.Tensor:
    q = torch.from_numpy(np.random.default_rng(seed).dirichlet(np.ones(N_DATA * N_DATA)))
    return (0.82 * q + 0.02).reshape(N_DATA, N_DATA)


def _exact_model(path: MixturePath, q: torch.Tensor, epsilon: float = 0.0):
    def model(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        B = x.shape[0]
        cand = torch.arange(N_DATA).expand(B, N_DATA)
        probs = path.probs(cand, t.double().unsqueeze(-1).expand(B, N_DATA)).double()  # (B, v, V)
        lik = torch.stack(
            [probs.gather(-1, x[:, i, None, None].expand(B, N_DATA, 1)).squeeze(-1) for i in range(2)], 1
        )
        joint = q * lik[:, 0, :, None] * lik[:, 1, None, :]
        joint = joint / joint.sum((1, 2), keepdim=True)
        post = torch.zeros(B, 2, path.vocab_size, dtype=torch.float64)
        post[:, 0, :N_DATA], post[:, 1, :N_DATA] = joint.sum(2), joint.sum(1)
        post[..., :N_DATA] = (1 - epsilon) * post[..., :N_DATA] + epsilon / N_DATA
        return post.log().float()

    return model


def _nats_per_state(path, model, repeats: int = 12, n_points: int = 128) -> torch.Tensor:
    states = torch.cartesian_prod(torch.arange(N_DATA), torch.arange(N_DATA))  # (9, 2)
    x1 = states.repeat(repeats, 1)
    res = fair_elbo(model, x1, path, n_points=n_points, generator=torch.Generator().manual_seed(0), chunk=16)
    return res.nats_per_sequence.view(repeats, -1).mean(0).reshape(N_DATA, N_DATA)


def test_fair_elbo_is_tight_for_the_exact_mask_denoiser():
    q = _target()
    source = torch.zeros(N_DATA + 1, dtype=torch.float64)
    source[MASK] = 1.0
    path = MixturePath(source, make_scheduler("linear", source))
    entropy = float((q * -q.log()).sum())  # E_q[-log q(x1)], the exact expected NLL
    nats = _nats_per_state(path, _exact_model(path, q))
    # masked diffusion with the true denoiser: the bound is tight up to Monte Carlo noise
    assert float((q * nats).sum()) == pytest.approx(entropy, abs=0.03)
    assert torch.allclose(nats, -q.log(), atol=0.4)
    worse = _nats_per_state(path, _exact_model(path, q, epsilon=0.3))
    assert float((q * worse).sum()) > entropy + 0.02, "an imperfect denoiser gets a looser bound"


@pytest.mark.parametrize("scheduler", ["ko", "linear"])
def test_fair_elbo_bounds_the_likelihood_with_a_data_statistics_source(scheduler):
    q = _target(1)
    p_stats = torch.tensor([q.sum(1)[0], q.sum(1)[1], q.sum(1)[2]], dtype=torch.float64)
    source = torch.zeros(N_DATA + 1, dtype=torch.float64)
    source[:N_DATA] = torch.softmax(-2.0 * p_stats.log(), 0)  # eq 38 with beta0 = 2
    path = MixturePath(source, make_scheduler(scheduler, source))
    assert path.scheduler.token_dependent == (scheduler == "ko")
    nats = _nats_per_state(path, _exact_model(path, q))
    expected = float((q * -q.log()).sum())  # E_q[-log q(x1)], the exact expected NLL
    mean_bound = float((q * nats.double()).sum())
    assert mean_bound >= expected - 0.03
    assert mean_bound < expected + 1.0


def test_ar_perplexity_is_exact(tmp_path: Path):
    torch.manual_seed(0)
    model = TextARModel(TextModelConfig.tiny(max_len=8))
    with torch.no_grad():  # break the zero init so the likelihood is not uniform
        model.dit.final.linear.weight.normal_(0, 0.5)
    bundle = TextModel(model.eval(), "ar", None, None, {"seq_len": 8}, torch.device("cpu"), tmp_path / "ar")
    x = torch.randint(50257, (3, 8))
    nats = sequence_nats(bundle, x, batch_size=2)
    with torch.no_grad():
        logits = model.dit(TextARModel.shift_right(x), None)
        logits[..., 50257] = -math.inf
        logp = torch.log_softmax(logits, -1).gather(-1, x.unsqueeze(-1)).squeeze(-1)
    assert torch.allclose(nats, -logp.double().sum(-1), rtol=1e-5)
