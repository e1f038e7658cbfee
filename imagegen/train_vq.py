"""Training the VQ-VAE tokenizer of the discrete-latent variant (sec 8.4, App. E.4) and loading it back.

The same data handling as :func:`imagegen.train.train_image_model` (held-out validation images, optional
horizontal flips) on top of :func:`dfm_core.training.train` (AdamW, EMA of the weights as in E.4,
resumable checkpoints). The export ``run_dir/vqvae.safetensors`` holds the EMA weights of the best
validation step (validation loss: the reconstruction MSE on [-1, 1]) with the config, the data facts and
the reconstruction MSE and code usage on all validation images in its metadata.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from dfm_core.atomic_io import check_writable, holds_folder_lock
from dfm_core.checkpoints import export_safetensors
from dfm_core.config import config_from_dict
from dfm_core.nn import count_parameters
from dfm_core.runtime import keeps_global_rng, seed_everything
from dfm_core.training import TrainConfig, TrainResult, best_weights_metadata, train
from imagegen.data import ImageDataset, check_count, images_sha256, load_dataset
from imagegen.train import (
    _Batches,
    cpu_generator,
    data_facts,
    run_data_identity,
    split_train_val,
)
from imagegen.vqvae import VQVAE, VQVAE_FORMAT, VQVAEConfig

__all__ = ["VQVAE_FILE", "VQTrainConfig", "export_vqvae", "reconstruction_stats", "train_vqvae"]

VQVAE_FILE = "vqvae.safetensors"  # the run folder's export


def _default_vq_train() -> TrainConfig:
    return TrainConfig(steps=20_000, batch_size=128, lr=2e-4, ema_decay=0.999)


@dataclass
class VQTrainConfig:
    """A VQ-VAE training run; saved into its export.

    Attributes:
        dataset, data_dir, image_size, channels: the images, as in :class:`imagegen.train.ImagegenTrainConfig`.
        vq: the architecture; the image shape is set from the data.
        train: optimisation settings (default: 20k steps at batch 128, lr 2e-4, weight EMA 0.999 as in E.4).
        hflip: random horizontal flips of training images.
        train_limit, val_size, split_seed: as in :class:`imagegen.train.ImagegenTrainConfig` (the same
            held-out images for the same seed).
    """

    dataset: str = "cifar10"
    data_dir: str | None = None
    image_size: int | None = None
    channels: int = 3
    vq: VQVAEConfig = field(default_factory=VQVAEConfig)
    train: TrainConfig = field(default_factory=_default_vq_train)
    hflip: bool = True
    train_limit: int | None = None
    val_size: int = 1000
    split_seed: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.vq, dict):
            self.vq = VQVAEConfig.from_dict(self.vq)
        if isinstance(self.train, dict):
            self.train = TrainConfig.from_dict(self.train)
        check_count(self.val_size, "val_size (images held out for validation)")
        if self.train_limit is not None:
            check_count(self.train_limit, "train_limit (training images to use)")

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "vq": self.vq.to_dict(), "train": self.train.to_dict()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> VQTrainConfig:
        return config_from_dict(cls, data)


@torch.no_grad()
def reconstruction_stats(vq: VQVAE, images: Tensor, batch_size: int = 256) -> dict[str, float]:
    """Mean reconstruction MSE (on [-1, 1]) and the fraction of the K codes used, over ``images``."""
    was_training = vq.training
    vq.eval()
    device = vq.codebook.device
    total, used = 0.0, torch.zeros(vq.config.codebook_size, dtype=torch.bool, device=device)
    for part in images.split(batch_size):
        out = vq(part.to(device))
        total += float(out.recon_mse) * part.shape[0]
        used[out.codes.flatten()] = True
    vq.train(was_training)
    return {"recon_mse": total / max(1, images.shape[0]), "codebook_usage": float(used.float().mean())}


@holds_folder_lock("run_dir", "run folder")
@keeps_global_rng
def train_vqvae(
    config: VQTrainConfig,
    run_dir: str | os.PathLike,
    resume: bool = True,
    export: str | os.PathLike | None = None,
    progress: bool = True,
    data: ImageDataset | None = None,
) -> TrainResult:
    """Train a VQ-VAE; writes ``run_dir/{last,best}.pt``, ``metrics.jsonl`` and ``vqvae.safetensors``.

    The loss is ||x - x_hat||^2 + beta ||z - sg[e]||^2 on images in [-1, 1]; the codebook follows an EMA
    of the encoder outputs (see :mod:`imagegen.vqvae`). ``data`` replaces ``config.dataset`` (tests).
    """
    run_dir = Path(run_dir)
    if export is not None:
        check_writable(export, "export path")
    seed_everything(config.train.seed)
    if data is None:
        data = load_dataset(
            config.dataset, "train", config.data_dir, image_size=config.image_size, channels=config.channels
        )
    C, H, W = data.shape
    if H != W:
        raise ValueError(f"square images only, got {H}x{W}")
    vq_cfg = dataclasses.replace(config.vq, image_channels=C, image_size=H)
    train_data, val_data = split_train_val(data, config.val_size, config.split_seed, config.train_limit)
    model = VQVAE(vq_cfg)
    bs = config.train.batch_size
    train_images = _Batches(train_data, bs, config.hflip)
    val_images = _Batches(val_data, bs, hflip=False)

    def train_batches(generator: torch.Generator) -> Tensor:
        return train_images.draw(generator)[1]

    def loss_fn(model: nn.Module, images: Tensor, generator: torch.Generator) -> Tensor:
        return model(images).loss

    def val_loss(model: nn.Module, generator: torch.Generator) -> Tensor:
        images = val_images.draw(cpu_generator(generator))[1].to(next(model.parameters()).device)
        return model(images).recon_mse

    metadata = {
        "vqvae_config": vq_cfg.to_dict(),
        "vq_train_config": dataclasses.replace(config, vq=vq_cfg).to_dict(),
        "image_shape": [C, H, W],
        "latent_shape": [1, vq_cfg.latent_size, vq_cfg.latent_size],
        "class_names": list(data.class_names) if data.class_names else None,
        "data": data_facts(
            data, images_sha256(data.images), len(train_data), len(val_data), config.split_seed
        ),
        "parameters": count_parameters(model),
    }
    result = train(
        model,
        loss_fn,
        train_batches,
        config.train,
        run_dir,
        val_loss_fn=val_loss,
        resume=resume,
        extra_metadata={**metadata, "model_config": metadata["vqvae_config"]},
        progress=progress,
        identity={
            "data": run_data_identity(metadata["data"]),
            "train_limit": config.train_limit,
        },
        exported=VQVAE_FILE,
    )
    export_vqvae(run_dir, run_dir / VQVAE_FILE, metadata, val_data.images)
    if export is not None:
        export_vqvae(run_dir, Path(export), metadata, val_data.images)
    return result


def export_vqvae(
    run_dir: str | os.PathLike, out: str | os.PathLike, metadata: dict[str, Any], val_images: Tensor
) -> Path:
    """Write the EMA weights of ``best.pt`` (else ``last.pt``) with the metadata and validation statistics."""
    model = VQVAE(VQVAEConfig.from_dict(metadata["vqvae_config"]))
    meta = best_weights_metadata(run_dir, model, metadata, "vq_train_config")
    meta = {**meta, **reconstruction_stats(model, val_images), "format": VQVAE_FORMAT}
    return export_safetensors(model, out, meta)
