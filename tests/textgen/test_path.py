"""The text paths: the eq 38 source family built from token statistics, and the schedulers."""

from __future__ import annotations

import math

import pytest
import torch

from dfm_core.schedulers import KineticOptimalScheduler, LinearScheduler
from textgen.path import (
    PAPER_BETA0,
    TextPathConfig,
    build_path,
    stats_source,
    text_source,
    text_token_statistics,
)
from textgen.tokenizer import GPT2_VOCAB_SIZE, MASK_ID, VOCAB_SIZE


@pytest.fixture(scope="module")
def p_stats() -> torch.Tensor:
    # a Zipf-like stream: token k appears about 1000 / (k + 1) times among the first 200 ids
    counts = (1000.0 / torch.arange(1, 201)).long()
    tokens = torch.repeat_interleave(torch.arange(200), counts)
    return text_token_statistics(tokens, smoothing=1.0)


def test_token_statistics_count_and_smooth():
    p = text_token_statistics(torch.tensor([5, 5, 7]), smoothing=1.0)
    total = 3 + GPT2_VOCAB_SIZE
    assert p.shape == (GPT2_VOCAB_SIZE,) and p.dtype == torch.float64
    assert (
        p[5] == pytest.approx(3 / total)
        and p[7] == pytest.approx(2 / total)
        and p[0] == pytest.approx(1 / total)
    )
    with pytest.raises(ValueError):
        text_token_statistics(torch.tensor([MASK_ID]))


@pytest.mark.parametrize("beta0", PAPER_BETA0)
def test_stats_source_is_eq_38(p_stats, beta0):
    pmf = stats_source(p_stats, beta0)
    assert pmf.shape == (VOCAB_SIZE,) and pmf[MASK_ID] == 0
    assert float(pmf.sum()) == pytest.approx(1.0, abs=1e-12)
    # p(x) / p(y) = (p_stats(x) / p_stats(y))^(-beta0) wherever p does not underflow
    logp = pmf[:GPT2_VOCAB_SIZE].log()
    ok = logp > -700
    ref = int(torch.nonzero(ok)[0])
    assert torch.allclose(logp[ok] - logp[ref], -beta0 * (p_stats[ok].log() - p_stats[ref].log()), atol=1e-6)
    if beta0 <= 4:
        expected = p_stats ** (-beta0)
        assert torch.allclose(pmf[:GPT2_VOCAB_SIZE], expected / expected.sum(), rtol=1e-9)


def test_stats_source_limits(p_stats):
    assert torch.allclose(stats_source(p_stats, -1.0)[:GPT2_VOCAB_SIZE], p_stats)
    uniform = stats_source(p_stats, 0.0)
    assert torch.allclose(
        uniform[:GPT2_VOCAB_SIZE], torch.full((GPT2_VOCAB_SIZE,), 1 / GPT2_VOCAB_SIZE, dtype=torch.float64)
    )
    # beta0 -> inf: uniform on the least frequent tokens (here every unseen id)
    big = stats_source(p_stats, 1024.0)
    rare = p_stats == p_stats.min()
    assert float(big[:GPT2_VOCAB_SIZE][rare].sum()) == pytest.approx(1.0)
    assert torch.allclose(big[:GPT2_VOCAB_SIZE][rare], big[:GPT2_VOCAB_SIZE][rare][0].expand(int(rare.sum())))


def test_paths_pick_the_right_scheduler(p_stats):
    mask_ko = build_path(TextPathConfig("mask", scheduler="ko"), text_source(TextPathConfig("mask")))
    assert mask_ko.mask_id == MASK_ID and not mask_ko.scheduler.token_dependent
    t = torch.tensor([0.3])
    assert float(mask_ko.scheduler.kappa(t)) == pytest.approx(math.sin(math.pi * 0.3 / 2) ** 2)
    assert isinstance(
        build_path(TextPathConfig("mask", scheduler="linear"), mask_ko.source).scheduler, LinearScheduler
    )

    cfg = TextPathConfig("stats", beta0=-0.5, scheduler="ko")
    pmf = text_source(cfg, p_stats)
    path = build_path(cfg, pmf)
    assert path.mask_id is None and isinstance(path.scheduler, KineticOptimalScheduler)
    assert path.scheduler.token_dependent
    assert torch.allclose(path.scheduler.omega_table, torch.arccos(pmf.sqrt()))
    x1 = torch.tensor([[0, 150]])
    k = path.kappa(x1, torch.tensor([0.5]))
    assert k[0, 0] > k[0, 1], "a frequent token (large p(x1), small Omega) is reached earlier"
    xt = path.sample(
        torch.zeros(64, 8, dtype=torch.long), torch.zeros(64), generator=torch.Generator().manual_seed(0)
    )
    assert (xt != MASK_ID).all()
    with pytest.raises(ValueError, match="p_stats"):
        text_source(cfg)
    with pytest.raises(ValueError):
        TextPathConfig("uniform")
