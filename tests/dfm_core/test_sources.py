"""Source distributions: mask, uniform, the data-statistics family of eq 38, sampling."""

import pytest
import torch
from scipy.stats import chisquare

from dfm_core.sources import (
    data_statistics_source,
    mask_source,
    pmf_source,
    sample_source,
    token_statistics,
    uniform_source,
)


def assert_pmf(p: torch.Tensor) -> None:
    assert p.ndim == 1
    assert (p >= 0).all()
    assert float(p.sum()) == pytest.approx(1.0, abs=1e-12)


def random_stats(V: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.rand(V, generator=g, dtype=torch.float64) + 0.05
    return w / w.sum()


def test_mask_and_uniform_sources_are_pmfs():
    m = mask_source(7, 6)
    assert_pmf(m)
    assert float(m[6]) == 1.0 and int((m > 0).sum()) == 1
    u = uniform_source(7)
    assert_pmf(u)
    torch.testing.assert_close(u, torch.full((7,), 1 / 7, dtype=torch.float64))
    support = torch.tensor([True, False, True, True, False, False, False])
    us = uniform_source(7, support)
    assert_pmf(us)
    torch.testing.assert_close(us[support], torch.full((3,), 1 / 3, dtype=torch.float64))
    assert (us[~support] == 0).all()
    torch.testing.assert_close(uniform_source(7, torch.tensor([0, 2, 3])), us)
    with pytest.raises(ValueError):
        mask_source(4, 4)
    with pytest.raises(ValueError):
        uniform_source(3, torch.zeros(3, dtype=torch.bool))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_eq38_family_special_values(seed):
    p_stats = random_stats(11, seed)
    # beta0 = -1 recovers the data statistics, beta0 = 0 the uniform distribution
    torch.testing.assert_close(data_statistics_source(p_stats, -1.0), p_stats, atol=1e-12, rtol=0)
    torch.testing.assert_close(
        data_statistics_source(p_stats, 0.0), torch.full((11,), 1 / 11, dtype=torch.float64)
    )
    # softmax(-beta0 log p) = p^-beta0 / sum p^-beta0, written out independently
    for beta0 in (-0.5, 0.5, 1.0, 2.0, 4.0):
        w = p_stats ** (-beta0)
        src = data_statistics_source(p_stats, beta0)
        assert_pmf(src)
        torch.testing.assert_close(src, w / w.sum(), atol=1e-12, rtol=1e-10)
    # beta0 > 0 reverses the order: rarer tokens get more mass
    src = data_statistics_source(p_stats, 1.0)
    order = torch.argsort(p_stats)
    assert (src[order].diff() < 0).all()


def test_eq38_large_beta0_is_uniform_on_the_least_probable_tokens():
    counts = torch.tensor([40.0, 3.0, 17.0, 3.0, 9.0, 3.0, 25.0], dtype=torch.float64)
    p_stats = counts / counts.sum()
    argmin = p_stats == p_stats.min()
    for beta0 in (64.0, 256.0, 1024.0):
        src = data_statistics_source(p_stats, beta0)
        assert_pmf(src)
        assert torch.isfinite(src).all()
        torch.testing.assert_close(
            src[argmin], torch.full((3,), 1 / 3, dtype=torch.float64), atol=1e-9, rtol=0
        )
        assert float(src[~argmin].max()) < 1e-9
    with pytest.raises(ValueError):
        data_statistics_source(torch.tensor([0.5, 0.5, 0.0]), 1.0)


def test_token_statistics_and_pmf_source():
    tokens = torch.tensor([[0, 1, 1], [3, 3, 3]])
    p = token_statistics(tokens, 5, smoothing=0.0)
    torch.testing.assert_close(p, torch.tensor([1, 2, 0, 3, 0], dtype=torch.float64) / 6)
    p1 = token_statistics(tokens, 5, smoothing=1.0)
    torch.testing.assert_close(p1, torch.tensor([2, 3, 1, 4, 1], dtype=torch.float64) / 11)
    assert_pmf(pmf_source(torch.tensor([1.0, 3.0, 0.0])))
    torch.testing.assert_close(
        pmf_source(torch.tensor([1.0, 3.0, 0.0])), torch.tensor([0.25, 0.75, 0.0]).double()
    )
    with pytest.raises(ValueError):
        pmf_source(torch.tensor([1.0, -1.0]))


@pytest.mark.parametrize(
    "pmf",
    [
        torch.tensor([0.5, 0.0, 0.2, 0.25, 0.05], dtype=torch.float64),
        data_statistics_source(torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=torch.float64), 2.0),
        uniform_source(6),
    ],
    ids=["sparse", "eq38", "uniform"],
)
def test_sample_source_frequencies(pmf):
    g = torch.Generator().manual_seed(0)
    n = 40_000
    x = sample_source(pmf, (100, 400), generator=g)
    assert x.shape == (100, 400) and x.dtype == torch.long
    counts = torch.bincount(x.flatten(), minlength=len(pmf)).double()
    assert (counts[pmf == 0] == 0).all(), "drew a token of zero probability"
    pos = pmf > 0
    res = chisquare(counts[pos].numpy(), (pmf[pos] * n).numpy())
    assert res.pvalue > 1e-3, (counts, pmf * n)
    # the same generator seed gives the same draws
    again = sample_source(pmf, (100, 400), generator=torch.Generator().manual_seed(0))
    assert torch.equal(x, again)
