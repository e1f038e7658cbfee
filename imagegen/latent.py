"""The discrete-latent variant (sec 8.4, App. E.4): discrete flow matching on the code grids of a VQ-VAE.

    images (N, C, H, W) -> VQ-VAE codes (N, h, w) in 0..K-1 (encoded once, cached) -> tokens x_1 (B, h w)
    -> x_t ~ p_t(. | x_1) -> U-Net on a (1, h, w) grid -> logits (B, h w, K) -> cross-entropy (eq 11);
    generation: sampler -> codes -> VQ-VAE decoder -> images.

The metric path uses the Euclidean distance of the code embeddings (eq 107),
d(x, y) = ||emb(x) - emb(y)||_2^lp, with beta_t = c (t / (1 - t))^a (eq 108). The raw scale of a
codebook is arbitrary (it depends on the encoder), so the embeddings are first divided by s, the mean
Euclidean distance between two distinct codes:

    d(x, y) = (||emb(x) - emb(y)||_2 / s)^lp,

which is eq 107 with c replaced by c / s^lp. A typical pair of codes is then at distance 1 for every lp,
as a typical pair of pixel values is at distance ~2/3 on the pixel path, so c and a keep the meaning they
have there (at beta_t = 1 a typical code has weight e^-1 relative to x_1) and the E.4 values
(c = 3, a = 0.9, lp = 4) are a sensible start. The mask baseline uses the mask token K.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from dfm_core.paths import MetricPath, MixturePath, ProbabilityPath
from dfm_core.schedulers import BetaSchedule, make_scheduler
from dfm_core.sources import mask_source
from imagegen.vqvae import VQVAE

__all__ = [
    "CODES_DTYPE",
    "MATRIX_CODES_MAX",
    "check_vqvae_data",
    "codebook_distances",
    "distance_scale",
    "encode_codes",
    "latent_codes",
    "latent_path",
    "latent_path_preview",
    "latent_path_samples",
]

CODES_DTYPE = torch.int16  # codes travel and are cached as int16 (K <= 32767)


MATRIX_CODES_MAX = 2048  # up to this K the metric path keeps a K x K matrix (32 MB); above, rows on demand


def _as_codes(codebook: Tensor) -> Tensor:
    """The code embeddings in float64; a metric path needs at least two codes."""
    e = codebook.detach().to(torch.float64)
    if e.shape[0] < 2:
        raise ValueError("a metric path needs a codebook of at least 2 codes")
    return e


def _exact_distances(rows: Tensor, e: Tensor) -> Tensor:
    """Euclidean distances of ``rows`` to every code (exact form: zero on the diagonal)."""
    return torch.cdist(rows, e, compute_mode="donot_use_mm_for_euclid_dist")


def _mean_distinct(total: float, K: int) -> float:
    """s from the sum of all K x K distances (the diagonal is zero)."""
    s = total / (K * (K - 1))
    if not s > 0:
        raise ValueError("all codebook embeddings are equal: no metric path on them")
    return s


def distance_scale(codebook: Tensor, rows_per_chunk: int = 1024) -> float:
    """s: the mean Euclidean distance between two distinct codes of ``codebook`` (K, D), summed over
    blocks of rows so that no K x K matrix is held."""
    e = _as_codes(codebook)
    total = sum(float(_exact_distances(part, e).sum()) for part in e.split(rows_per_chunk))
    return _mean_distinct(total, e.shape[0])


def codebook_distances(codebook: Tensor, lp: float) -> Tensor:
    """The (K, K) float64 matrix d[i, j] = (||e_i - e_j||_2 / s)^lp (eq 107 with the scale s of
    :func:`distance_scale`), exactly zero on the diagonal. One K x K matrix, computed in place: 8 K^2
    bytes (2 GB at the paper's K = 16384, plus the cdist's own workspace; :func:`latent_path` computes
    rows on demand instead above :data:`MATRIX_CODES_MAX` codes). The scale comes from the same matrix."""
    e = _as_codes(codebook)
    d = _exact_distances(e, e)
    d.div_(_mean_distinct(float(d.sum()), e.shape[0])).pow_(lp)
    return d.fill_diagonal_(0.0)


def latent_path(config: Any, codebook: Tensor) -> ProbabilityPath:
    """The path of a :class:`imagegen.paths.PixelPathConfig` over the K codes of ``codebook`` (K, D):
    metric (eq 27 with the distances of eq 107, beta_t of eq 108) or mask (eq 2, mask token K).

    Above :data:`MATRIX_CODES_MAX` codes the metric path computes the rows d(., x1) it needs from the
    scaled embeddings (:meth:`MetricPath.from_embeddings`), the same numbers without a K x K matrix."""
    K = int(codebook.shape[0])
    if config.kind == "metric":
        beta = BetaSchedule(config.c, config.a)
        if K <= MATRIX_CODES_MAX:
            return MetricPath(codebook_distances(codebook, config.lp), beta=beta)
        scaled = codebook.detach().to(torch.float64) / distance_scale(codebook)
        return MetricPath.from_embeddings(scaled, power=config.lp, beta=beta)
    source = mask_source(K + 1, K)
    return MixturePath(source, make_scheduler(config.scheduler, source, n=config.scheduler_n))


def check_vqvae_data(meta: dict[str, Any], shape: tuple[int, int, int], where: str) -> None:
    """Refuse a VQ-VAE trained on images of another shape than the data's (C, H, W)."""
    trained = tuple(meta.get("image_shape") or ())
    if len(trained) == 3 and trained[1:] == tuple(shape[1:]) and trained[0] != shape[0]:
        raise ValueError(
            f"VQ-VAE {where} encodes {trained[0]}-channel images but the data are read with {shape[0]} "
            f"channel(s): pass --channels {trained[0]} (a folder data set) or use a VQ-VAE trained on these images"
        )
    if trained != tuple(shape):
        raise ValueError(
            f"VQ-VAE {where} encodes {'x'.join(map(str, trained))} images but the data are "
            f"{'x'.join(map(str, shape))}: train a VQ-VAE on these images with `imagegen train-vq`"
        )


@torch.no_grad()
def encode_codes(vq: VQVAE, images: Tensor, batch_size: int = 256) -> Tensor:
    """Codes of ``images`` (N, C, H, W) and of their horizontal flips: int16 (N, 2, h w).

    The flips are encoded (not the codes flipped) because a VQ-VAE is not equivariant to flips; the
    training batches pick one of the two for ``hflip``.
    """
    out = []
    for part in images.split(batch_size):
        both = torch.cat([part, part.flip(-1)])
        codes = vq.encode(both).reshape(2, part.shape[0], -1).transpose(0, 1)
        out.append(codes.to("cpu", CODES_DTYPE))
    return torch.cat(out)


def latent_codes(
    vq: VQVAE,
    images: Tensor,
    vq_sha256: str,
    images_sha256: str,
    cache_dir: str | os.PathLike | None = None,
) -> Tensor:
    """:func:`encode_codes`, cached as ``latent-codes-<VQ-VAE sha256>-<images sha256>.npz`` (16 hex
    digits of each) in ``cache_dir`` (default: the imagegen cache, ``$IMAGEGEN_CACHE``)."""
    from imagegen.data import _atomic_save_npz, default_cache_dir

    path = Path(cache_dir or default_cache_dir()) / f"latent-codes-{vq_sha256[:16]}-{images_sha256[:16]}.npz"
    h, w = vq.latent_shape
    want = (images.shape[0], 2, h * w)
    if path.is_file():
        try:
            with np.load(path, allow_pickle=False) as f:
                codes = torch.from_numpy(f["codes"])
            if tuple(codes.shape) == want and codes.dtype == CODES_DTYPE:
                return codes
            warnings.warn(f"ignoring latent code cache {path} of another shape; encoding again", stacklevel=2)
        except (OSError, ValueError, KeyError) as e:
            warnings.warn(f"ignoring unreadable latent code cache {path} ({e}); encoding again", stacklevel=2)
    codes = encode_codes(vq, images)
    try:
        _atomic_save_npz(path, codes=codes.numpy())
    except OSError as e:  # a read-only cache must not stop training
        warnings.warn(
            f"could not write latent code cache {path}: {e} (set IMAGEGEN_CACHE to cache elsewhere)",
            stacklevel=2,
        )
    return codes


@torch.no_grad()
def latent_path_samples(
    vq: VQVAE, images: Tensor, config: Any, times: Tensor, generator: torch.Generator | None = None
) -> Tensor:
    """Decoded x_t ~ p_t(. | x1) on the codes x1 of ``images`` for each time: uint8 (T, N, C, H, W).

    The E.4 way to choose c, a and lp: look at the images along the conditional path. Metric path only
    (a mask token has no image).
    """
    if config.kind != "metric":
        raise ValueError("a latent path preview shows the metric path (mask tokens cannot be decoded)")
    times = torch.as_tensor(times, dtype=torch.float64).flatten()
    if not (torch.isfinite(times).all() and (times >= 0).all() and (times <= 1).all()):
        raise ValueError(f"times must lie in [0, 1], got {times.tolist()}")
    path = latent_path(config, vq.codebook.cpu())
    x1 = vq.encode(images).cpu()
    N, h, w = x1.shape
    x1 = x1.reshape(N, h * w)
    out = [
        vq.decode(path.sample(x1, torch.full((N,), float(t)), generator=generator).reshape(N, h, w)).cpu()
        for t in times.tolist()
    ]
    return torch.stack(out)


def latent_path_preview(
    vqvae: str | os.PathLike, data: Any, config: Any, n: int = 8, times: int = 11, seed: int = 0
) -> tuple[Tensor, Tensor]:
    """:func:`imagegen.paths.path_preview` on the codes of the VQ-VAE file ``vqvae`` (eq 107): decoded x_t
    for ``n`` random images of ``data`` at ``times`` evenly spaced t. Refuses a VQ-VAE trained on images
    of another shape than the data's."""
    from imagegen.paths import check_preview_size
    from imagegen.vqvae import load_vqvae

    check_preview_size(n, times)
    vq, meta = load_vqvae(vqvae)
    check_vqvae_data(meta, data.shape, str(vqvae))
    ts = torch.linspace(0.0, 1.0, times)
    subset = data.random_subset(n, seed)
    return latent_path_samples(vq, subset.images, config, ts, torch.Generator().manual_seed(seed)), ts
