"""The closed-form mixture step and the general step agree on states off the path's support."""

import torch

from dfm_core import (
    CorrectedVelocity,
    KineticOptimalScheduler,
    KineticOptimalVelocity,
    MixturePath,
    mask_source,
    sample,
)
from dfm_core.sampler import _general_step, _mixture_ko_step


def test_unmasked_tokens_stay_under_the_mask_source() -> None:
    V, MASK = 5, 5
    path = MixturePath(mask_source(V + 1, MASK), KineticOptimalScheduler())
    z = torch.tensor([[0, 1, 2, MASK, MASK, 3]])
    x1 = torch.tensor([[4, 4, 4, 4, 4, 4]])  # the posterior draw disagrees with every unmasked token
    t, h = torch.tensor(0.9, dtype=torch.float64), torch.tensor(0.1, dtype=torch.float64)
    for step in (_mixture_ko_step,):
        out = step(path, z, x1, t, h, torch.Generator().manual_seed(0), torch.float64)
        assert torch.equal(out[0, [0, 1, 2, 5]], z[0, [0, 1, 2, 5]])
    out = _general_step(
        path, KineticOptimalVelocity(), z, x1, t, h, torch.Generator().manual_seed(0), torch.float64
    )
    assert torch.equal(out[0, [0, 1, 2, 5]], z[0, [0, 1, 2, 5]])


def test_fast_and_general_steps_have_the_same_law() -> None:
    # Same model, same path: the closed form (eq 72) and the generic flux (eq 26) give the same samples' law.
    V, MASK, n = 4, 4, 6000
    path = MixturePath(mask_source(V + 1, MASK), KineticOptimalScheduler())
    logits = torch.randn(3, V + 1)
    logits[:, MASK] = -1e9

    def model(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return logits.expand(x.shape[0], -1, -1)

    x0 = path.sample_source((n, 3))
    grid = torch.tensor([0.0, 0.2, 0.4, 0.6], dtype=torch.float64)  # stop before t = 1: a partial trajectory
    a = sample(model, path, x0, time_grid=grid, generator=torch.Generator().manual_seed(1)).tokens
    # a CorrectedVelocity with zero weight takes the general code path with the same law
    b = sample(
        model,
        path,
        x0,
        time_grid=grid,
        velocity=CorrectedVelocity(KineticOptimalVelocity(), 0.0),
        generator=torch.Generator().manual_seed(2),
    ).tokens
    for i in range(3):
        fa = torch.bincount(a[:, i], minlength=V + 1).double() / n
        fb = torch.bincount(b[:, i], minlength=V + 1).double() / n
        assert (fa - fb).abs().max() < 0.03
        assert 0.2 < fa[MASK] < 0.9  # still partly masked at t = 0.6
