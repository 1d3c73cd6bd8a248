"""House-number-like digit strings, the paper's SVHN multi-digit task built from MNIST digits.

Jaderberg et al. (2015, section 4.2) read house numbers of up to 5 digits from 64x64 (and 128x128) crops of SVHN
with one classifier per digit position and one for the length. :class:`DigitSequences` builds the same task from
the MNIST digits of :mod:`stn_lightning.data.mnist`: a string of L digits (L uniform in ``min_length`` ..
``max_length``) is laid out left to right, each digit with its own small vertical offset and scale, then the whole
string is rotated, scaled and moved inside a square canvas.

Layout of a sample, in canvas pixels (``h`` = ``digit_size``, the side the 28x28 digit box is drawn at):

* digit i is drawn at side ``h * s_i``, s_i uniform in [1 - scale_jitter, 1 + scale_jitter];
* the centres of neighbouring digits are ``f * h * (s_i + s_(i+1)) / 2`` apart horizontally, with one advance
  fraction f per string, uniform in ``spacing`` (MNIST's ink fills about 20 of the 28 pixels of the box, so an
  advance of 0.55 box lets the inks of two neighbours touch at most, 0.75 leaves a gap);
* digit i is moved vertically by ``h * e_i``, e_i Gaussian of std ``jitter``, truncated at 2 std;
* the string is rotated by an angle uniform in [-max_angle, max_angle] degrees and scaled by a factor uniform in
  ``scale_range``; each digit's own placement is composed with this transform, so every digit is warped once;
* the string is then moved so that the box around its digits' ink lies uniformly anywhere inside the canvas (or
  centred, in the rare case that the box is larger than the canvas).

The default ``digit_size`` makes the longest, widest string fit in the canvas at the largest scale and angle: it is
``0.95 * canvas / (scale_range[1] * e)``, where e (in units of h) is the largest extent over the angles in
[-max_angle, max_angle] of the worst-case ink box of a ``max_length`` string: width
``(1 + scale_jitter) * ((max_length - 1) * spacing[1] + 20 / 28)``, height ``(1 + scale_jitter) * 20 / 28 + 4 *
jitter``. With the defaults (5 digits, spacing (0.55, 0.75), jitter 0.08, scale jitter 0.1, 15 degrees, scale up to
1.15) that is 12.5 pixels at a 64-pixel canvas and 25 at 128: digit ink about 9 and 18 pixels tall.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from . import distortions as dist
from .mnist import DigitsDataModule, drawn_boxes, drawn_labels, stored_counts

__all__ = ["DigitSequences", "default_digit_size"]

# MNIST digits are scaled to fit a 20x20 box inside their 28x28 image.
_INK = 20 / dist.DIGIT_SIZE
# Fraction of the canvas the worst-case string may fill with the default digit size.
_MARGIN = 0.95
# Vertical offsets are Gaussian truncated at this many standard deviations.
_OFFSET_CLIP = 2.0
# The clutter pieces' side relative to the drawn digit, as in cluttered MNIST (6 pixels of a 28-pixel digit).
_CLUTTER_FRACTION = 6 / dist.DIGIT_SIZE


def _largest_extent(width: float, height: float, max_angle: float) -> float:
    # The largest side of the axis-aligned box around a width x height box rotated by any angle in [-a, a]:
    # w |cos t| + h |sin t| grows with t up to atan(h / w), where it reaches the diagonal (likewise for the height).
    a = math.radians(min(max_angle, 90.0))
    diagonal = math.hypot(width, height)
    across = diagonal if a >= math.atan2(height, width) else width * math.cos(a) + height * math.sin(a)
    down = diagonal if a >= math.atan2(width, height) else width * math.sin(a) + height * math.cos(a)
    return max(across, down)


def default_digit_size(
    canvas: int,
    max_length: int,
    spacing: tuple[float, float],
    jitter: float,
    scale_jitter: float,
    max_angle: float,
    scale_range: tuple[float, float],
) -> float:
    """The side in pixels at which :class:`DigitSequences` draws a digit box unless told otherwise.

    The largest size at which a string of ``max_length`` digits at the widest spacing, the largest per-digit
    scales and offsets, the largest string scale and the worst angle still fits in 95 % of the canvas (see the
    module's docstring for the formula).

    Returns:
        The digit box side in canvas pixels.
    """
    grow = 1.0 + scale_jitter
    width = grow * ((max_length - 1) * spacing[1] + _INK)
    height = grow * _INK + 2 * _OFFSET_CLIP * jitter
    return _MARGIN * canvas / (scale_range[1] * _largest_extent(width, height, max_angle))


def _check_pair(name: str, value: tuple[float, float], upper: float = math.inf) -> tuple[float, float]:
    if len(value) != 2 or not 0 < value[0] <= value[1] < upper:
        bound = "" if upper == math.inf else f" < {upper}"
        raise ValueError(f"expected {name} as (low, high) with 0 < low <= high{bound}, got {value}")
    return float(value[0]), float(value[1])


def _lengths(params: dict[str, Tensor], device: torch.device) -> Tensor:
    return stored_counts(params, "lengths", "the strings' lengths", device)


class DigitSequences(DigitsDataModule):
    """Strings of 1 to ``max_length`` MNIST digits in a square canvas, read digit by digit (SVHN-like).

    x (B, 1, canvas, canvas); y int64 (B, 1 + max_length): ``y[:, 0]`` is the length L of the string, in
    ``min_length`` .. ``max_length``, drawn uniformly; ``y[:, 1 + i]`` is the class (0..9) of the i-th digit from the
    left for i < L and -1 for i >= L. ``num_classes`` is 10, the digit classes.

    Samples hold ``max_length`` digits (training: single digits grouped with batch mates by
    :meth:`DigitsDataModule.compose`); only the first L are drawn. The layout is described in
    :mod:`stn_lightning.data.sequences`. The validation and test sets store their lengths with their other
    distortion parameters, so they are fixed by ``seed`` like those of the other DataModules.

    The DataModule gives no boxes (:meth:`boxes` is None: no co-localisation metric, whose boxes must all be
    present); :meth:`digit_boxes` says where each drawn digit's ink lies.

    Args:
        canvas: side of the canvas in pixels (the paper uses 64 and 128), at least 16.
        max_length: the most digits in a string.
        min_length: the fewest digits in a string, 1 <= min_length <= max_length.
        digit_size: side in pixels at which the 28x28 digit box is drawn before the string's scale; None for
            :func:`default_digit_size` (12.5 pixels at 64 with the defaults, 25 at 128).
        spacing: (low, high) horizontal advance from one digit to the next, as a fraction of the digit box, drawn
            uniformly once per string.
        jitter: std of each digit's vertical offset as a fraction of the digit box (truncated at 2 std).
        scale_jitter: each digit's own scale is uniform in [1 - scale_jitter, 1 + scale_jitter].
        max_angle: the string's rotation is uniform in [-max_angle, max_angle] degrees.
        scale_range: (low, high) the string's isotropic scale, uniform.
        num_clutter: pieces of other digits pasted anywhere in the canvas (0 for none), as in cluttered MNIST.
        clutter_size: side of a clutter piece in canvas pixels; None for 6 / 28 of the digit box (the ratio of
            cluttered MNIST). Pieces are cut from the other samples' first digits resized to the digit box.
        fit: (low, high): each string is zoomed so that its ink spans a uniform fraction in this range of the
            canvas's width, as SVHN's images are cropped around the house number (the paper's 64 px images: the
            digits' box grown by 30 %); a smaller range leaves more background around smaller digits (the paper's
            more loosely cropped 128 px images). None keeps every digit box at ``digit_size``, so that a string's
            size grows with its length.
        max_height: with ``fit``, the zoom stops where the string's ink reaches this fraction of the canvas's height
            (short strings would otherwise fill it).
        spread: the string's ink box is placed uniformly in this share of the room the canvas leaves around it: 1
            anywhere in the canvas, 0 centred (SVHN's crops are centred on the number, up to the random 54 x 54 crops
            of its 64 x 64 images that the paper trains on).
        **kwargs: the arguments of :class:`DigitsDataModule` (source, root, download, batch_size, num_workers,
            val_size, seed).

    Attributes:
        max_length, min_length, canvas, digit_size, clutter_size: as given or chosen.
        num_digits: ``max_length``, the digits per sample of a raw evaluation batch.
    """

    def __init__(
        self,
        canvas: int = 64,
        max_length: int = 5,
        min_length: int = 1,
        digit_size: float | None = None,
        spacing: tuple[float, float] = (0.55, 0.75),
        jitter: float = 0.08,
        scale_jitter: float = 0.1,
        max_angle: float = 15.0,
        scale_range: tuple[float, float] = (0.85, 1.15),
        num_clutter: int = 0,
        clutter_size: int | None = None,
        fit: tuple[float, float] | None = (0.5, 0.9),
        max_height: float = 0.6,
        spread: float = 1.0,
        **kwargs: Any,
    ) -> None:
        if canvas < 16:
            raise ValueError(f"expected canvas >= 16 pixels, got {canvas}")
        if max_length < 1:
            raise ValueError(f"expected max_length >= 1, got {max_length}")
        if not 1 <= min_length <= max_length:
            raise ValueError(f"expected 1 <= min_length <= max_length ({max_length}), got {min_length}")
        advance = _check_pair("spacing", spacing)
        scales = _check_pair("scale_range", scale_range)
        if not 0.0 <= jitter <= 1.0:
            raise ValueError(f"expected 0 <= jitter <= 1 (a fraction of the digit box), got {jitter}")
        if not 0.0 <= scale_jitter < 1.0:
            raise ValueError(f"expected 0 <= scale_jitter < 1, got {scale_jitter}")
        if not 0.0 <= max_angle <= 180.0:
            raise ValueError(f"expected 0 <= max_angle <= 180 degrees, got {max_angle}")
        if num_clutter < 0:
            raise ValueError(f"expected num_clutter >= 0, got {num_clutter}")
        fit = None if fit is None else _check_pair("fit", fit, upper=1.0 + 1e-9)
        if not 0.0 <= spread <= 1.0:
            raise ValueError(f"expected 0 <= spread <= 1 (a share of the room around the string), got {spread}")
        if not 0.0 < max_height <= 1.0:
            raise ValueError(f"expected 0 < max_height <= 1 (a fraction of the canvas), got {max_height}")
        # The arguments themselves stay as given: save_hyperparameters reads them from this frame.
        if digit_size is None:
            size = default_digit_size(canvas, max_length, advance, jitter, scale_jitter, max_angle, scales)
            if size < 4.0:
                raise ValueError(
                    f"expected a canvas large enough for {max_length} digits: canvas {canvas} leaves digit boxes of "
                    f"{size:.1f} pixels (at least 4 needed); use a larger canvas, fewer digits or give digit_size"
                )
        elif not 4.0 <= digit_size <= canvas:
            raise ValueError(f"expected 4 <= digit_size <= canvas ({canvas}) pixels, got {digit_size}")
        else:
            size = float(digit_size)
        largest = min(canvas, dist.DIGIT_SIZE)
        if clutter_size is not None and not 1 <= clutter_size <= largest:
            raise ValueError(f"expected 1 <= clutter_size <= {largest} pixels (min(canvas, 28)), got {clutter_size}")
        super().__init__(**kwargs)
        self.canvas = canvas
        self.max_length = max_length
        self.min_length = min_length
        self.digit_size = size
        self.spacing = advance
        self.jitter = jitter
        self.scale_jitter = scale_jitter
        self.max_angle = max_angle
        self.scale_range = scales
        self.num_clutter = num_clutter
        self.fit = fit
        self.max_height = max_height
        self.spread = spread
        self.clutter_size = max(1, round(_CLUTTER_FRACTION * size)) if clutter_size is None else clutter_size
        self.num_digits = max_length
        self.num_classes = 10
        self.image_size = (canvas, canvas)

    # ----------------------------------------------------------------------------------------------------------
    # distortions
    # ----------------------------------------------------------------------------------------------------------
    def draw(self, digits: Tensor, generator: torch.Generator | None) -> dict[str, Tensor]:
        """Random strings for composed digits.

        Args:
            digits: (B, max_length, 28, 28) float in [0, 1].
            generator: the random generator, on ``digits``' device.

        Returns:
            "lengths" (B,) int64, the digits drawn per sample; "theta" (B, max_length, 2, 3), each digit's placement
            in the canvas (output-to-input, the string's rotation, scale and translation included); with
            ``num_clutter``, "clutter" (B, P, s, s) pieces and "clutter_at" (B, P, 2) long corners (row, col).
        """
        b, d = digits.shape[:2]
        if d != self.max_length:
            raise ValueError(f"expected {self.max_length} digits per sample, got digits {tuple(digits.shape)}")
        device = digits.device

        def uniform(shape: tuple[int, ...], low: float, high: float) -> Tensor:
            return low + (high - low) * torch.rand(shape, generator=generator, device=device)

        lengths = torch.randint(self.min_length, self.max_length + 1, (b,), generator=generator, device=device)
        angle = uniform((b,), -math.radians(self.max_angle), math.radians(self.max_angle))
        scale = uniform((b,), *self.scale_range)
        advance = uniform((b, 1), *self.spacing)
        own = uniform((b, d), 1.0 - self.scale_jitter, 1.0 + self.scale_jitter)
        rise = self.jitter * torch.randn((b, d), generator=generator, device=device)
        rise = rise.clamp(-_OFFSET_CLIP * self.jitter, _OFFSET_CLIP * self.jitter)
        where = uniform((b, 2), -1.0, 1.0) * self.spread

        # Digit centres in the string, in pixels before the string's transform: x advances by the mean of the two
        # neighbours' sizes, y is each digit's offset.
        h = self.digit_size
        steps = advance * h * (own[:, :-1] + own[:, 1:]) / 2  # (B, D - 1)
        x = torch.cat([torch.zeros_like(own[:, :1]), steps.cumsum(dim=1)], dim=1)
        centres = torch.stack([x, rise * h], dim=-1)  # (B, D, 2)
        # The string's rotation R(a) and scale, then normalised canvas units (2 / canvas per pixel).
        cos, sin = torch.cos(angle), torch.sin(angle)
        rotation = torch.stack([torch.stack([cos, -sin], -1), torch.stack([sin, cos], -1)], -2)  # (B, 2, 2)
        placed = (centres @ rotation.transpose(-1, -2)) * (scale[:, None, None] * 2.0 / self.canvas)
        sizes = (scale[:, None] * own * (h / dist.DIGIT_SIZE)).reshape(-1)  # each digit's scale of its 28x28 box
        angles = angle[:, None].expand(b, d).reshape(-1)

        def place(shift: Tensor, zoom: Tensor) -> Tensor:
            # The string zoomed about its first digit's centre (the origin of `placed`), then shifted.
            centres = (placed * zoom[:, None, None] + shift[:, None]).reshape(-1, 2)
            sizes_now = sizes * zoom[:, None].expand(b, d).reshape(-1)
            return dist.placement_theta(angles, sizes_now, centres, self.canvas).view(b, d, 2, 3)

        present = dist.first_slots(lengths, d)[..., None]  # (B, D, 1)

        def extent(theta: Tensor) -> tuple[Tensor, Tensor]:
            # The box (x0, y0), (x1, y1) around the drawn digits' ink, (B, 2) each, in canvas pixels.
            boxes = dist.affine_ink_boxes(digits, theta, self.image_size)
            low = boxes[..., :2].masked_fill(~present, math.inf).amin(dim=1)
            high = boxes[..., 2:].masked_fill(~present, -math.inf).amax(dim=1)
            return low, high

        zoom = torch.ones_like(scale)
        if self.fit is not None:  # zoom each string to span a drawn fraction of the canvas's width
            low, high = extent(place(torch.zeros_like(where), zoom))
            span = (high - low).clamp(min=1.0)  # (B, 2) ink width and height at zoom 1
            target = uniform((b,), *self.fit) * self.canvas / span[:, 0]
            zoom = torch.minimum(target, self.max_height * self.canvas / span[:, 1])
        # Move the box around the drawn digits' ink to a uniform position inside the canvas (pixel edges -0.5 and
        # canvas - 0.5), or centre it where it is larger than the canvas.
        low, high = extent(place(torch.zeros_like(where), zoom))
        first, last = -0.5 - low, self.canvas - 0.5 - high  # the range of shifts that keeps the box inside
        shift = (first + last) / 2 + where * (last - first).clamp(min=0.0) / 2
        params = {"lengths": lengths, "theta": place(shift * (2.0 / self.canvas), zoom)}
        if self.num_clutter > 0:
            params.update(self._draw_clutter(digits, generator))
        return params

    def _draw_clutter(self, digits: Tensor, generator: torch.Generator | None) -> dict[str, Tensor]:
        # Pieces cut from the other samples' first digits, resized to the drawn digit box.
        side = max(round(self.digit_size), self.clutter_size)
        pool = F.interpolate(digits[:, :1], size=(side, side), mode="bilinear", align_corners=False, antialias=True)
        return dist.random_clutter_pieces(
            pool[:, 0].clamp(0.0, 1.0),
            num_pieces=self.num_clutter,
            patch=self.clutter_size,
            canvas=self.canvas,
            generator=generator,
        )

    def render(self, digits: Tensor, params: dict[str, Tensor]) -> Tensor:
        """The first L digits of each sample placed and merged (with the clutter) by maximum: digits
        (B, max_length, 28, 28) -> (B, 1, canvas, canvas)."""
        b, d = digits.shape[:2]
        flat = digits.reshape(b * d, 1, dist.DIGIT_SIZE, dist.DIGIT_SIZE)
        theta = params["theta"].reshape(b * d, 2, 3)
        # Bilinear sampling alone aliases a digit shrunk by 2x or more (strokes break up). Each digit is sampled from
        # the smallest of the levels 28, 14, 7 pixels (shrunk with antialiasing) that is at least its drawn size, so
        # that no digit is shrunk by 2x in the warp. theta works on normalised coordinates, whatever the resolution.
        drawn = self.canvas / theta[:, :, :2].det().abs().sqrt().clamp(min=1e-6)  # (B D,) box side in pixels
        placed = dist.warp_affine(flat, theta, self.image_size)
        side = dist.DIGIT_SIZE // 2
        while side >= 7 and bool((drawn < side).any()):
            level = F.interpolate(flat, size=(side, side), mode="bilinear", align_corners=False, antialias=True)
            small = dist.warp_affine(level.clamp(0.0, 1.0), theta, self.image_size)
            placed = torch.where((drawn < side)[:, None, None, None], small, placed)
            side //= 2
        return dist.merge_digits(placed.view(b, d, *self.image_size), params, _lengths(params, digits.device))

    def boxes(self, digits: Tensor, params: dict[str, Tensor]) -> None:
        """None: a string has fewer than ``max_length`` digits, and co-localisation needs every box present."""
        return None

    def digit_boxes(self, digits: Tensor, params: dict[str, Tensor]) -> Tensor:
        """Each drawn digit's ink box in canvas pixels; NaN for the digits past the string's length.

        Args:
            digits: (B, max_length, 28, 28) float in [0, 1].
            params: what :meth:`draw` returns.

        Returns:
            (B, max_length, 4) float32 boxes x0, y0, x1, y1 (pixel centres at integers).
        """
        boxes = dist.affine_ink_boxes(digits, params["theta"], self.image_size)
        return drawn_boxes(boxes, _lengths(params, boxes.device))

    # ----------------------------------------------------------------------------------------------------------
    # labels
    # ----------------------------------------------------------------------------------------------------------
    def target(self, labels: Tensor, params: dict[str, Tensor]) -> Tensor:
        """The sequence label: lengths, then the digits from the left, -1 past the length.

        Args:
            labels: (B, max_length) int64, the classes of the sample's digits in drawing order.
            params: with "lengths" (B,).

        Returns:
            y int64 (B, 1 + max_length): y[:, 0] = L, y[:, 1 + i] = labels[:, i] for i < L, -1 for i >= L.
        """
        lengths = _lengths(params, labels.device)
        return torch.cat([lengths[:, None], drawn_labels(labels, lengths)], dim=1)
