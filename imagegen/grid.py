"""Writing images: a grid PNG of a batch, and one PNG per image; output paths checked before any work."""

from __future__ import annotations

import math
import os
import re
from pathlib import Path

import numpy as np
from torch import Tensor

from dfm_core.atomic_io import atomic_write, check_writable
from imagegen.data import check_count

__all__ = [
    "ImageFolderWriter",
    "check_grid_fits",
    "check_grid_options",
    "check_image_file",
    "check_output_folder",
    "grid_size",
    "make_grid",
    "remove_images_beyond",
    "save_grid",
    "save_images",
]


def check_grid_options(nrow: int | None = None, scale: int = 1, padding: int = 2) -> None:
    """Raise a ValueError for ``nrow`` or ``scale`` below 1 (or not whole numbers), or a negative padding."""
    if nrow is not None:
        check_count(nrow, "nrow (images per grid row)")
    check_count(scale, "scale")
    if isinstance(padding, bool) or not isinstance(padding, int) or padding < 0:
        raise ValueError(f"padding must be a whole number >= 0, got {padding!r}")


def max_grid_pixels() -> int:
    """The largest grid written: twice PIL's decompression-bomb limit, above which PIL (and so this project)
    refuses to open the PNG again (about 179 M pixels, 0.5 GB as RGB)."""
    from PIL import Image

    return 2 * (Image.MAX_IMAGE_PIXELS or 89_478_485)


def check_grid_fits(
    n: int, image_hw: tuple[int, int], nrow: int | None = None, scale: int = 1, padding: int = 2
) -> None:
    """Raise a ValueError, before any sampling, when the grid of ``n`` images of (H, W) upscaled ``scale``
    times would be too large to hold in memory and open again (more than :func:`max_grid_pixels`)."""
    check_grid_options(nrow, scale, padding)
    width, height = grid_size(n, image_hw, nrow, padding)
    if width * scale * height * scale > max_grid_pixels():
        raise ValueError(
            f"a grid of {n} images of {image_hw[0]} x {image_hw[1]} at scale {scale} would be "
            f"{width * scale} x {height * scale} pixels, more than the {max_grid_pixels():,} an image viewer "
            "(or PIL) opens; lower --scale or --n (--images-dir writes every image on its own)"
        )


def _columns(n: int, nrow: int | None) -> int:
    """Images per row: ``nrow`` capped at ``n`` (default ceil(sqrt n))."""
    return max(1, min(nrow, n) if nrow is not None else math.ceil(math.sqrt(n)))


def grid_size(
    n: int, image_hw: tuple[int, int], nrow: int | None = None, padding: int = 2
) -> tuple[int, int]:
    """(width, height) in pixels of the grid :func:`make_grid` draws for ``n`` images of (H, W)."""
    check_count(n, "the number of images in a grid")
    check_grid_options(nrow, padding=padding)
    cols = _columns(n, nrow)
    rows = math.ceil(n / cols)
    H, W = image_hw
    return cols * (W + padding) + padding, rows * (H + padding) + padding


def make_grid(images: Tensor, nrow: int | None = None, padding: int = 2, pad_value: int = 255) -> np.ndarray:
    """uint8 (N, C, H, W) -> one uint8 array (rows, cols[, 3]) with ``nrow`` images per row (default sqrt N).

    ``nrow`` above N is capped at N (one row, no empty columns).
    """
    if images.ndim != 4 or images.shape[0] < 1:
        raise ValueError(f"images must be (N, C, H, W) with N >= 1, got {tuple(images.shape)}")
    N, C, H, W = images.shape
    arr = images.detach().cpu().numpy().astype(np.uint8)
    width, height = grid_size(N, (H, W), nrow, padding)
    cols = _columns(N, nrow)
    grid = np.full((C, height, width), pad_value, dtype=np.uint8)
    for i in range(N):
        r, c = divmod(i, cols)
        y, x = padding + r * (H + padding), padding + c * (W + padding)
        grid[:, y : y + H, x : x + W] = arr[i]
    return grid[0] if C == 1 else grid.transpose(1, 2, 0)


LOSSLESS_FORMATS = frozenset({"PNG", "BMP", "TIFF", "PPM"})  # PIL formats that keep every pixel value


def check_image_file(path: str | os.PathLike, what: str = "output") -> Path:
    """Check now, before any sampling, that an image file (e.g. a grid ``.png``) can be written at ``path``.

    Raises:
        ValueError: ``path`` is a folder, has no image extension PIL can write, or cannot be written.
    """
    from PIL import Image

    path = Path(path).expanduser()
    if os.path.isdir(path):  # not Path.is_dir, which raises on a name too long; check_writable names it
        raise ValueError(f"{what} {path} is a folder: give a .png file path, e.g. {path / 'samples.png'}")
    ext = path.suffix.lower()
    Image.init()
    fmt = Image.registered_extensions().get(ext)
    if fmt is None or fmt not in Image.SAVE:
        got = f"extension {ext!r}" if ext else "no file extension"
        raise ValueError(f"{what} {path} has {got}: give an image path ending in .png")
    if fmt not in LOSSLESS_FORMATS:
        raise ValueError(
            f"{what} {path}: {fmt} changes pixel values (lossy or a reduced palette), and samples are "
            f"judged by their pixels; give a .png (or {', '.join(sorted(LOSSLESS_FORMATS - {'PNG'}))}) path"
        )
    return check_writable(path, what)


def check_output_folder(folder: str | os.PathLike, what: str = "output folder") -> Path:
    """Check now that ``folder`` is (or can become) a writable folder.

    Raises:
        ValueError: ``folder`` is a file, lies under a file, or cannot be written.
    """
    return check_writable(folder, what, folder=True)


def save_grid(
    images: Tensor, path: str | os.PathLike, nrow: int | None = None, padding: int = 2, scale: int = 1
) -> Path:
    """Write ``images`` (uint8 (N, C, H, W)) as one grid PNG, optionally upscaled ``scale`` times (nearest)."""
    from PIL import Image

    if images.ndim == 4 and images.shape[0] >= 1:
        check_grid_fits(images.shape[0], tuple(images.shape[2:]), nrow, scale, padding)
    check_grid_options(nrow, scale, padding)
    path = check_image_file(path, "grid")
    path.parent.mkdir(parents=True, exist_ok=True)
    img = Image.fromarray(make_grid(images, nrow, padding))
    if scale > 1:
        img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    return _save_atomically(img, path)


def _save_atomically(img, path: Path, durable: bool = True) -> Path:  # img: PIL.Image.Image
    """``img.save(path)`` through a temp file and a rename: a kill never leaves half an image."""
    from PIL import Image

    image_format = Image.registered_extensions().get(path.suffix.lower(), "PNG")
    return atomic_write(path, lambda tmp: img.save(tmp, format=image_format), durable=durable)


def save_images(
    images: Tensor, folder: str | os.PathLike, prefix: str = "image", start: int = 0
) -> list[Path]:
    """Write each image as ``folder/{prefix}_{index:06d}.png``; returns the paths."""
    from PIL import Image

    folder = check_output_folder(folder, "image folder")
    folder.mkdir(parents=True, exist_ok=True)
    arr = images.detach().cpu().numpy().astype(np.uint8)
    paths = []
    for i, a in enumerate(arr):
        p = folder / f"{prefix}_{start + i:06d}.png"
        # renamed into place, not fsynced one by one (thousands of files; a power cut may lose the last few)
        _save_atomically(Image.fromarray(a[0] if a.shape[0] == 1 else a.transpose(1, 2, 0)), p, durable=False)
        paths.append(p)
    return paths


def remove_images_beyond(folder: str | os.PathLike, n: int, prefix: str = "image") -> int:
    """Delete ``folder/{prefix}_{index:06d}.png`` files with index >= ``n``: the images an earlier, larger
    run left beside the ``n`` just written by :func:`save_images`. Other files are not touched. Returns how
    many were removed."""
    pattern = re.compile(rf"{re.escape(prefix)}_(\d{{6,}})\.png")
    removed = 0
    for path in Path(folder).iterdir():
        match = pattern.fullmatch(path.name)
        if match and int(match.group(1)) >= n and path.is_file():
            path.unlink()
            removed += 1
    return removed


class ImageFolderWriter:
    """``on_batch`` for :meth:`imagegen.generate.ImageGenerator.sample`: writes each batch's images into
    ``folder`` as they come (:func:`save_images`). When the first batch is ready (every option was accepted
    by then) the ``image_*.png`` and half-written temps an earlier run left there go, so a run stopped half
    way never leaves a mix of two runs. ``written``: images written so far; ``removed``: earlier ones."""

    def __init__(self, folder: str | os.PathLike) -> None:
        self.folder = check_output_folder(folder, "image folder")
        self.written = 0
        self.removed = 0

    def __call__(self, start: int, images: Tensor) -> None:
        if start == 0:
            from dfm_core.atomic_io import remove_stale_temps

            self.removed = remove_images_beyond(self.folder, 0) if self.folder.is_dir() else 0
            remove_stale_temps(self.folder)
        save_images(images, self.folder, start=start)
        self.written = start + len(images)
