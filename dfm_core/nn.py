"""Diffusion Transformer (DiT, Peebles & Xie 2023) for token sequences.

The network every app shares: a stack of adaLN-Zero transformer blocks conditioned on the flow time
``t`` (and optionally on an extra conditioning vector an app supplies), mapping tokens ``(B, L)`` to
logits ``(B, L, V)`` of the posterior ``p_{1|t}(x_1^i | x_t)`` that the cross-entropy (eq 11 of the
KO-DFM paper) trains. It follows the DiT of SEDD (Lou et al. 2024), which the paper's models modify.

The pieces are public so apps can compose them differently (e.g. pool groups of tokens between the
embedding and the blocks). Everything is device-agnostic, correct under bf16
autocast (layer norms and the residual stream stay in fp32), and free of data-dependent Python
control flow in ``forward`` so ``torch.compile`` traces it in one graph.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "count_parameters",
    "DiT",
    "DiTBlock",
    "FinalLayer",
    "LearnedPositionalEmbedding",
    "RotaryEmbedding",
    "SinusoidalPositionalEmbedding",
    "TimestepEmbedder",
    "apply_rotary",
    "init_dit_weights",
    "make_attention_mask",
    "modulate",
    "sinusoidal_features",
]

Positional = Literal["learned", "sinusoidal", "rotary"]


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    """adaLN modulation ``x * (1 + scale) + shift``.

    Args:
        x: ``(B, L, D)`` normalised activations.
        shift, scale: ``(B, D)`` per-sample modulation from the conditioning vector.
    """
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


def sinusoidal_features(x: Tensor, dim: int, max_period: float = 10_000.0) -> Tensor:
    """Transformer sinusoidal features ``[cos(x w_k), sin(x w_k)]`` with ``w_k = max_period^(-k/(dim/2))``.

    Args:
        x: any shape ``(...)``; computed in fp32 whatever its dtype.
        dim: number of features (an odd ``dim`` is zero-padded).

    Returns:
        ``(..., dim)`` fp32 features.
    """
    half = dim // 2
    freqs = torch.exp(
        -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=x.device) / max(half, 1)
    )
    args = x.float().unsqueeze(-1) * freqs
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


class TimestepEmbedder(nn.Module):
    """Embeds the flow time ``t in [0, 1]`` into a conditioning vector.

    .. math:: c = \\mathrm{MLP}(\\mathrm{sinusoidal}(s \\cdot t)),\\quad s = \\text{time\\_scale}

    Scaling by ``s = 1000`` puts ``t`` on the integer-step scale the sinusoidal frequencies were made
    for (DiT embeds diffusion step indices).

    Args:
        hidden: output width ``D``.
        frequency_dim: number of sinusoidal features.
        time_scale: factor applied to ``t`` before the sinusoids.
    """

    def __init__(self, hidden: int, frequency_dim: int = 256, time_scale: float = 1000.0) -> None:
        super().__init__()
        self.frequency_dim = frequency_dim
        self.time_scale = time_scale
        self.mlp = nn.Sequential(nn.Linear(frequency_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden))

    def forward(self, t: Tensor) -> Tensor:
        """``t: (B,)`` -> ``(B, D)``."""
        return self.mlp(sinusoidal_features(t * self.time_scale, self.frequency_dim))


class LearnedPositionalEmbedding(nn.Module):
    """A learned table of ``max_len`` position vectors; ``forward(L) -> (L, D)``."""

    def __init__(self, max_len: int, hidden: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(max_len, hidden) * 0.02)

    def forward(self, length: int) -> Tensor:
        return self.weight[:length]


class SinusoidalPositionalEmbedding(nn.Module):
    """Fixed sinusoidal positions (Vaswani et al. 2017); ``forward(L) -> (L, D)``. Not in the state dict."""

    def __init__(self, max_len: int, hidden: int) -> None:
        super().__init__()
        table = sinusoidal_features(torch.arange(max_len, dtype=torch.float32), hidden)
        self.register_buffer("table", table, persistent=False)

    def forward(self, length: int) -> Tensor:
        return self.table[:length]


class RotaryEmbedding(nn.Module):
    """Rotary position embedding (Su et al. 2024) tables; ``forward(L) -> (cos, sin)``, each ``(L, Dh)``.

    Use with :func:`apply_rotary` on the per-head queries and keys.
    """

    def __init__(self, head_dim: int, max_len: int, base: float = 10_000.0) -> None:
        super().__init__()
        if head_dim % 2:
            raise ValueError(f"rotary embeddings need an even head dimension, got {head_dim}")
        inv_freq = base ** (-torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
        angles = torch.arange(max_len, dtype=torch.float32)[:, None] * inv_freq[None]
        angles = torch.cat([angles, angles], dim=-1)
        self.register_buffer("cos", angles.cos(), persistent=False)
        self.register_buffer("sin", angles.sin(), persistent=False)

    def forward(self, length: int) -> tuple[Tensor, Tensor]:
        return self.cos[:length], self.sin[:length]


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate ``x: (B, H, L, Dh)`` by the angles in ``cos, sin: (L, Dh)`` (half-split convention)."""
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return x * cos.to(x.dtype) + rotated * sin.to(x.dtype)


def make_attention_mask(valid: Tensor | None, causal: bool, length: int) -> tuple[Tensor | None, bool]:
    """Attention mask for :func:`torch.nn.functional.scaled_dot_product_attention`.

    Valid queries attend only to valid keys (and, if ``causal``, to keys ``j <= i``), so outputs at
    valid positions do not depend on padding. Every query may attend to itself, so no row is empty
    (an empty row would give NaN that leaks through ``0 * NaN`` in later layers); a sequence with
    no valid token at all attends everywhere.

    Args:
        valid: ``(B, L)`` bool, True for real tokens; None for unpadded batches.
        causal: restrict to ``j <= i``.
        length: ``L``.

    Returns:
        ``(attn_mask, is_causal)``: ``attn_mask`` is None, ``(B, 1, 1, L)`` or ``(B, 1, L, L)`` bool
        (True = may attend); ``is_causal`` is the flag to pass to SDPA (only when ``attn_mask`` is None).
    """
    if valid is None:
        return None, causal
    valid = valid.bool()
    valid = valid | ~valid.any(dim=-1, keepdim=True)
    if not causal:
        return valid[:, None, None, :], False
    idx = torch.arange(length, device=valid.device)
    lower = idx[None, :] <= idx[:, None]
    mask = (lower[None] & valid[:, None, :]) | torch.eye(length, dtype=torch.bool, device=valid.device)[None]
    return mask[:, None], False


class DiTBlock(nn.Module):
    """Transformer block with adaLN-Zero conditioning (Peebles & Xie 2023).

    .. math::
        h &= x + g_1 \\odot \\mathrm{Attn}(\\mathrm{LN}(x)(1 + s_1) + b_1) \\\\
        y &= h + g_2 \\odot \\mathrm{MLP}(\\mathrm{LN}(h)(1 + s_2) + b_2)

    with ``(b_1, s_1, g_1, b_2, s_2, g_2) = Linear(SiLU(c))`` zero-initialised, so every block starts
    as the identity. Layer norms have no affine parameters.

    Args:
        hidden: width ``D``.
        heads: attention heads (``D % heads == 0``).
        mlp_ratio: MLP hidden width ``mlp_ratio * D``.
        dropout: dropout on the attention and MLP outputs before the residual add.
        cond_dim: width of the conditioning vector ``c`` (defaults to ``D``).
    """

    def __init__(
        self,
        hidden: int,
        heads: int,
        mlp_ratio: float = 4.0,
        dropout: float = 0.0,
        cond_dim: int | None = None,
    ) -> None:
        super().__init__()
        if hidden % heads:
            raise ValueError(f"hidden={hidden} is not divisible by heads={heads}")
        self.heads = heads
        self.dropout = dropout
        self.norm1 = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.qkv = nn.Linear(hidden, 3 * hidden)
        self.attn_out = nn.Linear(hidden, hidden)
        self.norm2 = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        mlp_hidden = int(hidden * mlp_ratio)
        self.mlp = nn.Sequential(
            nn.Linear(hidden, mlp_hidden), nn.GELU(approximate="tanh"), nn.Linear(mlp_hidden, hidden)
        )
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(cond_dim or hidden, 6 * hidden))

    def attention(
        self,
        x: Tensor,
        attn_mask: Tensor | None = None,
        is_causal: bool = False,
        rotary: tuple[Tensor, Tensor] | None = None,
    ) -> Tensor:
        """Multi-head self-attention of ``x: (B, L, D)`` via SDPA -> ``(B, L, D)``."""
        B, L, D = x.shape
        qkv = self.qkv(x).view(B, L, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        if rotary is not None:
            q = apply_rotary(q, *rotary)
            k = apply_rotary(k, *rotary)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal)
        return self.attn_out(out.transpose(1, 2).reshape(B, L, D))

    def forward(
        self,
        x: Tensor,
        c: Tensor,
        attn_mask: Tensor | None = None,
        is_causal: bool = False,
        rotary: tuple[Tensor, Tensor] | None = None,
    ) -> Tensor:
        """``x: (B, L, D)``, ``c: (B, C)``; masks as returned by :func:`make_attention_mask`."""
        shift1, scale1, gate1, shift2, scale2, gate2 = self.adaLN_modulation(c).chunk(6, dim=-1)
        h = self.attention(modulate(self.norm1(x), shift1, scale1), attn_mask, is_causal, rotary)
        x = x + gate1.unsqueeze(1) * F.dropout(h, self.dropout, self.training)
        h = self.mlp(modulate(self.norm2(x), shift2, scale2))
        return x + gate2.unsqueeze(1) * F.dropout(h, self.dropout, self.training)


class FinalLayer(nn.Module):
    """adaLN then a linear map to logits: ``Linear(LN(x)(1 + s) + b)``, both maps zero-initialised.

    Args:
        hidden: width ``D``.
        out_dim: number of logits ``V``.
        cond_dim: width of ``c`` (defaults to ``D``).
    """

    def __init__(self, hidden: int, out_dim: int, cond_dim: int | None = None) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(cond_dim or hidden, 2 * hidden))
        self.linear = nn.Linear(hidden, out_dim)

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        """``x: (B, L, D)``, ``c: (B, C)`` -> ``(B, L, V)``."""
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=-1)
        return self.linear(modulate(self.norm(x), shift, scale))


def init_dit_weights(module: nn.Module) -> None:
    """DiT initialisation: Xavier-uniform linears with zero bias, N(0, 0.02) embeddings, then
    adaLN-Zero (every ``adaLN_modulation`` linear and the :class:`FinalLayer` output set to zero)."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, std=0.02)
    for m in module.modules():
        if isinstance(m, DiTBlock | FinalLayer):
            nn.init.zeros_(m.adaLN_modulation[-1].weight)
            nn.init.zeros_(m.adaLN_modulation[-1].bias)
        if isinstance(m, FinalLayer):
            nn.init.zeros_(m.linear.weight)
            nn.init.zeros_(m.linear.bias)


class DiT(nn.Module):
    """Diffusion Transformer over token sequences: ``(tokens, t) -> logits``.

    .. math:: c = \\mathrm{TimeEmb}(t) + W_c\\,\\mathrm{cond},\\qquad
              \\mathrm{logits} = \\mathrm{Final}(\\mathrm{Block}_N \\circ \\dots \\circ
              \\mathrm{Block}_1(E[\\mathrm{tokens}] + P),\\ c)

    Args:
        vocab_size: ``V``, the number of input tokens and output logits.
        hidden: width ``D``.
        depth: number of :class:`DiTBlock`.
        heads: attention heads.
        max_len: longest sequence (size of the positional tables).
        mlp_ratio: MLP width multiplier.
        dropout: residual dropout.
        causal: causal self-attention (autoregressive models).
        positional: ``"learned"`` table, fixed ``"sinusoidal"`` or ``"rotary"`` (applied to q, k).
        cond_dim: width of an extra conditioning vector, linearly projected and added to the time
            embedding; None for none.
        time_conditioning: embed ``t``; False for models without time (e.g. autoregressive), which
            then condition only on ``cond`` (or nothing).
    """

    def __init__(
        self,
        vocab_size: int,
        hidden: int = 256,
        depth: int = 6,
        heads: int = 8,
        max_len: int = 1024,
        mlp_ratio: float = 4.0,
        dropout: float = 0.0,
        causal: bool = False,
        positional: Positional = "learned",
        cond_dim: int | None = None,
        time_conditioning: bool = True,
    ) -> None:
        super().__init__()
        if positional not in ("learned", "sinusoidal", "rotary"):
            raise ValueError(f"positional must be 'learned', 'sinusoidal' or 'rotary', got {positional!r}")
        self.vocab_size = vocab_size
        self.hidden = hidden
        self.max_len = max_len
        self.causal = causal
        self.positional = positional
        self.cond_dim = cond_dim
        self.time_conditioning = time_conditioning

        self.embed = nn.Embedding(vocab_size, hidden)
        self.pos: nn.Module | None = None
        self.rotary: RotaryEmbedding | None = None
        if positional == "learned":
            self.pos = LearnedPositionalEmbedding(max_len, hidden)
        elif positional == "sinusoidal":
            self.pos = SinusoidalPositionalEmbedding(max_len, hidden)
        else:
            self.rotary = RotaryEmbedding(hidden // heads, max_len)
        self.time_embed = TimestepEmbedder(hidden) if time_conditioning else None
        self.cond_proj = nn.Linear(cond_dim, hidden) if cond_dim is not None else None
        self.blocks = nn.ModuleList(DiTBlock(hidden, heads, mlp_ratio, dropout) for _ in range(depth))
        self.final = FinalLayer(hidden, vocab_size)
        init_dit_weights(self)

    def conditioning(self, t: Tensor | None, cond: Tensor | None, batch: int, device: torch.device) -> Tensor:
        """The adaLN conditioning vector ``c: (B, D)`` from ``t: (B,) | ()`` and ``cond: (B, cond_dim)``."""
        c = torch.zeros(batch, self.hidden, device=device)
        if self.time_embed is not None:
            if t is None:
                raise ValueError("this DiT is time-conditioned: pass t")
            c = c + self.time_embed(torch.as_tensor(t, device=device).float().expand(batch))
        if self.cond_proj is not None:
            if cond is None:
                raise ValueError(f"this DiT expects cond of shape (B, {self.cond_dim})")
            c = c + self.cond_proj(cond)
        elif cond is not None:
            raise ValueError("cond given but the DiT was built with cond_dim=None")
        return c

    def forward(
        self, tokens: Tensor, t: Tensor | None, valid: Tensor | None = None, cond: Tensor | None = None
    ) -> Tensor:
        """Logits of the posterior per position.

        Args:
            tokens: ``(B, L)`` long.
            t: ``(B,)`` float times in ``[0, 1]`` (a scalar is broadcast); ignored if time-free.
            valid: ``(B, L)`` bool, True for real tokens; padded positions are hidden from attention.
            cond: ``(B, cond_dim)`` extra conditioning.

        Returns:
            ``(B, L, V)`` logits (bf16 under autocast).
        """
        B, L = tokens.shape
        if L > self.max_len:
            raise ValueError(f"sequence length {L} exceeds the model's max_len {self.max_len}")
        x = self.embed(tokens)
        if self.pos is not None:
            x = x + self.pos(L)
        rotary = self.rotary(L) if self.rotary is not None else None
        c = self.conditioning(t, cond, B, tokens.device)
        attn_mask, is_causal = make_attention_mask(valid, self.causal, L)
        for block in self.blocks:
            x = block(x, c, attn_mask, is_causal, rotary)
        return self.final(x, c)


def count_parameters(model: nn.Module, trainable_only: bool = True) -> int:
    """Number of (trainable) parameters: the ``parameters`` every app records in its checkpoints."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)
