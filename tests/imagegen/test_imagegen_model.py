"""The E.3-style U-Net (pixel embedding in, 256 logits per channel out) and a tiny training run."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from imagegen_fixtures import read_metrics

from dfm_core.checkpoints import load_safetensors
from dfm_core.nn import count_parameters
from imagegen.model import PRESETS, PixelUNet, UNetConfig
from imagegen.train import CHECKPOINT_FORMAT, ImagegenTrainConfig, load_train_config


def tiny(**kw) -> PixelUNet:
    torch.manual_seed(0)
    return PixelUNet(UNetConfig.preset("tiny", image_size=8, **kw))


def test_logits_layout_is_channel_row_column_by_256() -> None:
    """Output channel c * 256 + v of the last conv becomes logits[:, c * H * W + h * W + w, v]."""
    model = tiny(image_channels=3)
    V, S = 256, 8
    with torch.no_grad():
        model.out_conv.weight.zero_()
        model.out_conv.bias.copy_(
            torch.arange(3 * V, dtype=torch.float32) + 1000 * (torch.arange(3 * V) // V)
        )
    x = torch.randint(0, 256, (2, 3 * S * S))
    logits = model(x, torch.rand(2))
    assert logits.shape == (2, 3 * S * S, V)
    c = torch.arange(3 * S * S) // (S * S)
    expected = (c[:, None] * (V + 1000) + torch.arange(V)[None]).float()
    torch.testing.assert_close(logits[1], expected)


def test_input_embedding_time_and_class_conditioning() -> None:
    model = tiny(image_channels=1, num_classes=3, input_vocab=257).eval()
    with torch.no_grad():  # undo the zero inits so that every input reaches the output
        for p in model.parameters():
            if p.dim() > 1 and not p.any():
                torch.nn.init.normal_(p, std=0.05)
    x = torch.randint(0, 257, (2, 64))
    t = torch.tensor([0.3, 0.7])
    base = model(x, t, torch.tensor([0, 1]))
    assert not torch.allclose(base, model(x, t, torch.tensor([2, 2])))
    assert not torch.allclose(base, model(x, t.flip(0), torch.tensor([0, 1])))
    torch.testing.assert_close(model(x, t), model(x, t, torch.tensor([3, 3])))  # None = the null class
    assert model.pixel_embed.num_embeddings == 257 and model.class_embed.num_embeddings == 4
    with pytest.raises(ValueError, match="tokens per image"):
        model(x[:, :10], t)


def test_config_validation_presets_and_round_trip() -> None:
    with pytest.raises(ValueError, match="halved"):
        UNetConfig(image_size=28, channel_mult=(1, 2, 2, 2))
    with pytest.raises(ValueError, match="attention_levels"):
        UNetConfig(attention_levels=(5,))
    with pytest.raises(ValueError, match="unknown model size"):
        UNetConfig.preset("huge")
    assert set(PRESETS) == {"tiny", "small", "default", "paper"}
    paper = UNetConfig.preset("paper")
    assert (paper.channels, paper.channel_mult, paper.num_res_blocks, paper.embed_dim) == (
        96,
        (3, 4, 4),
        5,
        96,
    )
    cfg = UNetConfig.preset("small", image_size=28, image_channels=1, num_classes=10)
    assert UNetConfig.from_dict(cfg.to_dict()) == cfg
    assert count_parameters(tiny()) < 500_000


def test_tiny_training_loss_falls_and_export_has_metadata(tiny_run: Path) -> None:
    metrics = read_metrics(tiny_run)
    losses = [m["loss"] for m in metrics if "loss" in m]
    assert len(losses) == 3 and losses[-1] < losses[0] - 0.3, losses
    assert losses[0] < 5.6  # starts near log 256 = 5.55 (zero-initialised logits)
    state, meta = load_safetensors(tiny_run / "model.safetensors")
    assert meta["format"] == CHECKPOINT_FORMAT and meta["step"] == 30
    assert meta["path"]["kind"] == "metric" and meta["path"]["c"] == 3.0 and meta["path"]["a"] == 0.9
    assert meta["path"]["vocab_size"] == 256 and meta["image_shape"] == [1, 8, 8]
    assert meta["class_names"] == ["horizontal", "vertical"] and meta["model_config"]["num_classes"] == 2
    assert meta["data"]["n_val"] == 16 and meta["data"]["n_train"] == 80
    model = PixelUNet(UNetConfig.from_dict(meta["model_config"]))
    model.load_state_dict(state)


def test_train_config_files(tmp_path: Path) -> None:
    f = tmp_path / "run.toml"
    f.write_text(
        'dataset = "fashion-mnist"\nclass_conditional = true\n[path]\nkind = "mask"\nscheduler = "linear"\n'
        "[model]\nchannels = 32\n[train]\nsteps = 7\n"
    )
    cfg = load_train_config(f)
    assert (
        cfg.path.kind == "mask"
        and cfg.path.vocab_size == 257
        and cfg.model.channels == 32
        and cfg.train.steps == 7
    )
    assert ImagegenTrainConfig.from_dict(cfg.to_dict()) == cfg
    f.write_text("colour = 1\n")
    with pytest.raises(ValueError, match="unknown"):
        load_train_config(f)


def test_shipped_cifar10_config_is_the_default_preset() -> None:
    cfg = load_train_config(
        Path(__file__).resolve().parents[2] / "imagegen" / "configs" / "cifar10_default.toml"
    )
    assert cfg.dataset == "cifar10" and cfg.path.kind == "metric" and (cfg.path.c, cfg.path.a) == (3.0, 0.9)
    assert cfg.model == UNetConfig.preset("default") and cfg.train.compile


def test_batches_are_uint8_tokens_with_random_flips() -> None:
    from imagegen.data import ImageDataset
    from imagegen.train import _Batches

    image = torch.arange(16, dtype=torch.uint8).reshape(1, 1, 4, 4)
    data = ImageDataset(image.expand(3, -1, -1, -1).clone(), torch.tensor([0, 1, 2]), ("a", "b", "c"), "x")
    tokens, labels = _Batches(data, 32, hflip=True)(torch.Generator().manual_seed(0))
    assert tokens.shape == (32, 16) and tokens.dtype == torch.uint8 and labels.shape == (32,)
    flipped = (tokens == image.flip(-1).reshape(1, -1)).all(1)
    assert 0 < int(flipped.sum()) < 32 and ((tokens == image.reshape(1, -1)).all(1) | flipped).all()
