"""Helpers of the imagegen tests: a tiny synthetic image set, tiny training configs (pixel DFM, VQ-VAE), metrics."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from dfm_core.training import TrainConfig
from imagegen.data import ImageDataset
from imagegen.model import UNetConfig
from imagegen.paths import PixelPathConfig
from imagegen.train import ImagegenTrainConfig
from imagegen.train_vq import VQTrainConfig
from imagegen.vqvae import VQVAEConfig

SIZE = 8


def synthetic_images(n: int = 96, seed: int = 0) -> ImageDataset:
    """Two classes of 8 x 8 grayscale images: horizontal and vertical ramps with a little noise."""
    g = torch.Generator().manual_seed(seed)
    ramp = torch.linspace(20, 235, SIZE)
    labels = torch.arange(n) % 2
    base = torch.where(
        labels[:, None, None] == 0,
        ramp[None, None, :].expand(n, SIZE, SIZE),
        ramp[None, :, None].expand(n, SIZE, SIZE),
    )
    noise = torch.randint(-8, 9, (n, SIZE, SIZE), generator=g)
    images = (base + noise).clamp(0, 255).to(torch.uint8).unsqueeze(1)
    return ImageDataset(images, labels, ("horizontal", "vertical"), "synthetic")


def tiny_config(kind: str = "metric", steps: int = 30, class_conditional: bool = True) -> ImagegenTrainConfig:
    return ImagegenTrainConfig(
        dataset="folder",
        path=PixelPathConfig(kind=kind),
        model=UNetConfig.preset("tiny"),
        train=TrainConfig(
            steps=steps,
            batch_size=16,
            lr=3e-3,
            warmup_steps=0,
            eval_every=steps,
            eval_batches=1,
            ckpt_every=steps,
            log_every=10,
            device="cpu",
            ema_decay=0.5,
            bf16=False,
            seed=0,
        ),
        class_conditional=class_conditional,
        val_size=16,
    )


def tiny_vq_config(steps: int = 40, hflip: bool = True) -> VQTrainConfig:
    """A ~10k-parameter VQ-VAE with 16 codes of dimension 8 (8 x 8 images -> 2 x 2 codes)."""
    return VQTrainConfig(
        dataset="folder",
        vq=VQVAEConfig(channels=16, num_res_blocks=1, codebook_size=16, code_dim=8, restart_after=10),
        train=TrainConfig(
            steps=steps,
            batch_size=16,
            lr=3e-3,
            eval_every=steps,
            eval_batches=1,
            ckpt_every=steps,
            log_every=10,
            device="cpu",
            ema_decay=0.5,
            bf16=False,
            seed=0,
        ),
        hflip=hflip,
        val_size=16,
    )


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


def folder_preview_args(data: Path) -> list[str]:
    """`imagegen path-preview` arguments for an 8 x 8 grayscale image folder."""
    return [
        "path-preview",
        "--dataset",
        "folder",
        "--data-dir",
        str(data),
        "--image-size",
        str(SIZE),
        "--channels",
        "1",
    ]


class PixelHistogram:
    """A cheap stand-in extractor: 16-bin intensity histograms."""

    name = "PixelHist"

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        bins = (images.reshape(images.shape[0], -1).long() // 16).clamp_max(15)
        return torch.nn.functional.one_hot(bins, 16).double().mean(1)
