"""The metric-induced pixel path (eq 27, beta_t of eq 108), its KO velocity (eq 29), the corrector, the mask path."""

from __future__ import annotations

import math

import pytest
import torch

from dfm_core.sampler import sample
from dfm_core.velocities import CorrectedVelocity, KineticOptimalVelocity, flux_divergence
from imagegen.generate import CorrectorSchedule
from imagegen.paths import MASK_ID, NUM_LEVELS, PixelPathConfig, build_path, pad_logits, path_samples

C, A = 3.0, 0.9
VALUES = torch.linspace(-1.0, 1.0, NUM_LEVELS, dtype=torch.float64)


def metric_path():
    return build_path(PixelPathConfig(kind="metric", c=C, a=A))


def beta(t: float) -> float:
    return C * (t / (1 - t)) ** A


def d_beta(t: float) -> float:
    return C * A * t ** (A - 1) / (1 - t) ** (A + 1)


@pytest.mark.parametrize("t", [0.1, 0.5, 0.9])
def test_metric_path_is_softmax_of_pixel_distance(t: float) -> None:
    path = metric_path()
    x1 = torch.tensor([0, 37, 128, 255])
    p = path.probs(x1, torch.full((4,), t, dtype=torch.float64))
    d = (VALUES[None, :] - VALUES[x1][:, None]).abs()
    expected = torch.softmax(-beta(t) * d, dim=-1)
    torch.testing.assert_close(p.double(), expected, rtol=1e-5, atol=1e-9)
    # finite-difference check of d/dt p_t
    h = 1e-5
    fd = (
        path.probs(x1, torch.full((4,), t + h, dtype=torch.float64))
        - path.probs(x1, torch.full((4,), t - h, dtype=torch.float64))
    ) / (2 * h)
    torch.testing.assert_close(
        path.probs_dt(x1, torch.full((4,), t, dtype=torch.float64)).double(), fd, rtol=1e-3, atol=1e-6
    )


def test_metric_path_starts_uniform_and_ends_at_x1() -> None:
    path = metric_path()
    x1 = torch.tensor([3, 200])
    torch.testing.assert_close(
        path.probs(x1, torch.zeros(2, dtype=torch.float64)).double(),
        torch.full((2, NUM_LEVELS), 1 / NUM_LEVELS, dtype=torch.float64),
    )
    p1 = path.probs(x1, torch.ones(2, dtype=torch.float64))
    assert torch.equal(p1.argmax(-1), x1) and torch.allclose(
        p1.max(-1).values.double(), torch.ones(2, dtype=torch.float64)
    )


@pytest.mark.parametrize("t", [0.2, 0.6, 0.95])
def test_ko_velocity_on_metric_path_is_eq_29_and_moves_only_towards_x1(t: float) -> None:
    """u(x, z | x1) = p_t(x | x1) beta'_t [d(z, x1) - d(x, x1)]_+ for x != z (eq 29)."""
    path = metric_path()
    x1 = torch.tensor([0, 90, 255])
    tt = torch.full((3,), t, dtype=torch.float64)
    p, dp = path.probs(x1, tt).double(), path.probs_dt(x1, tt).double()
    u = KineticOptimalVelocity().velocity(p, dp)  # (3, V[x], V[z])
    d = (VALUES[None, :] - VALUES[x1][:, None]).abs()  # d(., x1): (3, V)
    expected = p.unsqueeze(-1) * d_beta(t) * (d.unsqueeze(-2) - d.unsqueeze(-1)).clamp_min(0.0)
    off = ~torch.eye(NUM_LEVELS, dtype=torch.bool)
    scale = expected.abs().max()
    torch.testing.assert_close(u[:, off] / scale, expected[:, off] / scale, rtol=1e-6, atol=1e-9)
    # positive rates only towards states strictly closer to x1
    closer = d.unsqueeze(-1) < d.unsqueeze(-2)  # [x, z]: d(x, x1) < d(z, x1)
    assert (((u > 0) & off) <= closer).all()
    # the O(V) rates out of given states agree with the matrix columns
    z = torch.tensor([17, 90, 3])
    rates = KineticOptimalVelocity().rates_from(p, dp, z)
    torch.testing.assert_close(rates, u[torch.arange(3), :, z], rtol=1e-6, atol=1e-9 * float(scale))


def test_corrector_flux_is_divergence_free_and_schedule_is_w_tp_1mt_q() -> None:
    path = metric_path()
    x1 = torch.tensor([10, 240])
    tt = torch.full((2,), 0.5, dtype=torch.float64)
    p, dp = path.probs(x1, tt).double(), path.probs_dt(x1, tt).double()
    schedule = CorrectorSchedule(2.0, p=0.5, q=1.0)
    vel = CorrectedVelocity(KineticOptimalVelocity(), schedule)
    jp = vel.corrector_flux(p, dp)
    torch.testing.assert_close(jp, jp.transpose(-1, -2))
    assert flux_divergence(jp).abs().max() < 1e-12
    # the corrected flux still satisfies the continuity equation (eq 14): dp + div j = 0
    j = vel.flux(p, dp, tt)
    torch.testing.assert_close(flux_divergence(j), -dp, rtol=1e-6, atol=1e-9)
    ts = torch.tensor([0.0, 0.25, 1.0])
    torch.testing.assert_close(schedule(ts), 2.0 * ts**0.5 * (1 - ts))
    with pytest.raises(ValueError):
        CorrectorSchedule(-1.0)


def test_sampling_with_an_oracle_moves_every_pixel_monotonically_to_x1() -> None:
    """With p_{1|t} = delta_{x1}, the KO velocity (eq 29) never increases |x_t - x1| and ends at x1."""
    path = metric_path()
    g = torch.Generator().manual_seed(0)
    x1 = torch.randint(0, NUM_LEVELS, (4, 48), generator=g)

    def oracle(x, t):
        return torch.where(torch.nn.functional.one_hot(x1, NUM_LEVELS).bool(), 0.0, -1e4)

    x0 = path.sample_source(tuple(x1.shape), generator=g)
    res = sample(oracle, path, x0, steps=16, generator=g, return_trajectory=True)
    dist = torch.stack([(x - x1).abs() for x in res.trajectory])
    assert (dist.diff(dim=0) <= 0).all()
    assert torch.equal(res.tokens, x1)
    assert (dist[8] < dist[0]).float().mean() > 0.5  # it really moves before the last step


def test_mask_path_vocabulary_and_padding() -> None:
    cfg = PixelPathConfig(kind="mask", scheduler="ko")
    path = build_path(cfg)
    assert cfg.vocab_size == path.vocab_size == NUM_LEVELS + 1
    assert torch.equal(path.sample_source((2, 3)), torch.full((2, 3), MASK_ID))
    # KO scheduler with a mask source: kappa_t = sin^2(pi t / 2)
    x1 = torch.tensor([5])
    p = path.probs(x1, torch.tensor([0.5]))
    assert math.isclose(float(p[0, 5]), math.sin(math.pi / 4) ** 2, rel_tol=1e-6)
    logits = torch.randn(2, 3, NUM_LEVELS)
    padded = pad_logits(logits, cfg.vocab_size)
    assert padded.shape == (2, 3, 257) and torch.isinf(padded[..., MASK_ID]).all()
    assert pad_logits(logits, NUM_LEVELS) is logits


def test_path_config_validation_and_preview() -> None:
    with pytest.raises(ValueError):
        PixelPathConfig(kind="gaussian")
    with pytest.raises(ValueError):
        PixelPathConfig(c=0.0)
    cfg = PixelPathConfig(c=5.0, a=1.2)
    assert PixelPathConfig.from_dict(cfg.to_dict()) == cfg
    images = torch.randint(0, 256, (3, 1, 4, 4), dtype=torch.uint8)
    xt = path_samples(images, cfg, torch.tensor([0.0, 1.0]), torch.Generator().manual_seed(0))
    assert xt.shape == (2, 3, 1, 4, 4) and xt.dtype == torch.uint8
    assert torch.equal(xt[1], images)  # t = 1 is the data
    xm = path_samples(images, PixelPathConfig(kind="mask"), torch.tensor([0.0]))
    assert (xm == 128).all()  # mask tokens drawn grey
