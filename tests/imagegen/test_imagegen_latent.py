"""The discrete-latent variant (sec 8.4): the metric path on codebook embeddings (eq 107), latent training,
self-contained checkpoints, and the `imagegen train-vq` / `train --latent` / `sample` commands."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest
import torch
from imagegen_fixtures import folder_preview_args, synthetic_images, tiny_config
from PIL import Image
from typer.testing import CliRunner

from cli.imagegen import app
from dfm_core.checkpoints import load_safetensors
from dfm_core.velocities import KineticOptimalVelocity
from imagegen.generate import ImageGenerator, SamplingConfig
from imagegen.grid import grid_size
from imagegen.latent import codebook_distances, distance_scale, encode_codes, latent_path_samples
from imagegen.paths import PixelPathConfig, build_path
from imagegen.train import train_image_model
from imagegen.vqvae import load_vqvae

runner = CliRunner()
C, A, LP = 3.0, 0.9, 4.0


def codebook(K: int = 12, D: int = 5, scale: float = 1.0) -> torch.Tensor:
    return scale * torch.randn(K, D, generator=torch.Generator().manual_seed(0))


def test_latent_metric_path_distances_are_eq_107_over_the_mean_code_distance() -> None:
    e = codebook().double()
    K = e.shape[0]
    pair = ((e[:, None, :] - e[None, :, :]) ** 2).sum(-1).sqrt()  # ||e_i - e_j||_2
    s = float(pair.sum() / (K * (K - 1)))
    assert distance_scale(e) == pytest.approx(s, rel=1e-12)
    path = build_path(PixelPathConfig(kind="metric", c=C, a=A, lp=LP), e)
    assert path.vocab_size == K
    x1 = torch.arange(K)
    torch.testing.assert_close(path.distances(x1, torch.float64), (pair / s) ** LP, rtol=1e-10, atol=1e-12)
    # the normalisation makes the path blind to the codebook's overall scale
    torch.testing.assert_close(codebook_distances(e * 37.0, LP), codebook_distances(e, LP))
    # p_t = softmax(-beta_t d(., x1)) with beta_t = c (t / (1 - t))^a (eq 27, 108)
    t = 0.4
    beta = C * (t / (1 - t)) ** A
    p = path.probs(x1, torch.full((K,), t, dtype=torch.float64))
    torch.testing.assert_close(p, torch.softmax(-beta * (pair / s) ** LP, -1), rtol=1e-8, atol=1e-12)
    mask = build_path(PixelPathConfig(kind="mask"), e)
    assert mask.vocab_size == K + 1 and torch.equal(mask.sample_source((2, 3)), torch.full((2, 3), K))


def test_a_large_codebook_gets_the_same_metric_path_without_a_k_by_k_matrix(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import imagegen.latent as latent_module

    e = codebook(K=40, D=6, scale=3.0)
    config = PixelPathConfig(kind="metric", c=C, a=A, lp=LP)
    matrix = build_path(config, e)
    monkeypatch.setattr(latent_module, "MATRIX_CODES_MAX", 16)  # K = 40 now counts as large
    on_demand = build_path(config, e)
    assert on_demand._distance_fn is not None  # rows on demand, no matrix
    x1 = torch.randint(40, (3, 7), generator=torch.Generator().manual_seed(1))
    t = torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64)
    torch.testing.assert_close(on_demand.distances(x1, torch.float64), matrix.distances(x1, torch.float64))
    torch.testing.assert_close(on_demand.probs(x1, t), matrix.probs(x1, t))
    torch.testing.assert_close(on_demand.probs_dt(x1, t), matrix.probs_dt(x1, t))
    assert distance_scale(e, rows_per_chunk=7) == pytest.approx(distance_scale(e), rel=1e-12)


@pytest.mark.parametrize("t", [0.1, 0.5, 0.9])
def test_ko_velocity_on_the_latent_path_satisfies_the_rate_conditions(t: float) -> None:
    """Rates u(x, z) >= 0 off the diagonal, sum_x u(x, z) = 0, d/dt p = sum_z u(., z) p(z) (eq 12),
    and positive rates only towards codes closer to x1 (eq 29)."""
    e = codebook(K=10).double()
    path = build_path(PixelPathConfig(kind="metric", c=C, a=A, lp=LP), e)
    x1 = torch.tensor([0, 4, 9])
    tt = torch.full((3,), t, dtype=torch.float64)
    p, dp = path.probs(x1, tt), path.probs_dt(x1, tt)
    u = KineticOptimalVelocity().velocity(p, dp)  # (3, V[x], V[z])
    off = ~torch.eye(10, dtype=torch.bool)
    assert (u[:, off] >= 0).all() and u[:, off].max() > 0
    torch.testing.assert_close(u.sum(-2), torch.zeros(3, 10, dtype=torch.float64), atol=1e-10, rtol=0)
    torch.testing.assert_close((u * p.unsqueeze(-2)).sum(-1), dp, atol=1e-10, rtol=1e-8)
    d = path.distances(x1, torch.float64)
    closer = d.unsqueeze(-1) < d.unsqueeze(-2)  # [x, z]: d(x, x1) < d(z, x1)
    assert (((u > 0) & off) <= closer).all()


@pytest.fixture(scope="module")
def latent_run(tiny_vq_run: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A tiny latent metric-path model (20 steps) on a private copy of the tiny VQ-VAE, which is then
    deleted: the checkpoint must do without it. Returns (run folder, code cache folder)."""
    root = tmp_path_factory.mktemp("latent")
    vq_file = root / "vq.safetensors"
    shutil.copy(tiny_vq_run / "vqvae.safetensors", vq_file)
    config = dataclasses.replace(tiny_config("metric", 20), latent=str(vq_file))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("IMAGEGEN_CACHE", str(root / "cache"))
        train_image_model(config, root / "run", resume=False, progress=False, data=synthetic_images())
    vq_file.unlink()
    return root / "run", root / "cache"


def test_latent_training_trains_on_cached_codes_and_stores_the_vqvae(
    latent_run: tuple[Path, Path], tiny_vq_run: Path
) -> None:
    run_dir, cache = latent_run
    state, meta = load_safetensors(run_dir / "model.safetensors")
    vq, vq_meta = load_vqvae(tiny_vq_run / "vqvae.safetensors")
    assert meta["image_shape"] == [1, 8, 8] and meta["latent"]["latent_shape"] == [1, 2, 2]
    assert meta["model_config"]["num_levels"] == meta["model_config"]["input_vocab"] == 16
    assert meta["model_config"]["image_size"] == 2 and meta["model_config"]["image_channels"] == 1
    assert meta["path"]["lp"] == 4.0 and meta["path"]["vocab_size"] == 16
    assert meta["latent"]["distance_scale"] == pytest.approx(distance_scale(vq.codebook))
    for name, value in vq.state_dict().items():  # the VQ-VAE rides along, unchanged, under vq.
        assert torch.equal(state[f"vq.{name}"], value), name
    # codes of every image and of its flip, cached under the VQ-VAE's and the images' digests
    (cached,) = cache.glob("latent-codes-*.npz")
    assert meta["latent"]["vqvae_sha256"][:16] in cached.name
    assert meta["data"]["images_sha256"][:16] in cached.name
    import numpy as np

    codes = torch.from_numpy(np.load(cached)["codes"])
    images = synthetic_images().images
    assert torch.equal(codes, encode_codes(vq, images))
    assert torch.equal(codes[:, 1].long(), vq.encode(images.flip(-1)).reshape(len(images), -1))


def test_a_train_limit_encodes_only_the_images_the_run_uses(
    tiny_vq_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import numpy as np

    monkeypatch.setenv("IMAGEGEN_CACHE", str(tmp_path / "cache"))
    vq_file = tiny_vq_run / "vqvae.safetensors"
    config = dataclasses.replace(tiny_config("metric", 2), latent=str(vq_file), train_limit=10)
    data = synthetic_images()  # 96 images; 16 held out for validation, 10 of the rest trained on
    train_image_model(config, tmp_path / "run", resume=False, progress=False, data=data)
    (cached,) = (tmp_path / "cache").glob("latent-codes-*.npz")
    codes = torch.from_numpy(np.load(cached)["codes"])
    assert codes.shape[0] == 26  # not all 96
    vq, _ = load_vqvae(vq_file)
    encoded = encode_codes(vq, data.images)  # the codes of the images at the run's indices
    assert all(any(torch.equal(row, other) for other in encoded) for row in codes)


def test_latent_checkpoint_samples_decoded_images_without_the_vqvae_file(
    latent_run: tuple[Path, Path], tiny_vq_run: Path, tmp_path: Path
) -> None:
    checkpoint = latent_run[0] / "model.safetensors"
    gen = ImageGenerator.from_checkpoint(checkpoint, "cpu")
    assert gen.vqvae is not None and gen.image_shape == (1, 8, 8) and gen.token_shape == (1, 2, 2)
    images = gen.sample(6, SamplingConfig(steps=4), seed=1)
    assert images.shape == (6, 1, 8, 8) and images.dtype == torch.uint8
    # the images are the decoded sampled codes
    g = torch.Generator().manual_seed(0)
    tokens = gen.sample_tokens(3, SamplingConfig(steps=4), labels=torch.tensor([0, 1, 0]), generator=g).tokens
    assert tokens.shape == (3, 4) and int(tokens.max()) < 16
    vq, _ = load_vqvae(tiny_vq_run / "vqvae.safetensors")
    assert torch.equal(gen.tokens_to_images(tokens), vq.decode(tokens.reshape(3, 2, 2)))
    out = tmp_path / "grid.png"
    args = ["sample", "--checkpoint", str(checkpoint), "--n", "4", "--out", str(out), "--steps", "3"]
    result = runner.invoke(app, [*args, "--images-dir", str(tmp_path / "single"), "--quiet"])
    assert result.exit_code == 0, result.output
    with Image.open(out) as img:
        assert img.format == "PNG" and img.size == grid_size(4, (8, 8))
    with Image.open(tmp_path / "single" / "image_000003.png") as img:
        assert img.size == (8, 8)


def test_a_resume_of_another_kind_of_run_is_refused_before_any_image_is_encoded(
    latent_run: tuple[Path, Path],
    tiny_vq_run: Path,
    tiny_run: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from safetensors.torch import save_file

    import imagegen.train as train_module

    def no_encoding(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        raise AssertionError("the images were encoded before the resume was refused")

    monkeypatch.setattr(train_module, "latent_codes", no_encoding)
    monkeypatch.setattr(train_module, "load_dataset", no_encoding)
    vq_file = tmp_path / "vq.safetensors"
    shutil.copy(tiny_vq_run / "vqvae.safetensors", vq_file)
    state, meta = load_safetensors(vq_file)  # the same VQ-VAE, other bytes: another file digest
    other_vq = tmp_path / "other_vq.safetensors"
    save_file(
        state, str(other_vq), metadata={k: json.dumps(v) for k, v in {**meta, "note": "retrained"}.items()}
    )
    latent_dir, pixel_dir = tmp_path / "latent", tmp_path / "pixel"
    shutil.copytree(latent_run[0], latent_dir)
    shutil.copytree(tiny_run, pixel_dir)
    latent = dataclasses.replace(tiny_config("metric", 40), latent=str(vq_file))
    cases = [
        (latent_dir, tiny_config("metric", 40), "holds a latent run on the codes of the VQ-VAE"),
        (
            latent_dir,
            dataclasses.replace(latent, latent=str(other_vq)),
            "trained on the codes of another VQ-VAE",
        ),
        (pixel_dir, latent, "holds a pixel run, not a latent one"),
    ]
    for run_dir, config, message in cases:
        before = (run_dir / "last.pt").read_bytes()
        with pytest.raises(ValueError, match=message):
            train_image_model(config, run_dir, resume=True, progress=False)
        assert (run_dir / "last.pt").read_bytes() == before


def _image_folder(root: Path, size: int = 8) -> Path:
    for cls in ("a", "b"):
        folder = root / "train" / cls
        folder.mkdir(parents=True)
        for i in range(12):
            Image.new("L", (size, size), 20 * i + (100 if cls == "b" else 0)).save(folder / f"{i}.png")
    return root


def test_cli_train_vq_then_train_latent_then_sample(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("IMAGEGEN_CACHE", str(tmp_path / "cache"))
    data = _image_folder(tmp_path / "images")
    common = ["--dataset", "folder", "--data-dir", str(data), "--image-size", "8", "--channels", "1"]
    common += ["--val-size", "4", "--batch-size", "4", "--device", "cpu", "--quiet"]
    vq_dir = tmp_path / "vq"
    args = ["train-vq", "--run-dir", str(vq_dir), *common, "--steps", "3", "--codebook-size", "8"]
    result = runner.invoke(app, [*args, "--code-dim", "4", "--width", "8", "--eval-every", "3"])
    assert result.exit_code == 0, result.output
    assert "trained to step 3" in result.output and "vqvae.safetensors" in result.output
    vq, meta = load_vqvae(vq_dir / "vqvae.safetensors")
    assert vq.config.codebook_size == 8 and vq.config.channels == 8 and meta["image_shape"] == [1, 8, 8]
    run_dir = tmp_path / "latent"
    args = ["train", "--run-dir", str(run_dir), *common, "--steps", "2", "--size", "tiny"]
    result = runner.invoke(app, [*args, "--latent", str(vq_dir / "vqvae.safetensors"), "--lp", "2"])
    assert result.exit_code == 0, result.output
    gen = ImageGenerator.from_checkpoint(run_dir / "model.safetensors", "cpu")
    assert gen.path_config.lp == 2.0 and gen.path.vocab_size == 8 and gen.image_shape == (1, 8, 8)
    result = runner.invoke(
        app,
        [
            "sample",
            "--checkpoint",
            str(run_dir / "model.safetensors"),
            "--n",
            "2",
            "--out",
            str(tmp_path / "s.png"),
        ],
    )
    assert result.exit_code == 0, result.output
    with Image.open(tmp_path / "s.png") as img:
        assert img.size == grid_size(2, (8, 8))


def test_cli_refuses_a_bad_latent_file_in_one_line(
    tiny_vq_run: Path, tiny_checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("IMAGEGEN_CACHE", str(tmp_path / "cache"))
    data = _image_folder(tmp_path / "images", size=16)
    base = ["train", "--run-dir", str(tmp_path / "run"), "--dataset", "folder", "--data-dir", str(data)]
    base += ["--channels", "1", "--val-size", "4", "--steps", "1", "--size", "tiny", "--device", "cpu"]
    raw = (tiny_vq_run / "vqvae.safetensors").read_bytes()
    header_end = 8 + int.from_bytes(raw[:8], "little")
    zeroed = tmp_path / "zeroed.safetensors"  # header intact, every weight 0
    zeroed.write_bytes(raw[:header_end] + bytes(len(raw) - header_end))
    cases = [
        (zeroed, "all 16 codebook vectors are equal"),
        (tmp_path / "none.safetensors", "not found"),
        (tmp_path, "a folder, not a VQ-VAE file"),
        (tiny_checkpoint, "not an imagegen VQ-VAE"),
        (tiny_vq_run / "vqvae.safetensors", "encodes 1x8x8 images but the data are 1x16x16"),
    ]
    for latent, message in cases:
        result = runner.invoke(app, [*base, "--image-size", "16", "--latent", str(latent), "--quiet"])
        assert result.exit_code == 2, result.output
        lines = result.output.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], result.output
        assert not (tmp_path / "run" / "last.pt").exists()  # refused before any training
    result = runner.invoke(app, [*base, "--image-size", "16", "--lp", "4", "--quiet"])
    assert result.exit_code == 2 and "--lp applies to latent mode" in result.output
    rgb = [*base[: base.index("--channels")], *base[base.index("--channels") + 2 :], "--channels", "3"]
    result = runner.invoke(
        app, [*rgb, "--image-size", "8", "--latent", str(tiny_vq_run / "vqvae.safetensors")]
    )
    assert result.exit_code == 2 and "pass --channels 1" in result.output, result.output


def test_latent_settings_that_cannot_work_are_named() -> None:
    from imagegen.data import ImageDataset
    from imagegen.train import ImagegenTrainConfig, model_config_for
    from imagegen.vqvae import VQVAE, VQVAEConfig

    with pytest.raises(ValueError, match="at most 32767"):
        VQVAEConfig(codebook_size=40_000)
    assert ImagegenTrainConfig(latent=Path("vq.safetensors")).latent == "vq.safetensors"  # a Path is fine
    vq = VQVAE(
        VQVAEConfig(image_channels=1, image_size=28, channels=4, num_down=2, codebook_size=8, code_dim=2)
    )
    data = ImageDataset(torch.zeros(2, 1, 28, 28, dtype=torch.uint8), None, None, "fmnist-like")
    cfg = dataclasses.replace(tiny_config(class_conditional=False), latent="vq.safetensors")
    with pytest.raises(ValueError, match=r"7x7 code grid cannot be halved.*--num-down 1"):
        model_config_for(cfg, data, vq)


def test_latent_path_preview_decodes_x_t(tiny_vq_run: Path, tmp_path: Path) -> None:
    vq, _ = load_vqvae(tiny_vq_run / "vqvae.safetensors")
    images = synthetic_images(6).images
    cfg = PixelPathConfig(kind="metric", lp=2.0)
    xt = latent_path_samples(vq, images, cfg, torch.tensor([0.0, 0.5, 1.0]), torch.Generator().manual_seed(0))
    assert xt.shape == (3, 6, 1, 8, 8) and xt.dtype == torch.uint8
    assert torch.equal(xt[2], vq.decode(vq.encode(images)))  # t = 1: the reconstructions
    with pytest.raises(ValueError, match="metric path"):
        latent_path_samples(vq, images, PixelPathConfig(kind="mask"), torch.tensor([0.5]))
    data = _image_folder(tmp_path / "images")
    out = tmp_path / "preview.png"
    args = folder_preview_args(data)
    args += ["--n", "4", "--times", "3", "--scale", "1", "--out", str(out)]
    result = runner.invoke(app, [*args, "--latent", str(tiny_vq_run / "vqvae.safetensors"), "--lp", "4"])
    assert result.exit_code == 0, result.output
    with Image.open(out) as img:
        assert img.size == grid_size(12, (8, 8), nrow=4)
    result = runner.invoke(app, [*args, "--lp", "4"])
    assert result.exit_code == 2 and "--lp applies to a latent preview" in result.output
