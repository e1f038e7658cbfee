"""Runs stopped half way (Ctrl-C, SIGTERM, SIGKILL) and run again: what is kept, redone and said."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from imagegen_fixtures import PixelHistogram
from PIL import Image
from typer.testing import CliRunner

import imagegen.evaluate as evaluate_module
import imagegen.grid as grid_module
from cli.imagegen import app
from imagegen.data import ImageDataset
from imagegen.evaluate import evaluate_sweep, plot_score_vs_nfe, reference_stats
from imagegen.generate import ImageGenerator, SamplingConfig

runner = CliRunner()


def _dead_pid() -> int:
    """The id of a process that has ended: the owner of a temp file that a killed run left behind."""
    done = subprocess.Popen([sys.executable, "-c", "pass"])
    done.wait()
    return done.pid


def _stale_temp(folder: Path, target: str) -> Path:
    """A hidden temp file as `atomic_write` leaves it when its process is killed mid-write."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f".{target}.{_dead_pid()}.0123abcd.tmp"
    path.write_bytes(b"half a file")
    return path


def _gray_folder(root: Path, n: int = 6) -> Path:
    for cls in ("a", "b"):
        (root / cls).mkdir(parents=True)
        for i in range(n):
            Image.new("L", (8, 8), 30 * i + (100 if cls == "b" else 0)).save(root / cls / f"{i}.png")
    return root


def test_a_rerun_into_a_used_run_dir_says_that_it_resumed(tmp_path: Path) -> None:
    data = _gray_folder(tmp_path / "data")
    common = ["--dataset", "folder", "--data-dir", str(data), "--image-size", "8", "--channels", "1"]
    common += ["--val-size", "4", "--batch-size", "4", "--device", "cpu", "--quiet"]
    common += ["--eval-every", "0"]
    train = ["train", "--run-dir", str(tmp_path / "run"), *common, "--size", "tiny", "--ckpt-every", "1"]
    vq = ["train-vq", "--run-dir", str(tmp_path / "vq"), *common, "--codebook-size", "8", "--code-dim", "4"]
    vq += ["--width", "8"]
    for args, run_dir in ((train, tmp_path / "run"), (vq, tmp_path / "vq")):
        first = runner.invoke(app, [*args, "--steps", "1"])
        assert first.exit_code == 0 and "resumed" not in first.output, first.output
        more = runner.invoke(app, [*args, "--steps", "2"])
        assert more.exit_code == 0, more.output
        assert f"resumed from step 1 of {run_dir / 'last.pt'}" in more.output, more.output
        assert "trained to step 2" in more.output
        same = runner.invoke(app, [*args, "--steps", "2"])
        assert same.exit_code == 0 and "at step 2 already: nothing to train" in same.output, same.output


@pytest.fixture
def sweep_parts(tiny_checkpoint: Path):
    gen = ImageGenerator.from_checkpoint(tiny_checkpoint, "cpu")
    extractor = PixelHistogram()
    images = torch.randint(
        0, 256, (10, 1, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(0)
    )
    return gen, extractor, reference_stats(ImageDataset(images, None, None, "ref"), extractor, cache=False)


def test_an_evaluation_stopped_before_its_grid_redoes_the_point_grid_and_all(
    sweep_parts, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    gen, extractor, reference = sweep_parts
    out = tmp_path / "eval"
    real_save_grid = evaluate_module.save_grid

    def interrupted(*args, **kwargs):  # Ctrl-C while the first point's grid is written
        raise KeyboardInterrupt

    monkeypatch.setattr(evaluate_module, "save_grid", interrupted)
    with pytest.raises(KeyboardInterrupt):
        evaluate_sweep(gen, [SamplingConfig()], [2], extractor, reference, out, n=4, save_grids=4)
    monkeypatch.setattr(evaluate_module, "save_grid", real_save_grid)
    lines: list[str] = []
    evaluate_sweep(
        gen, [SamplingConfig()], [2], extractor, reference, out, n=4, save_grids=4, log=lines.append
    )
    assert (out / "samples_ko_nfe2.png").is_file(), lines  # not a point kept without its grid
    assert not any("kept from an earlier run" in line for line in lines), lines
    assert len((out / "results.csv").read_text().splitlines()) == 2  # header + the point, once


def test_the_score_plot_is_replaced_whole_or_not_at_all(
    sweep_parts, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from matplotlib.figure import Figure

    gen, extractor, reference = sweep_parts
    out = tmp_path / "eval"
    rows = evaluate_sweep(gen, [SamplingConfig()], [2], extractor, reference, out, n=4, save_grids=0)
    plot = out / "fd_vs_nfe.png"
    before = plot.read_bytes()

    def killed_half_way(self, fname, *args, **kwargs):  # the first bytes are out, then the run stops
        Path(fname).write_bytes(before[:100])
        raise KeyboardInterrupt

    monkeypatch.setattr(Figure, "savefig", killed_half_way)
    with pytest.raises(KeyboardInterrupt):
        plot_score_vs_nfe(rows, plot)
    assert plot.read_bytes() == before
    assert sorted(p.name for p in out.iterdir()) == ["fd_vs_nfe.png", "results.csv"]  # no temp file left


def test_temp_files_a_killed_evaluation_left_are_removed(sweep_parts, tmp_path: Path) -> None:
    gen, extractor, reference = sweep_parts
    out = tmp_path / "eval"
    stale = _stale_temp(out, "samples_ko_nfe2.png")
    evaluate_sweep(gen, [SamplingConfig()], [2], extractor, reference, out, n=4, save_grids=4)
    assert not stale.exists()
    assert sorted(p.name for p in out.iterdir()) == ["fd_vs_nfe.png", "results.csv", "samples_ko_nfe2.png"]


def test_sample_stopped_half_way_says_what_its_images_dir_holds(
    tiny_checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    images_dir, grid = tmp_path / "images", tmp_path / "grid.png"
    stale = _stale_temp(images_dir, "image_000003.png")
    args = ["sample", "--checkpoint", str(tiny_checkpoint), "--n", "4", "--batch-size", "2", "--steps", "2"]
    args += ["--out", str(grid), "--images-dir", str(images_dir), "--device", "cpu", "--quiet"]
    real_save_images = grid_module.save_images

    def stopped_at_the_second_batch(images, folder, prefix="image", start=0):
        if start > 0:
            raise KeyboardInterrupt
        return real_save_images(images, folder, prefix=prefix, start=start)

    monkeypatch.setattr(grid_module, "save_images", stopped_at_the_second_batch)
    result = runner.invoke(app, args)
    assert result.exit_code == 130, result.output
    assert f"{images_dir} holds 2 of the 4 images" in result.output and "not written" in result.output
    assert sorted(p.name for p in images_dir.iterdir()) == ["image_000000.png", "image_000001.png"]
    assert not grid.exists() and not stale.exists()
    monkeypatch.setattr(grid_module, "save_images", real_save_images)
    again = runner.invoke(app, args)
    assert again.exit_code == 0, again.output
    assert len(list(images_dir.glob("image_*.png"))) == 4 and grid.is_file()
