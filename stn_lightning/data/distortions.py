"""Batched random distortions of digits, drawn and applied on any device.

Every ``random_*`` function draws the parameters of ``n`` warps with a ``torch.Generator`` on ``device`` (so the
same seed gives the same warps) and returns them in the convention of :mod:`kernels`: they map OUTPUT (canvas)
normalised coordinates in [-1, 1] to INPUT (digit) normalised coordinates. ``warp_*`` apply one warp per image
through :mod:`kernels` with ``backend="auto"`` (the PyTorch path for the affine and projective warps on every
device; Triton only for the thin-plate-spline warp of CUDA tensors, the one pass the last GPU run measured faster:
``_AUTO_TRITON`` in ``kernels/__init__.py``), with ``align_corners=False`` and zeros padding, so everything outside
the digit is 0, the empty pixel of an image in [0, 1].

The distorted MNIST variants of the paper (Jaderberg et al. 2015, appendix), with the ranges chosen here:

* R: rotation uniform in [-90, 90] degrees; 28x28 output.
* RTS: rotation uniform in [-45, 45] degrees, isotropic scale uniform in [0.7, 1.2], then a translation uniform
  over every position that keeps the scaled 28x28 digit box inside the 42x42 canvas (per axis, up to
  (42 - 28 s) / 2 pixels from the centre). MNIST's ink fits a 20x20 box, whose rotation by 45 degrees spans
  20 * sqrt(2) ~= 28 pixels, so the ink stays inside the canvas whatever the angle.
* P: isotropic scale uniform in [0.75, 1.0], then each of the 4 corners of the digit moved by Gaussian noise of
  std 0.1 (normalised units, i.e. 1.4 pixels on 28x28), truncated at 3 std so the quadrilateral stays convex;
  28x28 output.
* E: thin-plate spline on a 4x4 lattice of control points over [-1, 1]^2, each moved by Gaussian noise of std
  0.1, truncated at 3 std; 28x28 output.
* Translated: the unscaled digit placed uniformly anywhere fully inside a larger canvas (60x60 for cluttered MNIST).
* Clutter: ``num_pieces`` 6x6 patches cut at uniform positions from random other digits, pasted at uniform
  positions in the canvas, combined with the digit by a pixelwise maximum.
* Cells (multi-digit MNIST): each digit placed in its own cell of a ``cells x cells`` grid over the canvas (cells
  drawn without replacement, so digits never overlap), with a uniform jitter that keeps it inside its cell.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from .. import kernels

__all__ = [
    "DIGIT_SIZE",
    "affine_ink_boxes",
    "cut_patches",
    "homography_from_points",
    "paste_patches",
    "placement_theta",
    "random_cells",
    "random_clutter",
    "random_elastic",
    "random_projective",
    "random_rotation",
    "random_rts",
    "random_translation",
    "warp_affine",
    "warp_projective",
    "warp_tps",
]

#: Side of an MNIST digit in pixels.
DIGIT_SIZE = 28


# --------------------------------------------------------------------------------------------------------------
# drawing helpers
# --------------------------------------------------------------------------------------------------------------
def _uniform(
    shape: tuple[int, ...], low: float, high: float, generator: torch.Generator | None, device: torch.device | str
) -> Tensor:
    return low + (high - low) * torch.rand(shape, generator=generator, device=device)


def _truncated_normal(
    shape: tuple[int, ...], std: float, generator: torch.Generator | None, device: torch.device | str
) -> Tensor:
    # Gaussian noise clamped at 3 std: the rare far outlier would fold the warp over itself.
    return (std * torch.randn(shape, generator=generator, device=device)).clamp(-3.0 * std, 3.0 * std)


def _check_range(name: str, value: tuple[float, float]) -> None:
    if len(value) != 2 or not 0 < value[0] <= value[1]:
        raise ValueError(f"expected {name} as (low, high) with 0 < low <= high, got {value}")


# --------------------------------------------------------------------------------------------------------------
# affine placements
# --------------------------------------------------------------------------------------------------------------
def placement_theta(angle: Tensor, scale: Tensor, translation: Tensor, canvas: int, digit: int = DIGIT_SIZE) -> Tensor:
    """Affine matrices that rotate, scale and move a ``digit``-pixel image into a ``canvas``-pixel canvas.

    A canvas point p (normalised over the canvas) reads the digit at (canvas / (digit * s)) R(-a) (p - t)
    (normalised over the digit): the digit's centre lands at t, its side becomes ``digit * s`` canvas pixels.

    Args:
        angle: (n,) rotation in radians.
        scale: (n,) isotropic scale (1 keeps the digit's pixel size).
        translation: (n, 2) position (x, y) of the digit's centre in normalised canvas coordinates.
        canvas: side of the square output in pixels.
        digit: side of the square input in pixels.

    Returns:
        theta (n, 2, 3), output-to-input, as ``F.affine_grid`` and :func:`kernels.sample_affine` expect.
    """
    cos, sin = torch.cos(angle), torch.sin(angle)
    k = (canvas / digit) / scale
    # R(-a) = [[cos, sin], [-sin, cos]], scaled by canvas / (digit * s).
    linear = torch.stack([torch.stack([cos, sin], -1), torch.stack([-sin, cos], -1)], -2) * k[:, None, None]
    offset = -(linear @ translation.unsqueeze(-1))
    return torch.cat([linear, offset], dim=-1)


def random_rts(
    n: int,
    *,
    max_angle: float = 45.0,
    scale_range: tuple[float, float] = (0.7, 1.2),
    canvas: int = 42,
    digit: int = DIGIT_SIZE,
    translate: bool = True,
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
) -> Tensor:
    """Random rotation, scale and translation (the RTS variant with its defaults).

    Args:
        n: number of warps.
        max_angle: rotation uniform in [-max_angle, max_angle] degrees.
        scale_range: isotropic scale uniform in [low, high].
        canvas: side of the output canvas in pixels.
        digit: side of the input digit in pixels.
        translate: move the centre uniformly over every position that keeps the scaled digit box inside the
            canvas (per axis up to (canvas - digit * s) / 2 pixels); else keep it at the centre.
        generator: the random generator, on ``device``.
        device: where the parameters are made.

    Returns:
        theta (n, 2, 3).
    """
    _check_range("scale_range", scale_range)
    angle = _uniform((n,), -math.radians(max_angle), math.radians(max_angle), generator, device)
    scale = _uniform((n,), scale_range[0], scale_range[1], generator, device)
    shift = _uniform((n, 2), -1.0, 1.0, generator, device)
    if translate:
        # Normalised room left on each side of the scaled digit box.
        room = ((canvas - digit * scale) / canvas).clamp(min=0.0)
        shift = shift * room[:, None]
    else:
        shift = torch.zeros_like(shift)
    return placement_theta(angle, scale, shift, canvas, digit)


# The scale range of the warps that keep the digit's size.
_UNSCALED = (1.0, 1.0)


def _on(generator: torch.Generator | None, device: torch.device | str) -> dict[str, Any]:
    # The keyword arguments that say where a random draw happens.
    return {"generator": generator, "device": device}


def random_rotation(
    n: int,
    *,
    max_angle: float = 90.0,
    size: int = DIGIT_SIZE,
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
) -> Tensor:
    """Random rotation about the centre, uniform in [-max_angle, max_angle] degrees (the R variant).

    Returns:
        theta (n, 2, 3).
    """
    return random_rts(
        n,
        max_angle=max_angle,
        scale_range=_UNSCALED,
        canvas=size,
        digit=size,
        translate=False,
        **_on(generator, device),
    )


def random_translation(
    n: int,
    *,
    canvas: int = 60,
    digit: int = DIGIT_SIZE,
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
) -> Tensor:
    """The unscaled digit placed uniformly anywhere fully inside the canvas (translated MNIST).

    Returns:
        theta (n, 2, 3).
    """
    return random_rts(n, max_angle=0.0, scale_range=_UNSCALED, canvas=canvas, digit=digit, **_on(generator, device))


def random_cells(
    n: int,
    num_digits: int,
    *,
    canvas: int = 64,
    cells: int = 2,
    digit: int = DIGIT_SIZE,
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
) -> Tensor:
    """Place ``num_digits`` unscaled digits in distinct cells of a ``cells x cells`` grid over the canvas.

    Each digit goes to its own cell (drawn without replacement), centred there with a uniform jitter of up to
    (canvas / cells - digit) / 2 pixels per axis, so the digit boxes never overlap.

    Returns:
        theta (n, num_digits, 2, 3).
    """
    cell = canvas / cells
    if cell < digit:
        raise ValueError(f"expected cells of at least {digit} pixels, got canvas {canvas} / {cells} cells = {cell}")
    if not 1 <= num_digits <= cells * cells:
        raise ValueError(f"expected 1 <= num_digits <= {cells * cells} (cells**2), got {num_digits}")
    # A random permutation of the cells per sample; the first num_digits are used.
    order = torch.rand((n, cells * cells), generator=generator, device=device).argsort(dim=1)[:, :num_digits]
    row, col = order // cells, order % cells
    # Normalised centre of cell i along an axis: (i + 0.5) * 2 / cells - 1.
    centre = torch.stack([col, row], dim=-1).to(torch.float32) * (2.0 / cells) + (1.0 / cells - 1.0)
    jitter = _uniform((n, num_digits, 2), -1.0, 1.0, generator, device) * ((cell - digit) / canvas)
    ones = torch.ones(n * num_digits, device=device)
    theta = placement_theta(0.0 * ones, ones, (centre + jitter).reshape(-1, 2), canvas, digit)
    return theta.view(n, num_digits, 2, 3)


def affine_ink_boxes(digits: Tensor, theta: Tensor, size: int | tuple[int, int]) -> Tensor:
    """Where affine placements put each digit's ink: the axis-aligned box around the warped ink bounding box.

    The ink bounding box spans the outer edges of the digit's nonzero pixels; its four corners are mapped from
    the digit into the canvas by the inverse of ``theta`` (which maps canvas to digit, ``align_corners=False``),
    and the result is the box around them, in canvas pixels with pixel centres at integers (the convention of
    ``Transform.outline``). Bilinear sampling spreads the ink by less than a pixel, so every nonzero pixel of the
    rendered digit overlaps its box. A digit without ink gets the box of its whole square.

    Args:
        digits: (..., 28, 28) (any side), ink where > 0.
        theta: (..., 2, 3) output-to-input placements, as :func:`warp_affine` takes them, one per digit.
        size: canvas (H, W) or an int.

    Returns:
        boxes (..., 4) float32: x0, y0, x1, y1.
    """
    lead = digits.shape[:-2]
    digits, theta = digits.reshape(-1, *digits.shape[-2:]), theta.reshape(-1, 2, 3)
    h, w = (size, size) if isinstance(size, int) else size
    side_y, side_x = digits.shape[-2:]
    ink = digits > 0

    def span(mask: Tensor, n: int) -> tuple[Tensor, Tensor]:
        # First and last ink index along an axis; the whole axis when there is no ink.
        idx = torch.arange(n, device=mask.device)
        first = torch.where(mask, idx, n).amin(-1)
        last = torch.where(mask, idx, -1).amax(-1)
        empty = last < 0
        return torch.where(empty, 0, first).float(), torch.where(empty, n - 1, last).float()

    x0, x1 = span(ink.any(-2), side_x)
    y0, y1 = span(ink.any(-1), side_y)
    # Pixel edges i - 0.5 and i + 0.5 in normalised digit coordinates: (2 i + 1) / n - 1 at the centres.
    u0, u1 = 2 * x0 / side_x - 1, 2 * (x1 + 1) / side_x - 1
    v0, v1 = 2 * y0 / side_y - 1, 2 * (y1 + 1) / side_y - 1
    corners = torch.stack(
        [torch.stack([u0, v0], -1), torch.stack([u1, v0], -1), torch.stack([u1, v1], -1), torch.stack([u0, v1], -1)],
        dim=1,
    )  # (N, 4, 2) in the digit
    theta = theta.float()
    inv = torch.linalg.inv(theta[:, :, :2])
    canvas = (corners - theta[:, None, :, 2]) @ inv.transpose(-1, -2)  # (N, 4, 2), normalised canvas
    px = ((canvas[..., 0] + 1) * w - 1) / 2
    py = ((canvas[..., 1] + 1) * h - 1) / 2
    return torch.stack([px.amin(-1), py.amin(-1), px.amax(-1), py.amax(-1)], dim=-1).view(*lead, 4)


# --------------------------------------------------------------------------------------------------------------
# projective and elastic
# --------------------------------------------------------------------------------------------------------------
def homography_from_points(src: Tensor, dst: Tensor) -> Tensor:
    """The homographies that map each set of 4 points ``src`` onto ``dst``.

    Args:
        src: (n, 4, 2) points (x, y).
        dst: (n, 4, 2) their images.

    Returns:
        h (n, 3, 3) with h[2, 2] = 1: [u, v, w] = h @ [x, y, 1] and (u / w, v / w) = dst.
    """
    s, d = src.to(torch.float64), dst.to(torch.float64)
    x, y, u, v = s[..., 0], s[..., 1], d[..., 0], d[..., 1]
    one, zero = torch.ones_like(x), torch.zeros_like(x)
    # Two rows per correspondence of the 8x8 direct linear transform with h22 = 1.
    rows_u = torch.stack([x, y, one, zero, zero, zero, -u * x, -u * y], dim=-1)
    rows_v = torch.stack([zero, zero, zero, x, y, one, -v * x, -v * y], dim=-1)
    a = torch.cat([rows_u, rows_v], dim=1)  # (n, 8, 8)
    b = torch.cat([u, v], dim=1).unsqueeze(-1)  # (n, 8, 1)
    h = torch.linalg.solve(a, b).squeeze(-1)
    return torch.cat([h, torch.ones_like(h[:, :1])], dim=1).view(-1, 3, 3).to(src.dtype)


_CORNERS = ((-1.0, -1.0), (1.0, -1.0), (1.0, 1.0), (-1.0, 1.0))


def random_projective(
    n: int,
    *,
    scale_range: tuple[float, float] = (0.75, 1.0),
    std: float = 0.1,
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
) -> Tensor:
    """Random projective warps (the P variant): random scale, then each digit corner moved by Gaussian noise.

    The digit's corners (+-1, +-1) land in the output at s * corner + noise, with s uniform in ``scale_range`` and
    the noise (per corner and axis) Gaussian of std ``std`` in normalised units, truncated at 3 std.

    Returns:
        h (n, 3, 3), output-to-input homographies on normalised coordinates.
    """
    _check_range("scale_range", scale_range)
    corners = torch.tensor(_CORNERS, device=device).expand(n, 4, 2)
    scale = _uniform((n, 1, 1), scale_range[0], scale_range[1], generator, device)
    placed = corners * scale + _truncated_normal((n, 4, 2), std, generator, device)
    return homography_from_points(placed, corners)


def random_elastic(
    n: int,
    *,
    grid_size: int = 4,
    std: float = 0.1,
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
) -> Tensor:
    """Random thin-plate-spline warps (the E variant).

    The target control points are the ``grid_size x grid_size`` lattice of :func:`kernels.tps_target_points`;
    each is moved by Gaussian noise of std ``std`` (normalised units), truncated at 3 std.

    Returns:
        control points (n, grid_size**2, 2): where each target control point reads the input.
    """
    target = kernels.tps_target_points(grid_size, device=torch.device(device))
    return target + _truncated_normal((n, grid_size * grid_size, 2), std, generator, device)


# --------------------------------------------------------------------------------------------------------------
# clutter
# --------------------------------------------------------------------------------------------------------------
def cut_patches(digits: Tensor, source: Tensor, corner: Tensor, patch: int = 6) -> Tensor:
    """Cut square patches out of digits.

    Args:
        digits: (N, H, W) images.
        source: (n, P) long, index into ``digits`` of the digit each patch comes from.
        corner: (n, P, 2) long, (row, col) of each patch's top-left pixel; patches must lie inside the digit.
        patch: side of the patches in pixels.

    Returns:
        (n, P, patch, patch) in ``digits``' dtype.
    """
    offsets = torch.arange(patch, device=digits.device)
    rows = (corner[..., 0, None] + offsets)[..., :, None]  # (n, P, patch, 1)
    cols = (corner[..., 1, None] + offsets)[..., None, :]  # (n, P, 1, patch)
    return digits[source[..., None, None], rows, cols]


def paste_patches(canvas: Tensor, patches: Tensor, corner: Tensor) -> Tensor:
    """Paste patches into canvases by pixelwise maximum.

    Args:
        canvas: (n, H, W).
        patches: (n, P, p, p), same dtype as ``canvas``.
        corner: (n, P, 2) long, (row, col) of each patch's top-left pixel; patches must lie inside the canvas.

    Returns:
        A new (n, H, W) tensor.
    """
    n, h, w = canvas.shape
    p = patches.shape[-1]
    offsets = torch.arange(p, device=canvas.device)
    rows = (corner[..., 0, None] + offsets)[..., :, None]
    cols = (corner[..., 1, None] + offsets)[..., None, :]
    index = (rows * w + cols).reshape(n, -1)  # flat canvas index of every patch pixel
    return canvas.reshape(n, -1).scatter_reduce(1, index, patches.reshape(n, -1), reduce="amax").view(n, h, w)


def random_clutter(
    n: int,
    num_digits: int,
    *,
    num_pieces: int = 8,
    patch: int = 6,
    canvas: int = 60,
    digit: int = DIGIT_SIZE,
    exclude: Tensor | None = None,
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
) -> tuple[Tensor, Tensor, Tensor]:
    """Draw clutter: which digit each piece comes from, where it is cut and where it is pasted.

    Args:
        n: number of canvases.
        num_digits: size of the pool of digits the pieces are cut from.
        num_pieces: clutter pieces per canvas.
        patch: side of a piece in pixels.
        canvas: side of the canvas in pixels.
        digit: side of a digit in pixels.
        exclude: (n,) long, the pool index of each canvas's own digit, never used as a source when the pool holds
            other digits; None to allow any.
        generator: the random generator, on ``device``.
        device: where the parameters are made.

    Returns:
        source (n, num_pieces) long pool indices, cut (n, num_pieces, 2) long (row, col) in the digit,
        paste (n, num_pieces, 2) long (row, col) in the canvas; feed them to :func:`cut_patches` and
        :func:`paste_patches`.
    """
    if exclude is not None and num_digits > 1:
        # Draw among the num_digits - 1 others, then skip over the excluded index.
        source = torch.randint(0, num_digits - 1, (n, num_pieces), generator=generator, device=device)
        source = source + (source >= exclude.to(device)[:, None]).long()
    else:
        source = torch.randint(0, num_digits, (n, num_pieces), generator=generator, device=device)
    cut = torch.randint(0, digit - patch + 1, (n, num_pieces, 2), generator=generator, device=device)
    paste = torch.randint(0, canvas - patch + 1, (n, num_pieces, 2), generator=generator, device=device)
    return source, cut, paste


def random_clutter_pieces(
    pool: Tensor, *, num_pieces: int, patch: int, canvas: int, generator: torch.Generator | None = None
) -> dict[str, Tensor]:
    """Clutter for a batch of canvases, each cut from the other canvases' digits (cluttered MNIST's).

    Args:
        pool: (n, s, s) the digit of each canvas, at the size the pieces are cut at (28 pixels for MNIST's clutter).
        num_pieces: clutter pieces per canvas.
        patch: side of a piece in pixels.
        canvas: side of the canvas in pixels.
        generator: the random generator, on ``pool``'s device.

    Returns:
        "clutter" (n, num_pieces, patch, patch) pieces in ``pool``'s dtype and "clutter_at" (n, num_pieces, 2) long
        corners (row, col) in the canvas: what :func:`merge_digits` pastes.
    """
    n, device = pool.shape[0], pool.device
    own = torch.arange(n, device=device)
    source, cut, paste = random_clutter(
        n,
        n,
        num_pieces=num_pieces,
        patch=patch,
        canvas=canvas,
        digit=pool.shape[-1],
        exclude=own,
        **_on(generator, device),
    )
    return {"clutter": cut_patches(pool, source, cut, patch), "clutter_at": paste}


def first_slots(drawn: Tensor, slots: int) -> Tensor:
    """Which of ``slots`` digit slots are drawn when each sample draws its first ``drawn`` ones.

    Args:
        drawn: (n,) integer counts.
        slots: the slots per sample.

    Returns:
        (n, slots) bool.
    """
    return torch.arange(slots, device=drawn.device) < drawn[:, None]


def merge_digits(placed: Tensor, params: dict[str, Tensor], drawn: Tensor | None = None) -> Tensor:
    """One canvas from the digits placed on it: their pixelwise maximum, then the clutter of ``params`` pasted.

    Args:
        placed: (n, D, H, W) each digit alone on the canvas.
        params: the clutter under "clutter" and "clutter_at" (:func:`random_clutter_pieces`), or none.
        drawn: (n,) how many of the D digits are drawn (the first ones), or None for all of them.

    Returns:
        (n, 1, H, W) in ``placed``'s dtype.
    """
    if drawn is not None:
        placed = placed * first_slots(drawn.to(placed.device), placed.shape[1])[..., None, None].to(placed.dtype)
    canvas = placed.amax(dim=1)
    if "clutter" in params:
        canvas = paste_patches(canvas, params["clutter"].to(canvas.dtype), params["clutter_at"])
    return canvas.unsqueeze(1)


# --------------------------------------------------------------------------------------------------------------
# application (one warp per image)
# --------------------------------------------------------------------------------------------------------------
def warp_affine(images: Tensor, theta: Tensor, size: int | tuple[int, int]) -> Tensor:
    """Apply one affine warp per image.

    Args:
        images: (B, C, H, W) floating.
        theta: (B, 2, 3) output-to-input.
        size: output (Ho, Wo) or an int.

    Returns:
        (B, C, Ho, Wo), zeros outside the input.
    """
    return kernels.sample_affine(images, theta.unsqueeze(1).to(images.dtype), size).squeeze(1)


def place_digits(digits: Tensor, theta: Tensor, size: int | tuple[int, int]) -> Tensor:
    """Every digit of every sample warped alone onto a canvas of its own.

    Args:
        digits: (n, D, h, w) D digits per sample.
        theta: (n, D, 2, 3) each digit's output-to-input placement.
        size: canvas (H, W) or an int.

    Returns:
        (n, D, H, W); :func:`merge_digits` makes one canvas of them.
    """
    n, d = digits.shape[:2]
    placed = warp_affine(digits.reshape(n * d, 1, *digits.shape[-2:]), theta.reshape(n * d, 2, 3), size)
    return placed.view(n, d, *placed.shape[-2:])


def warp_projective(images: Tensor, h: Tensor, size: int | tuple[int, int]) -> Tensor:
    """Apply one homography per image: images (B, C, H, W), h (B, 3, 3) -> (B, C, Ho, Wo)."""
    return kernels.sample_projective(images, h.unsqueeze(1).to(images.dtype), size).squeeze(1)


def warp_tps(images: Tensor, control_points: Tensor, size: int | tuple[int, int]) -> Tensor:
    """Apply one thin-plate spline per image: images (B, C, H, W), control points (B, N, 2) -> (B, C, Ho, Wo)."""
    return kernels.sample_tps(images, control_points.unsqueeze(1).to(images.dtype), size).squeeze(1)
