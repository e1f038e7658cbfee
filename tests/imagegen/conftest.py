"""Fixtures of the imagegen tests: tiny trained checkpoints (metric and mask paths)."""

from __future__ import annotations

from pathlib import Path

import pytest
from imagegen_fixtures import synthetic_images, tiny_config

from imagegen.train import train_image_model


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
