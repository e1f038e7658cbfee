"""Fixtures of the textgen tests: the GPT-2 tokenizer, a tiny corpus, and one tiny trained model.

Keep B * L small: every forward pass makes (B, L, 50258) logits.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from textgen.tokenizer import TextTokenizer, default_tokenizer_path

SENTENCES = [
    "The cat sat on the mat.",
    "The dog sat on the log.",
    "A bird sang in the old tree.",
    "The cat saw the bird and the dog.",
]


@pytest.fixture(autouse=True)
def _isolated_cache(monkeypatch, tmp_path_factory):
    """Token caches go to a temporary folder, never to the user's ~/.cache."""
    monkeypatch.setenv("TEXTGEN_CACHE", str(tmp_path_factory.getbasetemp() / "textgen-cache"))


@pytest.fixture(scope="session")
def tokenizer_dir() -> Path:
    path = default_tokenizer_path()
    if not (path / "tokenizer.json").is_file():
        pytest.skip(f"GPT-2 tokenizer files not found at {path}")
    return path


@pytest.fixture(scope="session")
def tokenizer(tokenizer_dir: Path) -> TextTokenizer:
    return TextTokenizer(tokenizer_dir)


@pytest.fixture(scope="session")
def tiny_corpus(tmp_path_factory) -> Path:
    """A ~1 kB text file of four short sentences repeated (about 400 GPT-2 tokens)."""
    path = tmp_path_factory.mktemp("corpus") / "tiny.txt"
    path.write_text(" ".join(SENTENCES * 12) + "\n")
    return path


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, tiny_corpus: Path, tokenizer_dir: Path) -> Path:
    """`textgen train`: a tiny mask + linear DFM, ELBO loss, 30 steps of 2 x 16 tokens. Returns the run dir."""
    run_dir = tmp_path_factory.mktemp("run") / "dfm"
    cache = tmp_path_factory.getbasetemp() / "textgen-cache"
    from cli.textgen import app

    result = CliRunner().invoke(
        app,
        [
            "train",
            "--run-dir",
            str(run_dir),
            "--size",
            "tiny",
            "--seq-len",
            "16",
            "--source",
            "mask",
            "--scheduler",
            "linear",
            "--loss",
            "elbo",
            "--steps",
            "30",
            "--batch-size",
            "2",
            "--lr",
            "3e-3",
            "--warmup",
            "0",
            "--ema-decay",
            "0.5",
            "--eval-every",
            "0",
            "--ckpt-every",
            "0",
            "--device",
            "cpu",
            "--data",
            str(tiny_corpus),
            "--tokenizer",
            str(tokenizer_dir),
            "--cache-dir",
            str(cache),
            "--quiet",
        ],
    )
    assert result.exit_code == 0, result.output
    assert (run_dir / "model.safetensors").is_file()
    return run_dir
