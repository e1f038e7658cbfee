"""Text networks: the DFM posterior DiT and the autoregressive baseline on the same backbone.

* :class:`TextDiT`: ``dfm_core.nn.DiT`` over the 50,258-token vocabulary conditioned on the flow time,
  giving the factorised posterior ``p_{1|t}(x_1^i | x_t)`` (eq 10 of the KO-DFM paper). MASK is never
  a data token, so its logit is fixed to ``-inf``.
* :class:`TextARModel`: the same DiT made causal and time-free; it predicts token ``i`` from
  ``<|endoftext|>`` (as BOS) and tokens ``< i``, so its perplexity is exact.

Most parameters sit in the two ``V x D`` tables (input embedding, output layer): hidden 32 already
gives ~3.3M parameters.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dfm_core.config import config_from_dict
from dfm_core.nn import DiT
from textgen.tokenizer import EOT_ID, MASK_ID, VOCAB_SIZE

__all__ = [
    "SIZE_PRESETS",
    "TextModelConfig",
    "TextDiT",
    "TextARModel",
    "build_model",
]


@dataclass
class TextModelConfig:
    """Architecture shared by the DFM and AR text models.

    The default (hidden 384, depth 8, 6 heads) has ~61M parameters (38.6M of them in the two vocabulary
    tables); ``small`` ~14M, ``tiny`` ~3.3M. The paper's models are 768 / 12 / 12 (~150M).

    Attributes:
        vocab_size: 50,258 = GPT-2's 50,257 + MASK.
        hidden, depth, heads, mlp_ratio, dropout: DiT width, blocks, heads, MLP ratio, residual dropout.
        max_len: longest sequence the positional tables cover.
        positional: ``rotary`` (default), ``learned`` or ``sinusoidal``.
    """

    vocab_size: int = VOCAB_SIZE
    hidden: int = 384
    depth: int = 8
    heads: int = 6
    mlp_ratio: float = 4.0
    dropout: float = 0.0
    max_len: int = 1024
    positional: Literal["rotary", "learned", "sinusoidal"] = "rotary"

    def __post_init__(self) -> None:
        for name in ("vocab_size", "hidden", "depth", "heads", "max_len"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.hidden % self.heads:
            raise ValueError(f"hidden={self.hidden} is not divisible by heads={self.heads}")
        if self.positional == "rotary" and (self.hidden // self.heads) % 2:
            raise ValueError(
                f"rotary positions need an even head width: hidden / heads = {self.hidden // self.heads}"
            )
        if not (math.isfinite(self.mlp_ratio) and self.mlp_ratio > 0):
            raise ValueError(f"mlp_ratio must be a finite number > 0, got {self.mlp_ratio}")
        if not 0.0 <= self.dropout < 1.0:  # also refuses NaN
            raise ValueError(f"dropout must lie in [0, 1), got {self.dropout}")
        if self.positional not in ("rotary", "learned", "sinusoidal"):
            raise ValueError(
                f"positional must be 'rotary', 'learned' or 'sinusoidal', got {self.positional!r}"
            )

    @classmethod
    def tiny(cls, **overrides: Any) -> TextModelConfig:
        """~3.3M parameters: tests and smoke runs."""
        return cls(**{"hidden": 32, "depth": 2, "heads": 2, **overrides})

    @classmethod
    def small(cls, **overrides: Any) -> TextModelConfig:
        """~14M parameters: short GPU runs."""
        return cls(**{"hidden": 128, "depth": 4, "heads": 4, **overrides})

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> TextModelConfig:
        if name not in SIZE_PRESETS:
            raise ValueError(f"unknown size {name!r}: choose one of {', '.join(SIZE_PRESETS)}")
        return SIZE_PRESETS[name](**overrides)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TextModelConfig:
        return config_from_dict(cls, data)


SIZE_PRESETS = {"tiny": TextModelConfig.tiny, "small": TextModelConfig.small, "default": TextModelConfig}


def _dit(config: TextModelConfig, causal: bool) -> DiT:
    return DiT(
        config.vocab_size,
        hidden=config.hidden,
        depth=config.depth,
        heads=config.heads,
        max_len=config.max_len,
        mlp_ratio=config.mlp_ratio,
        dropout=config.dropout,
        causal=causal,
        positional=config.positional,
        time_conditioning=not causal,
    )


class TextDiT(nn.Module):
    """Posterior network of DFM text models: ``(x_t (B, L), t (B,)) -> logits (B, L, V)``, MASK at -inf."""

    def __init__(self, config: TextModelConfig | None = None) -> None:
        super().__init__()
        self.config = config = config or TextModelConfig()
        self.dit = _dit(config, causal=False)

    def forward(self, tokens: Tensor, t: Tensor) -> Tensor:
        if tokens.shape[1] > self.config.max_len:
            raise ValueError(f"sequence length {tokens.shape[1]} exceeds max_len {self.config.max_len}")
        logits = self.dit(tokens, t)
        # in place: the output layer does not keep its output for backward
        return logits.index_fill_(-1, torch.tensor([MASK_ID], device=logits.device), float("-inf"))


class TextARModel(nn.Module):
    """Autoregressive baseline: a causal, time-free DiT.

    .. math:: \\log p(x) = \\sum_i \\log p_\\theta(x^i \\mid \\mathrm{EOT}, x^{<i})
    """

    def __init__(self, config: TextModelConfig | None = None) -> None:
        super().__init__()
        self.config = config = config or TextModelConfig()
        self.dit = _dit(config, causal=True)

    @staticmethod
    def shift_right(tokens: Tensor) -> Tensor:
        """Inputs ``[EOT, x^1, ..., x^{L-1}]`` for targets ``tokens: (B, L)``."""
        return torch.cat([torch.full_like(tokens[:, :1], EOT_ID), tokens[:, :-1]], dim=1)

    def forward(self, tokens_in: Tensor) -> Tensor:
        """Next-token logits ``(B, L, V)`` (MASK at -inf) for inputs from :meth:`shift_right`."""
        if tokens_in.shape[1] > self.config.max_len:
            raise ValueError(f"sequence length {tokens_in.shape[1]} exceeds max_len {self.config.max_len}")
        logits = self.dit(tokens_in, None)
        return logits.index_fill_(-1, torch.tensor([MASK_ID], device=logits.device), float("-inf"))

    def token_nll(self, tokens: Tensor) -> Tensor:
        """``-log p(x^i | EOT, x^{<i})`` per token: ``(B, L)`` fp32."""
        logits = self(self.shift_right(tokens)).float()
        return F.cross_entropy(logits.transpose(1, 2), tokens, reduction="none")

    def loss(self, tokens: Tensor) -> Tensor:
        """Mean next-token cross-entropy (nats per token)."""
        return self.token_nll(tokens).mean()

    @torch.no_grad()
    def sample(
        self,
        n: int,
        length: int,
        prefix: Tensor | None = None,
        temperature: float = 1.0,
        generator: torch.Generator | None = None,
        float64: bool = True,
    ) -> Tensor:
        """Ancestral sampling of ``(n, length)`` tokens (the prefix is recomputed each step; no KV cache).

        Args:
            prefix: ``(P,)`` tokens every sample starts with (a prompt).
            temperature: softmax temperature; 0 means greedy.
            generator: for the draws, on the model's device.
            float64: draw from float64 probabilities.
        """
        from dfm_core.sampler import categorical

        if not (math.isfinite(temperature) and temperature >= 0):
            raise ValueError(f"temperature must be a finite number >= 0 (0: greedy), got {temperature}")
        device = next(self.parameters()).device
        seq = torch.full((n, length + 1), EOT_ID, dtype=torch.long, device=device)
        P = 0
        if prefix is not None:
            P = int(prefix.numel())
            if P > length:
                raise ValueError(f"prompt of {P} tokens is longer than the sequence ({length})")
            seq[:, 1 : P + 1] = prefix.to(device).reshape(1, -1)
        was_training = self.training
        self.eval()
        try:
            for i in range(P, length):
                logits = self(seq[:, : i + 1])[:, -1].float()
                if temperature == 0:
                    nxt = logits.argmax(-1)
                else:
                    probs = torch.softmax(logits / temperature, dim=-1)
                    nxt = categorical(probs, generator, torch.float64 if float64 else torch.float32)
                seq[:, i + 1] = nxt
        finally:
            self.train(was_training)
        return seq[:, 1:]


def build_model(kind: Literal["dfm", "ar"], config: TextModelConfig | None = None) -> nn.Module:
    """``"dfm"`` -> :class:`TextDiT`, ``"ar"`` -> :class:`TextARModel`."""
    if kind == "dfm":
        return TextDiT(config)
    if kind == "ar":
        return TextARModel(config)
    raise ValueError(f"kind must be 'dfm' or 'ar', got {kind!r}")
