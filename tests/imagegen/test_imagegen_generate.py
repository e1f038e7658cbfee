"""Sampling a tiny checkpoint: velocities, corrector, guidance, seeds, and the `imagegen sample` CLI."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from cli.imagegen import app
from dfm_core.checkpoints import export_safetensors, load_safetensors
from imagegen.generate import CheckpointError, ImageGenerator, SamplingConfig, resolve_labels
from imagegen.grid import grid_size

runner = CliRunner()


@pytest.fixture(scope="module")
def generator(tiny_checkpoint: Path) -> ImageGenerator:
    return ImageGenerator.from_checkpoint(tiny_checkpoint, "cpu")


def test_cli_sample_writes_a_grid_png_of_the_asked_size(tiny_checkpoint: Path, tmp_path: Path) -> None:
    out, folder = tmp_path / "grid.png", tmp_path / "single"
    args = [
        "sample",
        "--checkpoint",
        str(tiny_checkpoint),
        "--n",
        "6",
        "--out",
        str(out),
        "--steps",
        "4",
        "--images-dir",
        str(folder),
        "--seed",
        "3",
        "--quiet",
    ]
    import subprocess
    import sys

    dead = int(
        subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True).stdout
    )
    half_saved = tmp_path / f".grid.png.{dead}.0123abcd.png"  # a grid a killed earlier run was saving
    not_ours = tmp_path / f".notes.txt.{dead}.0123abcd.tmp"  # the folder is the user's: others stay
    for p in (half_saved, not_ours):
        p.write_bytes(b"half")
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "wrote a grid of 6 images" in result.output
    assert not half_saved.exists() and not_ours.exists()
    with Image.open(out) as img:
        assert img.format == "PNG" and img.size == grid_size(6, (8, 8)) == (3 * 10 + 2, 2 * 10 + 2)
    assert len(list(folder.glob("image_*.png"))) == 6
    with Image.open(folder / "image_000005.png") as img:
        assert img.size == (8, 8) and img.mode == "L"
    result = runner.invoke(
        app, [*args[:9], "--nrow", "6", "--scale", "2", "--label", "vertical", "--guidance", "1.5"]
    )
    assert result.exit_code == 0, result.output
    with Image.open(out) as img:
        assert img.size == (2 * (6 * 10 + 2), 2 * (1 * 10 + 2))


def test_cli_errors_are_clear(tiny_checkpoint: Path, tmp_path: Path) -> None:
    result = runner.invoke(app, ["sample", "--checkpoint", str(tmp_path / "none.safetensors"), "--quiet"])
    assert result.exit_code == 2 and "checkpoint not found" in result.output
    base = [
        "sample",
        "--checkpoint",
        str(tiny_checkpoint),
        "--n",
        "2",
        "--out",
        str(tmp_path / "x.png"),
        "--quiet",
    ]
    result = runner.invoke(app, [*base, "--velocity", "power"])
    assert result.exit_code == 2 and "alpha" in result.output
    result = runner.invoke(app, [*base, "--label", "diagonal"])
    assert result.exit_code == 2 and "unknown class" in result.output
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0 and result.output.startswith("imagegen ")


def test_same_seed_same_images_other_seed_other_images(generator: ImageGenerator) -> None:
    cfg = SamplingConfig(steps=6)
    a = generator.sample(5, cfg, seed=7, batch_size=3)
    b = generator.sample(5, cfg, seed=7, batch_size=3)
    c = generator.sample(5, cfg, seed=8, batch_size=3)
    assert a.shape == (5, 1, 8, 8) and a.dtype == torch.uint8
    assert torch.equal(a, b) and not torch.equal(a, c)


@pytest.mark.parametrize(
    "cfg",
    [
        SamplingConfig(steps=5, velocity="power", alpha=2.0),
        SamplingConfig(steps=5, velocity="power-inf", corrector=3.0, corrector_p=0.25, corrector_q=0.25),
        SamplingConfig(steps=5, velocity="ko", corrector=1.0, temperature=0.8, guidance=2.0),
        SamplingConfig(steps=5, velocity="campbell"),
    ],
    ids=lambda c: c.label(),
)
def test_every_velocity_and_the_corrector_give_pixels(generator: ImageGenerator, cfg: SamplingConfig) -> None:
    images = generator.sample(3, cfg, seed=0, label="horizontal")
    assert images.shape == (3, 1, 8, 8) and images.dtype == torch.uint8


def test_mask_path_checkpoint_samples_without_leftover_masks(tiny_mask_checkpoint: Path) -> None:
    gen = ImageGenerator.from_checkpoint(tiny_mask_checkpoint, "cpu")
    assert gen.path_config.kind == "mask" and gen.model.config.input_vocab == 257
    res = gen.sample_tokens(
        2, SamplingConfig(steps=4), generator=torch.Generator().manual_seed(0), return_trajectory=True
    )
    assert (res.trajectory[0] == 256).all() and int(res.tokens.max()) < 256
    assert gen.sample(2, SamplingConfig(steps=3, velocity="power-inf", corrector=1.0)).shape == (2, 1, 8, 8)


def test_labels_guidance_and_checkpoint_validation(generator: ImageGenerator, tmp_path: Path) -> None:
    names = ["horizontal", "vertical"]
    assert resolve_labels(None, 5, 2, names).tolist() == [0, 1, 0, 1, 0]
    assert resolve_labels("Vertical", 2, 2, names).tolist() == [1, 1]
    assert resolve_labels("null", 1, 2, names).tolist() == [2]
    assert resolve_labels(None, 3, 0, None) is None
    with pytest.raises(ValueError):
        resolve_labels(3, 1, 2, names)
    with pytest.raises(ValueError, match="unconditional"):
        resolve_labels(1, 1, 0, None)
    with pytest.raises(ValueError, match="temperature"):
        SamplingConfig(temperature=0.0)
    with pytest.raises(ValueError, match="unknown velocity"):
        SamplingConfig(velocity="euler")
    other = export_safetensors({"w": torch.zeros(2)}, tmp_path / "other.safetensors", {"format": "something"})
    with pytest.raises(CheckpointError, match="not an imagegen checkpoint"):
        ImageGenerator.from_checkpoint(other)
    assert SamplingConfig(velocity="power", alpha=2, corrector=1.5, corrector_q=1).label() == (
        "power-2+corr(w=1.5,p=0,q=1)"
    )


def test_cli_train_on_an_image_folder_keeps_the_given_flags(tmp_path: Path) -> None:
    """`imagegen train` on a folder of PNGs: the flags given land in the saved config, the rest keep defaults."""
    import json

    from imagegen.train import ImagegenTrainConfig

    for split, n in (("train", 12), ("test", 4)):
        for cls in ("a", "b"):
            folder = tmp_path / "images" / split / cls
            folder.mkdir(parents=True)
            for i in range(n):
                Image.new("L", (8, 8), 20 * i + (100 if cls == "b" else 0)).save(folder / f"{i}.png")
    run_dir, export, config = tmp_path / "run", tmp_path / "model.safetensors", tmp_path / "c.toml"
    config.write_text("val_size = 4\n[train]\neval_batches = 1\nema_decay = 0.5\n")
    args = ["train", "--config", str(config), "--run-dir", str(run_dir), "--dataset", "folder"]
    args += ["--data-dir", str(tmp_path / "images")]
    args += ["--image-size", "8", "--channels", "1", "--size", "tiny", "--path", "mask", "--steps", "3"]
    args += ["--warmup", "1", "--eval-every", "2", "--ckpt-every", "2", "--seed", "5", "--export-bf16"]
    args += ["--batch-size", "4", "--device", "cpu", "--export", str(export), "--quiet"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "trained to step 3" in result.output and export.exists()
    saved = json.loads((run_dir / "config.json").read_text())
    assert saved["train"]["steps"] == 3 and saved["train"]["batch_size"] == 4
    assert (saved["train"]["warmup_steps"], saved["train"]["eval_every"]) == (1, 2)
    assert (saved["train"]["ckpt_every"], saved["train"]["seed"]) == (2, 5)
    half, _ = load_safetensors(export)
    full, _ = load_safetensors(run_dir / "model.safetensors")
    assert {v.dtype for v in half.values() if v.is_floating_point()} == {torch.bfloat16}
    assert {v.dtype for v in full.values() if v.is_floating_point()} == {torch.float32}
    images = ImageGenerator.from_checkpoint(export, device="cpu").sample(2, SamplingConfig(steps=2), seed=0)
    assert images.shape[0] == 2 and images.dtype == torch.uint8
    assert saved["train"]["ema_decay"] == 0.5  # from the file, and a flag not given keeps its default:
    assert saved["train"]["lr"] == ImagegenTrainConfig().train.lr
    config = saved["metadata"]["imagegen_config"]
    assert config["path"]["kind"] == "mask" and config["data_dir"] == str(tmp_path / "images")
    assert config["model"] == saved["metadata"]["model_config"]  # the U-Net built, not the bare preset
    assert config["model"]["image_size"] == 8 and config["model"]["image_channels"] == 1
    bare = runner.invoke(app, [a for a in args if a not in ("--export", str(export))])
    assert bare.exit_code != 0 and "--export-bf16 needs --export" in bare.output
    again = runner.invoke(app, [*args[:-1], "--no-resume", "--steps", "2", "--quiet"])
    assert again.exit_code == 0 and "trained to step 2" in again.output


def test_an_image_folder_writer_is_what_images_dir_does_from_python(
    generator: ImageGenerator, tmp_path: Path
) -> None:
    import numpy as np

    from imagegen.grid import ImageFolderWriter

    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(7):  # an earlier, larger run's images
        Image.new("L", (8, 8)).save(folder / f"image_{i:06d}.png")
    writer = ImageFolderWriter(folder)
    images = generator.sample(3, SamplingConfig(steps=2), seed=0, batch_size=2, on_batch=writer)
    assert writer.written == 3 and writer.removed == 7
    assert sorted(p.name for p in folder.iterdir()) == [f"image_{i:06d}.png" for i in range(3)]
    with Image.open(folder / "image_000002.png") as img:
        assert torch.equal(torch.from_numpy(np.asarray(img)), images[2, 0])
