"""A small VQ-VAE (van den Oord et al., 2017): the tokenizer of the discrete-latent variant (sec 8.4, App. E.4).

    images uint8 (N, C, H, W) -> [-1, 1] -> conv encoder (stride-2 convs + residual blocks) -> z (N, D, h, w)
    -> nearest codebook row (codes (N, h, w) in 0..K-1, straight-through gradients) -> conv decoder -> images

with h = H / 2^num_down. The loss is ||x - x_hat||^2 + beta ||z - sg[e]||^2 (reconstruction plus the
commitment term); the codebook is not trained by gradients but follows an exponential moving average of
the encoder outputs assigned to each code (VQ-VAE-2), and codes that go unused for ``restart_after``
training steps are re-initialised from random encoder outputs of the batch. The paper's tokenizer is a
VQ-GAN with 16x downsampling and 16384 codes (E.4); this one is sized for 32 x 32 images.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "VQVAE",
    "VQVAE_FORMAT",
    "VQOutput",
    "VQVAEConfig",
    "VectorQuantizer",
    "images_to_unit",
    "load_vqvae",
    "vqvae_from_state",
    "unit_to_images",
]

VQVAE_FORMAT = "imagegen-vqvae-v1"


@dataclass
class VQVAEConfig:
    """Architecture of :class:`VQVAE`.

    Attributes:
        image_channels, image_size: C and H = W of the images.
        channels: width of the convolutions.
        num_down: stride-2 downsamplings (2: a 4x smaller latent grid, 32 x 32 -> 8 x 8).
        num_res_blocks: residual blocks at the latent resolution, in the encoder and in the decoder.
        codebook_size: K, the number of codes (the latent vocabulary).
        code_dim: D, the dimension of a code embedding.
        beta: weight of the commitment loss ||z - sg[e]||^2.
        codebook_decay: EMA decay of the codebook statistics.
        restart_after: a code unused for this many training steps is re-initialised from a random
            encoder output of the batch (0: never).
    """

    image_channels: int = 3
    image_size: int = 32
    channels: int = 128
    num_down: int = 2
    num_res_blocks: int = 2
    codebook_size: int = 512
    code_dim: int = 64
    beta: float = 0.25
    codebook_decay: float = 0.99
    restart_after: int = 100

    def __post_init__(self) -> None:
        for name in ("image_channels", "image_size", "channels", "num_down", "codebook_size", "code_dim"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"VQ-VAE {name} must be a whole number >= 1, got {value!r}")
        if self.codebook_size > 32767:  # codes travel and are cached as int16
            raise ValueError(f"VQ-VAE codebook_size must be at most 32767, got {self.codebook_size}")
        if self.num_res_blocks < 0 or self.restart_after < 0:
            raise ValueError("VQ-VAE num_res_blocks and restart_after must be >= 0")
        if self.image_size % 2**self.num_down:
            raise ValueError(
                f"VQ-VAE image size {self.image_size} cannot be halved {self.num_down} times (num_down)"
            )
        if not self.beta >= 0:
            raise ValueError(f"VQ-VAE beta must be >= 0, got {self.beta}")
        if not 0.0 <= self.codebook_decay < 1.0:
            raise ValueError(f"VQ-VAE codebook_decay must be in [0, 1), got {self.codebook_decay}")

    @property
    def latent_size(self) -> int:
        """h = w of the code grid."""
        return self.image_size // 2**self.num_down

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> VQVAEConfig:
        from dfm_core.config import config_from_dict

        return config_from_dict(cls, data)


def images_to_unit(images: Tensor) -> Tensor:
    """uint8 images -> float in [-1, 1]."""
    return images.float() / 127.5 - 1.0


def unit_to_images(x: Tensor) -> Tensor:
    """float in [-1, 1] (clamped) -> uint8 images."""
    return ((x.float().clamp(-1.0, 1.0) + 1.0) * 127.5).round().to(torch.uint8)


class VectorQuantizer(nn.Module):
    """Nearest-code quantisation with an EMA codebook and dead-code restarts.

    Buffers: ``codebook`` (K, D); ``cluster_size`` (K,) and ``embed_sum`` (K, D), the EMAs of the counts
    and sums of the encoder outputs assigned to each code (codebook = embed_sum / cluster_size);
    ``idle`` (K,), training steps since each code was last used; ``initialised``, whether the codebook
    was set from the first training batch.
    """

    def __init__(self, codebook_size: int, code_dim: int, decay: float, restart_after: int) -> None:
        super().__init__()
        self.decay, self.restart_after = decay, restart_after
        codebook = torch.randn(codebook_size, code_dim)
        self.register_buffer("codebook", codebook)
        self.register_buffer("cluster_size", torch.ones(codebook_size))
        self.register_buffer("embed_sum", codebook.clone())
        self.register_buffer("idle", torch.zeros(codebook_size, dtype=torch.long))
        self.register_buffer("initialised", torch.zeros((), dtype=torch.bool))

    def nearest(self, flat: Tensor) -> Tensor:
        """Index of the nearest code (Euclidean) for each row of ``flat`` (M, D): long (M,)."""
        e = self.codebook
        d = flat.pow(2).sum(1, keepdim=True) - 2 * flat @ e.T + e.pow(2).sum(1)[None]
        return d.argmin(1)

    def forward(self, z: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """z (N, D, h, w) -> (straight-through quantised z, codes (N, h, w), commitment ||z - sg[e]||^2)."""
        with torch.autocast(z.device.type, enabled=False):  # distances in fp32 even under bf16 autocast
            z = z.float()
            N, D, h, w = z.shape
            flat = z.permute(0, 2, 3, 1).reshape(-1, D)
            if self.training:
                self._maybe_initialise(flat.detach())
            codes = self.nearest(flat.detach())
            if self.training:
                self._update(flat.detach(), codes)
            q = self.codebook[codes].reshape(N, h, w, D).permute(0, 3, 1, 2)
            commitment = F.mse_loss(z, q.detach())
            return z + (q - z).detach(), codes.reshape(N, h, w), commitment

    @torch.no_grad()
    def _maybe_initialise(self, flat: Tensor) -> None:
        if bool(self.initialised):
            return
        K = self.codebook.shape[0]
        pick = flat[torch.randint(flat.shape[0], (K,), device=flat.device)]
        pick = pick + 1e-3 * pick.std() * torch.randn_like(pick)  # break ties when K > batch rows
        self.codebook.copy_(pick)
        self.embed_sum.copy_(pick)
        self.cluster_size.fill_(1.0)
        self.initialised.fill_(True)

    @torch.no_grad()
    def _update(self, flat: Tensor, codes: Tensor) -> None:
        K = self.codebook.shape[0]
        counts = torch.bincount(codes, minlength=K).to(flat.dtype)
        sums = torch.zeros_like(self.embed_sum).index_add_(0, codes, flat)
        self.cluster_size.lerp_(counts, 1.0 - self.decay)
        self.embed_sum.lerp_(sums, 1.0 - self.decay)
        self.codebook.copy_(self.embed_sum / self.cluster_size.clamp_min(1e-12)[:, None])
        self.idle.add_(1).masked_fill_(counts > 0, 0)
        if self.restart_after > 0:
            dead = (self.idle >= self.restart_after).nonzero().flatten()
            if dead.numel():
                fresh = flat[torch.randint(flat.shape[0], (dead.numel(),), device=flat.device)]
                self.codebook[dead] = fresh
                self.embed_sum[dead] = fresh
                self.cluster_size[dead] = 1.0
                self.idle[dead] = 0


class _ResBlock(nn.Module):
    """x + conv1x1(relu(conv3x3(relu(x)))), as in the VQ-VAE paper."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.conv2 = nn.Conv2d(channels, channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.conv2(F.relu(self.conv1(F.relu(x))))


@dataclass
class VQOutput:
    """What :meth:`VQVAE.forward` returns: ``loss = recon_mse + beta * commitment``."""

    loss: Tensor
    recon_mse: Tensor
    commitment: Tensor
    codes: Tensor
    recon: Tensor


class VQVAE(nn.Module):
    """Encoder -> :class:`VectorQuantizer` -> decoder; see the module docstring."""

    def __init__(self, config: VQVAEConfig) -> None:
        super().__init__()
        self.config = cfg = config
        ch, C = cfg.channels, cfg.image_channels
        enc: list[nn.Module] = [nn.Conv2d(C, ch, 3, padding=1)]
        for _ in range(cfg.num_down):
            enc += [nn.ReLU(), nn.Conv2d(ch, ch, 4, stride=2, padding=1)]
        enc += [_ResBlock(ch) for _ in range(cfg.num_res_blocks)]
        enc += [nn.ReLU(), nn.Conv2d(ch, cfg.code_dim, 1)]
        self.encoder = nn.Sequential(*enc)
        self.quantizer = VectorQuantizer(
            cfg.codebook_size, cfg.code_dim, cfg.codebook_decay, cfg.restart_after
        )
        dec: list[nn.Module] = [nn.Conv2d(cfg.code_dim, ch, 3, padding=1)]
        dec += [_ResBlock(ch) for _ in range(cfg.num_res_blocks)]
        for _ in range(cfg.num_down):
            dec += [nn.ReLU(), nn.ConvTranspose2d(ch, ch, 4, stride=2, padding=1)]
        dec += [nn.ReLU(), nn.Conv2d(ch, C, 3, padding=1)]
        self.decoder = nn.Sequential(*dec)

    @property
    def codebook(self) -> Tensor:
        """The code embeddings e_k: (K, D)."""
        return self.quantizer.codebook

    @property
    def latent_shape(self) -> tuple[int, int]:
        return self.config.latent_size, self.config.latent_size

    def _check_images(self, images: Tensor) -> None:
        cfg = self.config
        want = (cfg.image_channels, cfg.image_size, cfg.image_size)
        if images.ndim != 4 or tuple(images.shape[1:]) != want:
            raise ValueError(
                f"the VQ-VAE takes (N, {', '.join(map(str, want))}) images, got {tuple(images.shape)}"
            )

    def forward(self, images: Tensor) -> VQOutput:
        """uint8 images (N, C, H, W) -> :class:`VQOutput` (updates the codebook when training)."""
        self._check_images(images)
        x = images_to_unit(images)
        zq, codes, commitment = self.quantizer(self.encoder(x))
        recon = self.decoder(zq)
        mse = F.mse_loss(recon.float(), x)
        return VQOutput(mse + self.config.beta * commitment, mse, commitment, codes, recon)

    @torch.no_grad()
    def encode(self, images: Tensor) -> Tensor:
        """uint8 images (N, C, H, W) -> codes long (N, h, w) in 0..K-1 (never updates the codebook)."""
        self._check_images(images)
        z = self.encoder(images_to_unit(images).to(self.codebook.device)).float()
        N, D, h, w = z.shape
        return self.quantizer.nearest(z.permute(0, 2, 3, 1).reshape(-1, D)).reshape(N, h, w)

    @torch.no_grad()
    def decode(self, codes: Tensor) -> Tensor:
        """codes (N, h, w) in 0..K-1 -> uint8 images (N, C, H, W)."""
        h, w = self.latent_shape
        if codes.ndim != 3 or tuple(codes.shape[1:]) != (h, w):
            raise ValueError(f"the VQ-VAE decodes (N, {h}, {w}) code grids, got {tuple(codes.shape)}")
        codes = codes.long().to(self.codebook.device)
        if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= self.config.codebook_size):
            raise ValueError(
                f"codes outside 0..{self.config.codebook_size - 1} (a mask token left unsampled?)"
            )
        zq = self.codebook[codes].permute(0, 3, 1, 2)
        return unit_to_images(self.decoder(zq))


def load_vqvae(path: str | os.PathLike, device: str | torch.device = "cpu") -> tuple[VQVAE, dict[str, Any]]:
    """Load a ``vqvae.safetensors`` written by :func:`imagegen.train_vq.train_vqvae`: (model in eval mode, metadata).

    Raises:
        FileNotFoundError: no such file.
        ValueError: not a readable safetensors file, or not an imagegen VQ-VAE.
    """
    from dfm_core.checkpoints import load_safetensors

    path = Path(path).expanduser()
    if not path.is_file():
        what = "a folder, not a VQ-VAE file" if path.is_dir() else "not found"
        raise FileNotFoundError(f"VQ-VAE {path} is {what} (train one with `imagegen train-vq`)")
    state, meta = load_safetensors(path)
    if meta.get("format") != VQVAE_FORMAT or "vqvae_config" not in meta:
        raise ValueError(
            f"{path} is not an imagegen VQ-VAE (format={meta.get('format')!r}); "
            "train one with `imagegen train-vq` and pass its vqvae.safetensors"
        )
    return vqvae_from_state(state, meta["vqvae_config"], str(path)).to(device), meta


def vqvae_from_state(state: dict[str, Tensor], config: dict[str, Any], where: str) -> VQVAE:
    """A :class:`VQVAE` in eval mode from its config dict and state dict (``where`` names it in errors)."""
    from dfm_core.checkpoints import load_model_weights

    model = load_model_weights(lambda: VQVAE(VQVAEConfig.from_dict(config)), state, where, "imagegen VQ-VAE")
    codebook = model.codebook
    if bool((codebook == codebook[:1]).all()):
        raise ValueError(
            f"{where}: all {codebook.shape[0]} codebook vectors are equal, so every image has the same codes: "
            "the file is damaged or the VQ-VAE untrained"
        )
    return model.eval()
