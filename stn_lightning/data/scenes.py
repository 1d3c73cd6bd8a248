"""Scenes of a varying number of digits anywhere in a canvas, each at its own size and angle: a set to read.

The multi-digit DataModules of :mod:`stn_lightning.data.mnist` place exactly D unscaled digits in the cells of a
fixed grid, the scenes that K = D parallel transformers are built for. :class:`DigitScenes` draws what a user's images
look like instead: between ``min_digits`` and ``max_digits`` digits (0 allowed) at free positions, each with its own
scale and rotation, their boxes overlapping little, optionally on clutter. The label is the multiset of the digits
(:class:`~stn_lightning.tasks.SetOfObjects` reads it); every digit's box is known.

Layout of a sample, in canvas pixels:

* the number of digits n is uniform in ``min_digits`` .. ``max_digits``; the first n of the sample's
  ``max_digits`` digits are drawn, the others are not;
* digit i is rotated by an angle uniform in [-max_angle, max_angle] degrees and scaled by s_i uniform in
  ``scale_range`` (its 28 x 28 box becomes 28 s_i pixels wide: ink about 20 s_i pixels tall);
* the digits are placed one after another, each at a position drawn uniformly among those that keep its ink box
  (the axis-aligned box around its rotated ink) inside the canvas. ``candidates`` positions are drawn at once for
  every sample of the batch, and each sample keeps the first one whose box overlaps every box placed before it by
  at most ``max_overlap`` of the smaller of the two boxes' areas; a sample with no such candidate keeps the one of
  least overlap (so the batch never waits for a crowded sample: its digits overlap a little more, rarely).

The placement runs batched on the batch's device, one step per digit slot (no loop over samples).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from . import distortions as dist
from .digits import CLASS_NAMES
from .mnist import DigitsDataModule, drawn_boxes, drawn_labels, stored_counts

__all__ = ["DigitScenes", "box_overlap"]

# Positions drawn per digit and sample in one round of the placement.
_CANDIDATES = 32
# Whole placements drawn for the samples whose digits still overlap too much.
_ROUNDS = 4


def box_overlap(a: Tensor, b: Tensor) -> Tensor:
    """How much boxes overlap: the area of their intersection over the area of the smaller box.

    Args:
        a: (..., N, 4) boxes x0, y0, x1, y1.
        b: (..., M, 4) boxes in the same units (and the same leading dimensions).

    Returns:
        (..., N, M) fractions in [0, 1]: 0 for disjoint boxes, 1 when one box lies inside the other. Boxes with NaN
        coordinates overlap nothing (0).
    """
    lo = torch.maximum(a[..., :, None, :2], b[..., None, :, :2])
    hi = torch.minimum(a[..., :, None, 2:], b[..., None, :, 2:])
    inter = (hi - lo).clamp(min=0).prod(-1)
    area_a = (a[..., 2:] - a[..., :2]).clamp(min=0).prod(-1)
    area_b = (b[..., 2:] - b[..., :2]).clamp(min=0).prod(-1)
    smaller = torch.minimum(area_a[..., :, None], area_b[..., None, :]).clamp(min=1e-6)
    return torch.nan_to_num(inter / smaller, nan=0.0)


def _counts(params: dict[str, Tensor], device: torch.device) -> Tensor:
    return stored_counts(params, "counts", "the scenes' digit counts", device)


class DigitScenes(DigitsDataModule):
    """Scenes of ``min_digits`` to ``max_digits`` MNIST digits at free positions, sizes and angles; the label is
    their multiset.

    x (B, 1, canvas, canvas); y int64 (B, max_digits): the classes (0..9) of the drawn digits, then -1 for the slots
    of digits not drawn. The slots' order means nothing (the label is the multiset of the values >= 0).
    ``num_classes`` is 10, the digit classes. Validation and test batches are ``(x, y, boxes)``, boxes (B,
    max_digits, 4) float32 in canvas pixels with NaN rows for the digits not drawn, so co-localisation
    (:class:`~stn_lightning.metrics.CoLocalization`) counts only the drawn ones.

    Samples hold ``max_digits`` digits (training: single digits grouped with batch mates by
    :meth:`DigitsDataModule.compose`); the layout is described in :mod:`stn_lightning.data.scenes`. The validation
    and test sets store their counts with the other placement parameters, so they are fixed by ``seed``.

    Args:
        canvas: side of the canvas in pixels (64 by default; 96 leaves more room), at least 32.
        min_digits: the fewest digits in a scene, 0 allowed.
        max_digits: the most digits in a scene, at least 1 and at least ``min_digits``.
        scale_range: (low, high) each digit's isotropic scale of its 28-pixel box, uniform.
        max_angle: each digit's rotation is uniform in [-max_angle, max_angle] degrees.
        max_overlap: the largest intersection of two digits' ink boxes, as a fraction of the smaller box's area,
            that the placement accepts (see above; 1 lets digits fall anywhere).
        num_clutter: pieces of other digits pasted anywhere in the canvas (0 for none), as in cluttered MNIST.
        clutter_size: side of a clutter piece in pixels (cut from the other samples' first digits at 28 pixels).
        **kwargs: the arguments of :class:`DigitsDataModule` (source, root, download, batch_size, num_workers,
            val_size, seed).

    Attributes:
        num_digits: ``max_digits``, the digits per sample of a raw evaluation batch.
    """

    def __init__(
        self,
        canvas: int = 64,
        min_digits: int = 1,
        max_digits: int = 3,
        scale_range: tuple[float, float] = (0.6, 1.3),
        max_angle: float = 30.0,
        max_overlap: float = 0.1,
        num_clutter: int = 0,
        clutter_size: int = 6,
        **kwargs: Any,
    ) -> None:
        if canvas < 32:
            raise ValueError(f"expected canvas >= 32 pixels, got {canvas}")
        if max_digits < 1:
            raise ValueError(f"expected max_digits >= 1, got {max_digits}")
        if not 0 <= min_digits <= max_digits:
            raise ValueError(f"expected 0 <= min_digits <= max_digits ({max_digits}), got {min_digits}")
        if len(scale_range) != 2 or not 0 < scale_range[0] <= scale_range[1]:
            raise ValueError(f"expected scale_range as (low, high) with 0 < low <= high, got {scale_range}")
        if not 0.0 <= max_angle <= 180.0:
            raise ValueError(f"expected 0 <= max_angle <= 180 degrees, got {max_angle}")
        if not 0.0 <= max_overlap <= 1.0:
            raise ValueError(f"expected 0 <= max_overlap <= 1, got {max_overlap}")
        if num_clutter < 0:
            raise ValueError(f"expected num_clutter >= 0, got {num_clutter}")
        if not 1 <= clutter_size <= dist.DIGIT_SIZE:
            raise ValueError(f"expected 1 <= clutter_size <= {dist.DIGIT_SIZE}, got {clutter_size}")
        super().__init__(**kwargs)
        self.canvas = canvas
        self.min_digits = min_digits
        self.max_digits = max_digits
        self.scale_range = (float(scale_range[0]), float(scale_range[1]))
        self.max_angle = max_angle
        self.max_overlap = max_overlap
        self.num_clutter = num_clutter
        self.clutter_size = clutter_size
        self.num_digits = max_digits
        self.num_classes = 10
        self.image_size = (canvas, canvas)

    @property
    def class_names(self) -> tuple[str, ...] | None:
        """The digit classes' names (the labels are digit classes, whatever their number per scene)."""
        return CLASS_NAMES[self.source]

    # ----------------------------------------------------------------------------------------------------------
    # distortions
    # ----------------------------------------------------------------------------------------------------------
    def draw(self, digits: Tensor, generator: torch.Generator | None) -> dict[str, Tensor]:
        """Random scenes for composed digits.

        Args:
            digits: (B, max_digits, 28, 28) float in [0, 1].
            generator: the random generator, on ``digits``' device.

        Returns:
            "counts" (B,) int64, the digits drawn per sample (the first ``counts`` slots); "theta"
            (B, max_digits, 2, 3), each digit's placement in the canvas (output-to-input); with ``num_clutter``,
            "clutter" (B, P, s, s) pieces and "clutter_at" (B, P, 2) long corners (row, col).
        """
        b, d = digits.shape[:2]
        if d != self.max_digits:
            raise ValueError(f"expected {self.max_digits} digits per sample, got digits {tuple(digits.shape)}")
        device = digits.device

        def uniform(shape: tuple[int, ...], low: float, high: float) -> Tensor:
            return low + (high - low) * torch.rand(shape, generator=generator, device=device)

        counts = torch.randint(self.min_digits, self.max_digits + 1, (b,), generator=generator, device=device)
        angle = uniform((b * d,), -math.radians(self.max_angle), math.radians(self.max_angle))
        scale = uniform((b * d,), *self.scale_range)
        # Each digit's ink box with its centre at the canvas's centre; a shift of t pixels moves it by t.
        centred = dist.placement_theta(angle, scale, torch.zeros(b * d, 2, device=device), self.canvas)
        boxes = dist.affine_ink_boxes(digits, centred.view(b, d, 2, 3), self.image_size)
        shift = self._place(boxes, counts, generator)  # (B, D, 2) pixels
        theta = dist.placement_theta(angle, scale, shift.reshape(-1, 2) * (2.0 / self.canvas), self.canvas)
        params = {"counts": counts, "theta": theta.view(b, d, 2, 3)}
        if self.num_clutter > 0:
            params.update(
                dist.random_clutter_pieces(
                    digits[:, 0],
                    num_pieces=self.num_clutter,
                    patch=self.clutter_size,
                    canvas=self.canvas,
                    generator=generator,
                )
            )
        return params

    def _place(self, boxes: Tensor, counts: Tensor, generator: torch.Generator | None) -> Tensor:
        # Shifts (B, D, 2) in pixels that move each centred ink box (B, D, 4) inside the canvas with little overlap
        # between the first counts (B,) digits: whole placements are drawn in a few rounds, and each sample keeps its
        # first placement within max_overlap, or the one whose worst overlap is least.
        drawn = torch.arange(boxes.shape[1], device=boxes.device) < counts[:, None]  # (B, D)

        def once() -> tuple[Tensor, Tensor]:
            shifts, worst = self._place_once(boxes, generator)
            return shifts, worst.masked_fill(~drawn, 0.0).amax(1)

        best, best_worst = once()
        for _ in range(_ROUNDS - 1):
            again = best_worst > self.max_overlap
            if not bool(again.any()):
                break
            shifts, worst = once()
            better = again & (worst < best_worst)
            best = torch.where(better[:, None, None], shifts, best)
            best_worst = torch.where(better, worst, best_worst)
        return best

    def _place_once(self, boxes: Tensor, generator: torch.Generator | None) -> tuple[Tensor, Tensor]:
        # One placement, slot after slot: each digit at the first of _CANDIDATES uniform positions whose box overlaps
        # the boxes placed before it by at most max_overlap, or at the candidate of least overlap. Slots past a
        # sample's count are placed too (they are not drawn); the count's digits are the first slots, so a drawn digit
        # is only compared with drawn ones. Returns the shifts (B, D, 2) and each digit's worst overlap (B, D) with
        # the digits before it.
        b, d = boxes.shape[:2]
        rows = torch.arange(b, device=boxes.device)
        # The shifts that keep the box inside the pixel edges -0.5 and canvas - 0.5; a box larger than the canvas
        # stays centred on it.
        first, last = -0.5 - boxes[..., :2], self.canvas - 0.5 - boxes[..., 2:]  # (B, D, 2)
        middle = (first + last) / 2
        room = (last - first).clamp(min=0) / 2
        shifts = torch.zeros(b, d, 2, device=boxes.device)
        placed = torch.zeros(b, d, 4, device=boxes.device)
        worst_of = torch.zeros(b, d, device=boxes.device)  # each slot's worst overlap with the slots before it
        for j in range(d):
            u = torch.rand((b, _CANDIDATES, 2), generator=generator, device=boxes.device) * 2 - 1
            candidates = middle[:, j, None] + u * room[:, j, None]  # (B, R, 2)
            where = boxes[:, j, None] + candidates.repeat(1, 1, 2)  # (B, R, 4)
            if j == 0:
                worst = torch.zeros(b, _CANDIDATES, device=boxes.device)
            else:
                worst = box_overlap(where, placed[:, :j]).amax(-1)  # (B, R)
            fits = worst <= self.max_overlap
            pick = torch.where(fits.any(1), fits.float().argmax(1), worst.argmin(1))  # the first that fits
            shifts[:, j] = candidates[rows, pick]
            placed[:, j] = where[rows, pick]
            worst_of[:, j] = worst[rows, pick]
        return shifts, worst_of

    def render(self, digits: Tensor, params: dict[str, Tensor]) -> Tensor:
        """The first ``counts`` digits of each sample placed and merged (with the clutter) by maximum: digits
        (B, max_digits, 28, 28) -> (B, 1, canvas, canvas)."""
        placed = dist.place_digits(digits, params["theta"], self.image_size)
        return dist.merge_digits(placed, params, _counts(params, digits.device))

    def boxes(self, digits: Tensor, params: dict[str, Tensor]) -> Tensor:
        """Each drawn digit's ink box (B, max_digits, 4) in canvas pixels; NaN rows for the slots not drawn."""
        boxes = dist.affine_ink_boxes(digits, params["theta"], self.image_size)
        return drawn_boxes(boxes, _counts(params, boxes.device))

    # ----------------------------------------------------------------------------------------------------------
    # labels
    # ----------------------------------------------------------------------------------------------------------
    def target(self, labels: Tensor, params: dict[str, Tensor]) -> Tensor:
        """The multiset label y int64 (B, max_digits): the drawn digits' classes, -1 for the slots not drawn
        (y[:, i] = labels[:, i] for i < params["counts"], -1 from there)."""
        return drawn_labels(labels, _counts(params, labels.device))
