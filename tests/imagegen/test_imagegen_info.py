"""`imagegen info`: image models and VQ-VAEs described from their headers; other files noted."""

from __future__ import annotations

from pathlib import Path

import torch
from typer.testing import CliRunner

from cli.imagegen import app
from dfm_core.checkpoints import export_safetensors

runner = CliRunner()


def test_info_describes_image_models_and_vq_vaes(
    tiny_checkpoint: Path, tiny_vq_run: Path, tmp_path: Path
) -> None:
    for path, fmt in (
        (tiny_checkpoint, "imagegen-checkpoint-v1"),
        (tiny_vq_run / "vqvae.safetensors", "imagegen-vqvae-v1"),
    ):
        result = runner.invoke(app, ["info", str(path)])
        assert result.exit_code == 0, result.output
        assert f"format: {fmt}" in result.output.splitlines()
        assert "note: not a" not in result.output
    foreign = export_safetensors(
        {"w": torch.zeros(3, 2)}, tmp_path / "other.safetensors", {"format": "other-v1"}
    )
    other = runner.invoke(app, ["info", str(foreign)])
    assert other.exit_code == 0, other.output
    lines = other.output.splitlines()
    assert "note: not a imagegen-checkpoint-v1 or imagegen-vqvae-v1 file (format='other-v1')" in lines
    assert "weights: 6 values in 1 tensors (F32)" in lines
