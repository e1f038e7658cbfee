"""The Frechet distance between Gaussians fitted to two feature sets (the formula of FID).

.. math::
    d^2 = \\|\\mu_1 - \\mu_2\\|^2 + \\operatorname{tr}\\big(\\Sigma_1 + \\Sigma_2 - 2 (\\Sigma_1 \\Sigma_2)^{1/2}\\big)

With features other than InceptionV3's it is not FID: name the extractor with the score
(``FD-EffNetLite0``). The trace of the matrix square root is computed from the eigenvalues of the
symmetric PSD matrix ``S1^(1/2) S2 S1^(1/2)``, which has the same spectrum as ``S1 S2``.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from torch import Tensor

from dfm_core.atomic_io import atomic_write

__all__ = ["FeatureStats", "frechet_distance", "score_name"]


def score_name(extractor: str) -> str:
    """The printed name of the score, e.g. 'FD-EffNetLite0'."""
    return f"FD-{extractor}"


@dataclass
class FeatureStats:
    """Mean (D,) and covariance (D, D) of N feature vectors from the named extractor."""

    mu: np.ndarray
    sigma: np.ndarray
    n: int
    extractor: str

    @classmethod
    def from_features(cls, features: Tensor | np.ndarray, extractor: str) -> FeatureStats:
        f = np.asarray(features.cpu().numpy() if isinstance(features, Tensor) else features, dtype=np.float64)
        if f.ndim != 2 or f.shape[0] < 2:
            raise ValueError(f"need at least 2 feature vectors (N, D), got shape {f.shape}")
        return cls(f.mean(0), np.cov(f, rowvar=False), int(f.shape[0]), extractor)

    def save(self, path: str | os.PathLike) -> Path:
        return atomic_write(
            path,
            lambda tmp: np.savez(tmp, mu=self.mu, sigma=self.sigma, n=self.n, extractor=self.extractor),
            suffix=".npz",
        )

    @classmethod
    def load(cls, path: str | os.PathLike) -> FeatureStats:
        with np.load(path, allow_pickle=False) as d:
            return cls(d["mu"], d["sigma"], int(d["n"]), str(d["extractor"]))

    @property
    def digest(self) -> str:
        """A short hash of the statistics: it changes with the reference images and the extractor."""
        h = hashlib.sha256(self.extractor.encode())
        for a in (self.mu, self.sigma):
            h.update(np.ascontiguousarray(a, dtype=np.float64).tobytes())
        return h.hexdigest()[:16]

    def distance(self, other: FeatureStats) -> float:
        if self.extractor != other.extractor:
            raise ValueError(f"cannot compare {self.extractor} features with {other.extractor} features")
        return frechet_distance(self.mu, self.sigma, other.mu, other.sigma)


def _sqrt_psd(m: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh((m + m.T) / 2)
    return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """Squared Frechet distance between N(mu1, sigma1) and N(mu2, sigma2) (float64)."""
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    s1, s2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != (mu1.shape[0],) * 2:
        raise ValueError(f"shape mismatch: mu {mu1.shape} / {mu2.shape}, sigma {s1.shape} / {s2.shape}")
    r1 = _sqrt_psd(s1)
    eig = np.linalg.eigvalsh(r1 @ s2 @ r1)
    tr_sqrt = float(np.sqrt(np.clip(eig, 0.0, None)).sum())
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * tr_sqrt)
