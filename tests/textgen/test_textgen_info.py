"""`textgen info`: a text checkpoint described from its header."""

from __future__ import annotations

from pathlib import Path

from typer.testing import CliRunner

from cli.textgen import app
from dfm_core.checkpoints import load_safetensors


def test_info_describes_a_trained_text_model(tiny_run: Path) -> None:
    ckpt = tiny_run / "model.safetensors"
    result = CliRunner().invoke(app, ["info", str(ckpt)])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    state, meta = load_safetensors(ckpt)
    assert "format: textgen-checkpoint-v1" in lines
    assert any(
        line.startswith(f"weights: {sum(v.numel() for v in state.values()):,} values in {len(state)} tensors")
        for line in lines
    )
    assert not any(line.startswith("note: not a") for line in lines)
