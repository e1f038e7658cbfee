"""The mixture paths of the text experiments (section 8.1): a source PMF and a scheduler kappa_t.

Sources over the 50,258-token text vocabulary:

* ``mask``: ``p = delta_MASK`` (MASK id 50257);
* ``stats``: the data-statistics family of eq 38, ``p = softmax(-beta0 log p_stats)`` over the 50,257
  GPT-2 tokens (MASK gets no mass), with ``p_stats`` the smoothed token frequencies of the training
  stream. beta0 = -1 is ``p_stats``, 0 the uniform PMF, large beta0 uniform on the rarest tokens.

Schedulers: ``linear`` (kappa_t = t), ``ko`` (eq 33: token-dependent for ``stats``, sin^2(pi t / 2)
for ``mask``), or ``cosine``.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from dfm_core.config import config_from_dict
from dfm_core.paths import MixturePath
from dfm_core.schedulers import make_scheduler
from dfm_core.sources import data_statistics_source, mask_source, token_statistics
from textgen.tokenizer import GPT2_VOCAB_SIZE, MASK_ID, VOCAB_SIZE

__all__ = [
    "PAPER_BETA0",
    "TextPathConfig",
    "text_token_statistics",
    "stats_source",
    "text_source",
    "build_path",
]

PAPER_BETA0 = (-0.5, 0.0, 0.5, 1.0, 2.0, 4.0, 64.0, 256.0, 1024.0)
"""The beta0 values of section 8.1 (any float is accepted)."""


@dataclass
class TextPathConfig:
    """Which mixture path a text model is trained on.

    Attributes:
        source: ``"mask"`` or ``"stats"`` (eq 38).
        beta0: the eq 38 parameter (only for ``stats``).
        scheduler: ``"linear"``, ``"ko"`` (eq 33) or ``"cosine"``.
    """

    source: str = "mask"
    beta0: float = 1024.0
    scheduler: str = "ko"

    def __post_init__(self) -> None:
        if self.source not in ("mask", "stats"):
            raise ValueError(f"source must be 'mask' or 'stats' (eq 38), got {self.source!r}")
        self.beta0 = float(self.beta0)
        if not math.isfinite(self.beta0):
            raise ValueError(f"beta0 must be a finite number, got {self.beta0}")
        if self.scheduler.lower() not in ("linear", "ko", "kinetic-optimal", "cosine"):
            raise ValueError(f"scheduler must be 'linear', 'ko' or 'cosine', got {self.scheduler!r}")

    @property
    def label(self) -> str:
        src = "mask" if self.source == "mask" else f"beta0={self.beta0:g}"
        return f"{self.scheduler}/{src}"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TextPathConfig:
        return config_from_dict(cls, data)


def text_token_statistics(tokens: Tensor, smoothing: float = 1.0) -> Tensor:
    """p_stats over the 50,257 GPT-2 tokens from a token stream (additive smoothing keeps it > 0)."""
    tokens = torch.as_tensor(tokens).reshape(-1).long()
    if (tokens >= GPT2_VOCAB_SIZE).any() or (tokens < 0).any():
        raise ValueError("token statistics need GPT-2 ids in [0, 50257)")
    return token_statistics(tokens, GPT2_VOCAB_SIZE, smoothing=smoothing)


def stats_source(p_stats: Tensor, beta0: float) -> Tensor:
    """Eq 38 over the GPT-2 tokens, padded with zero mass for MASK: shape (50258,) float64."""
    p_stats = torch.as_tensor(p_stats, dtype=torch.float64)
    if p_stats.shape != (GPT2_VOCAB_SIZE,):
        raise ValueError(f"p_stats must have shape ({GPT2_VOCAB_SIZE},), got {tuple(p_stats.shape)}")
    pmf = torch.zeros(VOCAB_SIZE, dtype=torch.float64)
    pmf[:GPT2_VOCAB_SIZE] = data_statistics_source(p_stats, beta0)
    if not torch.isfinite(pmf).all():
        raise ValueError(f"beta0={beta0} is too large: softmax(-beta0 log p_stats) overflows")
    return pmf


def text_source(config: TextPathConfig, p_stats: Tensor | None = None) -> Tensor:
    """The source PMF (50258,) of ``config``; ``stats`` needs ``p_stats``."""
    if config.source == "mask":
        return mask_source(VOCAB_SIZE, MASK_ID)
    if p_stats is None:
        raise ValueError("the stats source (eq 38) needs token statistics p_stats")
    return stats_source(p_stats, config.beta0)


def build_path(config: TextPathConfig, source_pmf: Tensor) -> MixturePath:
    """The mixture path (eq 2) with ``source_pmf`` and ``config.scheduler`` (eq 33 for ``ko``)."""
    source_pmf = torch.as_tensor(source_pmf, dtype=torch.float64)
    if source_pmf.shape != (VOCAB_SIZE,):
        raise ValueError(f"source PMF must have shape ({VOCAB_SIZE},), got {tuple(source_pmf.shape)}")
    return MixturePath(source_pmf, make_scheduler(config.scheduler, source_pmf))
