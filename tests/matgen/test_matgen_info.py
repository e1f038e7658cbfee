"""`matgen info`: what a checkpoint is, from its header, with one error line for what is not one."""

from __future__ import annotations

import json
from pathlib import Path

from cli_assert import one_line_error
from typer.testing import CliRunner

from cli.matgen import app
from dfm_core.checkpoints import load_safetensors
from matgen.sampling import DEFAULT_CHECKPOINT

runner = CliRunner()


def test_info_describes_the_shipped_model_with_no_arguments() -> None:
    result = runner.invoke(app, ["info"])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    _, meta = load_safetensors(DEFAULT_CHECKPOINT)
    assert f"parameters: {meta['parameters']:,}" in lines
    assert f"weights: {meta['parameters']:,} values in 95 tensors (BF16)" in lines
    assert "format: matgen-checkpoint-v1" in lines and "scheduler: ko" in lines
    assert f"  n_train: {meta['data']['n_train']:,}" in lines  # a table: one line per entry
    assert "atom_count_distribution: [21 numbers]" in lines
    assert lines[-1] == "elements no training crystal holds: Ar, Po, At, Rn, Fr, Ra"
    as_json = runner.invoke(app, ["info", "--json"])
    assert as_json.exit_code == 0, as_json.output
    described = json.loads(as_json.output)
    assert described["metadata"] == meta
    assert described["file"]["values"] == meta["parameters"]
    assert described["file"]["size_bytes"] == DEFAULT_CHECKPOINT.stat().st_size


def test_info_refuses_what_is_not_a_checkpoint_in_one_line(tmp_path: Path) -> None:
    one_line_error(runner.invoke(app, ["info", str(tmp_path / "none.safetensors")]), "not found")
    (tmp_path / "notes.safetensors").write_text("these are notes, not weights\n")
    one_line_error(runner.invoke(app, ["info", str(tmp_path / "notes.safetensors")]), "not a safetensors")
    run = tmp_path / "run"
    run.mkdir()
    (run / "model.safetensors").write_bytes(DEFAULT_CHECKPOINT.read_bytes())
    one_line_error(runner.invoke(app, ["info", str(run)]), "is a folder", "did you mean")
    import torch

    torch.save({"model": {}, "step": 1}, run / "last.pt")
    one_line_error(runner.invoke(app, ["info", str(run / "last.pt")]), "training checkpoint")
