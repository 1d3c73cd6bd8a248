"""A DataModule for photographs arranged as class folders (CUB-200-2011 and the like), with timm's transforms.

Expected layout::

    root/train/<class>/*.jpg
    root/test/<class>/*.jpg      (and/or root/val/<class>/*.jpg)

:func:`arrange_cub200` turns the official CUB-200-2011 archive (``images/``, ``images.txt``,
``train_test_split.txt``) into it.
"""

from __future__ import annotations

import os
import shutil
from typing import Any, Literal

import timm
import torch
from PIL import Image
from pytorch_lightning import LightningDataModule
from timm.data import create_transform, resolve_data_config
from torchvision import transforms
from torchvision.datasets import ImageFolder

from .sampling import SplitLoaders

__all__ = ["BadImageError", "ImageFolderDataModule", "arrange_cub200", "load_rgb"]


def _layout_message(root: str, problem: str) -> str:
    return (
        f"{problem}. ImageFolderDataModule expects the images arranged as class folders: "
        f"{os.path.join(root, 'train', '<class>', '*.jpg')} and {os.path.join(root, 'test', '<class>', '*.jpg')} "
        f"(a 'val' folder is accepted too; the same class folder names in every split). "
        f"For CUB-200-2011, extract CUB_200_2011.tgz and run "
        f"`python -c \"from stn_lightning.data import arrange_cub200; arrange_cub200('CUB_200_2011', {root!r})\"`, "
        f"which splits images/ with images.txt and train_test_split.txt into that layout."
    )


class BadImageError(ValueError):
    """An image file that cannot be decoded (truncated, empty, not an image)."""


def load_rgb(path: str) -> Image.Image:
    """Decode an image file to RGB, or raise :class:`BadImageError` naming the file."""
    try:
        with open(path, "rb") as f:
            image = Image.open(f)
            return image.convert("RGB")  # convert() decodes every pixel: truncated files fail here, not later
    except (OSError, SyntaxError, ValueError) as err:  # PIL's UnidentifiedImageError is an OSError
        raise BadImageError(f"cannot read image {path}: {err}") from None


class _ClassListImageFolder(ImageFolder):
    """An ImageFolder whose classes are given (those of the training split), so indices agree across splits."""

    def __init__(self, root: str, classes: list[str], transform: Any, allow_empty: bool) -> None:
        self._given_classes = classes
        super().__init__(root, transform=transform, allow_empty=allow_empty, loader=load_rgb)

    def find_classes(self, directory: str) -> tuple[list[str], dict[str, int]]:  # type: ignore[override]
        return list(self._given_classes), {name: i for i, name in enumerate(self._given_classes)}


def _class_folders(path: str) -> list[str]:
    return sorted(entry.name for entry in os.scandir(path) if entry.is_dir() and not entry.name.startswith("."))


class FramedEvaluation:
    """A user's image through timm's evaluation transform, RGB first, and :meth:`frame`: where the model's input
    pixels lie in the file's, so that predicted regions can be written in the file's pixels.

    The frame follows the transform's geometric steps, torchvision's ``Resize`` (the shorter side to a size, or both
    sides) and ``CenterCrop``: timm's "center" and "squash" crop modes. Another geometric step (timm's "border"
    mode pads) has no frame here, and :meth:`frame` is None for it: regions stay in the model's pixels.
    """

    def __init__(self, evaluation: Any) -> None:
        self.evaluation = evaluation
        steps = list(getattr(evaluation, "transforms", []))
        geometric = [t for t in steps if any(w in type(t).__name__ for w in ("Resize", "Crop", "Pad", "Trim"))]
        if not all(isinstance(t, (transforms.Resize, transforms.CenterCrop)) for t in geometric):
            self.frame = None  # type: ignore[assignment]
        self.steps = geometric

    def __call__(self, image: Image.Image) -> Any:
        return self.evaluation(image.convert("RGB"))

    def frame(self, width: int, height: int) -> torch.Tensor:
        """(4,) float64 [ax, bx, ay, by]: a point (x, y) in the model's input pixels is (ax x + bx, ay y + by) in
        the pixels of a ``width`` x ``height`` file (pixel centres at integers), as GreyTransform's frame."""
        w, h = float(width), float(height)  # the image's size after the steps so far
        kx, ox, ky, oy = 1.0, 0.0, 1.0, 0.0  # its pixel (x, y) is the file's (kx x + ox, ky y + oy)
        for step in self.steps:
            if isinstance(step, transforms.Resize):
                size = step.size if isinstance(step.size, (list, tuple)) else [step.size]
                if len(size) == 1:  # the shorter side to size[0], the longer in proportion (torchvision's rule)
                    short, long = (w, h) if w <= h else (h, w)
                    new_short, new_long = size[0], int(size[0] * long / short)
                    nw, nh = (new_short, new_long) if w <= h else (new_long, new_short)
                else:
                    nh, nw = size[0], size[1]
                sx, sy = w / nw, h / nh  # a resized pixel centre x maps to (x + 0.5) * sx - 0.5 before it
                kx, ox = kx * sx, kx * (0.5 * sx - 0.5) + ox
                ky, oy = ky * sy, ky * (0.5 * sy - 0.5) + oy
                w, h = float(nw), float(nh)
            else:  # CenterCrop: torchvision's offsets
                size = step.size if isinstance(step.size, (list, tuple)) else [step.size, step.size]
                ch, cw = (size[0], size[0]) if len(size) == 1 else (size[0], size[1])
                top, left = int(round((h - ch) / 2.0)), int(round((w - cw) / 2.0))
                ox, oy = ox + kx * left, oy + ky * top
                w, h = float(cw), float(ch)
        return torch.tensor([kx, ox, ky, oy], dtype=torch.float64)


class ImageFolderDataModule(SplitLoaders, LightningDataModule):
    """Photographs in class folders, transformed for a timm backbone.

    Mean, std, interpolation and crop fraction come from timm's pretrained configuration of ``backbone`` (no
    weights are loaded); ``input_size`` overrides its input size (the paper uses 448 for CUB-200-2011). Training
    images go through timm's training transform (random resized crop with ``train_scale``, horizontal flip, colour
    jitter), the others through its evaluation transform (resize, centre crop).

    Batches are ``(x, y)``: x float32 (B, 3, S, S), normalised; y int64 (B,) in ``range(num_classes)``.

    Args:
        root: folder holding ``train/`` and ``test/`` and/or ``val/``, each with one sub-folder per class.
        num_classes: number of class folders expected (200 for CUB-200-2011); checked in ``setup``.
        backbone: timm model name whose data configuration is used, e.g. "resnet50" or "resnet50.a1_in1k".
        input_size: side S of the square input; None for the backbone's default. (Named as in timm, and
            not image_size, so that it never clashes with the (S, S) ``image_size`` the model receives.)
        batch_size: images per batch.
        num_workers: DataLoader workers (JPEG decoding needs several).
        val_split: folder of the validation set; None for "val" if it exists, else "test".
        test_split: folder of the test set; None for "test" if it exists, else "val".
        train_scale: area fraction range of the training random resized crop.
        color_jitter: strength of the training colour jitter (0 to disable).

    Attributes:
        num_classes, in_chans (3), image_size (S, S), mean, std, background (0.0: the mean colour after
        normalisation), data_config (timm's resolved data configuration), class_names (the class folders' names,
        in label order).
    """

    def __init__(
        self,
        root: str,
        num_classes: int,
        backbone: str = "resnet50",
        input_size: int | None = None,
        batch_size: int = 32,
        num_workers: int = 4,
        val_split: str | None = None,
        test_split: str | None = None,
        train_scale: tuple[float, float] = (0.25, 1.0),
        color_jitter: float = 0.4,
    ) -> None:
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"expected num_classes >= 1, got {num_classes}")
        if input_size is not None and input_size < 1:
            raise ValueError(f"expected input_size >= 1 or None, got {input_size}")
        if batch_size < 1:
            raise ValueError(f"expected batch_size >= 1, got {batch_size}")
        if not timm.is_model(backbone):
            raise ValueError(f"expected a timm model name (see timm.list_models()), got backbone={backbone!r}")
        self.save_hyperparameters()
        self.root = root
        self.num_classes = num_classes
        self.backbone = backbone
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.val_split = val_split
        self.test_split = test_split
        self.train_scale = (float(train_scale[0]), float(train_scale[1]))
        self.color_jitter = color_jitter
        pretrained = timm.get_pretrained_cfg(backbone)
        args = {"input_size": (3, input_size, input_size)} if input_size is not None else {}
        self.data_config: dict[str, Any] = resolve_data_config(
            args=args, pretrained_cfg=pretrained.to_dict() if pretrained is not None else {}
        )
        height, width = self.data_config["input_size"][1:]
        self.in_chans = 3
        self.image_size: tuple[int, int] = (int(height), int(width))
        self.mean: tuple[float, ...] = tuple(float(m) for m in self.data_config["mean"])
        self.std: tuple[float, ...] = tuple(float(s) for s in self.data_config["std"])
        self.background = 0.0
        self.classes: list[str] | None = None
        self.train_set: ImageFolder | None = None
        self.val_set: ImageFolder | None = None
        self.test_set: ImageFolder | None = None

    @property
    def class_names(self) -> tuple[str, ...] | None:
        """The class folders' names in label order (those of ``root/train``, sorted), or None while they are not
        known: before ``setup`` they are listed when ``root/train`` holds ``num_classes`` class folders."""
        if self.classes is not None:
            return tuple(self.classes)
        train = os.path.join(self.root, "train")
        classes = _class_folders(train) if os.path.isdir(train) else []
        return tuple(classes) if len(classes) == self.num_classes else None

    def transform(self, train: bool) -> Any:
        """timm's training (``train=True``) or evaluation transform: PIL image -> float tensor (3, S, S)."""
        config = self.data_config
        common = {
            "input_size": config["input_size"],
            "interpolation": config["interpolation"],
            "mean": config["mean"],
            "std": config["std"],
        }
        if train:
            return create_transform(**common, is_training=True, scale=self.train_scale, color_jitter=self.color_jitter)
        return create_transform(
            **common, is_training=False, crop_pct=config.get("crop_pct"), crop_mode=config.get("crop_mode")
        )

    def image_transform(self) -> Any:
        """How a user's own image becomes an input: RGB, then timm's evaluation transform (with its ``frame``: where
        the model's pixels lie in the file's)."""
        return FramedEvaluation(self.transform(train=False))

    def _split_folder(self, name: str | None, preferred: str, fallback: str) -> str:
        if name is not None:
            path = os.path.join(self.root, name)
            if not os.path.isdir(path):
                raise FileNotFoundError(_layout_message(self.root, f"the split folder {path} does not exist"))
            return path
        for candidate in (preferred, fallback):
            path = os.path.join(self.root, candidate)
            if os.path.isdir(path):
                return path
        raise FileNotFoundError(
            _layout_message(self.root, f"neither {os.path.join(self.root, preferred)} nor {fallback}/ exists")
        )

    def _check_layout(self) -> list[str]:
        train = os.path.join(self.root, "train")
        if not os.path.isdir(self.root):
            raise FileNotFoundError(_layout_message(self.root, f"the folder {self.root} does not exist"))
        if not os.path.isdir(train):
            raise FileNotFoundError(_layout_message(self.root, f"the training folder {train} does not exist"))
        classes = _class_folders(train)
        if not classes:
            raise FileNotFoundError(_layout_message(self.root, f"{train} holds no class folders"))
        if len(classes) != self.num_classes:
            raise ValueError(
                f"expected {self.num_classes} class folders (num_classes) in {train}, got {len(classes)}; "
                f"set num_classes to {len(classes)} or fix the folder"
            )
        return classes

    def _eval_set(self, path: str, classes: list[str]) -> ImageFolder:
        unknown = sorted(set(_class_folders(path)) - set(classes))
        if unknown:
            raise ValueError(f"expected the class folders of {path} among those of train/, got unknown {unknown[:5]}")
        return _ClassListImageFolder(path, classes, self.transform(train=False), allow_empty=True)

    def setup(self, stage: str | None = None) -> None:
        """Check the layout and build the datasets of ``stage``.

        Raises:
            FileNotFoundError: when a folder is missing or holds no class folders; the message gives the layout.
            ValueError: when the number of class folders differs from ``num_classes``.
        """
        classes = self._check_layout()
        self.classes = classes
        if stage in (None, "fit"):
            self.train_set = _ClassListImageFolder(
                os.path.join(self.root, "train"), classes, self.transform(train=True), allow_empty=False
            )
        if stage in (None, "fit", "validate"):
            self.val_set = self._eval_set(self._split_folder(self.val_split, "val", "test"), classes)
        if stage in (None, "test", "predict"):
            self.test_set = self._eval_set(self._split_folder(self.test_split, "test", "val"), classes)


def arrange_cub200(cub_root: str, root: str, mode: Literal["symlink", "copy"] = "symlink") -> None:
    """Arrange an extracted CUB-200-2011 as ``root/train/<class>/`` and ``root/test/<class>/`` (5,994 / 5,794).

    Args:
        cub_root: the extracted ``CUB_200_2011`` folder, holding ``images/``, ``images.txt`` and
            ``train_test_split.txt``.
        root: where to build the layout (created if needed).
        mode: symlink the images (no extra space) or copy them.
    """
    if mode not in ("symlink", "copy"):
        raise ValueError(f"expected mode in ('symlink', 'copy'), got {mode!r}")
    needed = [os.path.join(cub_root, name) for name in ("images", "images.txt", "train_test_split.txt")]
    missing = [path for path in needed if not os.path.exists(path)]
    if missing:
        raise FileNotFoundError(f"expected an extracted CUB_200_2011 folder, missing {missing}")
    with open(needed[1]) as f:
        paths = dict(line.split(maxsplit=1) for line in f if line.strip())
    with open(needed[2]) as f:
        is_train = dict(line.split() for line in f if line.strip())
    for image_id, relative in paths.items():
        relative = relative.strip()
        split = "train" if is_train[image_id] == "1" else "test"
        source = os.path.abspath(os.path.join(cub_root, "images", relative))
        target = os.path.join(root, split, relative)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        if os.path.lexists(target):
            continue
        if mode == "symlink":
            os.symlink(source, target)
        else:
            shutil.copy2(source, target)
