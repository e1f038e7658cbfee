"""imagegen: pixel-space image generation with discrete flow matching (section 8.3 of the KO-DFM paper).

Each pixel channel is a token in {0, ..., 255}. Data flow:

    images (N, C, H, W) -> tokens x_1 (B, C H W) -> path.sample (metric eq 27 or mask eq 2) -> U-Net (E.3)
    -> cross-entropy (eq 11); generation: sampler(model, path, velocity [+ corrector eq 35]) -> tokens
    -> images -> grid PNG; evaluation: FD-EffNetLite0 against held-out test images.

Modules, one idea each:

* :mod:`imagegen.data`      CIFAR-10 (JPEG npz, decoded once and cached), Fashion-MNIST (IDX), image folders
* :mod:`imagegen.paths`     the metric-induced pixel path (beta_t = c (t/(1-t))^a) and the mask baseline
* :mod:`imagegen.model`     the U-Net with a pixel-value embedding table and 256 logits per channel
* :mod:`imagegen.train`     training runs on top of :func:`dfm_core.training.train`, safetensors export
* :mod:`imagegen.generate`  sampling with a chosen velocity, corrector schedule and guidance
* :mod:`imagegen.grid`      grid PNGs and single images
* :mod:`imagegen.features`  EfficientNet-Lite0 (ImageNet weights from a local .pth) as feature extractor
* :mod:`imagegen.frechet`   the Frechet distance of feature Gaussians
* :mod:`imagegen.evaluate`  scores against the test split, score-vs-NFE sweeps (CSV + plot)
* :mod:`imagegen.vqvae`     a small VQ-VAE (EMA codebook, dead-code restarts): the tokenizer of the latent variant
* :mod:`imagegen.train_vq`  training and exporting the VQ-VAE
* :mod:`imagegen.latent`    the discrete-latent variant (sec 8.4): code grids, the metric path of eq 107
"""

from imagegen.data import ImageDataset, load_dataset
from imagegen.generate import CorrectorSchedule, ImageGenerator, SamplingConfig
from imagegen.model import PixelUNet, UNetConfig
from imagegen.paths import MASK_ID, NUM_LEVELS, PixelPathConfig, build_path
from imagegen.train import ImagegenTrainConfig, train_image_model
from imagegen.train_vq import VQTrainConfig, train_vqvae
from imagegen.vqvae import VQVAE, VQVAEConfig

__all__ = [
    "MASK_ID",
    "NUM_LEVELS",
    "CorrectorSchedule",
    "ImageDataset",
    "ImageGenerator",
    "ImagegenTrainConfig",
    "PixelPathConfig",
    "PixelUNet",
    "SamplingConfig",
    "UNetConfig",
    "VQTrainConfig",
    "VQVAE",
    "VQVAEConfig",
    "build_path",
    "load_dataset",
    "train_image_model",
    "train_vqvae",
]
