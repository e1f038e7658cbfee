"""The VQ-VAE tokenizer of the latent variant (sec 8.4): shapes, quantiser updates, training, loading."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from imagegen_fixtures import read_metrics, synthetic_images, tiny_vq_config

from dfm_core.checkpoints import load_safetensors
from imagegen.train import split_train_val
from imagegen.train_vq import reconstruction_stats, train_vqvae
from imagegen.vqvae import VQVAE, VQVAE_FORMAT, VectorQuantizer, VQVAEConfig, load_vqvae


def small_vq(**overrides) -> VQVAE:
    cfg = dict(image_channels=3, image_size=16, channels=8, num_res_blocks=1, codebook_size=32, code_dim=4)
    return VQVAE(VQVAEConfig(**{**cfg, **overrides}))


def test_encode_decode_shapes_dtypes_and_code_range() -> None:
    torch.manual_seed(0)
    vq = small_vq()
    images = torch.randint(0, 256, (5, 3, 16, 16), dtype=torch.uint8)
    codes = vq.encode(images)
    assert codes.shape == (5, 4, 4) and codes.dtype == torch.long  # two halvings: 16 -> 4
    assert int(codes.min()) >= 0 and int(codes.max()) < 32
    out = vq.decode(codes)
    assert out.shape == (5, 3, 16, 16) and out.dtype == torch.uint8
    assert vq.codebook.shape == (32, 4) and vq.latent_shape == (4, 4)
    # the codes are the nearest codebook rows of the encoder outputs
    z = vq.encoder(images.float() / 127.5 - 1).permute(0, 2, 3, 1).reshape(-1, 4)
    torch.testing.assert_close(codes.flatten(), torch.cdist(z, vq.codebook).argmin(1))
    with pytest.raises(ValueError, match="code grids"):
        vq.decode(codes[:, :2])
    with pytest.raises(ValueError, match="codes outside"):
        vq.decode(torch.full((1, 4, 4), 32))
    with pytest.raises(ValueError, match="images"):
        vq.encode(images[:, :1])
    with pytest.raises(ValueError, match="halved"):
        VQVAEConfig(image_size=12, num_down=3)


def test_straight_through_gradients_reach_the_encoder_and_encode_leaves_the_codebook() -> None:
    torch.manual_seed(0)
    vq = small_vq()
    images = torch.randint(0, 256, (4, 3, 16, 16), dtype=torch.uint8)
    vq.eval()
    before = vq.codebook.clone()
    vq.encode(images)
    out = vq(images)  # eval mode: no codebook update either
    assert torch.equal(vq.codebook, before)
    out.loss.backward()
    assert vq.encoder[0].weight.grad is not None and vq.encoder[0].weight.grad.abs().sum() > 0
    torch.testing.assert_close(out.loss, out.recon_mse + 0.25 * out.commitment)


def test_ema_codebook_update_and_dead_code_restart() -> None:
    torch.manual_seed(0)
    q = VectorQuantizer(codebook_size=4, code_dim=2, decay=0.5, restart_after=2)
    q.initialised.fill_(True)
    q.codebook.copy_(torch.tensor([[0.0, 0.0], [10.0, 10.0], [100.0, 100.0], [-100.0, 100.0]]))
    q.embed_sum.copy_(q.codebook)
    z = torch.tensor([[1.0, 1.0], [3.0, 1.0], [9.0, 11.0]])  # two points near code 0, one near code 1
    q.train()
    _, codes, _ = q(z.T.reshape(1, 2, 3, 1))
    assert codes.flatten().tolist() == [0, 0, 1]
    # EMA with decay 0.5 from cluster size 1: code 0 -> (0.5 (0, 0) + 0.5 (1 + 3, 1 + 1)) / (0.5 + 0.5 * 2)
    torch.testing.assert_close(q.codebook[0], torch.tensor([4.0 / 3, 2.0 / 3]))
    torch.testing.assert_close(q.codebook[1], torch.tensor([9.5, 10.5]))
    torch.testing.assert_close(q.codebook[2], torch.tensor([100.0, 100.0]))  # unused: stays where it was
    assert q.idle.tolist() == [0, 0, 1, 1]
    q(z.T.reshape(1, 2, 3, 1))  # codes 2 and 3 idle for 2 steps: restarted from encoder outputs
    for k in (2, 3):
        assert any(torch.equal(q.codebook[k], row) for row in z) and int(q.idle[k]) == 0


def test_tiny_vqvae_reconstruction_loss_falls_and_export_round_trips(tmp_path: Path) -> None:
    data = synthetic_images()
    run_dir = tmp_path / "vq"
    train_vqvae(tiny_vq_config(50, hflip=False), run_dir, resume=False, progress=False, data=data)
    losses = [r["loss"] for r in read_metrics(run_dir) if "loss" in r]
    assert len(losses) == 5 and losses[-1] < 0.7 * losses[0], losses
    state, meta = load_safetensors(run_dir / "vqvae.safetensors")
    assert meta["format"] == VQVAE_FORMAT and meta["image_shape"] == [1, 8, 8]
    assert meta["latent_shape"] == [1, 2, 2] and meta["data"]["n_val"] == 16
    assert 0 < meta["recon_mse"] < 0.5 and 0 < meta["codebook_usage"] <= 1
    vq, meta2 = load_vqvae(run_dir / "vqvae.safetensors")
    assert not vq.training and meta2["recon_mse"] == meta["recon_mse"]
    assert torch.equal(vq.codebook, state["quantizer.codebook"])
    # the reported MSE is the one of the exported weights on the held-out images
    _, val = split_train_val(data, 16, 0, None)
    assert reconstruction_stats(vq, val.images)["recon_mse"] == pytest.approx(meta["recon_mse"], rel=1e-5)
    codes = vq.encode(data.images[:8])
    assert codes.shape == (8, 2, 2) and int(codes.max()) < 16


def test_load_vqvae_refuses_what_is_not_one(tiny_checkpoint: Path, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="not found"):
        load_vqvae(tmp_path / "none.safetensors")
    with pytest.raises(ValueError, match="not an imagegen VQ-VAE"):
        load_vqvae(tiny_checkpoint)
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a safetensors file at all")
    with pytest.raises(ValueError, match="not a safetensors"):
        load_vqvae(junk)
