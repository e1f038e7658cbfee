"""Sampling images: checkpoint -> posterior sampler (section 3, App. A) with a chosen velocity -> pixels.

The sampler (:func:`dfm_core.sampler.sample`) sees the U-Net as ``model(x (B, L), t (B,)) -> logits (B, L, V)``
with L = C H W. The velocity is a post-training choice (section 8.3):

* 'ko': the kinetic-optimal velocity of eq 26, which on the metric path is eq 29,
  ``u(x, z | x1) = p_t(x | x1) beta'_t [d(z, x1) - d(x, x1)]_+`` (moves only towards x1);
* 'power' (with ``alpha``) and 'power-inf': the tau_t = p_t^alpha family of Appendix C.3 (eq 74-77);
* 'campbell': eq 24 (tau = 1), which is unsafe on paths with tiny p_t(z) and fails on metric paths;

plus, optionally, the probability-preserving corrector of eq 35 with weight
``omega_t = w t^p (1 - t)^q`` (a constant for p = q = 0). Classifier-free guidance combines
``(1 + g) log p(. | x_t, y) - g log p(. | x_t, null)`` and costs two network calls per step.

Batch k of a run draws from a generator seeded by (seed, k): the same seed and batch size give the
same images.

A latent checkpoint (sec 8.4, :mod:`imagegen.latent`) carries its VQ-VAE: the sampler draws code grids
(1, h, w) over K codes and the VQ-VAE decodes them, so ``image_shape`` is the decoded image shape.
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from dfm_core.checkpoints import CheckpointError, load_model_weights, read_checkpoint
from dfm_core.paths import ProbabilityPath
from dfm_core.runtime import batch_seed, resolve_device
from dfm_core.sampler import sample
from dfm_core.velocities import ProbabilityVelocity, make_velocity
from imagegen.data import check_count, tokens_to_images
from imagegen.model import PixelUNet, UNetConfig
from imagegen.paths import PixelPathConfig, build_path, pad_logits
from imagegen.train import CHECKPOINT_FORMAT
from imagegen.vqvae import VQVAE, vqvae_from_state

__all__ = [
    "CheckpointError",
    "CorrectorSchedule",
    "ImageGenerator",
    "SamplingConfig",
    "resolve_labels",
]


def _check_number(what: str, value: object, minimum: float, strict: bool = False) -> None:
    """Raise a ValueError naming ``what`` unless ``value`` is a finite number >= ``minimum`` (> if strict)."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if ok:
        ok = value > minimum if strict else value >= minimum
    if not ok:
        bound = f"> {minimum:g}" if strict else f">= {minimum:g}"
        raise ValueError(f"{what} must be a finite number {bound}, got {value!r}")


class CorrectorSchedule:
    """Corrector weight omega_t = w t^p (1 - t)^q of eq 35 (p = q = 0: the constant w).

    A callable of t for :class:`dfm_core.velocities.CorrectedVelocity`; ``q > 0`` switches the corrector
    off as t -> 1, ``p > 0`` near the uniform (metric) or all-mask (mask path) start.
    """

    def __init__(self, weight: float, p: float = 0.0, q: float = 0.0) -> None:
        for name, value in (("weight", weight), ("exponent p", p), ("exponent q", q)):
            _check_number(f"corrector {name}", value, minimum=0.0)
        self.weight, self.p, self.q = float(weight), float(p), float(q)

    def __call__(self, t: Tensor) -> Tensor:
        t = torch.as_tensor(t).clamp(0.0, 1.0)
        return self.weight * t**self.p * (1.0 - t) ** self.q

    def __repr__(self) -> str:
        return f"CorrectorSchedule(w={self.weight:g}, p={self.p:g}, q={self.q:g})"


@dataclass
class SamplingConfig:
    """Sampler settings.

    Attributes:
        steps: sampler steps on a uniform grid (the NFE; twice the network calls with guidance).
        velocity: 'ko', 'power', 'power-inf' or 'campbell'.
        alpha: exponent of the 'power' velocity.
        corrector, corrector_p, corrector_q: omega_t = w t^p (1 - t)^q; w = 0 disables the corrector.
        temperature: softmax temperature of the posterior.
        guidance: classifier-free guidance scale g (0 = none; class-conditional models only).
        float64: do the categorical draws and rates in float64.
    """

    steps: int = 128
    velocity: str = "ko"
    alpha: float | None = None
    corrector: float = 0.0
    corrector_p: float = 0.0
    corrector_q: float = 0.0
    temperature: float = 1.0
    guidance: float = 0.0
    float64: bool = True

    def __post_init__(self) -> None:
        check_count(self.steps, "steps (NFE)")
        _check_number("temperature", self.temperature, 0.0, strict=True)
        _check_number("guidance", self.guidance, 0.0)
        _check_number("corrector weight", self.corrector, 0.0)
        _check_number("corrector exponent p", self.corrector_p, 0.0)
        _check_number("corrector exponent q", self.corrector_q, 0.0)
        if self.alpha is not None:
            _check_number("alpha", self.alpha, 0.0, strict=True)
        self.build_velocity()  # validates the velocity and corrector

    def build_velocity(self) -> ProbabilityVelocity:
        corrector: float | Callable[[Tensor], Tensor] = 0.0
        if self.corrector > 0:
            corrector = CorrectorSchedule(self.corrector, self.corrector_p, self.corrector_q)
        return make_velocity(self.velocity, alpha=self.alpha, corrector=corrector)

    def label(self) -> str:
        """Short description for tables and legends, e.g. 'ko+corr(w=2,p=0.25,q=0.25)+guidance=1.5'.

        Guidance and a temperature other than 1 are named when set (not the steps: a sweep varies them).
        """
        name = self.velocity if self.velocity != "power" else f"power-{self.alpha:g}"
        if self.corrector > 0:
            name += f"+corr(w={self.corrector:g},p={self.corrector_p:g},q={self.corrector_q:g})"
        if self.temperature != 1.0:
            name += f"+temp={self.temperature:g}"
        if self.guidance > 0:
            name += f"+guidance={self.guidance:g}"
        return name

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def resolve_labels(
    label: int | str | None, n: int, num_classes: int, class_names: list[str] | None
) -> Tensor | None:
    """Labels for ``n`` images: None (unconditional model or 'null'), a fixed class, or 'balanced' (i mod K).

    A text label is a class name if one matches (case-insensitive), else a class index.
    """
    if num_classes == 0:
        if label not in (None, "balanced", "null"):
            raise ValueError("this model is unconditional: it takes no class label")
        return None
    if label is None or label == "balanced":
        return torch.arange(n) % num_classes
    if label == "null":
        return torch.full((n,), num_classes, dtype=torch.long)
    if isinstance(label, str):
        names = [c.lower() for c in (class_names or [])]
        if label.lower() in names:  # a class name wins over an index: folders named 1, 2, 10 are names
            label = names.index(label.lower())
        elif not label.lstrip("-").isdigit():
            raise ValueError(f"unknown class {label!r}; classes: {', '.join(class_names or [])}")
    label = int(label)
    if not 0 <= label < num_classes:
        raise ValueError(f"class label must be in 0..{num_classes - 1}, got {label}")
    return torch.full((n,), label, dtype=torch.long)


@dataclass
class ImageGenerator:
    """A loaded pixel (or latent: with its VQ-VAE decoder) model with its path and training metadata."""

    model: PixelUNet
    path_config: PixelPathConfig
    metadata: dict[str, Any]
    device: torch.device
    checkpoint: Path | None = None
    vqvae: VQVAE | None = None

    @classmethod
    def from_checkpoint(cls, checkpoint: str | os.PathLike, device: str = "auto") -> ImageGenerator:
        """Load a ``model.safetensors`` written by :func:`imagegen.train.train_image_model`."""
        path = Path(checkpoint).expanduser()
        state, meta = read_checkpoint(path, "imagegen", CHECKPOINT_FORMAT, required=("model_config", "path"))
        vq_state = {k[3:]: v for k, v in state.items() if k.startswith("vq.")}
        state = {k: v for k, v in state.items() if not k.startswith("vq.")}
        if not isinstance(meta["path"], dict):
            raise CheckpointError(
                f"{path}: its path metadata must be a table of settings, got {meta['path']!r}"
            )
        try:
            path_config = PixelPathConfig.from_dict(
                {k: v for k, v in meta["path"].items() if k != "vocab_size"}
            )
        except (ValueError, TypeError) as e:
            raise CheckpointError(f"{path}: bad path config in its metadata: {e}") from e
        model = load_model_weights(
            lambda: PixelUNet(UNetConfig.from_dict(meta["model_config"])), state, path, "imagegen"
        )
        dev = resolve_device(device)
        model.to(dev).eval()
        vq = None
        if meta.get("latent"):
            if not vq_state:
                raise CheckpointError(f"{path} is a latent checkpoint without its VQ-VAE weights (vq.*)")
            try:
                vq = vqvae_from_state(vq_state, meta["latent"]["vqvae_config"], str(path)).to(dev)
            except (ValueError, KeyError, TypeError) as e:
                raise CheckpointError(f"{path}: cannot rebuild its VQ-VAE: {e}") from e
        return cls(
            model=model,
            path_config=path_config,
            metadata=meta,
            device=dev,
            checkpoint=path,
            vqvae=vq,
        )

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of the images made (decoded by the VQ-VAE in latent mode)."""
        if self.vqvae is not None:
            cfg = self.vqvae.config
            return cfg.image_channels, cfg.image_size, cfg.image_size
        return self.token_shape

    @property
    def token_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of the token grid the model sees: the image, or (1, h, w) codes in latent mode."""
        cfg = self.model.config
        return cfg.image_channels, cfg.image_size, cfg.image_size

    @functools.cached_property
    def path(self) -> ProbabilityPath:
        """The probability path of the checkpoint (over pixel values, or over the VQ-VAE codes)."""
        return build_path(self.path_config, None if self.vqvae is None else self.vqvae.codebook)

    def tokens_to_images(self, tokens: Tensor) -> Tensor:
        """Sampled tokens (n, L) -> uint8 images (n, C, H, W) on the CPU (decoded in latent mode)."""
        if self.vqvae is None:
            return tokens_to_images(tokens.cpu(), self.image_shape)
        _, h, w = self.token_shape
        return self.vqvae.decode(tokens.reshape(-1, h, w)).cpu()

    @property
    def num_classes(self) -> int:
        return self.model.config.num_classes

    @property
    def class_names(self) -> list[str] | None:
        return self.metadata.get("class_names")

    def model_fn(
        self, labels: Tensor | None, guidance: float = 0.0
    ) -> Callable[[Tensor, Tensor, Tensor], Tensor]:
        """``f(x (R, L), t (R,), rows (R,) | None) -> logits (R, L, V)`` for the sampler, ``rows`` being the
        batch rows that ``x`` holds (``skip_idle_rows``; None: all); guided if ``guidance > 0``."""
        V = self.path.vocab_size
        y = None if labels is None else labels.to(self.device)
        use_bf16 = self.device.type == "cuda"
        null = self.num_classes

        def forward(x: Tensor, t: Tensor, yy: Tensor | None) -> Tensor:
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=use_bf16):
                return self.model(x, t, yy).float()

        def fn(x: Tensor, t: Tensor, rows: Tensor | None = None) -> Tensor:
            yy = y if y is None or rows is None else y[rows]
            if guidance > 0 and yy is not None:
                both = forward(
                    torch.cat([x, x]), torch.cat([t, t]), torch.cat([yy, torch.full_like(yy, null)])
                )
                cond, uncond = both.log_softmax(-1).chunk(2)
                logits = (1.0 + guidance) * cond - guidance * uncond
            else:
                logits = forward(x, t, yy)
            return pad_logits(logits, V)

        return fn

    @torch.no_grad()
    def sample_tokens(
        self,
        n: int,
        sampling: SamplingConfig,
        labels: Tensor | None = None,
        generator: torch.Generator | None = None,
        return_trajectory: bool = False,
    ):
        """One sampler batch of ``n`` sequences; returns :class:`dfm_core.sampler.SampleResult`."""
        if sampling.guidance > 0 and self.num_classes == 0:
            raise ValueError("classifier-free guidance needs a class-conditional model")
        path = self.path
        C, H, W = self.token_shape
        x0 = path.sample_source((n, C * H * W), generator=generator, device=self.device)
        return sample(
            self.model_fn(labels, sampling.guidance),
            path,
            x0,
            steps=sampling.steps,
            velocity=sampling.build_velocity(),
            temperature=sampling.temperature,
            float64=sampling.float64,
            generator=generator,
            return_trajectory=return_trajectory,
            skip_idle_rows=True,  # with a mask path, an image goes through the network only when it changes
        )

    def sample(
        self,
        n: int,
        sampling: SamplingConfig | None = None,
        seed: int = 0,
        batch_size: int = 256,
        label: int | str | None = None,
        progress: bool = False,
        on_batch: Callable[[int, Tensor], None] | None = None,
    ) -> Tensor:
        """Generate ``n`` images: uint8 (n, C, H, W).

        Args:
            sampling: sampler settings (default :class:`SamplingConfig`).
            seed: the same seed and batch size give the same images.
            label: for class-conditional models, 'balanced' (default, class i mod K), 'null', an index or
                a class name.
            on_batch: called with (start index, images) after every batch (e.g. to write files).
        """
        n = check_count(n, "n (the number of images)")
        batch_size = check_count(batch_size, "batch_size")
        sampling = sampling or SamplingConfig()
        labels = resolve_labels(label, n, self.num_classes, self.class_names)
        starts = range(0, n, batch_size)
        iterator = starts
        if progress:
            from tqdm.auto import tqdm

            iterator = tqdm(starts, desc="sampling", unit="batch")
        out = []
        for b, start in enumerate(iterator):
            size = min(batch_size, n - start)
            g = torch.Generator(device=self.device).manual_seed(batch_seed(seed, b, "imagegen:"))
            yb = None if labels is None else labels[start : start + size]
            tokens = self.sample_tokens(size, sampling, yb, g).tokens
            images = self.tokens_to_images(tokens)
            if on_batch is not None:
                on_batch(start, images)
            out.append(images)
        return torch.cat(out)
