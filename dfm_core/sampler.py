"""Posterior sampling of section 3 with the always-valid step of Appendix A (Algorithm 1).

Each step from t to t + h, for every position independently:

1. draw ``X_1 ~ p_{1|t}(. | X_t)`` from the model's factorised posterior;
2. with ``lambda = -u_t(X_t, X_t | X_1)``, stay with probability ``exp(-h lambda)``, otherwise jump to
   ``x != X_t`` with probability ``u_t(x, X_t | X_1) / lambda``.

Step 2 is a valid PMF for any h. The last step, which ends at t = 1 where every conditional path is
``delta_{X_1}``, takes the exact transition ``X_1``. Mixture paths with the kinetic-optimal velocity
(eq 72) use a closed form that needs no (B, L, V) rate tensor.

With a token-independent scheduler, whether a position jumps in step 2 does not depend on ``X_1``, so
the jumps can be drawn first and the posterior evaluated only where one happens. ``skip_idle_rows``
goes one step further: a sequence with no jump in a step does not go through the network at all. That is
the same law with far fewer network rows (a 10-atom crystal has 46 tokens to unmask over 500 steps).
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from dfm_core.draws import categorical
from dfm_core.paths import MixturePath, ProbabilityPath
from dfm_core.velocities import KineticOptimalVelocity, ProbabilityVelocity

__all__ = ["SampleResult", "sample", "check_temperature", "categorical", "uniform_grid", "posterior_probs"]

ModelFn = Callable[..., Tensor]


@dataclass
class SampleResult:
    """Final tokens (B, L) and, when asked for, the states at every grid time (on CPU)."""

    tokens: Tensor
    trajectory: list[Tensor] | None = None
    times: Tensor | None = None
    network_rows: int = 0
    """Rows handed to the model function, summed over the steps (batch x steps without skipping; a guided
    model may run each twice)."""


def whole_number(value: object, name: str) -> int:
    """``value`` as an int >= 1 (numpy and torch integers too); 2.5, True or 0 is a ValueError naming it."""
    try:
        n = operator.index(value)
    except TypeError:
        n = None
    if n is None or isinstance(value, bool) or n < 1:
        raise ValueError(f"{name} must be a whole number >= 1, got {value!r}")
    return n


def uniform_grid(steps: int, device: torch.device | str | None = None, t_max: float = 1.0) -> Tensor:
    """steps + 1 equally spaced times in [0, t_max]."""
    steps = whole_number(steps, "steps")
    return torch.linspace(0.0, t_max, steps + 1, device=device, dtype=torch.float64)


def _check_tokens(x0: Tensor, V: int) -> Tensor:
    """``x0`` as a (B, L) long tensor of tokens in [0, V), or a ValueError saying what is wrong."""
    if x0.dtype == torch.bool or x0.is_floating_point() or x0.is_complex():
        raise ValueError(f"x0 must hold integer token ids, got dtype {x0.dtype}")
    if x0.ndim != 2:
        raise ValueError(f"x0 must have shape (batch, length), got {tuple(x0.shape)}")
    x0 = x0.long()
    if x0.numel() and (int(x0.min()) < 0 or int(x0.max()) >= V):
        raise ValueError(f"x0 holds tokens outside [0, {V}): min {int(x0.min())}, max {int(x0.max())}")
    return x0


def posterior_probs(
    logits: Tensor,
    temperature: float = 1.0,
    allowed: Tensor | None = None,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """Softmax of logits / temperature restricted to allowed tokens, in ``dtype``."""
    temperature = check_temperature(temperature)  # finite and > 0 (a NaN passed ``<= 0``)
    return _masked_softmax(logits, temperature, None if allowed is None else ~allowed, dtype)


def _masked_softmax(logits: Tensor, temperature: float, banned: Tensor | None, dtype: torch.dtype) -> Tensor:
    logits = logits.to(dtype)
    if temperature != 1.0:
        logits = logits / temperature
    if banned is not None:
        logits = logits.masked_fill(banned, float("-inf"))
    return torch.softmax(logits, dim=-1)


def check_temperature(temperature: float) -> float:
    """The posterior softmax temperature as a float; a ValueError unless it is finite and > 0."""
    if not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be a positive number, got {temperature}")
    return float(temperature)


def sample(
    model: ModelFn,
    path: ProbabilityPath,
    x0: Tensor,
    steps: int | None = None,
    time_grid: Tensor | None = None,
    velocity: ProbabilityVelocity | None = None,
    temperature: float = 1.0,
    allowed: Tensor | None = None,
    clamp_mask: Tensor | None = None,
    clamp_values: Tensor | None = None,
    float64: bool = True,
    generator: torch.Generator | None = None,
    return_trajectory: bool = False,
    progress: bool = False,
    skip_idle_rows: bool = False,
) -> SampleResult:
    """Generate samples with the posterior sampler of section 3 / Appendix A.

    Args:
        model: ``model(x_t (B, L) long, t (B,) float) -> logits (B, L, V)`` of p_{1|t}.
        path: the conditional path (mixture or metric, or any :class:`ProbabilityPath`).
        x0: starting tokens (B, L), usually ``path.sample_source``.
        steps / time_grid: NFE on a uniform grid, or an explicit increasing grid in [0, 1]; a grid that
            starts after 0 continues from ``x0`` taken as a sample of p_t at its first time.
        velocity: the conditional velocity (default: kinetic-optimal eq 26; may include a corrector).
        temperature: softmax temperature of the posterior.
        allowed: bool mask (B, L, V) or (L, V) of tokens each position may take (structured vocabularies).
        clamp_mask / clamp_values: positions (B, L) held at known tokens (inpainting / conditioning).
        float64: do the categorical draws and rates in float64.
        generator: torch.Generator for reproducible draws (on the tokens' device).
        return_trajectory: also return x_t at every grid time (on CPU).
        progress: show a tqdm progress bar.
        skip_idle_rows: call the network only on the sequences that have a jump in the step (mixture
            path, kinetic-optimal velocity, token-independent scheduler; the same law, other cases run
            every sequence). The model is then always called as ``model(x_rows, t_rows, rows)``, where
            ``rows`` (R,) long holds the batch indices of ``x_rows``, so that a model with per-sequence
            inputs (atom counts, class labels) can pick its own.
    """
    check_temperature(temperature)
    if time_grid is None:
        if steps is None:
            raise ValueError("give steps or time_grid")
        time_grid = uniform_grid(steps, device=x0.device)
    time_grid = time_grid.to(device=x0.device, dtype=torch.float64)
    if time_grid.ndim != 1 or len(time_grid) < 2 or (time_grid.diff() <= 0).any():
        raise ValueError("time_grid must be a strictly increasing 1-D tensor with at least 2 points")
    if time_grid[0] < 0 or time_grid[-1] > 1:
        raise ValueError("time_grid must lie in [0, 1]")
    velocity = velocity or KineticOptimalVelocity()
    work_dtype = torch.float64 if float64 else torch.float32
    V = path.vocab_size
    x0 = _check_tokens(x0, V)
    if allowed is not None:
        if allowed.dtype != torch.bool:
            raise ValueError(f"allowed must be a bool mask (True = allowed), got dtype {allowed.dtype}")
        allowed = allowed.to(x0.device)
        if allowed.ndim == 2:
            allowed = allowed.unsqueeze(0).expand(x0.shape[0], -1, -1)
        if allowed.shape != (*x0.shape, V):
            raise ValueError(f"allowed must have shape {(*x0.shape, V)}, got {tuple(allowed.shape)}")
        if not allowed.any(-1).all():
            raise ValueError("some position has no allowed token")
    if (clamp_mask is None) != (clamp_values is None):
        raise ValueError("clamp_mask and clamp_values go together")

    x = x0.clone()
    if clamp_mask is not None:
        x = torch.where(clamp_mask, clamp_values, x)
    banned = None if allowed is None else ~allowed
    fast_mixture = isinstance(path, MixturePath) and type(velocity) is KineticOptimalVelocity
    # Token-independent scheduler: whether a position jumps does not depend on the drawn x1, so the
    # posterior is only drawn where a jump happens (same law, far fewer categorical draws).
    lazy = fast_mixture and not path.scheduler.token_dependent
    source_support = path.source.to(x.device) > 0 if fast_mixture else None
    traj = [x.cpu()] if return_trajectory else None
    B = x.shape[0]
    times = time_grid.tolist()  # control flow on the host: no device sync per step
    t_dev = time_grid.to(torch.float32)
    n_steps = len(times) - 1
    finite = torch.ones((), dtype=torch.bool, device=x.device)  # all posteriors finite so far (no sync)
    iterator = range(n_steps)
    if progress:
        from tqdm.auto import tqdm

        iterator = tqdm(iterator, desc="sampling", unit="step", leave=False)

    network_rows = 0
    checked = False

    def call_model(x: Tensor, t: Tensor, rows: Tensor | None) -> Tensor:
        """Logits for the batch rows ``rows`` (None: all) of ``x`` at time ``t`` (0-dim)."""
        nonlocal network_rows, checked
        t_rows = t.expand(B if rows is None else len(rows))
        if skip_idle_rows:
            rows = torch.arange(B, device=x.device) if rows is None else rows
            out = model(x[rows], t_rows, rows)
        else:
            out = model(x, t_rows)
        expected = (len(t_rows), *x.shape[1:], V)
        if not checked and out.shape != expected:
            raise ValueError(
                f"the model returned logits of shape {tuple(out.shape)}; the path needs {expected} "
                f"(batch, length, vocabulary {V})"
            )
        checked = True
        network_rows += len(t_rows)
        return out

    for k in iterator:
        t, t_next = times[k], times[k + 1]
        final = k == n_steps - 1 and t_next >= 1.0
        if lazy:
            cand = source_support[x]
            if clamp_mask is not None:
                cand &= ~clamp_mask
            if final:
                jump = cand
            else:
                lam = path.scheduler.rate(torch.tensor(t, dtype=work_dtype, device=x.device))
                stay = torch.exp(-(t_next - t) * lam)
                u = torch.rand(x.shape, generator=generator, device=x.device, dtype=work_dtype)
                jump = cand & (u >= stay)
            # the rows with a jump (one host sync, as the boolean indexing by ``jump`` below has)
            rows = jump.any(-1).nonzero().squeeze(-1) if skip_idle_rows else None
            logits = None
            if rows is None or len(rows):
                logits = call_model(x, t_dev[k], rows)[jump if rows is None else jump[rows]]
            # a step without jumps draws nothing either way, so both settings use the generator alike
            if logits is not None and len(logits):
                post = _masked_softmax(
                    logits, temperature, None if banned is None else banned[jump], torch.float32
                )
                finite &= torch.isfinite(post.sum(-1)).all()
                x = x.clone()
                x[jump] = categorical(post, generator=generator, dtype=work_dtype)
        else:
            logits = call_model(x, t_dev[k], None)
            post = _masked_softmax(logits, temperature, banned, torch.float32)
            finite &= torch.isfinite(post.sum(-1)).all()
            x1 = categorical(post, generator=generator, dtype=work_dtype)
            if clamp_mask is not None:
                x1 = torch.where(clamp_mask, clamp_values, x1)
            t_k = time_grid[k]
            h = time_grid[k + 1] - t_k
            if final:  # exact: p_1(. | x1) = delta_{x1}, reached from every state on the path's support
                x_new = torch.where(path.on_support(x, x1, t_k), x1, x)
            elif fast_mixture:
                x_new = _mixture_ko_step(path, x, x1, t_k, h, generator, work_dtype)
            else:
                x_new = _general_step(path, velocity, x, x1, t_k, h, generator, work_dtype)
            if clamp_mask is not None:
                x_new = torch.where(clamp_mask, clamp_values, x_new)
            x = x_new
        if traj is not None:
            traj.append(x.cpu())
    if not bool(finite):  # one check at the end: a per-step check would sync the device every step
        raise FloatingPointError(
            "the model gave non-finite logits (NaN, or -inf for every allowed token) during sampling: "
            "the samples are meaningless"
        )
    return SampleResult(
        tokens=x,
        trajectory=traj,
        times=time_grid.cpu() if return_trajectory else None,
        network_rows=network_rows,
    )


def _mixture_ko_step(
    path: MixturePath,
    z: Tensor,
    x1: Tensor,
    t: Tensor,
    h: Tensor,
    generator: torch.Generator | None,
    dtype: torch.dtype,
) -> Tensor:
    # eq 72: the only jump is z -> x1, at rate lambda(x1) = kappa'(x1) / (1 - kappa(x1)). It holds where
    # p_t(z | x1) > 0; a state off the path's support (e.g. an unmasked token != x1 under the mask
    # source) has zero flux out (eq 16, 18) and stays.
    lam = path.scheduler.rate(t.to(dtype).expand(x1.shape), x1)
    stay = torch.exp(-h.to(dtype) * lam)
    u = torch.rand(z.shape, generator=generator, device=z.device, dtype=dtype)
    on_support = path.source.to(z.device)[z] > 0
    jump = (u >= stay) & (z != x1) & on_support
    return torch.where(jump, x1, z)


def _general_step(
    path: ProbabilityPath,
    velocity: ProbabilityVelocity,
    z: Tensor,
    x1: Tensor,
    t: Tensor,
    h: Tensor,
    generator: torch.Generator | None,
    dtype: torch.dtype,
) -> Tensor:
    tt = t.to(dtype).expand(x1.shape)
    p = path.probs(x1, tt).to(dtype)
    dp = path.probs_dt(x1, tt).to(dtype)
    rates = velocity.rates_from(p, dp, z, tt)
    lam = -rates.gather(-1, z.unsqueeze(-1)).squeeze(-1)
    lam = torch.nan_to_num(lam.clamp_min(0.0), nan=0.0, posinf=torch.finfo(dtype).max)
    stay = torch.exp(-h.to(dtype) * lam)
    u = torch.rand(z.shape, generator=generator, device=z.device, dtype=dtype)
    jump = (u >= stay) & (lam > 0)
    off = rates.scatter(-1, z.unsqueeze(-1), torch.zeros_like(lam).unsqueeze(-1)).clamp_min(0.0)
    # an infinite rate must not overflow the running sum of the categorical draw
    off = torch.nan_to_num(off, nan=0.0, posinf=torch.finfo(dtype).max / off.shape[-1])
    has_target = off.sum(-1) > 0
    target = categorical(torch.where(has_target.unsqueeze(-1), off, torch.ones_like(off)), generator, dtype)
    return torch.where(jump & has_target, target, z)
