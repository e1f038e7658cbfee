"""Data loaders: IDX parsing (Fashion-MNIST), CIFAR-10 JPEG npz decoding and caching, image folders, tokens."""

from __future__ import annotations

import gzip
import io
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from imagegen.data import (
    ImageDataset,
    images_to_tokens,
    load_cifar10,
    load_dataset,
    load_fashion_mnist,
    load_image_folder,
    read_idx,
    resolve_data_dir,
    tokens_to_images,
)


def write_idx(path: Path, array: np.ndarray, gz: bool = True) -> Path:
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    data = header + array.astype(np.uint8).tobytes()
    if gz:
        with gzip.open(path, "wb") as f:
            f.write(data)
    else:
        path.write_bytes(data)
    return path


def test_read_idx_parses_gzipped_and_plain_files(tmp_path: Path) -> None:
    arr = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    assert np.array_equal(read_idx(write_idx(tmp_path / "a-idx3-ubyte.gz", arr)), arr)
    assert np.array_equal(read_idx(write_idx(tmp_path / "b-idx3-ubyte", arr, gz=False)), arr)
    (tmp_path / "bad").write_bytes(b"\x01\x02\x08\x01\x00\x00\x00\x01\x05")
    with pytest.raises(ValueError, match="magic"):
        read_idx(tmp_path / "bad")
    (tmp_path / "short").write_bytes(struct.pack(">BBBBI", 0, 0, 8, 1, 5) + b"\x00\x01")
    with pytest.raises(ValueError, match="data bytes"):
        read_idx(tmp_path / "short")


def test_fashion_mnist_loader_on_synthetic_idx(tmp_path: Path) -> None:
    root = tmp_path / "fashion_mnist"
    root.mkdir()
    images = np.random.default_rng(0).integers(0, 256, (5, 28, 28), dtype=np.uint8)
    write_idx(root / "t10k-images-idx3-ubyte.gz", images)
    write_idx(root / "t10k-labels-idx1-ubyte.gz", np.array([0, 1, 2, 9, 4], dtype=np.uint8))
    ds = load_fashion_mnist("test", tmp_path, limit=4)
    assert ds.images.shape == (4, 1, 28, 28) and ds.images.dtype == torch.uint8
    assert np.array_equal(ds.images[:, 0].numpy(), images[:4])
    assert ds.labels.tolist() == [0, 1, 2, 9] and ds.class_names[9] == "Ankle boot"
    with pytest.raises(FileNotFoundError, match="train"):
        load_fashion_mnist("train", tmp_path / "nowhere")


def _jpeg_npz(path: Path, colors: list[tuple[int, int, int]], labels: list[int]) -> list[np.ndarray]:
    """Write a CIFAR-style npz of JPEG bytes; returns PIL's own decoding of each JPEG."""
    blobs, arrays = [], []
    for c in colors:
        arr = np.zeros((32, 32, 3), dtype=np.uint8) + np.array(c, dtype=np.uint8)
        arr[8:24, 8:24] = 255 - arr[8:24, 8:24]
        buf = io.BytesIO()
        Image.fromarray(arr).save(buf, format="JPEG", quality=75)
        blobs.append(np.frombuffer(buf.getvalue(), dtype=np.uint8))
        arrays.append(np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB")))
    offsets = np.concatenate([[0], np.cumsum([len(b) for b in blobs])]).astype(np.int64)
    np.savez(
        path,
        jpeg=np.concatenate(blobs),
        offsets=offsets,
        y=np.array(labels, dtype=np.uint8),
        paths=np.array([f"img{i}.jpg" for i in range(len(blobs))]),
    )
    return arrays


def test_cifar_jpeg_npz_decodes_and_caches(tmp_path: Path) -> None:
    root = tmp_path / "cifar10_jpeg"
    root.mkdir()
    decoded_by_pil = _jpeg_npz(
        root / "cifar10_jpegbytes_test.npz", [(200, 30, 30), (20, 180, 60), (40, 40, 220)], [0, 5, 9]
    )
    cache = tmp_path / "cache"
    ds = load_cifar10("test", tmp_path, cache_dir=cache)
    assert ds.images.shape == (3, 3, 32, 32) and ds.labels.tolist() == [0, 5, 9]
    assert np.array_equal(ds.images.permute(0, 2, 3, 1).numpy(), np.stack(decoded_by_pil))
    cached = list(cache.glob("cifar10-test-*.npz"))
    assert len(cached) == 1
    again = load_cifar10("test", tmp_path, cache_dir=cache)
    assert torch.equal(again.images, ds.images)
    limited = load_cifar10("test", tmp_path, limit=2, cache_dir=tmp_path / "other")
    assert len(limited) == 2 and not (tmp_path / "other").exists()


def test_image_folder_resizes_crops_and_labels_by_subfolder(tmp_path: Path) -> None:
    for split, n in (("train", 3), ("test", 2)):
        for cls in ("cats", "dogs"):
            d = tmp_path / split / cls
            d.mkdir(parents=True)
            for i in range(n):
                Image.new("RGB", (40 + 10 * i, 20), (10 * i, 100, 200)).save(d / f"{i}.png")
    ds = load_image_folder(tmp_path, size=16, split="train")
    assert ds.images.shape == (6, 3, 16, 16) and ds.class_names == ("cats", "dogs")
    assert ds.labels.tolist() == [0, 0, 0, 1, 1, 1]
    test = load_dataset("folder", "test", tmp_path, image_size=8, channels=1)
    assert test.images.shape == (4, 1, 8, 8)
    flat = tmp_path / "train" / "cats"
    unlabelled = load_image_folder(flat, size=12)
    assert unlabelled.labels is None and len(unlabelled) == 3
    with pytest.raises(FileNotFoundError, match="test"):
        load_image_folder(flat, size=12, split="test")
    with pytest.raises(ValueError, match="image size"):
        load_dataset("folder", "train", tmp_path)


def test_image_folder_of_unseen_shapes(tmp_path: Path) -> None:
    """Class folders beside a test/ folder (no train/), Mac resource forks, hidden folders, numeric class
    names, and a phone photo stored sideways with an EXIF orientation."""
    from imagegen.generate import resolve_labels

    root = tmp_path / "data"
    for cls in ("1", "2", "10", "test/1", "test/2", "test/10"):
        (root / cls).mkdir(parents=True)
        Image.new("L", (8, 8), 50).save(root / cls / "a.png")
    (root / "1" / "._a.png").write_bytes(b"\x00\x05\x16\x07 resource fork")  # AppleDouble
    (root / ".thumbs").mkdir()
    (root / ".thumbs" / "x.png").write_bytes(b"not an image")
    train = load_image_folder(root, size=8, channels=1, split="train")
    assert len(train) == 3 and train.class_names == ("1", "10", "2")  # test/ is held out, not a class
    assert len(load_image_folder(root, size=8, channels=1, split="test")) == 3
    names = list(train.class_names)
    assert names[int(resolve_labels("2", 1, 3, names)[0])] == "2"  # a name wins over an index
    assert names[int(resolve_labels("10", 1, 3, names)[0])] == "10"
    assert int(resolve_labels("0", 1, 3, ["a", "b", "c"])[0]) == 0  # no such name: an index

    photo = tmp_path / "photo"
    photo.mkdir()
    img = Image.new("L", (8, 4), 0)
    img.paste(255, (0, 0, 8, 2))  # top half white as stored
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    img.save(photo / "p.jpg", exif=exif, quality=100)
    upright = load_image_folder(photo, size=4, channels=1).images[0, 0].float()
    assert upright[:, :2].mean() < 60 and upright[:, 2:].mean() > 190  # shown: left black, right white
    with pytest.raises(ValueError, match="is a file"):
        load_image_folder(photo / "p.jpg", size=4)


def test_transparent_pixels_are_composited_over_white(tmp_path: Path) -> None:
    """A transparent pixel's stored colour is arbitrary: an icon reads as drawn on white, whatever its
    mode (RGBA, grey + alpha, palette with a transparent index)."""
    folder = tmp_path / "icons"
    folder.mkdir()
    icon = Image.new("RGBA", (4, 4), (255, 0, 0, 0))  # invisible red
    icon.paste((0, 0, 255, 255), (0, 0, 2, 4))  # opaque blue left half
    icon.putpixel((3, 0), (0, 0, 0, 128))  # half-transparent black
    icon.save(folder / "a.png")
    Image.new("LA", (4, 4), (0, 0)).save(folder / "b.png")  # fully transparent black
    palette = Image.new("P", (4, 4), 1)
    palette.putpalette([0, 255, 0, 10, 10, 10] + [0] * 762)
    palette.save(folder / "c.png", transparency=1)  # index 1 (near black) is transparent
    images = load_image_folder(folder, size=4, channels=3).images
    a, b, c = images[0], images[1], images[2]
    assert a[:, :, :2].tolist() == [[[0, 0]] * 4, [[0, 0]] * 4, [[255, 255]] * 4]  # blue stays
    assert (a[:, 1:, 2:] == 255).all() and a[:, 0, 2].tolist() == [255, 255, 255]  # white, not red
    assert abs(int(a[0, 0, 3]) - 127) <= 1 and int(a[0, 0, 3]) == int(a[2, 0, 3])  # half black on white
    assert (b == 255).all() and (c == 255).all()
    grey = load_image_folder(folder, size=4, channels=1).images
    assert (grey[1] == 255).all() and (grey[0, 0, 1:, 2:] == 255).all()


def test_a_trns_colour_key_is_transparency_too(tmp_path: Path) -> None:
    """Grey, RGB and 16-bit grey PNGs can mark one colour transparent (tRNS) instead of an alpha channel:
    those pixels are white too, the others keep their value."""
    folder = tmp_path / "keyed"
    folder.mkdir()
    Image.new("L", (4, 4), 0).save(folder / "a.png", transparency=0)
    Image.new("RGB", (4, 4), (0, 0, 0)).save(folder / "b.png", transparency=(0, 0, 0))
    deep = Image.new("I;16", (4, 4), 0)
    deep.putpixel((0, 0), 25700)  # 100 in 8 bits, opaque
    deep.save(folder / "c.png", transparency=0)
    Image.new("L", (4, 4), 0).save(folder / "d.png")  # no key: black stays black
    a, b, c, d = load_image_folder(folder, size=4, channels=1).images
    assert (a == 255).all() and (b == 255).all() and (d == 0).all()
    assert int(c[0, 0, 0]) == 100 and (c.flatten()[1:] == 255).all()
    # a 16-bit RGB PNG (written by hand: Pillow writes none), its key a 16-bit colour that Pillow keeps while
    # it gives 8-bit pixels
    from imagegen.data import _flatten_alpha

    png = _rgb16_png([[(0x1234, 0x5678, 0x9ABC), (0xFFFF, 0, 0)]], (0x1234, 0x5678, 0x9ABC))
    with Image.open(io.BytesIO(png)) as keyed:
        assert np.asarray(_flatten_alpha(keyed)).tolist() == [[[255, 255, 255], [255, 0, 0]]]


def _rgb16_png(rows: list[list[tuple[int, int, int]]], key: tuple[int, int, int]) -> bytes:
    """A 16-bit RGB PNG with a tRNS colour key, chunk by chunk."""
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data))
            + kind
            + data
            + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
        )

    raw = b"".join(b"\x00" + b"".join(struct.pack(">HHH", *p) for p in row) for row in rows)
    header = struct.pack(">IIBBBBB", len(rows[0]), len(rows), 16, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"tRNS", struct.pack(">HHH", *key))
        + chunk(b"IDAT", zlib.compress(raw))
        + chunk(b"IEND", b"")
    )


def test_tokens_round_trip_and_dataset_helpers(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    images = torch.randint(0, 256, (4, 3, 2, 2), dtype=torch.uint8)
    tokens = images_to_tokens(images)
    assert tokens.shape == (4, 12) and tokens.dtype == torch.long
    assert tokens[0, 4] == images[0, 1, 0, 0]  # (channel, row, column) order
    assert torch.equal(tokens_to_images(tokens, (3, 2, 2)), images)
    with pytest.raises(ValueError, match="mask"):
        tokens_to_images(torch.full((1, 12), 256), (3, 2, 2))
    ds = ImageDataset(images, torch.arange(4), ("a", "b", "c", "d"), "x")
    sub = ds.random_subset(2, seed=1)
    assert len(sub) == 2 and sub.num_classes == 4 and ds.random_subset(10) is ds
    monkeypatch.setenv("IMAGEGEN_DATA", str(tmp_path))
    assert resolve_data_dir() == tmp_path
    monkeypatch.delenv("IMAGEGEN_DATA")
    with pytest.raises(FileNotFoundError, match="IMAGEGEN_DATA"):
        resolve_data_dir()
    with pytest.raises(ValueError, match="unknown dataset"):
        load_dataset("mnist", "train", tmp_path)


def test_real_shared_data_when_present(shared_data_dir: Path, tmp_path: Path) -> None:
    images = shared_data_dir / "images"
    if not images.is_dir():
        pytest.skip(f"{images} not found")
    cifar = load_cifar10("test", images, limit=4, cache=False)
    assert cifar.images.shape == (4, 3, 32, 32) and cifar.labels.tolist() == [0, 0, 0, 0]
    fm = load_fashion_mnist("test", images, limit=3)
    assert fm.images.shape == (3, 1, 28, 28) and int(fm.images.max()) > 0


def test_float_and_32_bit_tiffs_keep_their_brightness_and_huge_images_are_named(tmp_path: Path) -> None:
    import numpy as np

    folder = tmp_path / "tiffs"
    folder.mkdir()
    Image.fromarray(np.full((4, 4), 0.5, dtype=np.float32), "F").save(folder / "a_float01.tif")
    Image.fromarray(np.full((4, 4), 128, dtype=np.int32), "I").save(folder / "b_int8range.tif")
    Image.fromarray(np.full((4, 4), 51400, dtype=np.int32), "I").save(folder / "c_int16range.tif")
    images = load_image_folder(folder, size=4, channels=1).images[:, 0]
    assert [int(im.float().mean()) for im in images] == [128, 128, 200]  # not all black
    Image.fromarray(np.full((4, 4), 300.0, dtype=np.float32), "F").save(folder / "d_bad.tif")
    with pytest.raises(ValueError, match=r"d_bad.tif.*expected 0..1 or 0..255"):
        load_image_folder(folder, size=4, channels=1)

    huge = tmp_path / "huge"
    huge.mkdir()
    Image.new("1", (20000, 10000)).save(huge / "scan.png")  # 200 megapixels in a few kB
    with pytest.raises(ValueError, match=r"scan.png.*exceeds limit"):
        load_image_folder(huge, size=4, channels=1)


def test_a_stray_image_beside_class_folders_is_named(tmp_path: Path) -> None:
    for cls in ("cat", "dog"):
        (tmp_path / cls).mkdir()
        Image.new("L", (4, 4), 50).save(tmp_path / cls / "a.png")
    Image.new("L", (4, 4), 50).save(tmp_path / "stray.png")
    with pytest.warns(UserWarning, match=r"1 image\(s\) of .* lie outside a class folder \(e.g. stray.png\)"):
        data = load_image_folder(tmp_path, size=4, channels=1)
    assert data.labels is None


def test_a_symlink_back_up_the_tree_does_not_read_the_folders_beside_it(tmp_path: Path) -> None:
    """data/a/up -> ../.. is a loop: following it once would read every image folder beside data/."""
    data = tmp_path / "data"
    for cls in ("a", "b"):
        (data / cls).mkdir(parents=True)
        Image.new("L", (4, 4), 50).save(data / cls / "x.png")
    (tmp_path / "other" / "c").mkdir(parents=True)
    Image.new("L", (4, 4), 200).save(tmp_path / "other" / "c" / "theirs.png")
    (data / "a" / "up").symlink_to("../..")
    (data / "b" / "root").symlink_to("..")
    ds = load_image_folder(data, 4, channels=1)
    assert len(ds) == 2 and ds.class_names == ("a", "b") and int(ds.images.max()) == 50


def test_a_folder_with_only_test_images_says_they_are_held_out(tmp_path: Path) -> None:
    """Training on a folder whose images are all in test/ said only "no images found", which looked false."""
    data = tmp_path / "data"
    (data / "test").mkdir(parents=True)
    Image.new("L", (4, 4), 50).save(data / "test" / "x.png")
    with pytest.raises(
        FileNotFoundError, match=r"outside its held-out test/ folder \(put training images in train/\)"
    ):
        load_image_folder(data, 4, channels=1, split="train")
