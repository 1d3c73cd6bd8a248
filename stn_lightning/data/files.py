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
from typing import Any, Literal

import torch
from PIL import Image
from pytorch_lightning import LightningDataModule
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from .imagefolder import BadImageError

__all__ = [
    "IMAGE_SUFFIXES",
    "GreyTransform",
    "ImageFilesDataModule",
    "ImageFilesDataset",
    "expand_image_paths",
    "grey_transform",
]

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


Resize = Literal["letterbox", "squash"]


class GreyTransform:
    """PIL image -> (1, H, W) float: grey levels in [0, 1] brought to ``size``, normalised by ``mean``/``std``.

    ``resize="letterbox"`` (the default) keeps the image's aspect ratio: it is scaled to fit ``size`` and centred,
    the rest filled with black, the digits' background; ``"squash"`` stretches it to ``size``. :meth:`frame` says
    where the model's pixels lie in the file's.
    """

    def __init__(
        self, size: tuple[int, int], mean: Sequence[float], std: Sequence[float], resize: Resize = "letterbox"
    ) -> None:
        if len(mean) != 1 or len(std) != 1:
            raise ValueError(f"grey images have one channel; got mean {tuple(mean)} and std {tuple(std)}")
        self.size, self.mean, self.std = size, float(mean[0]), float(std[0])
        self.resize = resize

    def _placement(self, width: int, height: int) -> tuple[int, int, int, int]:
        # (w, h) of the resized image and its top-left corner (left, top) in the model's frame.
        mh, mw = self.size
        if self.resize == "squash":
            return mw, mh, 0, 0
        if self.resize != "letterbox":
            raise ValueError(f"expected resize 'letterbox' or 'squash', got {self.resize!r}")
        scale = min(mw / width, mh / height)
        w, h = max(1, min(mw, round(width * scale))), max(1, min(mh, round(height * scale)))
        return w, h, (mw - w) // 2, (mh - h) // 2

    def frame(self, width: int, height: int) -> Tensor:
        """(4,) float64 [ax, bx, ay, by]: a point (x, y) in the model's input pixels is (ax x + bx, ay y + by) in
        the pixels of a ``width`` x ``height`` file (pixel centres at integers, edges at -0.5)."""
        w, h, left, top = self._placement(width, height)
        kx, ky = width / w, height / h
        return torch.tensor([kx, kx * (0.5 - left) - 0.5, ky, ky * (0.5 - top) - 0.5], dtype=torch.float64)

    def __call__(self, image: Image.Image) -> Tensor:
        mh, mw = self.size
        w, h, left, top = self._placement(*image.size)
        grey = image.convert("L").resize((w, h), Image.Resampling.BILINEAR)
        if (w, h) != (mw, mh):
            canvas = Image.new("L", (mw, mh), 0)
            canvas.paste(grey, (left, top))
            grey = canvas
        x = torch.frombuffer(bytearray(grey.tobytes()), dtype=torch.uint8).float().view(1, mh, mw) / 255.0
        return (x - self.mean) / self.std


def grey_transform(
    size: tuple[int, int], mean: Sequence[float], std: Sequence[float], resize: Resize = "letterbox"
) -> GreyTransform:
    """PIL image -> (1, H, W) float, like the digits: grey, brought to ``size`` (letterboxed by default, see
    :class:`GreyTransform`), normalised by ``mean``/``std``."""
    return GreyTransform(size, mean, std, resize)


class ImageFilesDataset(Dataset):
    """Images read from paths and prepared by ``transform``.

    Items are (image (C, H, W), info, path); info holds ``frame`` ((4,): the model's pixels in the file's, see
    :meth:`GreyTransform.frame`; the identity when the transform does not say) and ``error`` (why the file could not
    be read, "" when it was). An unreadable file gives the prepared picture of an empty image and its error, so
    that the other images of its batch are still predicted; with ``stop_on_error`` it raises
    :class:`BadImageError` instead.
    """

    def __init__(
        self, paths: Sequence[str], transform: Callable[[Image.Image], Tensor], stop_on_error: bool = False
    ) -> None:
        self.paths = list(paths)
        self.transform = transform
        self.stop_on_error = stop_on_error

    def __len__(self) -> int:
        return len(self.paths)

    def _frame(self, image: Image.Image) -> Tensor:
        frame = getattr(self.transform, "frame", None)
        return frame(*image.size) if callable(frame) else torch.tensor([1.0, 0.0, 1.0, 0.0], dtype=torch.float64)

    def __getitem__(self, index: int) -> tuple[Tensor, dict[str, Any], str]:
        path = self.paths[index]
        try:
            with open(path, "rb") as f:
                image = Image.open(f)
                image.load()
        except (OSError, SyntaxError, ValueError) as err:
            message = f"cannot read image {path}: {err}"
            if self.stop_on_error:
                raise BadImageError(message) from None
            blank = Image.new("RGB", (64, 64))
            return self.transform(blank), {"frame": self._frame(blank), "error": message}, path
        return self.transform(image), {"frame": self._frame(image), "error": ""}, path


class ImageFilesDataModule(LightningDataModule):
    """A predict-only DataModule over image files; batches are (x (B, C, H, W), info, paths) (see
    :class:`ImageFilesDataset`).

    Args:
        paths: image files, folders or glob patterns.
        transform: PIL image -> normalised tensor (C, H, W), as the training data was prepared.
        batch_size: images per batch.
        num_workers: DataLoader workers.
        class_names: the training data's class names, by label (the prediction file and pictures show them), or
            None.
        resize: for a transform that takes it (:class:`GreyTransform`): "letterbox" keeps the aspect ratio,
            "squash" stretches to the model's size.
        stop_on_error: stop at the first unreadable image instead of reporting every one and predicting the rest.
    """

    def __init__(
        self,
        paths: Sequence[str],
        transform: Callable[[Image.Image], Tensor],
        batch_size: int = 64,
        num_workers: int = 0,
        class_names: Sequence[str] | None = None,
        resize: Resize = "letterbox",
        stop_on_error: bool = False,
    ) -> None:
        super().__init__()
        self.paths = expand_image_paths(paths)
        self.class_names = tuple(class_names) if class_names is not None else None
        self.transform = transform
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.resize = resize
        self.stop_on_error = stop_on_error

    def predict_dataloader(self) -> DataLoader:
        if hasattr(self.transform, "resize"):
            self.transform.resize = self.resize
        return DataLoader(
            ImageFilesDataset(self.paths, self.transform, self.stop_on_error),
            batch_size=self.batch_size,
            num_workers=self.num_workers,
            shuffle=False,
        )

    def state_dict(self) -> dict[str, Any]:
        return {}
