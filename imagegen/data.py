"""Image data: CIFAR-10 (JPEG bytes in npz), Fashion-MNIST (IDX), any folder of images; tokens and back.

Every loader returns an :class:`ImageDataset` holding uint8 images (N, C, H, W) and optional labels.
Pixel channels are the tokens of section 8.3 of the KO-DFM paper: ``T = {0, ..., 255}`` and a sequence of
``L = C * H * W`` tokens in (channel, row, column) order.

Where the data live (first match wins): the ``data_dir`` argument, ``$IMAGEGEN_DATA``. Inside it:

* ``cifar10_jpeg/cifar10_jpegbytes_{train,test}.npz``: keys ``jpeg`` (all JPEG files concatenated),
  ``offsets`` (N + 1), ``y`` (labels). Decoded once with PIL and cached as uint8 arrays in
  ``$IMAGEGEN_CACHE`` (default ``$XDG_CACHE_HOME/imagegen``), keyed by the file's sha256.
* ``fashion_mnist/{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]`` (also found in
  ``/usr/share/datasets/fashion-mnist``, where Debian's ``dataset-fashion-mnist`` installs it).

A folder of images (png/jpg/...) is read recursively; images in class subfolders get labels from the
sorted subfolder names; ``train/`` and ``test/`` subfolders, if present, are the splits.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import operator
import os
import struct
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from dfm_core.atomic_io import atomic_write, file_sha256, user_cache_dir, visible_files_warning_others

__all__ = [
    "CIFAR10_CLASSES",
    "DATASETS",
    "FASHION_MNIST_CLASSES",
    "ImageDataset",
    "MissingSplitError",
    "check_count",
    "check_split",
    "default_cache_dir",
    "images_to_tokens",
    "load_cifar10",
    "load_dataset",
    "load_fashion_mnist",
    "load_image_folder",
    "read_idx",
    "resolve_data_dir",
    "tokens_to_images",
]

DATASETS = ("cifar10", "fashion-mnist", "folder")
SPLITS = ("train", "test")
CIFAR10_CLASSES = (
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
)
FASHION_MNIST_CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
_DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
_CACHE_VERSION = 1


@dataclass
class ImageDataset:
    """A set of images as tokens' source.

    Attributes:
        images: uint8 (N, C, H, W).
        labels: long (N,) class indices, or None for unlabelled data.
        class_names: one name per class (None when unlabelled).
        name: where the images came from (e.g. ``"cifar10/train"``).
    """

    images: Tensor
    labels: Tensor | None
    class_names: tuple[str, ...] | None
    name: str

    def __post_init__(self) -> None:
        if self.images.dtype != torch.uint8 or self.images.ndim != 4:
            raise ValueError(
                f"images must be uint8 (N, C, H, W), got {self.images.dtype} {tuple(self.images.shape)}"
            )
        if self.labels is not None and self.labels.shape != (self.images.shape[0],):
            raise ValueError("labels must have shape (N,)")

    def __len__(self) -> int:
        return int(self.images.shape[0])

    @property
    def shape(self) -> tuple[int, int, int]:
        """(C, H, W)."""
        return tuple(self.images.shape[1:])  # type: ignore[return-value]

    @property
    def num_classes(self) -> int:
        return len(self.class_names) if self.class_names else 0

    def tokens(self, idx: Tensor | None = None) -> Tensor:
        """Images ``idx`` (all if None) as token sequences: long (n, C * H * W)."""
        images = self.images if idx is None else self.images[idx]
        return images_to_tokens(images)

    def take(self, idx: Tensor | slice, suffix: str = "") -> ImageDataset:
        """A sub-dataset (e.g. ``take(slice(0, 1000))``)."""
        labels = None if self.labels is None else self.labels[idx]
        return ImageDataset(self.images[idx], labels, self.class_names, self.name + suffix)

    def random_subset(self, n: int, seed: int = 0) -> ImageDataset:
        """``n`` images drawn without replacement with a seeded permutation (all if ``n >= len``).

        Raises:
            ValueError: ``n`` is not an integer >= 1.
        """
        n = check_count(n, "the number of images to draw")
        if n >= len(self):
            return self
        perm = torch.randperm(len(self), generator=torch.Generator().manual_seed(seed))[:n]
        return self.take(perm, f"[random {n}]")


def images_sha256(images: Tensor) -> str:
    """SHA-256 (hex) of uint8 images' bytes: what a run or a cache was made from, wherever it was read."""
    return hashlib.sha256(images.contiguous().numpy().tobytes()).hexdigest()


def check_count(value: object, what: str) -> int:
    """``value`` as an int >= 1, else a ValueError naming ``what`` and the value (bools and 2.5 refused)."""
    try:
        if isinstance(value, bool):
            raise TypeError
        n = operator.index(value)  # type: ignore[arg-type]
    except TypeError:
        raise ValueError(f"{what} must be a whole number >= 1, got {value!r}") from None
    if n < 1:
        raise ValueError(f"{what} must be >= 1, got {n}")
    return n


def images_to_tokens(images: Tensor) -> Tensor:
    """uint8 (N, C, H, W) -> long tokens (N, C * H * W) in (channel, row, column) order."""
    return images.reshape(images.shape[0], -1).long()


def tokens_to_images(tokens: Tensor, shape: tuple[int, int, int]) -> Tensor:
    """long tokens (N, L) in 0..255 -> uint8 images (N, C, H, W). Raises on tokens outside 0..255."""
    if tokens.numel() and (int(tokens.min()) < 0 or int(tokens.max()) > 255):
        raise ValueError("tokens outside 0..255 cannot be pixels (a mask token left unsampled?)")
    return tokens.reshape(tokens.shape[0], *shape).to(torch.uint8)


# ---------------------------------------------------------------------------- locations


def resolve_data_dir(data_dir: str | os.PathLike | None = None) -> Path:
    """The image data root: ``data_dir``, else ``$IMAGEGEN_DATA``; raises with a hint if neither is set."""
    if data_dir is not None:
        return Path(data_dir).expanduser()
    env = os.environ.get("IMAGEGEN_DATA")
    if env:
        return Path(env).expanduser()
    raise FileNotFoundError(
        "no image data directory: pass --data-dir or set IMAGEGEN_DATA to the folder holding "
        "cifar10_jpeg/ and fashion_mnist/ (or an image folder with --dataset folder)"
    )


def default_cache_dir() -> Path:
    """``$IMAGEGEN_CACHE``, else ``$XDG_CACHE_HOME/imagegen`` (``~/.cache/imagegen``)."""
    return user_cache_dir("imagegen", "IMAGEGEN_CACHE")


class MissingSplitError(FileNotFoundError):
    """An image folder without the asked-for ``train/`` or ``test/`` subfolder."""


def check_split(split: str, what: str = "split") -> None:
    """Refuse a split name other than ``train`` and ``test``; ``what`` names it in the message (a flag)."""
    if split not in SPLITS:
        raise ValueError(f"unknown {what} {split!r}; expected one of {', '.join(SPLITS)}")


def _atomic_save_npz(path: Path, **arrays: np.ndarray) -> None:
    atomic_write(path, lambda tmp: np.savez(tmp, **arrays), suffix=".npz")


# ---------------------------------------------------------------------------- CIFAR-10


def _cifar_file(root: Path, split: str) -> Path:
    name = f"cifar10_jpegbytes_{split}.npz"
    for cand in (root / "cifar10_jpeg" / name, root / name):
        if cand.is_file():
            return cand
    raise FileNotFoundError(f"CIFAR-10 {split} file {name} not found in {root} or {root / 'cifar10_jpeg'}")


def decode_jpeg_npz(path: str | os.PathLike, limit: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Decode the JPEG-bytes npz: returns uint8 images (N, 32, 32, 3) and uint8 labels (N,)."""
    from PIL import Image

    with np.load(path, allow_pickle=False) as d:
        blob, offsets, labels = d["jpeg"], d["offsets"], d["y"]
    n = len(offsets) - 1 if limit is None else min(limit, len(offsets) - 1)
    images = [
        np.asarray(Image.open(io.BytesIO(blob[offsets[i] : offsets[i + 1]].tobytes())).convert("RGB"))
        for i in range(n)
    ]
    return np.stack(images), np.asarray(labels[:n], dtype=np.uint8)


def load_cifar10(
    split: str = "train",
    data_dir: str | os.PathLike | None = None,
    limit: int | None = None,
    cache: bool = True,
    cache_dir: str | os.PathLike | None = None,
) -> ImageDataset:
    """CIFAR-10 from the JPEG-bytes npz (quality 75: compare only against references from the same data).

    The full split is decoded once and cached as a uint8 npz (``limit`` reads decode only the first
    ``limit`` images and are not cached). Images are sorted by class in the file: shuffle before
    taking subsets for training.
    """
    check_split(split)
    src = _cifar_file(resolve_data_dir(data_dir), split)
    images = labels = None
    path = None
    if cache and limit is None:
        path = (
            Path(cache_dir or default_cache_dir())
            / f"cifar10-{split}-v{_CACHE_VERSION}-{file_sha256(src)[:16]}.npz"
        )
        if path.is_file():
            try:
                with np.load(path, allow_pickle=False) as d:
                    images, labels = d["images"], d["labels"]
            except (OSError, ValueError, KeyError) as e:
                warnings.warn(f"ignoring unreadable image cache {path} ({e}); decoding again", stacklevel=2)
    if images is None:
        images, labels = decode_jpeg_npz(src, limit)
        if path is not None:
            try:
                _atomic_save_npz(path, images=images, labels=labels)
            except OSError as e:  # a read-only cache must not stop anything
                warnings.warn(
                    f"could not write image cache {path}: {e} (set IMAGEGEN_CACHE to cache elsewhere)",
                    stacklevel=2,
                )
    tensor = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).contiguous()
    return ImageDataset(
        tensor, torch.from_numpy(labels.astype(np.int64)), CIFAR10_CLASSES, f"cifar10/{split}"
    )


# ---------------------------------------------------------------------------- Fashion-MNIST


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read an IDX file (optionally gzipped): magic 0x0000 <dtype> <ndim>, big-endian dims, then data."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise ValueError(f"{path} is not an IDX file (bad magic)")
    dtypes = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
    code, ndim = data[2], data[3]
    if code not in dtypes:
        raise ValueError(f"{path}: unknown IDX data type 0x{code:02x}")
    dims = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
    dtype = np.dtype(dtypes[code])
    count = int(np.prod(dims)) if dims else 1
    offset = 4 + 4 * ndim
    if len(data) - offset != count * dtype.itemsize:
        raise ValueError(
            f"{path}: expected {count * dtype.itemsize} data bytes for shape {dims}, got {len(data) - offset}"
        )
    return np.frombuffer(data, dtype=dtype, offset=offset).reshape(dims)


def _fashion_files(root: Path, split: str) -> tuple[Path, Path]:
    prefix = "train" if split == "train" else "t10k"
    dirs = [root / "fashion_mnist", root, _DEBIAN_FASHION_MNIST]
    for d in dirs:
        for suffix in (".gz", ""):
            img = d / f"{prefix}-images-idx3-ubyte{suffix}"
            lab = d / f"{prefix}-labels-idx1-ubyte{suffix}"
            if img.is_file() and lab.is_file():
                return img, lab
    raise FileNotFoundError(
        f"Fashion-MNIST {split} files ({prefix}-images-idx3-ubyte.gz, {prefix}-labels-idx1-ubyte.gz) not found in "
        f"{', '.join(str(d) for d in dirs)}"
    )


def load_fashion_mnist(
    split: str = "train", data_dir: str | os.PathLike | None = None, limit: int | None = None
) -> ImageDataset:
    """Fashion-MNIST (lossless, 28 x 28 grayscale): images (N, 1, 28, 28)."""
    check_split(split)
    try:
        root = resolve_data_dir(data_dir)
    except FileNotFoundError:
        if not _DEBIAN_FASHION_MNIST.is_dir():
            raise
        root = _DEBIAN_FASHION_MNIST
    img_path, lab_path = _fashion_files(root, split)
    images, labels = read_idx(img_path), read_idx(lab_path)
    if images.ndim != 3 or labels.shape != (images.shape[0],):
        raise ValueError(f"{img_path}: unexpected shapes {images.shape} / {labels.shape}")
    if limit is not None:
        images, labels = images[:limit], labels[:limit]
    tensor = torch.from_numpy(np.array(images, dtype=np.uint8)).unsqueeze(1)
    return ImageDataset(
        tensor, torch.from_numpy(labels.astype(np.int64)), FASHION_MNIST_CLASSES, f"fashion-mnist/{split}"
    )


# ---------------------------------------------------------------------------- image folders


def _resize_crop(img, size: int):
    """Resize the shorter side to ``size`` (bicubic) and take the centre ``size x size`` crop."""
    from PIL import Image

    w, h = img.size
    scale = size / min(w, h)
    nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
    if (nw, nh) != (w, h):
        img = img.resize((nw, nh), Image.BICUBIC)
    left, top = (nw - size) // 2, (nh - size) // 2
    return img.crop((left, top, left + size, top + size))


_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")


def _to_8bit(img, file_format: str | None = None):
    """Greyscale images of more than 8 bits as 8-bit "L" (PIL's convert would clip, or map everything
    to black):

    * 16-bit ("I;16*", and the "I" mode in which some Pillow versions hold 16-bit PNGs): value / 257;
    * 32-bit integer ("I", e.g. TIFF): 0..255 kept, 0..65535 as 16-bit, anything larger refused;
    * floating point ("F", e.g. TIFF): 0..1 scaled by 255, 0..255 kept, anything else refused.

    A tRNS transparency key (a 16-bit PNG's) is kept as an alpha channel ("LA").
    """
    from PIL import Image

    if img.mode not in (*_SIXTEEN_BIT_MODES, "I", "F"):
        return img
    raw = np.asarray(img)
    arr = raw.astype(np.float64)
    low, high = (float(arr.min()), float(arr.max())) if arr.size else (0.0, 0.0)
    if not (np.isfinite(low) and np.isfinite(high)) or low < 0:
        raise ValueError(f"{img.mode}-mode pixel values from {low:g} to {high:g}: not an image's range")
    if img.mode == "F":
        if high <= 1.0:
            arr = arr * 255.0
        elif high > 255.0:
            raise ValueError(f"floating-point pixel values up to {high:g}: expected 0..1 or 0..255")
    elif img.mode in _SIXTEEN_BIT_MODES or (file_format or img.format) == "PNG" or high > 255.0:
        if high > 65535.0:
            raise ValueError(f"32-bit pixel values up to {high:g}: expected at most 16-bit (65535)")
        arr = arr / 257.0
    grey = Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), "L")
    key = img.info.get("transparency")
    if isinstance(key, int) and not isinstance(key, bool):  # a tRNS grey key: the pixels of that value
        alpha = Image.fromarray(np.where(raw == key, 0, 255).astype(np.uint8), "L")
        grey = Image.merge("LA", (grey, alpha))
    return grey


def _flatten_alpha(img):
    """An image with transparency composited over white: the stored colour of a transparent pixel is
    arbitrary (often black or a leftover), while icons and drawings are meant to be seen on a page."""
    from PIL import Image

    key = img.info.get("transparency")
    if img.mode == "RGB" and isinstance(key, tuple) and max(key) > 255:
        # a 16-bit RGB PNG: Pillow keeps the 16-bit key but gives 8-bit pixels, so no pixel equals the key;
        # the pixels whose 8 high bits match it are taken (within 1/256 of the key colour)
        alpha = ~np.all(np.asarray(img) == np.array([v >> 8 for v in key], dtype=np.uint8), axis=-1)
        img = Image.merge("RGBA", (*img.split(), Image.fromarray(alpha.astype(np.uint8) * 255, "L")))
    elif key is not None:  # a palette entry, or a tRNS colour key of a grey or RGB image
        img = img.convert("RGBA")
    if img.mode not in ("RGBA", "LA", "PA", "RGBa", "La"):
        return img
    rgba = img.convert("RGBA")
    return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")


def _physical_memory() -> int | None:
    """This machine's memory in bytes (None where the system does not say)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return None


def _check_decoded_size(n: int, channels: int, size: int, root: Path) -> None:
    """Refuse, before the first image is decoded, an image size whose decoded images (kept once as a list
    and once stacked) would not fit in this machine's memory: the process would be killed instead."""
    need, have = 2 * n * channels * size * size, _physical_memory()
    if have is not None and need > have:
        raise ValueError(
            f"image size {size}: {n} image(s) of {root} at {channels} x {size} x {size} take "
            f"{need / 2**30:,.1f} GiB decoded, more than this machine's {have / 2**30:,.1f} GiB of memory; "
            "choose a smaller --image-size (or fewer images)"
        )


def load_image_folder(
    folder: str | os.PathLike,
    size: int,
    channels: int = 3,
    split: str | None = None,
    limit: int | None = None,
) -> ImageDataset:
    """Every image under ``folder`` (recursively, sorted), resized and centre-cropped to ``size``.

    Args:
        folder: the folder; ``split='train'`` reads ``folder/train`` if present, else all of ``folder``
            but its ``test/`` subfolder (held-out images never become training data);
            ``split='test'`` needs ``folder/test``.
        size: output height and width.
        channels: 3 (RGB) or 1 (grayscale).
        limit: read at most this many images.

    16-bit greyscale images are scaled to 8 bits (value / 257, rounded), transparent images are
    composited over white, and the EXIF orientation of photos is applied. Hidden files and folders (``.x``, macOS ``._x.png`` resource forks, ``__MACOSX``)
    and symlinks back to the folder or above it are skipped; other files than images are skipped with a
    warning that counts them; unreadable images are refused, all named in one error. Labels come from the first-level subfolders (class folders) when every image lies in one.
    """
    from PIL import Image, ImageOps

    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels}")
    size = check_count(size, "image size")
    if split is not None:
        check_split(split)  # another name would read the whole folder, test images and all
    root = Path(folder).expanduser()
    if root.is_file():
        raise ValueError(f"image folder {root} is a file: give the folder that holds the images")
    held_out = None
    if split is not None and (root / split).is_dir():
        root = root / split
    elif split == "test":
        raise MissingSplitError(f"{root} has no test/ subfolder of held-out images")
    elif split == "train" and (root / "test").is_dir():
        held_out = root / "test"
    if not root.is_dir():
        raise FileNotFoundError(f"image folder not found: {root}")
    files = visible_files_warning_others(root, IMAGE_SUFFIXES, "images", skip_dir=lambda d: d == held_out)
    if limit is not None:
        files = files[:limit]
    if not files:
        kept_out = (
            f" outside its held-out {held_out.name}/ folder (put training images in train/)"
            if held_out
            else ""
        )
        raise FileNotFoundError(f"no images ({', '.join(IMAGE_SUFFIXES)}) found under {root}{kept_out}")
    _check_decoded_size(len(files), channels, size, root)
    mode = "RGB" if channels == 3 else "L"
    arrays, unreadable = [], []
    for p in files:
        try:
            with Image.open(p) as img:
                upright = ImageOps.exif_transpose(img)  # phone photos are stored sideways + EXIF
                flat = _flatten_alpha(_to_8bit(upright, img.format))
                arrays.append(np.asarray(_resize_crop(flat.convert(mode), size)))
        except (
            OSError,
            ValueError,
            SyntaxError,
            Image.DecompressionBombError,
        ) as e:  # truncated, corrupt, huge: all of them are listed at once, not one per run
            reason = str(e).replace(repr(str(p)), "").replace(str(p), "").strip(" :") or type(e).__name__
            unreadable.append(f"{p} ({reason})")
    if unreadable:
        more = f" and {len(unreadable) - 3} more" if len(unreadable) > 3 else ""
        raise ValueError(
            f"{len(unreadable)} of {len(files)} image file(s) under {root} cannot be read: "
            f"{'; '.join(unreadable[:3])}{more}; remove or replace them (or re-save them with an image tool)"
        )
    images = np.stack(arrays)
    images = images[:, None] if channels == 1 else images.transpose(0, 3, 1, 2)
    rel = [p.relative_to(root).parts for p in files]
    labels, names = None, None
    outside = ["/".join(r) for r in rel if len(r) < 2]
    if outside and len(outside) < len(rel):
        warnings.warn(
            f"{len(outside)} image(s) of {root} lie outside a class folder (e.g. {outside[0]}), so no image gets "
            "a class label; move them into a class folder or remove them to train with labels",
            stacklevel=2,
        )
    if all(len(r) >= 2 for r in rel):
        names = tuple(sorted({r[0] for r in rel}))
        index = {n: i for i, n in enumerate(names)}
        labels = torch.tensor([index[r[0]] for r in rel], dtype=torch.long)
    name = f"folder:{root.resolve()}"
    return ImageDataset(torch.from_numpy(np.ascontiguousarray(images)), labels, names, name)


# ---------------------------------------------------------------------------- dispatch


def load_dataset(
    dataset: str,
    split: str = "train",
    data_dir: str | os.PathLike | None = None,
    limit: int | None = None,
    image_size: int | None = None,
    channels: int = 3,
) -> ImageDataset:
    """Load ``dataset`` ('cifar10', 'fashion-mnist' or 'folder') split ``split``.

    For 'folder', ``data_dir`` (or ``$IMAGEGEN_DATA``) is the image folder and ``image_size`` is required.
    """
    if limit is not None:
        limit = check_count(limit, "limit")
    key = dataset.lower().replace("_", "-")
    if key in ("cifar10", "cifar-10"):
        return load_cifar10(split, data_dir, limit)
    if key in ("fashion-mnist", "fashionmnist", "fmnist"):
        return load_fashion_mnist(split, data_dir, limit)
    if key == "folder":
        if image_size is None:
            raise ValueError("an image folder needs an image size (--image-size)")
        return load_image_folder(resolve_data_dir(data_dir), image_size, channels, split, limit)
    raise ValueError(f"unknown dataset {dataset!r}: choose one of {', '.join(DATASETS)}")
