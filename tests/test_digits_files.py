"""MNIST and Fashion-MNIST from their IDX files: the reader, the folders searched, clear errors, class names."""

from __future__ import annotations

import gzip
import os
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from stn_lightning.data import MNISTAddition, MNISTDataModule, MultiMNIST
from stn_lightning.data import digits as digits_module
from stn_lightning.data.digits import (
    CLASS_NAMES,
    DEBIAN_FASHION_MNIST,
    digit_folders,
    digits_available,
    load_digits,
    read_idx,
)

FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
HAVE_DEBIAN = all(
    os.path.isfile(os.path.join(DEBIAN_FASHION_MNIST, name + ".gz")) for pair in FILES.values() for name in pair
)
NEEDS_DEBIAN = pytest.mark.skipif(
    not HAVE_DEBIAN, reason=f"Debian's dataset-fashion-mnist is not installed ({DEBIAN_FASHION_MNIST})"
)


def idx_bytes(values: np.ndarray, code: int = 0x08) -> bytes:
    """An IDX file: two zero bytes, the type code, the number of dimensions, the big-endian sizes, the values."""
    header = struct.pack(">BBBB", 0, 0, code, values.ndim) + struct.pack(f">{values.ndim}I", *values.shape)
    return header + values.astype(np.uint8).tobytes()


def digits_of(split: str) -> tuple[np.ndarray, np.ndarray]:
    # Three images of 28 x 28 and three labels, different per split.
    offset = 0 if split == "train" else 100
    images = (np.arange(3 * 28 * 28).reshape(3, 28, 28) + offset) % 256
    return images.astype(np.uint8), np.array([3, 0, 9] if split == "train" else [1, 1, 7], dtype=np.uint8)


def write_digits(folder: Path, gz: bool) -> Path:
    """The four files of a tiny MNIST-like source in ``folder``, plain or gzipped."""
    folder.mkdir(parents=True, exist_ok=True)
    for split, (image_name, label_name) in FILES.items():
        images, labels = digits_of(split)
        for name, values in ((image_name, images), (label_name, labels)):
            data = idx_bytes(values)
            if gz:
                (folder / (name + ".gz")).write_bytes(gzip.compress(data))
            else:
                (folder / name).write_bytes(data)
    return folder


# ----------------------------------------------------------------------------------------------------------------
# the reader
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("gz", [False, True])
def test_read_idx_plain_and_gzipped(tmp_path: Path, gz: bool) -> None:
    write_digits(tmp_path, gz)
    suffix = ".gz" if gz else ""
    images = read_idx(tmp_path / f"train-images-idx3-ubyte{suffix}")
    labels = read_idx(tmp_path / f"train-labels-idx1-ubyte{suffix}")
    expected_images, expected_labels = digits_of("train")
    assert images.dtype == torch.uint8 and images.shape == (3, 28, 28)
    assert np.array_equal(images.numpy(), expected_images)
    assert labels.shape == (3,) and labels.tolist() == expected_labels.tolist()


def test_truncated_and_corrupt_files_name_the_file(tmp_path: Path) -> None:
    good = idx_bytes(digits_of("train")[0])
    cases = {
        "short": (good[:-10], r"truncated: 2342 bytes of data, but the header's shape \(3, 28, 28\) needs 2352"),
        "long": (good + b"\0", r"corrupt: 2353 bytes of data"),
        "magic": (b"\x08\x03" + good[2:], r"not an IDX file: bad magic number 0x08030803"),
        "empty": (b"", r"not an IDX file: bad magic number 0x"),
        "header": (good[:10], r"truncated: 10 bytes, shorter than the header of 3 dimensions"),
        "code": (idx_bytes(np.zeros(3), code=0x0D), r"IDX type code 0x0d is not supported"),
    }
    for name, (data, message) in cases.items():
        path = tmp_path / name
        path.write_bytes(data)
        with pytest.raises(ValueError, match=message) as info:
            read_idx(path)
        assert str(path) in str(info.value)
    cut = tmp_path / "cut.gz"
    cut.write_bytes(gzip.compress(good)[:-20])
    with pytest.raises(ValueError, match=r"cut\.gz: not a complete gzip file"):
        read_idx(cut)
    plain = tmp_path / "plain.gz"
    plain.write_bytes(good)  # named .gz but not gzipped
    with pytest.raises(ValueError, match=r"plain\.gz: not a complete gzip file"):
        read_idx(plain)


# ----------------------------------------------------------------------------------------------------------------
# the folders searched
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("gz", [False, True])
@pytest.mark.parametrize("layout", ["flat", "torchvision"])
@pytest.mark.parametrize("source, folder", [("mnist", "MNIST"), ("fashion_mnist", "FashionMNIST")])
def test_load_digits_from_either_layout(tmp_path: Path, layout: str, gz: bool, source: str, folder: str) -> None:
    write_digits(tmp_path if layout == "flat" else tmp_path / folder / "raw", gz)
    assert digits_available(source, str(tmp_path))  # type: ignore[arg-type]
    for split in ("train", "test"):
        images, labels = load_digits(split, source, str(tmp_path))  # type: ignore[arg-type]
        expected_images, expected_labels = digits_of(split)
        assert images.dtype == torch.uint8 and labels.dtype == torch.int64
        assert np.array_equal(images.numpy(), expected_images) and labels.tolist() == expected_labels.tolist()


def test_a_data_module_reads_the_files(tmp_path: Path) -> None:
    write_digits(tmp_path, gz=True)
    dm = MNISTDataModule(source="fashion_mnist", root=str(tmp_path), val_size=1, batch_size=2)
    dm.setup("fit")
    assert dm.train_set is not None and dm.val_set is not None
    assert len(dm.train_set) == 2 and len(dm.val_set) == 1


def test_missing_files_say_where_and_how(tmp_path: Path) -> None:
    write_digits(tmp_path, gz=False)
    (tmp_path / "t10k-labels-idx1-ubyte").unlink()
    assert not digits_available("fashion_mnist", str(tmp_path))
    with pytest.raises(FileNotFoundError) as info:
        load_digits("train", "fashion_mnist", str(tmp_path))
    message = str(info.value)
    assert "\n" not in message
    assert f"{tmp_path / 'FashionMNIST' / 'raw'} (no such folder)" in message
    assert f"{tmp_path} (missing t10k-labels-idx1-ubyte)" in message
    assert "--data.init_args.download true" in message and "source='bundled'" in message
    assert "dataset-fashion-mnist" in message and f"--data.init_args.root {DEBIAN_FASHION_MNIST}" in message
    with pytest.raises(FileNotFoundError) as info:
        load_digits("test", "mnist", str(tmp_path))
    assert "dataset-fashion-mnist" not in str(info.value)  # Debian has no MNIST package


def test_bad_contents_are_value_errors(tmp_path: Path) -> None:
    write_digits(tmp_path, gz=False)
    labels = tmp_path / "train-labels-idx1-ubyte"
    labels.write_bytes(idx_bytes(np.array([1, 2], dtype=np.uint8)))
    with pytest.raises(ValueError, match=r"holds 3 images but .*train-labels-idx1-ubyte 2 labels"):
        load_digits("train", "mnist", str(tmp_path))
    labels.write_bytes(idx_bytes(np.array([1, 2, 10], dtype=np.uint8)))
    with pytest.raises(ValueError, match=r"train-labels-idx1-ubyte: expected labels 0\.\.9, found 10"):
        load_digits("train", "mnist", str(tmp_path))
    (tmp_path / "t10k-images-idx3-ubyte").write_bytes(idx_bytes(np.zeros((3, 32, 32), dtype=np.uint8)))
    with pytest.raises(ValueError, match=r"expected images of shape \(N, 28, 28\), got \(3, 32, 32\)"):
        load_digits("test", "mnist", str(tmp_path))


def test_the_default_root_falls_back_to_the_system_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    system = write_digits(tmp_path / "system", gz=True)
    monkeypatch.setattr(digits_module, "_SYSTEM_FOLDERS", {"fashion_mnist": (str(system),)})
    monkeypatch.chdir(tmp_path)  # no ./data here
    assert digit_folders("fashion_mnist") == [os.path.join("data", "FashionMNIST", "raw"), "data", str(system)]
    assert load_digits("test", "fashion_mnist")[1].tolist() == [1, 1, 7]
    # MNIST has no system folder, and a root given otherwise is the only place looked in (but the message says).
    assert not digits_available("mnist")
    with pytest.raises(FileNotFoundError, match=f"pass --data.init_args.root {system} "):
        load_digits("test", "fashion_mnist", str(tmp_path / "elsewhere"))


@NEEDS_DEBIAN
def test_the_debian_package() -> None:
    assert digits_available("fashion_mnist", DEBIAN_FASHION_MNIST)
    images, labels = load_digits("test", "fashion_mnist", DEBIAN_FASHION_MNIST)
    assert images.shape == (10000, 28, 28) and images.dtype == torch.uint8
    assert torch.bincount(labels).tolist() == [1000] * 10
    assert 60 < images.float().mean().item() < 90  # clothes cover more of the image than digits (about 33)


# ----------------------------------------------------------------------------------------------------------------
# class names
# ----------------------------------------------------------------------------------------------------------------
def test_class_names_of_the_data_modules() -> None:
    assert MNISTDataModule().class_names == tuple("0123456789")
    fashion = MNISTDataModule(source="fashion_mnist")
    assert fashion.class_names is not None and len(fashion.class_names) == 10
    assert fashion.class_names[0] == "T-shirt/top" and fashion.class_names[9] == "Ankle boot"
    assert CLASS_NAMES["mnist"] == CLASS_NAMES["bundled"]
    # Labels that are sums of digits have no names.
    assert MNISTAddition().class_names is None and MultiMNIST(2).class_names is None
