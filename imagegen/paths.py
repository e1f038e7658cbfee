"""The two pixel paths of section 8.3: the metric-induced path (eq 27) and the mask mixture baseline (eq 2).

* ``metric``: tokens 0..255 placed evenly on [-1, 1], d(x, y) = |x - y|, p_t(x | x1) =
  softmax(-beta_t d(x, x1)) with beta_t = c (t / (1 - t))^a (eq 108). The source (t = 0) is uniform.
* ``mask``: source delta on the mask token 256, kappa_t from a scheduler ('ko' is eq 33, which for a mask
  source is sin^2(pi t / 2); 'linear', 'cosine', 'poly').

The network always predicts 256 logits (a posterior over pixel values); :func:`pad_logits` adds the
never-predicted mask token for the 257-token mask path.

In latent mode (sec 8.4) the tokens are the K codes of a VQ-VAE instead: ``build_path(config, codebook)``
gives the metric path on the codebook embeddings (eq 107, see :mod:`imagegen.latent`) or the mask path
with mask token K.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor

from dfm_core.paths import MetricPath, MixturePath, ProbabilityPath
from dfm_core.schedulers import BetaSchedule, make_scheduler
from dfm_core.sources import mask_source
from imagegen.data import ImageDataset

__all__ = [
    "MASK_ID",
    "MAX_PREVIEW_IMAGES",
    "MAX_PREVIEW_TIMES",
    "NUM_LEVELS",
    "PixelPathConfig",
    "build_path",
    "pad_logits",
    "path_preview",
    "path_samples",
]

NUM_LEVELS = 256
MASK_ID = 256
MAX_PREVIEW_IMAGES = 64  # columns of a path preview (each draw holds (N, L, 256) probabilities)
MAX_PREVIEW_TIMES = 101  # rows of a path preview
_CHUNK_ELEMENTS = 1 << 24  # path_samples draws at most ~this many (position, value) probabilities at once


@dataclass
class PixelPathConfig:
    """Which conditional path a model is trained with; stored in every checkpoint.

    Attributes:
        kind: "metric" (eq 27) or "mask" (eq 2 with a mask source).
        c, a: beta_t = c (t / (1 - t))^a of the metric path (eq 108).
        scheduler: kappa_t of the mask path ('ko', 'linear', 'cosine', 'poly').
        scheduler_n: exponent of the 'poly' scheduler (kappa_t = t^n).
        lp: exponent of d(x, y) = ||emb(x) - emb(y)||^lp on codebook embeddings (eq 107; 4 as in E.4);
            only used in latent mode (pixel distances are |x - y|).
    """

    kind: Literal["metric", "mask"] = "metric"
    c: float = 3.0
    a: float = 0.9
    scheduler: str = "ko"
    scheduler_n: float = 1.0
    lp: float = 4.0

    def __post_init__(self) -> None:
        if self.kind not in ("metric", "mask"):
            raise ValueError(f"path kind must be 'metric' or 'mask', got {self.kind!r}")
        for name in ("c", "a", "scheduler_n", "lp"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ValueError(f"path parameter {name} must be a number, got {value!r}")
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"path parameter {name} must be a finite number > 0, got {value}")
        BetaSchedule(self.c, self.a)  # validates c, a
        make_scheduler(self.scheduler, n=self.scheduler_n)  # validates the name

    @property
    def vocab_size(self) -> int:
        """Tokens the path lives on: 256 pixel values, plus the mask token for the mask path."""
        return NUM_LEVELS + (1 if self.kind == "mask" else 0)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PixelPathConfig:
        from dfm_core.config import config_from_dict

        return config_from_dict(cls, data)


def build_path(config: PixelPathConfig, codebook: Tensor | None = None) -> ProbabilityPath:
    """The :class:`dfm_core.paths.ProbabilityPath` for ``config``: over pixel values, or with ``codebook``
    (K, D) over the K codes of a VQ-VAE (latent mode, :func:`imagegen.latent.latent_path`)."""
    if codebook is not None:
        from imagegen.latent import latent_path

        return latent_path(config, codebook)
    if config.kind == "metric":
        return MetricPath.ordinal(NUM_LEVELS, -1.0, 1.0, beta=BetaSchedule(config.c, config.a))
    source = mask_source(NUM_LEVELS + 1, MASK_ID)
    return MixturePath(source, make_scheduler(config.scheduler, source, n=config.scheduler_n))


def pad_logits(logits: Tensor, vocab_size: int) -> Tensor:
    """Append -inf logits up to ``vocab_size`` (the mask token is never a posterior outcome)."""
    extra = vocab_size - logits.shape[-1]
    if extra <= 0:
        return logits
    pad = torch.full((*logits.shape[:-1], extra), float("-inf"), dtype=logits.dtype, device=logits.device)
    return torch.cat([logits, pad], dim=-1)


def path_samples(
    images: Tensor, config: PixelPathConfig, times: Tensor, generator: torch.Generator | None = None
) -> Tensor:
    """x_t ~ p_t(. | x1) for every image x1 and time: uint8 (T, N, C, H, W), mask tokens shown as grey (128).

    The way E.4 tunes c and a: look at samples along the conditional path and pick values that use the
    whole time interval. Images are drawn in chunks, so memory stays bounded for any number of images.
    """
    if images.ndim != 4 or images.shape[0] < 1:
        raise ValueError(f"images must be (N, C, H, W) with N >= 1, got shape {tuple(images.shape)}")
    times = torch.as_tensor(times, dtype=torch.float64).flatten()
    if times.numel() < 1:
        raise ValueError("give at least one time")
    if not (torch.isfinite(times).all() and (times >= 0).all() and (times <= 1).all()):
        raise ValueError(f"times must lie in [0, 1], got {times.tolist()}")
    path = build_path(config)
    x1 = images.reshape(images.shape[0], -1).long()
    chunk = max(1, _CHUNK_ELEMENTS // (x1.shape[1] * path.vocab_size))
    out = []
    for t in times.tolist():
        parts = [
            path.sample(part, torch.full((part.shape[0],), float(t)), generator=generator)
            for part in x1.split(chunk)
        ]
        xt = torch.cat(parts)
        xt = torch.where(xt == MASK_ID, torch.full_like(xt, 128), xt) if config.kind == "mask" else xt
        out.append(xt.reshape(images.shape).to(torch.uint8))
    return torch.stack(out)


def path_preview(
    data: ImageDataset, config: PixelPathConfig, n: int = 8, times: int = 11, seed: int = 0
) -> tuple[Tensor, Tensor]:
    """x_t for ``n`` random images of ``data`` at ``times`` evenly spaced t in [0, 1] (the E.4 preview).

    Returns:
        ``(xt, ts)``: uint8 (times, n', C, H, W) with n' = min(n, len(data)), and the times (float).

    Raises:
        ValueError: ``n`` outside 1..MAX_PREVIEW_IMAGES or ``times`` outside 1..MAX_PREVIEW_TIMES.
    """
    check_preview_size(n, times)
    subset = data.random_subset(n, seed)
    ts = torch.linspace(0.0, 1.0, times)
    return path_samples(subset.images, config, ts, torch.Generator().manual_seed(seed)), ts


def check_preview_size(n: int, times: int) -> None:
    """Refuse a preview of ``n`` images (columns) or ``times`` rows beyond the grid a preview draws."""
    if not _is_int(n) or not 1 <= n <= MAX_PREVIEW_IMAGES:
        raise ValueError(f"a path preview shows 1 to {MAX_PREVIEW_IMAGES} images (n), got {n}")
    if not _is_int(times) or not 1 <= times <= MAX_PREVIEW_TIMES:
        raise ValueError(f"a path preview shows 1 to {MAX_PREVIEW_TIMES} times, got {times}")


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
