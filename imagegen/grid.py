"""Writing images: a grid PNG of a batch, and one PNG per image."""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
from torch import Tensor

__all__ = ["grid_size", "make_grid", "save_grid", "save_images"]


def grid_size(
    n: int, image_hw: tuple[int, int], nrow: int | None = None, padding: int = 2
) -> tuple[int, int]:
    """(width, height) in pixels of the grid :func:`make_grid` draws for ``n`` images of (H, W)."""
    cols = nrow or max(1, math.ceil(math.sqrt(n)))
    rows = math.ceil(n / cols)
    H, W = image_hw
    return cols * (W + padding) + padding, rows * (H + padding) + padding


def make_grid(images: Tensor, nrow: int | None = None, padding: int = 2, pad_value: int = 255) -> np.ndarray:
    """uint8 (N, C, H, W) -> one uint8 array (rows, cols[, 3]) with ``nrow`` images per row (default sqrt N)."""
    if images.ndim != 4:
        raise ValueError(f"images must be (N, C, H, W), got {tuple(images.shape)}")
    N, C, H, W = images.shape
    arr = images.detach().cpu().numpy().astype(np.uint8)
    cols = nrow or max(1, math.ceil(math.sqrt(N)))
    width, height = grid_size(N, (H, W), cols, padding)
    grid = np.full((C, height, width), pad_value, dtype=np.uint8)
    for i in range(N):
        r, c = divmod(i, cols)
        y, x = padding + r * (H + padding), padding + c * (W + padding)
        grid[:, y : y + H, x : x + W] = arr[i]
    return grid[0] if C == 1 else grid.transpose(1, 2, 0)


def save_grid(
    images: Tensor, path: str | os.PathLike, nrow: int | None = None, padding: int = 2, scale: int = 1
) -> Path:
    """Write ``images`` (uint8 (N, C, H, W)) as one grid PNG, optionally upscaled ``scale`` times (nearest)."""
    from PIL import Image

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    img = Image.fromarray(make_grid(images, nrow, padding))
    if scale > 1:
        img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    img.save(path)
    return path


def save_images(
    images: Tensor, folder: str | os.PathLike, prefix: str = "image", start: int = 0
) -> list[Path]:
    """Write each image as ``folder/{prefix}_{index:06d}.png``; returns the paths."""
    from PIL import Image

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    arr = images.detach().cpu().numpy().astype(np.uint8)
    paths = []
    for i, a in enumerate(arr):
        p = folder / f"{prefix}_{start + i:06d}.png"
        Image.fromarray(a[0] if a.shape[0] == 1 else a.transpose(1, 2, 0)).save(p)
        paths.append(p)
    return paths
