"""The Python APIs as a notebook calls them: process-wide state is left as the caller had it, and bad
options are refused as the command line refuses them."""

from __future__ import annotations

import dataclasses
import math
import random
from pathlib import Path

import matplotlib
import numpy as np
import pytest
import torch

from dfm_core.training import TrainConfig
from imagegen.data import ImageDataset
from imagegen.evaluate import EvalRow, plot_score_vs_nfe
from imagegen.generate import ImageGenerator
from imagegen.model import UNetConfig
from imagegen.paths import PixelPathConfig
from imagegen.train import ImagegenTrainConfig, train_image_model
from textgen.evaluate import SampleQuality, plot_samples_vs_nfe


def _rng_draws() -> tuple[float, float, float]:
    """One draw of each global generator (python, numpy, torch): equal draws mean equal states."""
    return random.random(), float(np.random.rand()), float(torch.rand(()))


def _seeded_draws(call) -> tuple[tuple[float, float, float], tuple[float, float, float]]:
    """The draws after seeding, without and with ``call()`` in between."""
    for g in (random.seed, np.random.seed, torch.manual_seed):
        g(1234)
    expected = _rng_draws()
    for g in (random.seed, np.random.seed, torch.manual_seed):
        g(1234)
    call()
    return expected, _rng_draws()


def _tiny_image_run(run_dir: Path) -> Path:
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (24, 1, 8, 8), generator=g, dtype=torch.uint8)
    data = ImageDataset(images, torch.zeros(24, dtype=torch.long), None, "noise")
    train = TrainConfig(steps=2, batch_size=4, warmup_steps=0, eval_every=0, ckpt_every=0, device="cpu")
    config = ImagegenTrainConfig(
        dataset="folder",
        path=PixelPathConfig(kind="metric"),
        model=UNetConfig.preset("tiny"),
        train=train,
        class_conditional=False,
        val_size=4,
    )
    train_image_model(config, run_dir, resume=False, progress=False, data=data)
    return run_dir / "model.safetensors"


@pytest.fixture(scope="module")
def image_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _tiny_image_run(tmp_path_factory.mktemp("nb_image"))


def test_image_training_gives_back_the_global_rng(tmp_path: Path) -> None:
    expected, after = _seeded_draws(lambda: _tiny_image_run(tmp_path / "run"))
    assert after == expected  # the run seeds python, numpy and torch from its own seed, then gives them back


def test_loading_a_checkpoint_leaves_the_global_rng(image_checkpoint: Path) -> None:
    expected, after = _seeded_draws(lambda: ImageGenerator.from_checkpoint(image_checkpoint, "cpu"))
    assert after == expected


def test_text_training_and_loading_give_back_the_global_rng(tmp_path: Path) -> None:
    from textgen import TextgenTrainConfig, TextModel, TextModelConfig, TextPathConfig, train_text_model
    from textgen.tokenizer import default_tokenizer_path

    if not (default_tokenizer_path() / "tokenizer.json").is_file():
        pytest.skip("GPT-2 tokenizer files not found")
    corpus = tmp_path / "tiny.txt"
    corpus.write_text("The cat sat on the mat. The dog sat on the log. " * 10 + "\n")
    config = TextgenTrainConfig(
        path=TextPathConfig("mask", scheduler="linear"),
        model=TextModelConfig.preset("tiny"),
        seq_len=16,
        data=(str(corpus),),
        cache_dir=str(tmp_path / "cache"),
        train=TrainConfig(steps=1, batch_size=2, warmup_steps=0, eval_every=0, ckpt_every=0, device="cpu"),
    )
    run_dir = tmp_path / "run"
    expected, after = _seeded_draws(lambda: train_text_model(config, run_dir, resume=False, progress=False))
    assert after == expected
    expected, after = _seeded_draws(lambda: TextModel.load(run_dir / "model.safetensors", "cpu"))
    assert after == expected

    from textgen import TextTokenizer, evaluate, generate_texts

    model = TextModel.load(run_dir / "model.safetensors", "cpu")
    # alpha means something to the power velocity only: refused, as `--alpha` is on the command line
    with pytest.raises(ValueError, match="alpha applies to the power velocity, not 'ko'"):
        generate_texts(model, TextTokenizer(), 1, steps=2, alpha=2.0)
    with pytest.raises(ValueError, match="alpha applies to the power velocity, not 'power-inf'"):
        evaluate(
            [run_dir / "model.safetensors"], [str(corpus)], device="cpu", velocity="power-inf", alpha=2.0
        )
    assert len(generate_texts(model, TextTokenizer(), 1, steps=2, velocity="power", alpha=2.0).texts) == 1


@pytest.fixture
def svg_backend():
    """A backend other than Agg, as a notebook's inline one is; restored afterwards."""
    before = matplotlib.get_backend()
    matplotlib.use("svg")
    yield
    matplotlib.use(before)


def test_plots_keep_the_matplotlib_backend_and_figures(tmp_path: Path, svg_backend: None) -> None:
    import matplotlib.pyplot as plt

    open_figures = plt.get_fignums()
    quality = [
        SampleQuality("m", "m.safetensors", nfe, 4, 16, 1.0, 3.0 + nfe / 100, None, None, 0.1)
        for nfe in (8, 16)
    ]
    assert plot_samples_vs_nfe(quality, tmp_path / "text.png") == tmp_path / "text.png"
    row = EvalRow("ko", "ko", None, 0, 0, 0, 1, 0, 8, 4, "FD-x", 1.0, 0.1, 0, "balanced", 4, "r", "m", "c")
    rows = [row, dataclasses.replace(row, nfe=16, score=math.pi)]
    assert plot_score_vs_nfe(rows, tmp_path / "image.png") == tmp_path / "image.png"
    for name in ("text.png", "image.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert matplotlib.get_backend() == "svg"  # not switched to Agg under the user
    assert plt.get_fignums() == open_figures


def test_crystal_model_loading_and_shared_training_give_back_the_global_rng(tmp_path: Path) -> None:
    from dfm_core.nn import DiT
    from dfm_core.training import train
    from matgen.sampling import CrystalGenerator

    expected, after = _seeded_draws(lambda: CrystalGenerator.from_checkpoint(device="cpu"))
    assert after == expected

    def loss(model, x, generator):
        return model(x, torch.rand(len(x))).float().pow(2).mean()

    model = DiT(vocab_size=5, hidden=8, depth=1, heads=2, max_len=4)  # its init draws are the caller's

    def run() -> None:
        batches = lambda g: torch.randint(0, 5, (2, 4), generator=g)  # noqa: E731
        cfg = TrainConfig(steps=1, batch_size=2, warmup_steps=0, eval_every=0, ckpt_every=0, device="cpu")
        train(model, loss, batches, cfg, tmp_path / "run", progress=False)

    expected, after = _seeded_draws(run)
    assert after == expected  # dfm_core's loop seeds from the run's seed, then gives the states back


def test_the_crystal_evaluation_plots_keep_the_matplotlib_backend(tmp_path: Path, svg_backend: None) -> None:
    import matplotlib.pyplot as plt
    import pandas as pd

    from matgen.evaluate.report import _plots

    open_figures = plt.get_fignums()
    results = pd.DataFrame({"valid": [True, True], "parsed": [True, True], "formula": ["NaCl", "KCl"], "density": [2.1, 2.0],
                            "n_atoms": [2, 2], "n_elements": [2, 2]})  # fmt: skip
    summary = {"e_hull_histogram": {"bin_edges": [-0.2, 0.0, 0.2], "counts": [1, 1]}}
    from matgen.evaluate.fingerprints import ReferenceSet

    one = np.ones((1, 1))
    reference = ReferenceSet(
        np.array(["r"]), one, one, np.array([2.2]), np.array([2]), np.array([2]), np.array(["NaCl"])
    )
    made = _plots(tmp_path, results, summary, reference)
    assert len(made) == 4 and all((tmp_path / name).read_bytes()[:4] == b"\x89PNG" for _, name in made)
    assert matplotlib.get_backend() == "svg" and plt.get_fignums() == open_figures
