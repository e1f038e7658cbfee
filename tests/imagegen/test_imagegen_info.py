"""`imagegen info`: image models and VQ-VAEs described from their headers; other files noted."""

from __future__ import annotations

from pathlib import Path

from typer.testing import CliRunner

from cli.imagegen import app
from matgen.generate import DEFAULT_CHECKPOINT

runner = CliRunner()


def test_info_describes_image_models_and_vq_vaes(tiny_checkpoint: Path, tiny_vq_run: Path) -> None:
    for path, fmt in (
        (tiny_checkpoint, "imagegen-checkpoint-v1"),
        (tiny_vq_run / "vqvae.safetensors", "imagegen-vqvae-v1"),
    ):
        result = runner.invoke(app, ["info", str(path)])
        assert result.exit_code == 0, result.output
        assert f"format: {fmt}" in result.output.splitlines()
        assert "note: not a" not in result.output
    other = runner.invoke(app, ["info", str(DEFAULT_CHECKPOINT)])
    assert other.exit_code == 0, other.output
    assert (
        "note: not a imagegen-checkpoint-v1 or imagegen-vqvae-v1 file (format='matgen-checkpoint-v1')"
        in other.output.splitlines()
    )
