"""Predicting on a user's own images: files, folders or globs, prepared the way the training data was.

``stn-train predict --ckpt_path P --images "photos/*.jpg"`` builds an :class:`ImageFilesDataModule` from the
training DataModule's :meth:`image_transform` (the digits' grey levels, size and normalisation, or timm's
evaluation transform for class folders), so the model sees what it was trained on.
"""

from __future__ import annotations

import glob
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from pytorch_lightning import LightningDataModule
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from .imagefolder import BadImageError

__all__ = ["IMAGE_SUFFIXES", "ImageFilesDataModule", "ImageFilesDataset", "expand_image_paths", "grey_transform"]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")


def expand_image_paths(specs: Sequence[str]) -> list[str]:
    """Image files from files, folders (their images, sorted) and glob patterns; ValueError if none or a miss."""
    paths: list[str] = []
    for spec in specs:
        if any(c in spec for c in "*?["):
            found = sorted(glob.glob(spec, recursive=True))
            matched = [p for p in found if os.path.isfile(p) and p.lower().endswith(IMAGE_SUFFIXES)]
            if not matched:
                raise ValueError(f"--images {spec!r}: the pattern matches no image file")
            paths += matched
        elif os.path.isdir(spec):
            matched = sorted(
                str(p) for p in Path(spec).rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
            )
            if not matched:
                raise ValueError(f"--images {spec!r}: the folder holds no image file ({', '.join(IMAGE_SUFFIXES)})")
            paths += matched
        elif os.path.isfile(spec):
            paths.append(spec)
        else:
            raise ValueError(f"--images {spec!r}: no such file, folder or pattern")
    return paths


def grey_transform(
    size: tuple[int, int], mean: Sequence[float], std: Sequence[float]
) -> Callable[[Image.Image], Tensor]:
    """PIL image -> (1, H, W) float: grey levels in [0, 1], resized to ``size``, normalised by ``mean``/``std``."""
    if len(mean) != 1 or len(std) != 1:
        raise ValueError(f"grey images have one channel; got mean {tuple(mean)} and std {tuple(std)}")
    h, w = size

    def transform(image: Image.Image) -> Tensor:
        grey = image.convert("L").resize((w, h), Image.Resampling.BILINEAR)
        x = torch.frombuffer(bytearray(grey.tobytes()), dtype=torch.uint8).float().view(1, h, w) / 255.0
        return (x - mean[0]) / std[0]

    return transform


class ImageFilesDataset(Dataset):
    """Images read from paths and prepared by ``transform``; items are (image (C, H, W), path)."""

    def __init__(self, paths: Sequence[str], transform: Callable[[Image.Image], Tensor]) -> None:
        self.paths = list(paths)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[Tensor, str]:
        path = self.paths[index]
        try:
            with open(path, "rb") as f:
                image = Image.open(f)
                image.load()
        except (OSError, SyntaxError, ValueError) as err:
            raise BadImageError(f"cannot read image {path}: {err}") from None
        return self.transform(image), path


class ImageFilesDataModule(LightningDataModule):
    """A predict-only DataModule over image files; batches are (x (B, C, H, W), paths).

    Args:
        paths: image files, folders or glob patterns.
        transform: PIL image -> normalised tensor (C, H, W), as the training data was prepared.
        batch_size: images per batch.
        num_workers: DataLoader workers.
        class_names: the training data's class names, by label (the prediction file and pictures show them), or
            None.
    """

    def __init__(
        self,
        paths: Sequence[str],
        transform: Callable[[Image.Image], Tensor],
        batch_size: int = 64,
        num_workers: int = 0,
        class_names: Sequence[str] | None = None,
    ) -> None:
        super().__init__()
        self.paths = expand_image_paths(paths)
        self.class_names = tuple(class_names) if class_names is not None else None
        self.transform = transform
        self.batch_size = batch_size
        self.num_workers = num_workers

    def predict_dataloader(self) -> DataLoader:
        return DataLoader(
            ImageFilesDataset(self.paths, self.transform),
            batch_size=self.batch_size,
            num_workers=self.num_workers,
            shuffle=False,
        )

    def state_dict(self) -> dict[str, Any]:
        return {}
