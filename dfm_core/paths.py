"""Conditional probability paths p_t(x | x1), factorised over positions (eq 1).

* :class:`MixturePath`: eq 2, ``(1 - kappa_t(x1)) p(x) + kappa_t(x1) delta_{x1}(x)``, with any source PMF
  and any (possibly token-dependent) scheduler.
* :class:`MetricPath`: eq 27, ``softmax(-beta_t d(x, x1))`` with a distance matrix or a callable and
  ``beta_t`` from eq 108.

Both give the conditional PMF and its time derivative over the whole vocabulary (shape (..., V)),
which is all the kinetic-optimal velocities need, and draw ``x_t ~ p_t(. | x1)`` for a batch.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from dfm_core.draws import categorical
from dfm_core.schedulers import BetaSchedule, Scheduler
from dfm_core.sources import pmf_source, sample_source

__all__ = ["ProbabilityPath", "MixturePath", "MetricPath"]


class ProbabilityPath:
    """Interface of a factorised conditional path over a vocabulary of size ``vocab_size``."""

    vocab_size: int

    def probs(self, x1: Tensor, t: Tensor) -> Tensor:
        """p_t(. | x1) for every position: (..., V). ``t`` broadcasts against ``x1``."""
        raise NotImplementedError

    def probs_dt(self, x1: Tensor, t: Tensor) -> Tensor:
        """d/dt p_t(. | x1): (..., V)."""
        raise NotImplementedError

    def sample(self, x1: Tensor, t: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Draw x_t ~ p_t(. | x1) independently per position."""
        # inverse CDF in float64 (4x faster than torch.multinomial over many short rows on a CPU)
        return categorical(self.probs(x1, t).clamp_min(0.0), generator=generator).reshape(x1.shape)

    def on_support(self, z: Tensor, x1: Tensor, t: Tensor) -> Tensor:
        """Whether p_t(z | x1) > 0 (for t < 1): the states that flow to x1. Shape of z."""
        return self.probs(x1, t).gather(-1, z.unsqueeze(-1)).squeeze(-1) > 0

    def sample_source(
        self,
        shape: tuple[int, ...],
        generator: torch.Generator | None = None,
        device: torch.device | str | None = None,
    ) -> Tensor:
        """Draw x_0 from the source p_0 (identical for every x1)."""
        raise NotImplementedError


class MixturePath(ProbabilityPath):
    """Mixture path of eq 2 with source PMF ``source`` (V,) and scheduler ``scheduler``."""

    def __init__(self, source: Tensor, scheduler: Scheduler) -> None:
        source = torch.as_tensor(source, dtype=torch.float64)
        if source.ndim != 1:
            raise ValueError("the source PMF must have shape (V,)")
        self.source = pmf_source(source)  # finite, non-negative, positive mass; normalised
        self.scheduler = scheduler
        self.vocab_size = int(source.shape[0])
        nz = torch.nonzero(self.source).flatten()
        self.mask_id: int | None = int(nz[0]) if len(nz) == 1 else None

    def _source_like(self, like: Tensor) -> Tensor:
        return self.source.to(device=like.device, dtype=like.dtype)

    def kappa(self, x1: Tensor, t: Tensor) -> Tensor:
        return self.scheduler.kappa(_as_time(t, x1), x1)

    def probs(self, x1: Tensor, t: Tensor) -> Tensor:
        k = self.kappa(x1, t).unsqueeze(-1)
        p = self._source_like(k)
        onehot = torch.nn.functional.one_hot(x1, self.vocab_size).to(k.dtype)
        return (1.0 - k) * p + k * onehot

    def probs_dt(self, x1: Tensor, t: Tensor) -> Tensor:
        dk = self.scheduler.d_kappa(_as_time(t, x1), x1).unsqueeze(-1)
        p = self._source_like(dk)
        onehot = torch.nn.functional.one_hot(x1, self.vocab_size).to(dk.dtype)
        return dk * (onehot - p)

    def sample(self, x1: Tensor, t: Tensor, generator: torch.Generator | None = None) -> Tensor:
        k = self.kappa(x1, t)
        u = torch.rand(x1.shape, generator=generator, device=x1.device, dtype=k.dtype)
        x0 = self.sample_source(tuple(x1.shape), generator=generator, device=x1.device)
        return torch.where(u < k, x1, x0)

    def on_support(self, z: Tensor, x1: Tensor, t: Tensor) -> Tensor:
        # (1 - kappa) p(z) + kappa delta_{x1}(z) > 0 for t < 1 iff z is in the source's support or z = x1
        return (self.source.to(z.device)[z] > 0) | (z == x1)

    def known_tokens(self, xt: Tensor) -> Tensor:
        """Where the posterior is known exactly: a token the source cannot draw (p_0(x_t) = 0, e.g. any
        unmasked token under the mask source) was put there by the data, so p_t(x_t | x1) > 0 (eq 2)
        forces x1 = x_t and p_{1|t}(. | x_t) = delta_{x_t}. Returns a bool tensor shaped like ``xt``
        (all False for a source of full support)."""
        return self.source.to(xt.device)[xt] == 0

    def pin_known_tokens(self, logits: Tensor, xt: Tensor) -> Tensor:
        """Make the posterior exact where it is known (:meth:`known_tokens`): writes 0 at x_t and -inf
        elsewhere into those positions of ``logits`` (..., V), in place for contiguous logits (else into a
        contiguous copy), and returns the result, which callers must use; for sampling and evaluation.
        Training gets the same loss cheaper from ``mixture_elbo_loss(..., pin_known=True)``, which
        zeroes the integrand there instead of rewriting V logits per position.

        With a network's logits this removes the eq 37 terms lambda(x_t) (p(x_t | x_t) - 1) of unmasked
        positions, whose weight lambda = kappa' / (1 - kappa) is large near t = 1: a small model error
        there costs likelihood and makes ELBO estimates heavy-tailed.
        """
        if self.source.ne(0).all():
            return logits
        known = self.known_tokens(xt)
        if not bool(known.any()):
            return logits
        if not logits.is_contiguous():
            logits = logits.contiguous()
        flat = logits.view(-1, logits.shape[-1])
        rows = known.reshape(-1).nonzero().squeeze(1)
        flat.index_fill_(0, rows, float("-inf"))
        flat.index_put_(
            (rows, xt.reshape(-1)[rows]), torch.zeros((), dtype=logits.dtype, device=logits.device)
        )
        return logits

    def sample_source(
        self,
        shape: tuple[int, ...],
        generator: torch.Generator | None = None,
        device: torch.device | str | None = None,
    ) -> Tensor:
        if self.mask_id is not None:
            return torch.full(shape, self.mask_id, dtype=torch.long, device=device)
        return sample_source(self.source, shape, generator=generator, device=device)

    def __repr__(self) -> str:
        src = f"mask={self.mask_id}" if self.mask_id is not None else f"V={self.vocab_size}"
        return f"MixturePath({src}, {self.scheduler!r})"


class MetricPath(ProbabilityPath):
    """Metric-induced path of eq 27: p_t(x | x1) = softmax(-beta_t d(x, x1)).

    Args:
        distance: either a (V, V) tensor with ``distance[x1, x] = d(x, x1)`` (>= 0, zero only on the
            diagonal), or a callable mapping ``x1`` (...,) to distances (..., V) (e.g. computed from
            embeddings as in eq 107 without storing a V x V matrix).
        beta: the schedule beta_t (eq 108).
        vocab_size: required when ``distance`` is a callable.
    """

    def __init__(
        self,
        distance: Tensor | Callable[[Tensor], Tensor],
        beta: BetaSchedule | None = None,
        vocab_size: int | None = None,
    ) -> None:
        self.beta = beta or BetaSchedule()
        if callable(distance) and not isinstance(distance, Tensor):
            if vocab_size is None:
                raise ValueError("vocab_size is required with a callable distance")
            self._distance_fn = distance
            self.vocab_size = int(vocab_size)
        else:
            d = torch.as_tensor(distance)
            if d.ndim != 2 or d.shape[0] != d.shape[1]:
                raise ValueError("distance must be a square (V, V) matrix")
            off_diagonal = ~torch.eye(d.shape[0], dtype=torch.bool, device=d.device)
            if (d < 0).any() or (d.diagonal() != 0).any() or (d[off_diagonal] == 0).any():
                raise ValueError("distance must be positive off the diagonal and zero on it (eq 27)")
            self._matrix = d
            self._matrices: dict[tuple[torch.device, torch.dtype], Tensor] = {}
            self._distance_fn = None
            self.vocab_size = int(d.shape[0])

    @classmethod
    def from_embeddings(
        cls, embeddings: Tensor, power: float = 1.0, beta: BetaSchedule | None = None
    ) -> MetricPath:
        """d(x, y) = ||emb(x) - emb(y)||_2^power (eq 107), evaluated on demand: the rows d(., x1) come
        from one float64 matrix product of the centred embeddings (|a|^2 + |b|^2 - 2 a.b, the fast form;
        centring keeps it accurate for large, tightly clustered embeddings), with d(x, x) = 0 exactly."""
        emb = embeddings.detach().to(torch.float64)
        emb = emb - emb.mean(0)
        held = {"emb": emb, "norms": emb.pow(2).sum(-1)}

        def dist(x1: Tensor) -> Tensor:
            if held["emb"].device != x1.device:  # moved once, not at every call
                held.update({k: v.to(x1.device) for k, v in held.items()})
            e, norms = held["emb"], held["norms"]
            index = x1.reshape(-1, 1)
            # one (N, V) buffer, updated in place: |b|^2 - 2 a.b, + |a|^2, clamped, d(x, x) = 0, ^(power/2)
            squared = torch.addmm(norms.unsqueeze(0), e[index[:, 0]], e.T, alpha=-2.0)
            squared.add_(norms[index]).clamp_(min=0.0).scatter_(1, index, 0.0)
            return squared.pow_(power / 2.0).reshape(*x1.shape, e.shape[0])

        return cls(dist, beta=beta, vocab_size=int(embeddings.shape[0]))

    @classmethod
    def ordinal(
        cls, vocab_size: int, low: float = -1.0, high: float = 1.0, beta: BetaSchedule | None = None
    ) -> MetricPath:
        """d(x, y) = |v(x) - v(y)| with tokens placed evenly on [low, high] (pixel values, sec 8.3)."""
        v = torch.linspace(low, high, vocab_size, dtype=torch.float64)
        return cls((v[:, None] - v[None, :]).abs(), beta=beta)

    def distances(self, x1: Tensor, dtype: torch.dtype | None = None) -> Tensor:
        """d(., x1) for every position: (..., V)."""
        if self._distance_fn is not None:
            d = self._distance_fn(x1)
        else:
            # the matrix is moved and cast once per (device, dtype), not at every call: gathering from a
            # float32 copy reads and writes half the bytes of a float64 gather followed by a cast
            key = (x1.device, dtype or self._matrix.dtype)
            matrix = self._matrices.get(key)
            if matrix is None:
                matrix = self._matrices[key] = self._matrix.to(device=key[0], dtype=key[1])
            d = matrix[x1]
        return d.to(dtype) if dtype is not None else d

    def _beta_terms(self, x1: Tensor, t: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        t = _as_time(t, x1)
        dtype = t.dtype if t.dtype in (torch.float32, torch.float64) else torch.float32
        t = t.to(dtype)
        d = self.distances(x1, dtype)
        return t, d, self.beta.beta(t.clamp(max=1.0 - 1e-7)).unsqueeze(-1)

    def probs(self, x1: Tensor, t: Tensor) -> Tensor:
        t, d, b = self._beta_terms(x1, t)
        p = torch.softmax(-b * d, dim=-1)
        # delta_{x1} at t >= 1, from a bool (V-wide) comparison: an int64 one_hot cost 8 bytes per entry
        hit = torch.arange(self.vocab_size, device=x1.device) == x1.unsqueeze(-1)
        return torch.where((t >= 1.0).unsqueeze(-1), hit.to(p.dtype), p)

    def probs_dt(self, x1: Tensor, t: Tensor) -> Tensor:
        t, d, b = self._beta_terms(x1, t)
        p = torch.softmax(-b * d, dim=-1)
        # beta'_t diverges at t = 0 when a < 1 (eq 108, a = 0.9): evaluate it at t >= 1e-6 so that the
        # rates at t = 0 (the sampler's first step) stay finite instead of inf * 0 = nan / +-inf.
        db = self.beta.d_beta(t.clamp(min=1e-6, max=1.0 - 1e-7)).unsqueeze(-1)
        mean_d = (p * d).sum(-1, keepdim=True)
        dp = -db * p * (d - mean_d)
        return torch.where((t >= 1.0).unsqueeze(-1), torch.zeros_like(dp), dp)

    def on_support(self, z: Tensor, x1: Tensor, t: Tensor) -> Tensor:
        # softmax(-beta d) is positive everywhere for t < 1 (no underflow test on purpose)
        return torch.ones_like(z, dtype=torch.bool)

    def sample_source(
        self,
        shape: tuple[int, ...],
        generator: torch.Generator | None = None,
        device: torch.device | str | None = None,
    ) -> Tensor:
        # beta_0 = 0: p_0 is uniform for every x1.
        return torch.randint(self.vocab_size, shape, generator=generator, device=device)

    def __repr__(self) -> str:
        return f"MetricPath(V={self.vocab_size}, {self.beta!r})"


def _as_time(t: Tensor | float, x1: Tensor) -> Tensor:
    """Broadcast t to x1's shape. A (B,) time against (B, L, ...) tokens is aligned on the batch dim."""
    t = torch.as_tensor(t, device=x1.device)
    if not t.is_floating_point():
        t = t.to(torch.get_default_dtype())
    while t.ndim < x1.ndim:
        t = t.unsqueeze(-1)
    return t.expand(x1.shape)
