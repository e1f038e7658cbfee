"""The apps' shared checkpoint reading (dfm_core.checkpoints): one CheckpointError per way a file is not a model."""

from pathlib import Path

import pytest
import torch
from torch import nn

from dfm_core.checkpoints import (
    EXPORTED_MODEL,
    CheckpointError,
    export_safetensors,
    load_model_weights,
    read_checkpoint,
)

FORMAT = "toyapp-checkpoint-v1"


def _export(path: Path, **metadata) -> Path:
    return export_safetensors(nn.Linear(3, 2), path, {"format": FORMAT, "model_config": {"n": 3}, **metadata})


def test_read_checkpoint_returns_weights_and_metadata(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    state, meta = read_checkpoint(_export(tmp_path / "m.safetensors"), "toyapp", FORMAT)
    assert set(state) == {"weight", "bias"} and meta["model_config"] == {"n": 3}
    monkeypatch.setenv("HOME", str(tmp_path))
    _, again = read_checkpoint("~/m.safetensors", "toyapp", FORMAT)  # a notebook's "~" is expanded
    assert again == meta


def test_each_wrong_file_gets_its_own_message_naming_it(tmp_path: Path):
    run = tmp_path / "run"
    run.mkdir()
    with pytest.raises(CheckpointError, match="is a folder.*give the .safetensors file"):
        read_checkpoint(run, "toyapp", FORMAT)
    exported = _export(run / EXPORTED_MODEL)
    with pytest.raises(CheckpointError, match=f"is a folder.*did you mean {exported}"):
        read_checkpoint(run, "toyapp", FORMAT)
    with pytest.raises(CheckpointError, match="checkpoint not found: .*nope.safetensors \\(hint\\)"):
        read_checkpoint(run / "nope.safetensors", "toyapp", FORMAT, missing_hint=" (hint)")
    # a training checkpoint beside the export: the message points at the export
    torch.save({"step": 1}, run / "last.pt")
    with pytest.raises(CheckpointError, match=f"cannot read checkpoint .*last.pt.*; {exported} is the model"):
        read_checkpoint(run / "last.pt", "toyapp", FORMAT)
    # another app's file, or this app's without a required key
    other = export_safetensors(nn.Linear(3, 2), tmp_path / "o.safetensors", {"format": "else-v1"})
    with pytest.raises(
        CheckpointError, match=r"not a toyapp checkpoint \(format='else-v1'\); train one with"
    ):
        read_checkpoint(other, "toyapp", FORMAT)
    with pytest.raises(CheckpointError, match="not an imagegen checkpoint.*; use X"):
        read_checkpoint(exported, "imagegen", FORMAT, required=("model_config", "path"), train_advice="use X")


def test_load_model_weights_builds_loads_and_keeps_the_callers_rng(tmp_path: Path):
    path = _export(tmp_path / "m.safetensors")
    state, _ = read_checkpoint(path, "toyapp", FORMAT)
    torch.manual_seed(7)
    expected = torch.rand(3)
    torch.manual_seed(7)
    model = load_model_weights(lambda: nn.Linear(3, 2), state, path, "toyapp")
    assert torch.equal(torch.rand(3), expected)  # the random init did not advance the global RNG
    assert torch.equal(model.weight, state["weight"])


def test_load_model_weights_names_a_bad_config_and_the_first_misfit(tmp_path: Path):
    path = _export(tmp_path / "m.safetensors")
    state, _ = read_checkpoint(path, "toyapp", FORMAT)

    def bad_config() -> nn.Module:
        raise ValueError("width must be > 0")

    with pytest.raises(CheckpointError, match="does not describe a toyapp model: width must be > 0"):
        load_model_weights(bad_config, state, path, "toyapp")
    with pytest.raises(CheckpointError, match=r"do not fit .*size mismatch for weight.*\(and 1 more\)"):
        load_model_weights(lambda: nn.Linear(4, 5), state, path, "toyapp")
