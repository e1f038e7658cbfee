"""Bad values are refused with one clear line (Python API: ValueError naming the value; CLI: no traceback)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from checkpoint_edit import with_raw_metadata
from cli_assert import one_line_error
from imagegen_fixtures import folder_preview_args
from PIL import Image
from typer.testing import CliRunner

from cli.imagegen import app
from imagegen.data import ImageDataset, load_image_folder
from imagegen.evaluate import check_sweep, load_evaluation_data
from imagegen.generate import CorrectorSchedule, ImageGenerator, SamplingConfig
from imagegen.grid import check_grid_options, check_image_file, check_output_folder, make_grid
from imagegen.paths import MAX_PREVIEW_IMAGES, PixelPathConfig, path_preview, path_samples
from imagegen.train import ImagegenTrainConfig

runner = CliRunner()


def gray_folder(root: Path, n: int = 3, size: int = 8) -> Path:
    """``root/a`` and ``root/b`` with ``n`` flat grey PNGs each (no train/ or test/ split)."""
    for cls in ("a", "b"):
        (root / cls).mkdir(parents=True)
        for i in range(n):
            Image.new("L", (size, size), 30 * i + (100 if cls == "b" else 0)).save(root / cls / f"{i}.png")
    return root


def sample_cli(checkpoint: Path, out: Path, *extra: str):
    args = ["sample", "--checkpoint", str(checkpoint), "--n", "4", "--out", str(out), "--steps", "2"]
    return runner.invoke(app, [*args, "--quiet", *extra])


# ---------------------------------------------------------------- 1. counts and path parameters


def test_counts_and_path_parameters_are_refused_before_any_allocation(tmp_path: Path) -> None:
    ds = ImageDataset(torch.zeros(5, 1, 4, 4, dtype=torch.uint8), None, None, "x")
    for bad in (-1, 0, 2.5, True):
        with pytest.raises(ValueError, match="number of images"):
            ds.random_subset(bad)  # -1 used to slice perm[:-1]
    for kw in ({"c": math.nan}, {"a": math.inf}, {"c": -1.0}, {"a": 0.0}):
        with pytest.raises(ValueError, match="finite number > 0"):
            PixelPathConfig(**kw)
    cfg = PixelPathConfig()
    for n, times in ((0, 3), (-1, 3), (MAX_PREVIEW_IMAGES + 1, 3), (2, 0)):
        with pytest.raises(ValueError, match="path preview"):
            path_preview(ds, cfg, n, times)
    with pytest.raises(ValueError, match="at least one time"):
        path_samples(ds.images, cfg, torch.tensor([]))
    xt, ts = path_preview(ds, cfg, 64, 2)  # n above the data size: all of it
    assert xt.shape == (2, 5, 1, 4, 4) and ts.tolist() == [0.0, 1.0]

    data = gray_folder(tmp_path / "data")
    base = ["path-preview", "--dataset", "folder", "--data-dir", str(data), "--image-size", "8"]
    base += ["--out", str(tmp_path / "p.png")]
    one_line_error(runner.invoke(app, [*base, "--n", "-1"]), "--n", "-1")
    one_line_error(runner.invoke(app, [*base, "--n", "100000"]), "1..64")
    one_line_error(runner.invoke(app, [*base, "--n", "0"]), "--n")
    one_line_error(runner.invoke(app, [*base, "--times", "0"]), "--times")
    one_line_error(runner.invoke(app, [*base, "--beta-c", "nan"]), "c", "nan")


def test_evaluate_refuses_bad_reference_n_and_counts(tiny_checkpoint: Path, tmp_path: Path) -> None:
    base = ["evaluate", "--checkpoint", str(tiny_checkpoint), "--out", str(tmp_path / "e"), "--quiet"]
    one_line_error(runner.invoke(app, [*base, "--reference-n", "-1"]), "--reference-n", "-1")
    one_line_error(runner.invoke(app, [*base, "--n", "0"]), "n (samples per point)")
    one_line_error(runner.invoke(app, [*base, "--grids", "-1"]), "-1")
    one_line_error(runner.invoke(app, [*base, "--n", "1"]), "at least 2")  # a Frechet distance needs two
    one_line_error(runner.invoke(app, [*base, "--reference-n", "1"]), "--reference-n must be at least 2")
    assert not (tmp_path / "e").exists()


# ---------------------------------------------------------------- 2, 3. sampler numbers


@pytest.mark.parametrize(
    "kw",
    [
        {"temperature": math.nan},
        {"temperature": math.inf},
        {"temperature": -1.0},
        {"guidance": math.inf},
        {"guidance": math.nan},
        {"guidance": -1.0},
    ],
)
def test_non_finite_temperature_and_guidance_are_refused(kw: dict) -> None:
    name = next(iter(kw))
    with pytest.raises(ValueError, match=f"{name} must be a finite number"):
        SamplingConfig(**kw)


@pytest.mark.parametrize(
    "kw",
    [
        {"corrector": -1.0},
        {"corrector": math.nan},
        {"corrector": math.inf},
        {"corrector": 1.0, "corrector_p": math.nan},
        {"corrector": 1.0, "corrector_q": -0.5},
        {"corrector": 0.0, "corrector_q": math.inf},  # refused even while the corrector is off
    ],
)
def test_negative_or_non_finite_corrector_settings_are_refused(kw: dict) -> None:
    with pytest.raises(ValueError, match="corrector .* must be a finite number >= 0"):
        SamplingConfig(**kw)


def test_corrector_schedule_and_cli_refuse_nan(tiny_checkpoint: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="corrector weight"):
        CorrectorSchedule(math.nan)
    with pytest.raises(ValueError, match="exponent q"):
        CorrectorSchedule(1.0, q=math.nan)
    out = tmp_path / "s.png"
    one_line_error(sample_cli(tiny_checkpoint, out, "--temperature", "nan"), "temperature", "nan")
    one_line_error(sample_cli(tiny_checkpoint, out, "--guidance", "inf"), "guidance", "inf")
    one_line_error(sample_cli(tiny_checkpoint, out, "--corrector", "-1"), "corrector weight", "-1")
    one_line_error(sample_cli(tiny_checkpoint, out, "--corrector-p", "nan"), "exponent p", "nan")
    ev = ["evaluate", "--checkpoint", str(tiny_checkpoint), "--out", str(tmp_path / "e"), "--quiet"]
    one_line_error(runner.invoke(app, [*ev, "--corrector", "0,nan"]), "corrector weight", "nan")
    assert not out.exists()


# ---------------------------------------------------------------- 4, 7. training data sizes


def test_train_limit_and_val_size(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="train_limit .* got 0"):
        ImagegenTrainConfig(train_limit=0)
    with pytest.raises(ValueError, match="val_size"):
        ImagegenTrainConfig(val_size=0)
    data = gray_folder(tmp_path / "data", n=6)
    args = ["train", "--run-dir", str(tmp_path / "run"), "--dataset", "folder", "--data-dir", str(data)]
    args += ["--image-size", "8", "--channels", "1", "--size", "tiny", "--steps", "2", "--batch-size", "4"]
    args += ["--device", "cpu", "--quiet"]
    one_line_error(runner.invoke(app, [*args, "--train-limit", "0"]), "train_limit", "0")
    one_line_error(runner.invoke(app, args), "12 images", "hold out 1000", "--val-size")
    result = runner.invoke(app, [*args, "--val-size", "4"])
    assert result.exit_code == 0 and "trained to step 2" in result.output, result.output
    # the same images under another spelling of the folder resume; other images are refused
    respelled = [str(data / ".." / "data") if a == str(data) else a for a in args]
    respelled[respelled.index("--steps") + 1] = "3"
    result = runner.invoke(app, [*respelled, "--val-size", "4"])
    assert result.exit_code == 0 and "trained to step 3" in result.output, result.output
    Image.new("L", (8, 8), 7).save(data / "a" / "0.png")
    respelled[respelled.index("--steps") + 1] = "4"
    one_line_error(runner.invoke(app, [*respelled, "--val-size", "4"]), "other data")


# ---------------------------------------------------------------- 5. silently accepted options


def test_nfe_lists_grid_options_and_data_shapes(
    tiny_checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = [SamplingConfig()]
    with pytest.raises(ValueError, match="2.7"):
        check_sweep(settings, [2.7], 4)
    assert check_sweep(settings, [2, 4.0], 4) == [2, 4]
    ev = ["evaluate", "--checkpoint", str(tiny_checkpoint), "--out", str(tmp_path / "e"), "--quiet"]
    one_line_error(runner.invoke(app, [*ev, "--nfe", "8,2.7"]), "--nfe", "whole numbers", "'2.7'")
    one_line_error(runner.invoke(app, [*ev, "--nfe", "abc"]), "--nfe", "'abc'")

    for bad in ({"nrow": 0}, {"nrow": -1}, {"scale": 0}):
        with pytest.raises(ValueError, match=">= 1"):
            check_grid_options(**bad)
    images = torch.zeros(4, 1, 8, 8, dtype=torch.uint8)
    assert make_grid(images, nrow=100).shape == (12, 4 * 10 + 2)  # nrow capped at n: one row of 4
    out = tmp_path / "s.png"
    one_line_error(sample_cli(tiny_checkpoint, out, "--nrow", "0"), "nrow", "0")
    one_line_error(sample_cli(tiny_checkpoint, out, "--nrow", "-1"), "nrow", "-1")
    one_line_error(sample_cli(tiny_checkpoint, out, "--scale", "0"), "scale", "0")
    assert sample_cli(tiny_checkpoint, out, "--nrow", "100").exit_code == 0
    with Image.open(out) as img:
        assert img.size == (4 * 10 + 2, 12)

    gen = ImageGenerator.from_checkpoint(tiny_checkpoint, "cpu")  # 1 x 8 x 8
    rgb = ImageDataset(torch.zeros(6, 3, 32, 32, dtype=torch.uint8), None, None, "cifar10/test")
    monkeypatch.setattr("imagegen.evaluate.load_dataset", lambda *a, **k: rgb)
    with pytest.raises(ValueError, match=r"shape \(3, 32, 32\).*\(1, 8, 8\)"):
        load_evaluation_data(gen, "cifar10")
    with pytest.raises(ValueError, match="reference images"):
        load_evaluation_data(gen, "cifar10", n=-1)


# ---------------------------------------------------------------- 6. 16-bit PNGs


def test_sixteen_bit_greyscale_pngs_are_scaled_not_clipped(tmp_path: Path) -> None:
    values = (np.arange(64, dtype=np.uint16) * 1000).reshape(8, 8)
    values[0, 0], values[0, 1] = 65535, 257 * 100
    (tmp_path / "f").mkdir()
    Image.fromarray(values).save(tmp_path / "f" / "deep.png")
    with Image.open(tmp_path / "f" / "deep.png") as img:
        assert img.mode in ("I;16", "I")
    expected = np.clip(np.rint(values / 257.0), 0, 255).astype(np.uint8)
    grey = load_image_folder(tmp_path / "f", size=8, channels=1)
    assert np.array_equal(grey.images[0, 0].numpy(), expected)
    assert grey.images[0, 0, 0, 0] == 255 and grey.images[0, 0, 0, 1] == 100
    assert abs(float(grey.images.float().mean()) - values.mean() / 257) < 1  # not clipped to ~254
    rgb = load_image_folder(tmp_path / "f", size=8, channels=3)
    assert all(np.array_equal(rgb.images[0, c].numpy(), expected) for c in range(3))


# ---------------------------------------------------------------- 8, 9. messages and output paths


def test_clear_messages_for_folders_and_bad_files(
    tiny_checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    one_line_error(sample_cli(tiny_checkpoint, tmp_path), "is a folder", ".png")
    one_line_error(sample_cli(tiny_checkpoint, tmp_path / "grid.txt"), ".png")
    line = one_line_error(sample_cli(tiny_checkpoint.parent, tmp_path / "s.png"), "is a folder")
    assert str(tiny_checkpoint) in line  # <dir>/model.safetensors suggested
    one_line_error(sample_cli(tmp_path, tmp_path / "s.png"), "is a folder", ".safetensors")

    bad = tmp_path / "bad.pth"
    bad.write_text("not a torch file\n")
    monkeypatch.setenv("IMAGEGEN_CACHE", str(tmp_path / "cache"))
    ev = ["evaluate", "--checkpoint", str(tiny_checkpoint), "--out", str(tmp_path / "e"), "--quiet"]
    one_line_error(runner.invoke(app, [*ev, "--features-weights", str(bad)]), str(bad), "state dict")

    data = gray_folder(tmp_path / "data")  # no test/ subfolder: the training images are previewed
    pp = ["path-preview", "--dataset", "folder", "--data-dir", str(data), "--image-size", "8"]
    result = runner.invoke(app, [*pp, "--out", str(tmp_path / "p.png"), "--n", "2", "--times", "3"])
    assert result.exit_code == 0 and "no test/ subfolder" in result.output, result.output
    with Image.open(tmp_path / "p.png") as img:
        assert img.size == (2 * (2 * 10 + 2), 2 * (3 * 10 + 2))


def test_folder_only_flags_are_refused_for_fixed_data_sets(tmp_path: Path) -> None:
    for flag in ("--image-size", "--channels"):
        args = ["train", "--run-dir", str(tmp_path / "r"), "--dataset", "fashion-mnist", flag, "1"]
        one_line_error(runner.invoke(app, args), "apply to --dataset folder")
    assert not (tmp_path / "r").exists()


def test_a_truncated_or_corrupt_image_is_named(tmp_path: Path) -> None:
    from imagegen.data import load_image_folder

    data = gray_folder(tmp_path / "data", size=16)
    victim = data / "a" / "1.png"
    victim.write_bytes(victim.read_bytes()[:40])  # header kept, pixels cut
    with pytest.raises(ValueError, match=r"1\.png"):
        load_image_folder(data, 16, channels=1, split="train")
    victim.write_bytes(b"not an image at all")
    with pytest.raises(ValueError, match=r"1\.png"):
        load_image_folder(data, 16, channels=1, split="train")


def test_every_unreadable_image_is_named_at_once_with_what_to_do(tmp_path: Path) -> None:
    """Two bad files in a folder: one run names both (not one per run), says how many and what to do."""
    data = gray_folder(tmp_path / "data", size=8)
    (data / "a" / "0.png").write_bytes((data / "a" / "0.png").read_bytes()[:40])  # truncated
    (data / "b" / "fake.jpg").write_text("not an image")  # a text file with an image extension
    args = ["train", "--run-dir", str(tmp_path / "r"), "--dataset", "folder", "--data-dir", str(data)]
    args += ["--image-size", "8", "--channels", "1", "--steps", "1", "--device", "cpu", "--quiet"]
    line = one_line_error(runner.invoke(app, args), "2 of 7 image file(s)", "remove or replace them")
    assert str(data / "a" / "0.png") in line and str(data / "b" / "fake.jpg") in line


def test_files_that_are_not_images_are_counted_not_skipped_silently(tmp_path: Path) -> None:
    data = gray_folder(tmp_path / "data", size=8)
    (data / "a" / "notes.txt").write_text("where the pictures came from")
    (data / "labels.csv").write_text("file,label\n")
    with pytest.warns(UserWarning, match=r"skipped 2 file\(s\) that are not images by name \(\.csv, \.txt"):
        ds = load_image_folder(data, 8, channels=1)
    assert len(ds) == 6 and ds.class_names == ("a", "b")


def test_output_paths_are_checked_before_sampling(
    tiny_checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    with pytest.raises(ValueError, match="which is a file"):
        check_image_file(a_file / "sub" / "grid.png")
    with pytest.raises(ValueError, match="is a file, not a folder"):
        check_output_folder(a_file)
    assert check_image_file(tmp_path / "new" / "grid.png") == tmp_path / "new" / "grid.png"
    assert not (tmp_path / "new").exists()  # checking creates nothing

    def no_sampling(*args, **kwargs):
        raise AssertionError("sampled before checking the output path")

    monkeypatch.setattr(ImageGenerator, "sample", no_sampling)
    one_line_error(sample_cli(tiny_checkpoint, a_file / "grid.png"), "which is a file")
    result = sample_cli(tiny_checkpoint, tmp_path / "g.png", "--images-dir", str(a_file))
    one_line_error(result, "--images-dir", "not a folder")
    ev = ["evaluate", "--checkpoint", str(tiny_checkpoint), "--out", str(a_file), "--quiet"]
    one_line_error(runner.invoke(app, ev), "not a folder")


# ---------------------------------------------------------------- 10. labels


def test_labels_name_guidance_and_temperature(tiny_checkpoint: Path, tmp_path: Path) -> None:
    assert SamplingConfig().label() == "ko"
    assert SamplingConfig(guidance=1.5).label() == "ko+guidance=1.5"
    assert SamplingConfig(corrector=2, temperature=0.9).label() == "ko+corr(w=2,p=0,q=0)+temp=0.9"
    result = sample_cli(tiny_checkpoint, tmp_path / "s.png", "--guidance", "1.5", "--label", "vertical")
    assert result.exit_code == 0 and "(ko+guidance=1.5, 2 steps)" in result.output, result.output


def test_images_dir_keeps_only_the_images_of_this_run(tiny_checkpoint: Path, tmp_path: Path) -> None:
    folder = tmp_path / "imgs"
    assert sample_cli(tiny_checkpoint, tmp_path / "a.png", "--images-dir", str(folder)).exit_code == 0
    (folder / "notes.txt").write_text("mine")
    (folder / "image_x.png").write_bytes(b"not ours")
    assert sorted(p.name for p in folder.glob("image_0*.png")) == [f"image_{i:06d}.png" for i in range(4)]
    args = ["sample", "--checkpoint", str(tiny_checkpoint), "--n", "2", "--out", str(tmp_path / "b.png")]
    result = runner.invoke(app, [*args, "--steps", "2", "--quiet", "--images-dir", str(folder)])
    assert result.exit_code == 0 and "removed the 4 image_*.png of an earlier run" in result.output, (
        result.output
    )
    names = sorted(p.name for p in folder.iterdir())
    assert names == ["image_000000.png", "image_000001.png", "image_x.png", "notes.txt"]
    # a run stopped half way leaves only its own images, never a mix of two runs
    import imagegen.generate as generate_module

    real_sample = generate_module.ImageGenerator.sample

    def stopped_after_one_batch(self, n, cfg, on_batch=None, **kw):
        real_sample(self, 1, cfg, on_batch=on_batch, **kw)
        raise KeyboardInterrupt

    # an option refused (here an unknown class) removes nothing
    refused = runner.invoke(
        app, [*args, "--steps", "2", "--quiet", "--images-dir", str(folder), "--label", "nope"]
    )
    assert refused.exit_code == 2 and len(list(folder.glob("image_0*.png"))) == 2, refused.output
    generate_module.ImageGenerator.sample = stopped_after_one_batch
    try:
        result = runner.invoke(
            app, [*args[:4], "3", *args[5:], "--steps", "2", "--quiet", "--images-dir", str(folder)]
        )
    finally:
        generate_module.ImageGenerator.sample = real_sample
    assert result.exit_code == 130
    assert sorted(p.name for p in folder.glob("image_0*.png")) == ["image_000000.png"]
    ev = ["evaluate", "--checkpoint", str(tiny_checkpoint), "--out", str(tmp_path / "e"), "--quiet"]
    one_line_error(runner.invoke(app, [*ev, "--nfe", "4,,8"]), "--nfe", "empty item")
    one_line_error(runner.invoke(app, [*ev, "--corrector", "0,,1"]), "--corrector", "empty item")


def test_lossy_image_formats_are_refused(tmp_path: Path) -> None:
    for name in ("g.jpg", "g.webp", "g.gif"):
        with pytest.raises(ValueError, match="changes pixel values"):
            check_image_file(tmp_path / name)
    for name in ("g.png", "g.PNG", "g.bmp", "g.tif"):
        assert check_image_file(tmp_path / name) == tmp_path / name


# ---------------------------------------------------------------- damaged metadata, huge outputs and inputs


@pytest.mark.parametrize(
    ("changes", "needle"),
    [({"path": "garbage"}, "path metadata"), ({"path": "[1, 2]"}, "path metadata")],
)
def test_damaged_path_metadata_is_one_line_naming_the_file(
    tiny_checkpoint: Path, tmp_path: Path, changes: dict, needle: str
) -> None:
    ckpt = with_raw_metadata(tiny_checkpoint, tmp_path / "damaged.safetensors", **changes)
    one_line_error(sample_cli(ckpt, tmp_path / "g.png"), needle, str(ckpt))
    assert not (tmp_path / "g.png").exists()


def test_a_grid_too_large_to_write_is_refused_before_sampling(
    tiny_checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`--scale 100000` sampled first, then died in PIL's resize (MemoryError, or killed by the OS)."""

    def no_sampling(*args, **kwargs):
        raise AssertionError("sampled before checking the grid size")

    monkeypatch.setattr(ImageGenerator, "sample", no_sampling)
    one_line_error(sample_cli(tiny_checkpoint, tmp_path / "g.png", "--scale", "100000"), "--scale", "pixels")
    data = gray_folder(tmp_path / "data")
    pp = folder_preview_args(data)
    one_line_error(
        runner.invoke(app, [*pp, "--out", str(tmp_path / "p.png"), "--scale", "100000"]), "--scale"
    )
    assert not (tmp_path / "g.png").exists() and not (tmp_path / "p.png").exists()


def test_an_image_size_too_large_for_memory_is_refused_before_decoding(tmp_path: Path) -> None:
    """`--image-size 1000000` resized the first image to 3 TB: the OS killed the process, no message."""
    data = gray_folder(tmp_path / "data")
    with pytest.raises(ValueError, match="image size 1000000: .* GiB decoded, more than this machine"):
        load_image_folder(data, 1_000_000, channels=1)
    args = ["train", "--dataset", "folder", "--data-dir", str(data), "--image-size", "1000000"]
    result = runner.invoke(app, [*args, "--run-dir", str(tmp_path / "run"), "--steps", "1", "--quiet"])
    one_line_error(result, "--image-size")


def test_an_image_size_the_unet_cannot_halve_is_refused_before_decoding(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """--image-size 7 with the tiny U-Net (one halving) was refused only after every image was decoded,
    with advice ("use fewer levels") that no flag can follow; now at once, naming a size that works."""
    import imagegen.data

    data = gray_folder(tmp_path / "data")

    def no_decoding(*a, **k):
        raise AssertionError("images decoded before the size was checked")

    monkeypatch.setattr(imagegen.data, "load_image_folder", no_decoding)
    args = ["train", "--dataset", "folder", "--data-dir", str(data), "--image-size", "7", "--size", "tiny"]
    result = runner.invoke(app, [*args, "--run-dir", str(tmp_path / "run"), "--steps", "1", "--quiet"])
    one_line_error(result, "image size 7 cannot be halved", "--image-size 6")


def test_an_unknown_split_of_an_image_folder_is_refused(tiny_checkpoint: Path, tmp_path: Path) -> None:
    """`--reference-split validation` read the whole folder, training images included, as the reference."""
    data = gray_folder(tmp_path / "data")
    for split in ("validation", "Test"):
        with pytest.raises(ValueError, match="unknown split"):
            load_image_folder(data, 8, channels=1, split=split)
    ev = ["evaluate", "--checkpoint", str(tiny_checkpoint), "--out", str(tmp_path / "ev"), "--quiet"]
    one_line_error(runner.invoke(app, [*ev, "--reference-split", "validation"]), "--reference-split")


def test_a_grid_name_too_long_for_the_file_system_is_refused_in_one_line(tmp_path: Path) -> None:
    """Path.is_dir raised ENAMETOOLONG before the check that names the problem."""
    from imagegen.grid import check_image_file

    with pytest.raises(ValueError, match=r"--out .* 304 bytes long, and the file system takes at most"):
        check_image_file(tmp_path / ("s" * 300 + ".png"), "--out")
