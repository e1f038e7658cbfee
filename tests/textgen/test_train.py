"""Training: a tiny model's ELBO falls; the exported checkpoint rebuilds its model and path."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from dfm_core.checkpoints import load_safetensors
from dfm_core.objectives import fair_elbo
from dfm_core.runtime import seed_everything
from dfm_core.training import TrainConfig
from textgen.checkpoint import CHECKPOINT_FORMAT, SOURCE_PMF_KEY, TextModel
from textgen.model import TextModelConfig, build_model
from textgen.path import TextPathConfig, stats_source
from textgen.train import TextgenTrainConfig, prepare_data, train_text_model


def _elbo(model_fn, path, x1: torch.Tensor) -> float:
    g = torch.Generator().manual_seed(0)
    return fair_elbo(model_fn, x1, path, n_points=16, generator=g, chunk=4).nats_per_token


def test_tiny_model_elbo_falls(tiny_run: Path, tiny_corpus: Path, tokenizer):
    trained = TextModel.load(tiny_run / "model.safetensors", device="cpu")
    x1 = torch.tensor(tokenizer.encode(tiny_corpus.read_text())[:32]).view(2, 16)
    seed_everything(0)  # the run's seed: the same initial weights
    init = build_model("dfm", TextModelConfig.from_dict(trained.metadata["model_config"])).eval()
    with torch.no_grad():
        before = _elbo(lambda x, t: init(x, t), trained.path, x1)
        after = _elbo(trained.logits_fn(), trained.path, x1)
    assert after < 0.7 * before, (before, after)
    metrics = [json.loads(line) for line in (tiny_run / "metrics.jsonl").read_text().splitlines()]
    assert metrics[-1]["step"] == 30 and metrics[-1]["loss"] > 0


def test_checkpoint_metadata_and_round_trip(tiny_run: Path):
    state, meta = load_safetensors(tiny_run / "model.safetensors")
    assert meta["format"] == CHECKPOINT_FORMAT and meta["kind"] == "dfm" and meta["seq_len"] == 16
    assert meta["path"] == {"source": "mask", "beta0": 1024.0, "scheduler": "linear"}
    assert meta["textgen_config"]["loss"] == "elbo" and meta["step"] == 30
    assert SOURCE_PMF_KEY not in state  # the mask source needs no stored PMF
    assert (tiny_run / "config.json").is_file() and (tiny_run / "last.pt").is_file()


def test_stats_source_run_stores_its_pmf(tmp_path: Path, tiny_corpus: Path, tokenizer_dir: Path):
    cfg = TextgenTrainConfig(
        kind="dfm",
        path=TextPathConfig("stats", beta0=2.0, scheduler="ko"),
        seq_len=8,
        model=TextModelConfig.tiny(max_len=8),
        data=(str(tiny_corpus),),
        tokenizer=str(tokenizer_dir),
        train=TrainConfig(steps=2, batch_size=2, warmup_steps=0, eval_every=0, ckpt_every=0, device="cpu"),
    )
    data = prepare_data(cfg)
    train_text_model(cfg, tmp_path / "run", progress=False, data=data, export=tmp_path / "copy.safetensors")
    loaded = TextModel.load(tmp_path / "copy.safetensors", device="cpu")
    assert loaded.label == "ko/beta0=2" and loaded.path.scheduler.token_dependent
    assert torch.allclose(loaded.path.source, stats_source(data.p_stats, 2.0))
    # p_stats counts the training sequences (not the held-out ones)
    counts = torch.bincount(data.train.reshape(-1), minlength=50257).double() + 1.0
    assert torch.allclose(data.p_stats, counts / counts.sum())
    assert data.val.shape[0] >= 1 and data.train.shape[1] == 8


def test_too_little_text_says_how_much_there_is(tmp_path: Path, tokenizer_dir: Path):
    """A folder of empty files said only "0 sequence(s)": the token and document counts show why."""
    import pytest

    (tmp_path / "data").mkdir()
    for name in ("a.txt", "b.txt"):
        (tmp_path / "data" / name).write_text("")
    cfg = TextgenTrainConfig(
        seq_len=8,
        model=TextModelConfig.tiny(max_len=8),
        data=(str(tmp_path / "data"),),
        tokenizer=str(tokenizer_dir),
        cache_dir=str(tmp_path / "cache"),
    )
    with pytest.raises(
        ValueError, match=r"0 sequence\(s\) of 8 tokens \(2 tokens in 2 document\(s\)\).*--seq-len"
    ):
        prepare_data(cfg)
