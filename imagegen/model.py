"""A U-Net over pixel tokens in the style of Appendix E.3 (Dhariwal & Nichol's U-Net with Gat et al.'s changes).

Changes from the continuous U-Net, as in E.3:

1. the first layer is an embedding table (one row per pixel value, plus the mask token for the mask
   path) shared by the colour channels; the C channel embeddings are stacked, so the network input is
   (B, C * embed_dim, H, W) (288 x 32 x 32 in the paper);
2. the last layer outputs 256 logits per pixel channel: (B, C * 256, H, W), returned as (B, L, 256) with
   L = C * H * W in (channel, row, column) order, the posterior p_{1|t}(. | x_t) of eq 10.

Time enters through a sinusoidal embedding and an MLP, added to an optional class embedding with a
null class (index ``num_classes``) for classifier-free guidance; every residual block applies it as a
scale and shift of its second normalisation (adaptive group norm).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["UNetConfig", "PixelUNet", "PRESETS"]


@dataclass
class UNetConfig:
    """Architecture of :class:`PixelUNet`.

    Attributes:
        image_channels, image_size: C and H = W of the images.
        input_vocab: rows of the input embedding table (256, or 257 with the mask token).
        num_levels: logits per pixel channel (256).
        embed_dim: width of the pixel-value embedding (96 in E.3).
        channels: base width of the U-Net (96 in E.3).
        channel_mult: width multiplier per resolution level ([3, 4, 4] in E.3).
        num_res_blocks: residual blocks per level ("depth", 5 in E.3).
        attention_levels: levels (0 = full resolution) with self-attention (level 1 = 16 x 16 in E.3).
        head_channels: channels per attention head (64 in E.3).
        dropout: dropout in the residual blocks (0.3 in E.3).
        num_classes: 0 for an unconditional model; else class-conditional with a null class.
        norm_groups: group-norm groups (reduced to a divisor of each width).
    """

    image_channels: int = 3
    image_size: int = 32
    input_vocab: int = 256
    num_levels: int = 256
    embed_dim: int = 64
    channels: int = 128
    channel_mult: tuple[int, ...] = (1, 2, 2)
    num_res_blocks: int = 2
    attention_levels: tuple[int, ...] = (1,)
    head_channels: int = 64
    dropout: float = 0.1
    num_classes: int = 0
    norm_groups: int = 32

    def __post_init__(self) -> None:
        self.channel_mult = tuple(self.channel_mult)
        self.attention_levels = tuple(self.attention_levels)
        if self.image_size % self.size_step:
            raise ValueError(
                f"image size {self.image_size} cannot be halved {self.halvings} times "
                f"(channel_mult {self.channel_mult}): use a size divisible by {self.size_step}, "
                "or fewer levels in channel_mult"
            )
        if any(not 0 <= lv < len(self.channel_mult) for lv in self.attention_levels):
            raise ValueError(
                f"attention_levels {self.attention_levels} outside 0..{len(self.channel_mult) - 1}"
            )
        if self.input_vocab < self.num_levels:
            raise ValueError("input_vocab must cover the pixel values")

    @property
    def halvings(self) -> int:
        """How often the U-Net halves the image side: once per level after the first."""
        return len(self.channel_mult) - 1

    @property
    def size_step(self) -> int:
        """The image side must be a multiple of this (``2 ** halvings``)."""
        return 2**self.halvings

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["channel_mult"] = list(self.channel_mult)
        d["attention_levels"] = list(self.attention_levels)
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> UNetConfig:
        from dfm_core.config import config_from_dict

        return config_from_dict(cls, data)

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> UNetConfig:
        """A named size (see :data:`PRESETS`) with ``overrides`` (image shape, vocab, classes)."""
        if name not in PRESETS:
            raise ValueError(f"unknown model size {name!r}: choose one of {', '.join(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})


PRESETS: dict[str, dict[str, Any]] = {
    # tests and smoke runs: ~0.2M parameters
    "tiny": dict(
        embed_dim=8,
        channels=16,
        channel_mult=(1, 2),
        num_res_blocks=1,
        attention_levels=(1,),
        head_channels=16,
        dropout=0.0,
        norm_groups=8,
    ),
    # a quick look on one GPU: ~7M parameters on CIFAR-10
    "small": dict(
        embed_dim=32,
        channels=64,
        channel_mult=(1, 2, 2),
        num_res_blocks=2,
        attention_levels=(1,),
        head_channels=64,
        dropout=0.1,
    ),
    # sized for ~20 min on one H100 (~29M parameters on CIFAR-10, DDPM-like widths; not yet timed)
    "default": dict(
        embed_dim=64,
        channels=128,
        channel_mult=(1, 2, 2),
        num_res_blocks=2,
        attention_levels=(1,),
        head_channels=64,
        dropout=0.1,
    ),
    # Appendix E.3: 96 channels, [3, 4, 4], depth 5, 64-channel heads, attention at 16 x 16
    # (~128M parameters here; the paper reports 113M for its variant)
    "paper": dict(
        embed_dim=96,
        channels=96,
        channel_mult=(3, 4, 4),
        num_res_blocks=5,
        attention_levels=(1,),
        head_channels=64,
        dropout=0.3,
    ),
}


def _norm(channels: int, groups: int) -> nn.GroupNorm:
    return nn.GroupNorm(math.gcd(groups, channels), channels)


def _zero(module: nn.Module) -> nn.Module:
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


def timestep_embedding(t: Tensor, dim: int, max_period: float = 10_000.0) -> Tensor:
    """Sinusoidal features of 1000 t: (B,) -> (B, dim)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = 1000.0 * t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    return F.pad(emb, (0, dim % 2))


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv, then adaptive GroupNorm (scale, shift from the embedding)-SiLU-dropout-conv."""

    def __init__(self, cin: int, cout: int, emb_dim: int, dropout: float, groups: int) -> None:
        super().__init__()
        self.norm1 = _norm(cin, groups)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.emb = nn.Linear(emb_dim, 2 * cout)
        self.norm2 = _norm(cout, groups)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = _zero(nn.Conv2d(cout, cout, 3, padding=1))
        self.skip = nn.Identity() if cin == cout else nn.Conv2d(cin, cout, 1)

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        scale, shift = self.emb(F.silu(emb))[:, :, None, None].chunk(2, dim=1)
        h = self.norm2(h) * (1 + scale) + shift
        h = self.conv2(self.dropout(F.silu(h)))
        return self.skip(x) + h


class AttentionBlock(nn.Module):
    """Multi-head self-attention over the H * W positions, residual, zero-initialised output."""

    def __init__(self, channels: int, head_channels: int, groups: int) -> None:
        super().__init__()
        self.heads = max(1, channels // head_channels)
        self.norm = _norm(channels, groups)
        self.qkv = nn.Conv1d(channels, 3 * channels, 1)
        self.proj = _zero(nn.Conv1d(channels, channels, 1))

    def forward(self, x: Tensor, emb: Tensor | None = None) -> Tensor:
        B, C, H, W = x.shape
        qkv = self.qkv(self.norm(x).reshape(B, C, H * W))
        q, k, v = qkv.reshape(B, 3, self.heads, C // self.heads, H * W).transpose(-1, -2).unbind(1)
        h = F.scaled_dot_product_attention(q, k, v)  # (B, heads, HW, C / heads)
        h = h.transpose(-1, -2).reshape(B, C, H * W)
        return x + self.proj(h).reshape(B, C, H, W)


class Downsample(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: Tensor, emb: Tensor | None = None) -> Tensor:
        return self.conv(x)


class Upsample(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor, emb: Tensor | None = None) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class _Stage(nn.ModuleList):
    """Layers applied in order, each given the conditioning embedding."""

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:  # type: ignore[override]
        for layer in self:
            x = layer(x, emb)
        return x


class PixelUNet(nn.Module):
    """The E.3 U-Net: ``model(x_t (B, L) long, t (B,), y (B,) | None) -> logits (B, L, 256)``.

    ``y = None`` (or entries equal to ``num_classes``) selects the null class of a class-conditional
    model; an unconditional model ignores ``y``.
    """

    def __init__(self, config: UNetConfig) -> None:
        super().__init__()
        self.config = cfg = config
        C, g = cfg.image_channels, cfg.norm_groups
        emb_dim = 4 * cfg.channels
        self.pixel_embed = nn.Embedding(cfg.input_vocab, cfg.embed_dim)
        self.time_mlp = nn.Sequential(
            nn.Linear(cfg.channels, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim)
        )
        self.class_embed = nn.Embedding(cfg.num_classes + 1, emb_dim) if cfg.num_classes > 0 else None

        ch = C * cfg.embed_dim  # the stacked channel embeddings replace the first convolution
        skips = [ch]
        self.down = nn.ModuleList()
        for level, mult in enumerate(cfg.channel_mult):
            for _ in range(cfg.num_res_blocks):
                layers: list[nn.Module] = [ResBlock(ch, mult * cfg.channels, emb_dim, cfg.dropout, g)]
                ch = mult * cfg.channels
                if level in cfg.attention_levels:
                    layers.append(AttentionBlock(ch, cfg.head_channels, g))
                self.down.append(_Stage(layers))
                skips.append(ch)
            if level < cfg.halvings:
                self.down.append(_Stage([Downsample(ch)]))
                skips.append(ch)
        self.middle = _Stage(
            [
                ResBlock(ch, ch, emb_dim, cfg.dropout, g),
                AttentionBlock(ch, cfg.head_channels, g),
                ResBlock(ch, ch, emb_dim, cfg.dropout, g),
            ]
        )
        self.up = nn.ModuleList()
        for level, mult in reversed(list(enumerate(cfg.channel_mult))):
            for i in range(cfg.num_res_blocks + 1):
                layers = [ResBlock(ch + skips.pop(), mult * cfg.channels, emb_dim, cfg.dropout, g)]
                ch = mult * cfg.channels
                if level in cfg.attention_levels:
                    layers.append(AttentionBlock(ch, cfg.head_channels, g))
                if level > 0 and i == cfg.num_res_blocks:
                    layers.append(Upsample(ch))
                self.up.append(_Stage(layers))
        self.out_norm = _norm(ch, g)
        self.out_conv = _zero(nn.Conv2d(ch, C * cfg.num_levels, 3, padding=1))

    def forward(self, x: Tensor, t: Tensor, y: Tensor | None = None) -> Tensor:
        cfg = self.config
        B = x.shape[0]
        C, S = cfg.image_channels, cfg.image_size
        if x.shape[1] != C * S * S:
            raise ValueError(f"expected {C * S * S} tokens per image ({C}x{S}x{S}), got {x.shape[1]}")
        t = torch.as_tensor(t, device=x.device, dtype=torch.float32).reshape(-1).expand(B)
        emb = self.time_mlp(timestep_embedding(t, cfg.channels))
        if self.class_embed is not None:
            if y is None:
                y = torch.full((B,), cfg.num_classes, dtype=torch.long, device=x.device)
            emb = emb + self.class_embed(y)
        # (B, C, H, W, E) -> (B, C * E, H, W): channel embeddings stacked along the feature axis
        h = self.pixel_embed(x.reshape(B, C, S, S)).permute(0, 1, 4, 2, 3).reshape(B, C * cfg.embed_dim, S, S)
        hs = [h]
        for stage in self.down:
            h = stage(h, emb)
            hs.append(h)
        h = self.middle(h, emb)
        for stage in self.up:
            h = stage(torch.cat([h, hs.pop()], dim=1), emb)
        out = self.out_conv(F.silu(self.out_norm(h)))  # (B, C * V, H, W)
        return (
            out.reshape(B, C, cfg.num_levels, S, S)
            .permute(0, 1, 3, 4, 2)
            .reshape(B, C * S * S, cfg.num_levels)
        )
