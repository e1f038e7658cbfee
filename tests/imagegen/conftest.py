"""Fixtures of the imagegen tests: tiny trained checkpoints (metric and mask paths, a VQ-VAE)."""

from __future__ import annotations

from pathlib import Path

import pytest
from imagegen_fixtures import synthetic_images, tiny_config, tiny_vq_config

from imagegen.train import train_image_model
from imagegen.train_vq import train_vqvae


def _train(tmp_path_factory: pytest.TempPathFactory, kind: str, steps: int) -> Path:
    run_dir = tmp_path_factory.mktemp(f"tiny_{kind}")
    train_image_model(
        tiny_config(kind, steps), run_dir, resume=False, progress=False, data=synthetic_images()
    )
    return run_dir


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny class-conditional metric-path model trained for 30 steps on 8 x 8 ramps (a few seconds)."""
    return _train(tmp_path_factory, "metric", 30)


@pytest.fixture(scope="session")
def tiny_checkpoint(tiny_run: Path) -> Path:
    return tiny_run / "model.safetensors"


@pytest.fixture(scope="session")
def tiny_mask_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same with the mask path (257-token input vocabulary), 5 steps: only for sampling mechanics."""
    return _train(tmp_path_factory, "mask", 5) / "model.safetensors"


@pytest.fixture(scope="session")
def tiny_vq_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny VQ-VAE (16 codes, 8 x 8 -> 2 x 2) trained for 40 steps on the ramps (about 2 s)."""
    run_dir = tmp_path_factory.mktemp("tiny_vq")
    train_vqvae(tiny_vq_config(40), run_dir, resume=False, progress=False, data=synthetic_images())
    return run_dir
