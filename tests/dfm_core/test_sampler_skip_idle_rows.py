"""``sample(skip_idle_rows=True)``: a sequence with no jump in a step skips the network, same law.

With a model that computes each sequence on its own (the exact posterior of dfm_toy, in float64), the
draws do not depend on which other rows are in the network batch, so skipping must give the very same
tokens as running every row, for the same generator. The model here has a per-sequence input (which of
two targets a row follows), so a row handed the wrong input would show.
"""

import itertools

import pytest
import torch
from dfm_toy import MASK, N_DATA, chi2_pvalue, exact_posterior, random_target

from dfm_core.paths import MetricPath, MixturePath
from dfm_core.sampler import sample
from dfm_core.schedulers import CosineScheduler, KineticOptimalScheduler, LinearScheduler
from dfm_core.sources import mask_source, uniform_source
from dfm_core.velocities import CorrectedVelocity, KineticOptimalVelocity

TARGETS = (random_target(0), random_target(1))


def labelled_model(path, labels: torch.Tensor, calls: list | None = None):
    """``model(x, t, rows)``: the exact posterior of target ``labels[rows]`` for each row."""

    def model(x: torch.Tensor, t: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
        lab = labels if rows is None else labels[rows]
        assert len(lab) == len(x) == len(t)
        if calls is not None:
            calls.append(None if rows is None else rows.clone())
        post = torch.stack([exact_posterior(path, q, x, t) for q in TARGETS])  # (2, B, 2, V)
        return post[lab, torch.arange(len(x))].log()

    return model


def mask_path(scheduler=None):
    return MixturePath(mask_source(N_DATA + 1, MASK), scheduler or KineticOptimalScheduler())


def run(path, labels, steps, skip, velocity=None, seed=0, calls=None, trajectory=False):
    g = torch.Generator().manual_seed(seed)
    x0 = path.sample_source((len(labels), 2), generator=g)
    model = labelled_model(path, labels, calls)
    return sample(
        model if skip else (lambda x, t: model(x, t)),
        path,
        x0,
        steps=steps,
        velocity=velocity,
        generator=g,
        skip_idle_rows=skip,
        return_trajectory=trajectory,
    )


LAZY = {  # mixture path, KO velocity, token-independent scheduler: rows are skipped
    "mask-ko": lambda: mask_path(),
    "mask-cosine": lambda: mask_path(CosineScheduler()),
    "uniform-linear": lambda: MixturePath(uniform_source(N_DATA), LinearScheduler()),
}


@pytest.mark.parametrize("name", list(LAZY))
def test_skipping_idle_rows_gives_the_same_tokens_with_fewer_network_rows(name):
    path = LAZY[name]()
    labels = torch.randint(0, 2, (3000,), generator=torch.Generator().manual_seed(1))
    steps = 200
    full = run(path, labels, steps, skip=False)
    skipped = run(path, labels, steps, skip=True)
    assert torch.equal(full.tokens, skipped.tokens)
    assert full.network_rows == len(labels) * steps
    # two positions that each jump once (mask) or a few times (uniform): most steps leave a row alone
    assert 0 < skipped.network_rows < 0.25 * full.network_rows


def test_the_network_sees_exactly_the_rows_that_change():
    path = mask_path()
    labels = torch.randint(0, 2, (500,), generator=torch.Generator().manual_seed(2))
    calls: list = []
    res = run(path, labels, 100, skip=True, calls=calls, trajectory=True)
    # under the mask source a jump always changes the token (mask -> data), so a row that went through
    # the network in a step is a row whose state changed in that step, and the other way round
    changed = [torch.nonzero((b != a).any(-1)).squeeze(-1) for a, b in itertools.pairwise(res.trajectory)]
    called = iter(calls)
    for step_rows in changed:
        if len(step_rows):
            assert torch.equal(next(called), step_rows)
    assert next(called, None) is None  # no call for a step where nothing changed
    assert res.network_rows == sum(len(r) for r in changed)


def test_skipped_rows_still_reproduce_each_rows_target():
    """Chi-square per label: each row follows its own target, so rows were matched to their inputs."""
    path = mask_path()
    labels = torch.arange(20_000) % 2
    res = run(path, labels, 128, skip=True, seed=3)
    for label, q in enumerate(TARGETS):
        chi2, pvalue = chi2_pvalue(res.tokens[labels == label], q)
        assert pvalue > 1e-3, f"label {label}: chi2 = {chi2:.1f}"


@pytest.mark.parametrize(
    "make_path, velocity",
    [
        (lambda: mask_path(), CorrectedVelocity(KineticOptimalVelocity(), 0.5)),  # not the closed form
        (lambda: MixturePath(uniform_source(N_DATA), KineticOptimalScheduler(uniform_source(N_DATA))), None),
        (lambda: MetricPath.ordinal(N_DATA), None),
    ],
    ids=["corrector", "token-dependent-scheduler", "metric-path"],
)
def test_paths_that_cannot_skip_run_every_row_with_the_rows_argument(make_path, velocity):
    path = make_path()
    labels = torch.randint(0, 2, (200,), generator=torch.Generator().manual_seed(4))
    calls: list = []
    skipped = run(path, labels, 20, skip=True, velocity=velocity, calls=calls)
    full = run(path, labels, 20, skip=False, velocity=velocity)
    assert torch.equal(full.tokens, skipped.tokens)
    assert len(calls) == 20 and all(torch.equal(rows, torch.arange(200)) for rows in calls)
    assert skipped.network_rows == full.network_rows == 200 * 20


def test_a_model_with_the_wrong_batch_size_is_named():
    path = mask_path()

    def bad(x, t, rows):
        return torch.zeros(len(x) + 1, x.shape[1], path.vocab_size)

    x0 = path.sample_source((8, 2))
    with pytest.raises(ValueError, match="logits of shape"):
        sample(bad, path, x0, steps=10, skip_idle_rows=True)
