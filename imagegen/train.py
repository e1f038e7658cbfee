"""Training pixel-space models with the cross-entropy of eq 11 on the metric (eq 27) or mask (eq 2) path.

Data flow: images (N, C, H, W) uint8 -> tokens x_1 (B, L = C H W) -> t ~ U[0, 1], x_t ~ p_t(. | x_1)
-> U-Net (with the label, dropped to the null class with probability ``label_dropout`` for
classifier-free guidance) -> logits (B, L, 256) -> -log p_{1|t}(x_1 | x_t).

Validation uses images held out from the training split; the test split is kept for evaluation.

Latent mode (``latent``: a VQ-VAE file, sec 8.4): the tokens are the VQ-VAE codes of the images, a
(1, h, w) grid over K codes (see :mod:`imagegen.latent`), and the exported checkpoint carries the VQ-VAE
(tensors under ``vq.``) so that it samples and decodes images on its own.
"""

from __future__ import annotations

import dataclasses
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from dfm_core.atomic_io import check_writable, file_sha256, holds_folder_lock
from dfm_core.checkpoints import EXPORTED_MODEL, export_safetensors
from dfm_core.config import config_from_dict, load_config
from dfm_core.nn import count_parameters
from dfm_core.objectives import cross_entropy_loss
from dfm_core.paths import ProbabilityPath
from dfm_core.runtime import keeps_global_rng, resolve_device, seed_everything
from dfm_core.training import TrainConfig, TrainResult, best_weights_metadata, saved_run_facts, train
from imagegen.data import ImageDataset, check_count, images_sha256, load_dataset
from imagegen.latent import check_vqvae_data, distance_scale, latent_codes
from imagegen.model import PixelUNet, UNetConfig
from imagegen.paths import NUM_LEVELS, PixelPathConfig, build_path
from imagegen.vqvae import VQVAE, load_vqvae

__all__ = [
    "CHECKPOINT_FORMAT",
    "ImagegenTrainConfig",
    "export_checkpoint",
    "load_train_config",
    "make_loss",
    "model_config_for",
    "train_image_model",
]

SHIPPED_CONFIGS = Path(__file__).resolve().parent / "configs"  # installed with the package
CHECKPOINT_FORMAT = "imagegen-checkpoint-v1"


@dataclass
class ImagegenTrainConfig:
    """Everything that defines an image training run; saved into every checkpoint.

    Attributes:
        dataset: 'cifar10', 'fashion-mnist' or 'folder'.
        data_dir: data root (else ``$IMAGEGEN_DATA``); the image folder for 'folder'.
        image_size / channels: output size and channels of a 'folder' dataset.
        path: the conditional path (metric with beta_t = c (t/(1-t))^a, or mask).
        model: U-Net architecture; image shape, input vocabulary and classes are set from the data.
        train: optimisation settings.
        class_conditional: condition on labels (with a null class for classifier-free guidance).
        label_dropout: probability of training on the null class instead of the label.
        hflip: random horizontal flips of training images.
        train_limit: use only this many training images (after holding out ``val_size``).
        val_size: images held out from the training split for validation.
        split_seed: seed of the shuffle that picks the held-out images.
        latent: a VQ-VAE ``.safetensors`` (from ``imagegen train-vq``): train on its code grids (sec 8.4,
            the metric path of eq 107 with ``path.lp``) instead of pixels.
    """

    dataset: str = "cifar10"
    data_dir: str | None = None
    image_size: int | None = None
    channels: int = 3
    path: PixelPathConfig = field(default_factory=PixelPathConfig)
    model: UNetConfig = field(default_factory=UNetConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    class_conditional: bool = False
    label_dropout: float = 0.1
    hflip: bool = True
    train_limit: int | None = None
    val_size: int = 1000
    split_seed: int = 0
    latent: str | None = None

    def __post_init__(self) -> None:
        if isinstance(self.latent, os.PathLike):
            self.latent = os.fspath(self.latent)
        if self.latent is not None and (not isinstance(self.latent, str) or not self.latent.strip()):
            raise ValueError(f"latent must name a VQ-VAE .safetensors file, got {self.latent!r}")
        if isinstance(self.path, dict):
            self.path = PixelPathConfig.from_dict(self.path)
        if isinstance(self.model, dict):
            self.model = UNetConfig.from_dict(self.model)
        if isinstance(self.train, dict):
            self.train = TrainConfig.from_dict(self.train)
        if not 0.0 <= self.label_dropout < 1.0:
            raise ValueError(f"label_dropout must be in [0, 1), got {self.label_dropout}")
        check_count(self.val_size, "val_size (images held out for validation)")
        if self.train_limit is not None:
            check_count(self.train_limit, "train_limit (training images to use)")
        if self.image_size is not None:
            check_count(self.image_size, "image_size")
            step = self.model.size_step
            if self.latent is None and self.image_size % step:  # refused before any image is decoded
                raise ValueError(
                    f"image size {self.image_size} cannot be halved {self.model.halvings} time(s) by the U-Net "
                    f"(channel_mult {tuple(self.model.channel_mult)}): use a multiple of {step} (--image-size "
                    f"{max(step, self.image_size // step * step)}), or fewer levels (channel_mult in the [model] "
                    "table of a --config file)"
                )
        if self.channels not in (1, 3):
            raise ValueError(f"channels must be 1 or 3, got {self.channels!r}")

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["path"] = self.path.to_dict()
        d["model"] = self.model.to_dict()
        d["train"] = self.train.to_dict()
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ImagegenTrainConfig:
        return config_from_dict(cls, data)


def load_train_config(path: str | os.PathLike) -> ImagegenTrainConfig:
    """Read a TOML or JSON file with top-level keys and [path] / [model] / [train] tables; a relative path
    that is not found is looked up by name among the shipped configs (``imagegen/configs``)."""
    return load_config(path, ImagegenTrainConfig, shipped=SHIPPED_CONFIGS)


def model_config_for(config: ImagegenTrainConfig, data: ImageDataset, vq: VQVAE | None = None) -> UNetConfig:
    """The U-Net config with the data's image shape, the path's vocabulary and the class count; with a
    VQ-VAE ``vq`` (latent mode) a (1, h, w) grid over its K codes (input vocabulary K + 1 for the mask path)."""
    C, H, W = data.shape
    if H != W:
        raise ValueError(f"square images only, got {H}x{W}")
    if config.class_conditional and data.num_classes == 0:
        raise ValueError("class_conditional needs labelled data (class subfolders for an image folder)")
    levels = NUM_LEVELS
    if vq is not None:
        C, (H, _), levels = 1, vq.latent_shape, vq.config.codebook_size
    try:
        return dataclasses.replace(
            config.model,
            image_channels=C,
            image_size=H,
            num_levels=levels,
            input_vocab=levels + (1 if config.path.kind == "mask" else 0),
            num_classes=data.num_classes if config.class_conditional else 0,
        )
    except ValueError as e:
        if vq is None:
            raise
        raise ValueError(
            f"the VQ-VAE's {H}x{H} code grid cannot be halved {config.model.halvings} time(s) by the U-Net ({e}): "
            "train the VQ-VAE with fewer downsamplings (e.g. `imagegen train-vq --num-down 1` for 28x28 images) "
            "or give the U-Net fewer levels (channel_mult in the [model] table of a --config file)"
        ) from None


def make_loss(path: ProbabilityPath, num_classes: int = 0, label_dropout: float = 0.1):
    """Eq 11 on a batch ``(tokens (B, L) uint8 or long, labels (B,))``: t ~ U[0, 1], x_t ~ p_t(. | x_1), CE of p_{1|t}."""

    def loss_fn(model: nn.Module, batch: tuple[Tensor, Tensor], generator: torch.Generator) -> Tensor:
        tokens, labels = batch
        tokens = tokens.long()  # batches travel as uint8 (8x less host-to-device traffic)
        B, dev = tokens.shape[0], tokens.device
        t = torch.rand(B, generator=generator, device=dev)
        xt = path.sample(tokens, t, generator=generator)
        y = None
        if num_classes > 0:
            drop = torch.rand(B, generator=generator, device=dev) < label_dropout
            y = torch.where(drop, torch.full_like(labels, num_classes), labels)
        return cross_entropy_loss(model(xt, t, y), tokens)

    return loss_fn


def split_train_val(
    data: ImageDataset, val_size: int, seed: int, limit: int | None
) -> tuple[ImageDataset, ImageDataset]:
    """The training and validation images of :func:`_split_indices`."""
    train_idx, val_idx = _split_indices(data, val_size, seed, limit)
    return data.take(train_idx, "[train]"), data.take(val_idx, "[val]")


def cpu_generator(generator: torch.Generator) -> torch.Generator:
    """A CPU generator seeded from ``generator`` (which may live on the GPU): validation batches are drawn
    on the CPU, the same for every validation because the training loop re-seeds ``generator``."""
    seed = int(torch.randint(2**62, (1,), generator=generator, device=generator.device))
    return torch.Generator().manual_seed(seed)


def _split_indices(data: ImageDataset, val_size: int, seed: int, limit: int | None) -> tuple[Tensor, Tensor]:
    """(training indices, validation indices) of ``data``: ``val_size`` held out by a seeded shuffle."""
    if len(data) <= val_size:
        hint = (
            f"; set a smaller val_size (--val-size, e.g. {max(1, len(data) // 10)})"
            if len(data) >= 2
            else ": at least 2 images are needed"
        )
        raise ValueError(
            f"{data.name} has {len(data)} images: too few to hold out {val_size} for validation{hint}"
        )
    perm = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed))
    val_idx, train_idx = perm[:val_size], perm[val_size:]
    if limit is not None:
        train_idx = train_idx[:limit]
    return train_idx, val_idx


class _Batches:
    """Random batches (uint8 tokens (B, L), labels (B,)) drawn with the CPU generator; optional horizontal flips."""

    def __init__(self, data: ImageDataset, batch_size: int, hflip: bool) -> None:
        self.images = data.images
        self.labels = data.labels if data.labels is not None else torch.zeros(len(data), dtype=torch.long)
        self.batch_size, self.hflip = batch_size, hflip

    def draw(self, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """(indices (B,), uint8 images (B, C, H, W), each flipped with probability 1/2 if ``hflip``)."""
        idx = torch.randint(len(self.images), (self.batch_size,), generator=generator)
        images = self.images[idx]
        if self.hflip:
            flip = torch.rand(self.batch_size, generator=generator) < 0.5
            images = torch.where(flip[:, None, None, None], images.flip(-1), images)
        return idx, images

    def __call__(self, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        idx, images = self.draw(generator)
        return images.reshape(self.batch_size, -1), self.labels[idx]


class _CodeBatches(_Batches):
    """Random batches (int16 codes (B, h w), labels (B,)) of latent mode, drawn like :class:`_Batches`;
    a flip takes the codes of the flipped image (``codes`` is (N, 2, h w), see ``encode_codes``)."""

    def __init__(self, codes: Tensor, data: ImageDataset, batch_size: int, hflip: bool) -> None:
        super().__init__(data, batch_size, hflip)
        self.codes = codes

    def __call__(self, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        idx = torch.randint(len(self.codes), (self.batch_size,), generator=generator)
        flip = torch.zeros(self.batch_size, dtype=torch.long)
        if self.hflip:
            flip = (torch.rand(self.batch_size, generator=generator) < 0.5).long()
        return self.codes[idx, flip], self.labels[idx]


@holds_folder_lock("run_dir", "run folder")
@keeps_global_rng
def train_image_model(
    config: ImagegenTrainConfig,
    run_dir: str | os.PathLike,
    resume: bool = True,
    export: str | os.PathLike | None = None,
    progress: bool = True,
    data: ImageDataset | None = None,
    export_dtype: torch.dtype | None = None,
) -> TrainResult:
    """Train a pixel model; writes ``run_dir/{last,best}.pt``, ``metrics.jsonl`` and ``model.safetensors``.

    Args:
        config: the run.
        run_dir: checkpoints and metrics (resumable).
        resume: continue from ``run_dir/last.pt`` if present.
        export: also write the exported weights here (in ``export_dtype``, e.g. bfloat16, if given).
        progress: tqdm bar.
        data: train on these images instead of loading ``config.dataset`` (tests, notebooks).

    ``model.safetensors`` holds the EMA weights of the best validation step with the config, the path
    parameters, the image shape and the class names in its metadata. In latent mode (``config.latent``)
    the images are encoded once (cached, see :func:`imagegen.latent.latent_codes`) and the export also
    holds the VQ-VAE: its weights under ``vq.`` and its config under the ``latent`` metadata key.
    """
    run_dir = Path(run_dir)
    if export is not None:
        check_writable(export, "export path")
    vq = vq_meta = vq_sha256 = None
    if config.latent is not None:  # a bad VQ-VAE file fails before the data are loaded
        vq, vq_meta = load_vqvae(config.latent)
        vq_sha256 = file_sha256(config.latent)
    if resume:  # and so does a resume with another kind of run, before the images are encoded
        check_latent_resume(run_dir, config.latent, vq_sha256)
    seed_everything(config.train.seed)
    if data is None:
        data = load_dataset(
            config.dataset, "train", config.data_dir, image_size=config.image_size, channels=config.channels
        )
    data_sha256 = images_sha256(data.images)
    if vq is not None:
        check_vqvae_data(vq_meta, data.shape, str(config.latent))
        trained_on = (vq_meta.get("data") or {}).get("images_sha256")
        if trained_on and trained_on != data_sha256:
            warnings.warn(
                f"the VQ-VAE {config.latent} was trained on other images ({(vq_meta.get('data') or {}).get('name')}) "
                f"than these ({data.name}); its codes may describe them poorly",
                stacklevel=4,  # past the two decorators
            )
    train_idx, val_idx = _split_indices(data, config.val_size, config.split_seed, config.train_limit)
    train_data, val_data = data.take(train_idx, "[train]"), data.take(val_idx, "[val]")
    model_cfg = model_config_for(config, data, vq)
    model = PixelUNet(model_cfg)
    bs = config.train.batch_size
    latent_meta = None
    if vq is None:
        path = build_path(config.path)
        train_batches = _Batches(train_data, bs, config.hflip)
        val_batches = _Batches(val_data, bs, hflip=False)
    else:
        used = torch.cat([train_idx, val_idx])
        subset = len(used) < len(data)  # --train-limit: encode (and cache) only the images the run uses
        images = data.images[used] if subset else data.images
        digest = images_sha256(images) if subset else data_sha256
        codes = latent_codes(vq.to(resolve_device(config.train.device)), images, vq_sha256, digest)
        if subset:
            train_codes, val_codes = codes[: len(train_idx)], codes[len(train_idx) :]
        else:
            train_codes, val_codes = codes[train_idx], codes[val_idx]
        vq.cpu()
        path = build_path(config.path, vq.codebook)
        train_batches = _CodeBatches(train_codes, train_data, bs, config.hflip)
        val_batches = _CodeBatches(val_codes, val_data, bs, hflip=False)
        latent_meta = {
            "vqvae_file": str(config.latent),
            "vqvae_sha256": vq_sha256,
            "vqvae_config": vq.config.to_dict(),
            "vqvae_recon_mse": vq_meta.get("recon_mse"),
            "codebook_size": vq.config.codebook_size,
            "latent_shape": [1, *vq.latent_shape],
            "vqvae_data": vq_meta.get("data"),
        }
        if config.path.kind == "metric":
            latent_meta["distance_scale"] = distance_scale(vq.codebook)
    loss_fn = make_loss(path, model_cfg.num_classes, config.label_dropout)

    def val_loss(model: nn.Module, generator: torch.Generator) -> Tensor:
        tokens, labels = val_batches(cpu_generator(generator))
        device = next(model.parameters()).device
        return loss_fn(model, (tokens.to(device), labels.to(device)), generator)

    path_params = config.path.to_dict()
    if vq is None:  # lp is a distance on codebook embeddings: pixel runs keep their identity without it
        del path_params["lp"]
    metadata = {
        "model_config": model_cfg.to_dict(),
        # the run as trained: its model table is the U-Net actually built (image shape, vocabulary, classes)
        "imagegen_config": dataclasses.replace(config, model=model_cfg).to_dict(),
        "path": {**path_params, "vocab_size": model_cfg.input_vocab},
        "image_shape": list(data.shape),
        "class_names": list(data.class_names) if data.class_names else None,
        "class_conditional": model_cfg.num_classes > 0,
        "data": data_facts(data, data_sha256, len(train_data), len(val_data), config.split_seed),
        "parameters": count_parameters(model),
    }
    identity = {
        "path": metadata["path"],
        "class_conditional": metadata["class_conditional"],
        "data": run_data_identity(metadata["data"]),
        "train_limit": config.train_limit,
    }
    if latent_meta is not None:
        metadata["latent"] = latent_meta
        identity["latent_vqvae_sha256"] = latent_meta["vqvae_sha256"]
    result = train(
        model,
        loss_fn,
        train_batches,
        config.train,
        run_dir,
        val_loss_fn=val_loss,
        resume=resume,
        extra_metadata=metadata,
        progress=progress,
        identity=identity,
    )
    vq_state = vq.state_dict() if vq is not None else None
    export_checkpoint(run_dir, run_dir / EXPORTED_MODEL, metadata, vq_state=vq_state)
    if export is not None:
        export_checkpoint(run_dir, Path(export), metadata, dtype=export_dtype, vq_state=vq_state)
    return result


_AFRESH = "Or start afresh (--no-resume; resume=False)."


def check_latent_resume(run_dir: str | os.PathLike, latent: str | None, vq_sha256: str | None) -> None:
    """Refuse to resume ``run_dir`` as a pixel run when it holds a latent run, as a latent run when it holds
    a pixel run, or on the codes of another VQ-VAE than the one it was trained on (``vq_sha256``)."""
    facts = saved_run_facts(run_dir)
    if facts is None:
        return
    was = facts["identity"].get("latent_vqvae_sha256")
    was_file = (facts["metadata"].get("latent") or {}).get("vqvae_file", "?")
    if was is None and latent is not None:
        raise ValueError(
            f"cannot resume: {run_dir} holds a pixel run, not a latent one; drop --latent (latent=None) to "
            f"continue it, or train the latent model in another --run-dir."
        )
    if was is not None and latent is None:
        raise ValueError(
            f"cannot resume: {run_dir} holds a latent run on the codes of the VQ-VAE {was_file}; pass "
            f"--latent {was_file} (latent=...) to continue it. {_AFRESH}"
        )
    if was is not None and was != vq_sha256:
        raise ValueError(
            f"cannot resume: {run_dir} was trained on the codes of another VQ-VAE ({was_file}, sha256 "
            f"{was[:12]}...) than {latent} ({vq_sha256[:12]}...); pass that VQ-VAE to continue it. "
            f"{_AFRESH}"
        )


def data_facts(data: ImageDataset, images_sha256: str, n_train: int, n_val: int, split_seed: int) -> dict:
    """What a run records about its images (metadata ``data``)."""
    return {
        "name": data.name,
        "images_sha256": images_sha256,
        "n_train": n_train,
        "n_val": n_val,
        "split_seed": split_seed,
    }


def run_data_identity(facts: dict) -> dict:
    """The data part of a run's identity: what the images are, not where they were read from (a path
    spelled another way resumes)."""
    return {k: v for k, v in facts.items() if k != "name"}


def export_checkpoint(
    run_dir: str | os.PathLike,
    out: str | os.PathLike,
    metadata: dict[str, Any],
    dtype: torch.dtype | None = None,
    vq_state: dict[str, Tensor] | None = None,
) -> Path:
    """Write the EMA weights of ``best.pt`` (else ``last.pt``) as safetensors with the run metadata.

    A latent run (``metadata["latent"]``) needs ``vq_state``, the VQ-VAE's state dict: it is stored in
    float32 under ``vq.`` whatever ``dtype`` the U-Net weights get, so the checkpoint decodes on its own.
    """
    model = PixelUNet(UNetConfig.from_dict(metadata["model_config"]))
    meta = {**best_weights_metadata(run_dir, model, metadata, "imagegen_config"), "format": CHECKPOINT_FORMAT}
    if metadata.get("latent") is None:
        return export_safetensors(model, out, meta, dtype=dtype)
    if not vq_state:
        raise ValueError("a latent checkpoint needs the VQ-VAE weights (vq_state)")
    state = {}
    for name, value in model.state_dict().items():
        cast = dtype is not None and value.is_floating_point() and value.dtype != torch.float64
        state[name] = value.to(dtype) if cast else value
    state.update({f"vq.{name}": value for name, value in vq_state.items()})
    return export_safetensors(state, out, meta)
