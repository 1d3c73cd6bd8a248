"""Transformation families of the paper, one class each.

A family turns the raw output of a localisation head into warp parameters (optionally bounded), knows its
identity and how to place an axis-aligned window (for tiled initialisation), samples an image through the
kernels, and maps points, which gives the outline of the region each transformer reads (for drawing) and
statistics such as the mean scale. Parameters always live in normalised coordinates: the output grid spans
[-1, 1]^2 and is mapped onto the input, whose extent is also [-1, 1]^2.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from stn_lightning.kernels import Backend, Mode, Padding
from stn_lightning.kernels.reference import half_extent

from . import kernels

__all__ = [
    "Affine",
    "AffineFamily",
    "Attention",
    "Projective",
    "Similarity",
    "ThinPlateSpline",
    "Transform",
    "Translation",
    "outline_square",
    "to_pixels",
]


def _bounded(raw: Tensor, limit: float | None) -> Tensor:
    return raw if limit is None else limit * torch.tanh(raw / limit)


def _unbounded(value: Tensor, limit: float | None) -> Tensor:
    if limit is None:
        return value
    return limit * torch.atanh((value / limit).clamp(-1 + 1e-6, 1 - 1e-6))


def _check_range(name: str, value: float | None) -> None:
    if value is not None and not value > 0:
        raise ValueError(f"expected {name} > 0 or None, got {value}")


class _ScaleRange:
    """Maps a raw value to a scale in (lo, hi) with a sigmoid; None means unbounded.

    An identity start needs lo < 1 < hi; a tiled start only needs the window scale inside the range.
    """

    def __init__(self, scale_range: tuple[float, float] | None) -> None:
        if scale_range is not None:
            lo, hi = (float(s) for s in scale_range)
            if not 0 <= lo < hi:
                raise ValueError(f"expected a scale range (lo, hi) with 0 <= lo < hi, got {scale_range}")
            scale_range = (lo, hi)
        self.range = scale_range

    def forward(self, raw: Tensor) -> Tensor:
        if self.range is None:
            return raw
        lo, hi = self.range
        return lo + (hi - lo) * torch.sigmoid(raw)

    def inverse(self, scale: Tensor) -> Tensor:
        if self.range is None:
            return scale
        lo, hi = self.range
        p = ((scale - lo) / (hi - lo)).clamp(1e-6, 1 - 1e-6)
        return torch.log(p) - torch.log1p(-p)


class Transform(nn.Module, ABC):
    """A transformation family. Subclasses set ``num_params`` and implement the abstract methods.

    A Transform holds no learnable parameters; it is an ``nn.Module`` so that it can sit inside a model and be
    chosen in YAML with ``class_path``.
    """

    num_params: int

    @abstractmethod
    def window(self, scale: float, tx: float, ty: float) -> Tensor:
        """Parameters (P,) of an axis-aligned window of isotropic ``scale`` centred at (tx, ty)."""

    def identity(self) -> Tensor:
        """The identity parameters (P,)."""
        return self.window(1.0, 0.0, 0.0)

    def forward(self, raw: Tensor) -> Tensor:
        """Map the head's raw output (..., P) to parameters (..., P), applying the family's bounds."""
        return raw

    def inverse(self, params: Tensor) -> Tensor:
        """The raw output (..., P) that :meth:`forward` maps to ``params``; used to initialise head biases."""
        return params

    def sample(
        self,
        x: Tensor,
        params: Tensor,
        size: tuple[int, int],
        *,
        align_corners: bool = False,
        padding_mode: Padding = "zeros",
        mode: Mode = "bilinear",
        fill: float = 0.0,
        backend: Backend = "auto",
    ) -> Tensor:
        """Warp ``x`` (B, C, H, W) by ``params`` (B, K, P) into crops (B, K, C, Ho, Wo) of ``size``; with zeros
        padding, points outside read ``fill``."""
        op, warp, extra = self.sampler(x, params.float())
        return op(
            x,
            warp,
            size,
            align_corners=align_corners,
            padding_mode=padding_mode,
            mode=mode,
            fill=fill,
            backend=backend,
            **extra,
        )

    @abstractmethod
    def sampler(self, x: Tensor, params: Tensor) -> tuple[Callable[..., Tensor], Tensor, dict[str, Any]]:
        """The ``kernels`` op that samples this family, its warp argument for ``params`` (B, K, P) on images ``x``,
        and the op's other family-specific keyword arguments."""

    @abstractmethod
    def points(self, params: Tensor, xy: Tensor, in_size: tuple[int, int]) -> Tensor:
        """Map output points ``xy`` (M, 2), normalised, through ``params`` (B, K, P) to input points (B, K, M, 2)."""

    def outline(
        self, params: Tensor, in_size: tuple[int, int], *, align_corners: bool = False, per_side: int = 16
    ) -> Tensor:
        """The boundary of the region each transformer reads, in input pixel coordinates.

        Args:
            params: (B, K, P).
            in_size: input (H, W).
            align_corners: the convention the sampler uses.
            per_side: points per side of the output square (more points follow curved warps).

        Returns:
            A closed polygon (B, K, 4 * per_side + 1, 2) of (x, y) pixel coordinates, pixel centres at integers.
        """
        square = outline_square(per_side, params.device)
        return to_pixels(self.points(params.float(), square, in_size), in_size, align_corners)

    def grid_lines(
        self,
        params: Tensor,
        in_size: tuple[int, int],
        *,
        lines: int = 4,
        per_line: int = 16,
        align_corners: bool = False,
    ) -> Tensor:
        """The output's ``lines`` x ``lines`` lattice (rows, then columns) mapped into the input, in pixels.

        Drawn for warps that bend straight lines (the thin-plate spline's control grid); the lines run from edge
        to edge of the output square.

        Returns:
            (B, K, 2 * lines, per_line, 2) polylines of (x, y) pixel coordinates.
        """
        t = torch.linspace(-1.0, 1.0, per_line, device=params.device)
        at = torch.linspace(-1.0, 1.0, lines, device=params.device)
        rows = torch.stack([t.expand(lines, -1), at[:, None].expand(-1, per_line)], -1)  # (lines, per_line, 2)
        cols = rows.flip(-1)
        xy = torch.cat([rows, cols]).reshape(-1, 2)
        pts = self.points(params.float(), xy, in_size)
        return to_pixels(pts, in_size, align_corners).unflatten(-2, (2 * lines, per_line))

    def statistics(self, params: Tensor, in_size: tuple[int, int]) -> dict[str, Tensor]:
        """Summary statistics of a batch of parameters (B, K, P).

        Returns:
            ``scale``: mean square root of the area read, relative to the input's (1 = the whole image);
            ``outside``: fraction of sampled points (the pixel centres of an 8 x 8 output) that fall outside the
            input;
            ``rotation``: mean absolute angle, in degrees, of the output's horizontal axis in the input's pixels.
        """
        with torch.no_grad():
            poly = self.points(params.float(), _square(params.device), in_size)
            x, y = poly[..., 0], poly[..., 1]
            area = 0.5 * (x * y.roll(-1, -1) - x.roll(-1, -1) * y).sum(-1).abs()
            r = (torch.arange(8, device=params.device, dtype=torch.float32) * 2 + 1) / 8 - 1
            lattice = torch.stack(torch.meshgrid(r, r, indexing="xy"), -1).reshape(-1, 2)
            inner = self.points(params.float(), lattice, in_size)
            outside = (inner.abs() > 1).any(-1).float().mean()
            ends = torch.tensor([[-1.0, 0.0], [1.0, 0.0]], device=params.device)  # the output's horizontal axis
            axis = self.points(params.float(), ends, in_size)
            h, w = in_size
            d = (axis[..., 1, :] - axis[..., 0, :]) * torch.tensor([w / 2, h / 2], device=params.device)
            rotation = torch.rad2deg(torch.atan2(d[..., 1], d[..., 0])).abs().nan_to_num(0.0).mean()
            return {"scale": (area / 4).sqrt().nan_to_num(0.0).mean(), "outside": outside, "rotation": rotation}


def outline_square(per_side: int, device: torch.device | None = None) -> Tensor:
    """The closed boundary (4 * per_side + 1, 2) of the normalised square [-1, 1]^2, as (x, y) points clockwise (in
    image orientation, y down) from the top-left corner, which is repeated at the end."""
    t = torch.linspace(-1.0, 1.0, per_side + 1, device=device, dtype=torch.float32)[:-1]
    one = torch.ones_like(t)
    return torch.cat(
        [
            torch.stack([t, -one], -1),
            torch.stack([one, t], -1),
            torch.stack([-t, one], -1),
            torch.stack([-one, -t], -1),
            torch.tensor([[-1.0, -1.0]], device=device),
        ]
    )


def to_pixels(pts: Tensor, in_size: tuple[int, int], align_corners: bool = False) -> Tensor:
    """Normalised input coordinates (..., 2) -> (x, y) pixel coordinates (..., 2) of an input of ``in_size`` (H, W),
    pixel centres at integers, in the sampler's ``align_corners`` convention."""
    h, w = in_size
    sx, sy = half_extent(w, align_corners), half_extent(h, align_corners)
    return torch.stack([pts[..., 0] * sx + (w - 1) / 2, pts[..., 1] * sy + (h - 1) / 2], dim=-1)


def _square(device: torch.device) -> Tensor:
    # Corners of the output square in order, for the shoelace area of what a warp reads.
    return torch.tensor([[-1.0, -1.0], [1.0, -1.0], [1.0, 1.0], [-1.0, 1.0]], device=device)


class AffineFamily(Transform):
    """Families whose warp is an affine matrix theta (B, K, 2, 3); subclasses implement :meth:`theta`."""

    @abstractmethod
    def theta(self, params: Tensor, in_size: tuple[int, int]) -> Tensor:
        """The ``F.affine_grid`` matrices (B, K, 2, 3) of ``params`` (B, K, P) for an input of ``in_size``."""

    def sampler(self, x: Tensor, params: Tensor) -> tuple[Callable[..., Tensor], Tensor, dict[str, Any]]:
        return kernels.sample_affine, self.theta(params, (x.shape[-2], x.shape[-1])), {}

    def points(self, params: Tensor, xy: Tensor, in_size: tuple[int, int]) -> Tensor:
        theta = self.theta(params, in_size)
        return xy @ theta[..., :2].transpose(-1, -2) + theta[..., 2].unsqueeze(-2)


class Affine(AffineFamily):
    """The general affine warp, 6 parameters: theta row major (crop, translation, rotation, scale, skew).

    Args:
        translation_range: when set, the translations are bounded to +-range by a scaled tanh.
    """

    num_params = 6

    def __init__(self, translation_range: float | None = None) -> None:
        super().__init__()
        _check_range("translation_range", translation_range)
        self.translation_range = translation_range

    def window(self, scale: float, tx: float, ty: float) -> Tensor:
        return torch.tensor([scale, 0.0, tx, 0.0, scale, ty])

    def forward(self, raw: Tensor) -> Tensor:
        if self.translation_range is None:
            return raw
        t = _bounded(raw[..., [2, 5]], self.translation_range)
        return torch.stack([raw[..., 0], raw[..., 1], t[..., 0], raw[..., 3], raw[..., 4], t[..., 1]], -1)

    def inverse(self, params: Tensor) -> Tensor:
        raw = params.clone()
        raw[..., [2, 5]] = _unbounded(params[..., [2, 5]], self.translation_range)
        return raw

    def theta(self, params: Tensor, in_size: tuple[int, int]) -> Tensor:
        return params.reshape(*params.shape[:-1], 2, 3)


class _ScaledFamily(AffineFamily):
    """Shared bounds of the families whose parameters are (scale, ..., tx, ty): Attention and Similarity."""

    def __init__(self, scale_range: tuple[float, float] | None = None, translation_range: float | None = None) -> None:
        super().__init__()
        _check_range("translation_range", translation_range)
        self.scale = _ScaleRange(scale_range)
        self.scale_range = self.scale.range
        self.translation_range = translation_range

    def forward(self, raw: Tensor) -> Tensor:
        s = self.scale.forward(raw[..., :1])
        return torch.cat([s, raw[..., 1:-2], _bounded(raw[..., -2:], self.translation_range)], -1)

    def inverse(self, params: Tensor) -> Tensor:
        s = self.scale.inverse(params[..., :1])
        return torch.cat([s, params[..., 1:-2], _unbounded(params[..., -2:], self.translation_range)], -1)


class Attention(_ScaledFamily):
    """Isotropic scale and translation, 3 parameters (s, tx, ty): the attention crops used for CUB.

    Args:
        scale_range: (lo, hi) bounds on the scale through a sigmoid; None leaves it free.
        translation_range: bound on the translations through a scaled tanh; None leaves them free.
    """

    num_params = 3

    def window(self, scale: float, tx: float, ty: float) -> Tensor:
        return torch.tensor([scale, tx, ty])

    def theta(self, params: Tensor, in_size: tuple[int, int]) -> Tensor:
        s, tx, ty = params.unbind(-1)
        zero = torch.zeros_like(s)
        return torch.stack([torch.stack([s, zero, tx], -1), torch.stack([zero, s, ty], -1)], -2)


class Similarity(_ScaledFamily):
    """Rotation, isotropic scale and translation, 4 parameters (s, angle in radians, tx, ty).

    The rotation is a rotation of the image in pixels, also on non-square inputs: normalised coordinates
    stretch the axes by W/2 and H/2, and theta compensates for the aspect ratio.

    Args:
        scale_range: (lo, hi) bounds on the scale through a sigmoid; None leaves it free.
        translation_range: bound on the translations through a scaled tanh; None leaves them free.
    """

    num_params = 4

    def window(self, scale: float, tx: float, ty: float) -> Tensor:
        return torch.tensor([scale, 0.0, tx, ty])

    def theta(self, params: Tensor, in_size: tuple[int, int]) -> Tensor:
        s, angle, tx, ty = params.unbind(-1)
        h, w = in_size
        cos, sin = s * torch.cos(angle), s * torch.sin(angle)
        # x_n' = cos x_n - sin y_n H/W and y_n' = sin x_n W/H + cos y_n: a rotation in pixels, not in [-1, 1]^2.
        return torch.stack([torch.stack([cos, -sin * (h / w), tx], -1), torch.stack([sin * (w / h), cos, ty], -1)], -2)


class Translation(AffineFamily):
    """Translation only, 2 parameters (tx, ty); the window scale is ignored.

    Args:
        translation_range: bound on the translations through a scaled tanh; None leaves them free.
    """

    num_params = 2

    def __init__(self, translation_range: float | None = None) -> None:
        super().__init__()
        _check_range("translation_range", translation_range)
        self.translation_range = translation_range

    def window(self, scale: float, tx: float, ty: float) -> Tensor:
        return torch.tensor([tx, ty])

    def forward(self, raw: Tensor) -> Tensor:
        return _bounded(raw, self.translation_range)

    def inverse(self, params: Tensor) -> Tensor:
        return _unbounded(params, self.translation_range)

    def theta(self, params: Tensor, in_size: tuple[int, int]) -> Tensor:
        tx, ty = params.unbind(-1)
        one, zero = torch.ones_like(tx), torch.zeros_like(tx)
        return torch.stack([torch.stack([one, zero, tx], -1), torch.stack([zero, one, ty], -1)], -2)


class Projective(Transform):
    """Projective warp, 8 parameters: the homography on normalised coordinates with h33 = 1, row major."""

    num_params = 8

    def window(self, scale: float, tx: float, ty: float) -> Tensor:
        return torch.tensor([scale, 0.0, tx, 0.0, scale, ty, 0.0, 0.0])

    def matrix(self, params: Tensor) -> Tensor:
        """The homographies (B, K, 3, 3) of ``params`` (B, K, 8)."""
        one = torch.ones_like(params[..., :1])
        return torch.cat([params, one], -1).reshape(*params.shape[:-1], 3, 3)

    def sampler(self, x: Tensor, params: Tensor) -> tuple[Callable[..., Tensor], Tensor, dict[str, Any]]:
        return kernels.sample_projective, self.matrix(params), {}

    def points(self, params: Tensor, xy: Tensor, in_size: tuple[int, int]) -> Tensor:
        h = self.matrix(params)
        uvw = torch.cat([xy, torch.ones_like(xy[:, :1])], -1) @ h.transpose(-1, -2)
        return uvw[..., :2] / uvw[..., 2:]


class ThinPlateSpline(Transform):
    """Thin-plate spline with a grid_size x grid_size lattice of control points (the paper uses 4 x 4).

    The 2 * grid_size**2 parameters are where the lattice points land in the input, (x, y) interleaved, row
    major; the lattice itself is fixed in the output.

    Args:
        grid_size: control points per side.
    """

    target: Tensor

    def __init__(self, grid_size: int = 4) -> None:
        super().__init__()
        if grid_size < 2:
            raise ValueError(f"expected grid_size >= 2, got {grid_size}")
        self.grid_size = grid_size
        self.num_params = 2 * grid_size * grid_size
        self.register_buffer("target", kernels.tps_target_points(grid_size), persistent=False)

    def window(self, scale: float, tx: float, ty: float) -> Tensor:
        return (self.target.cpu() * scale + torch.tensor([tx, ty])).reshape(-1)

    def control_points(self, params: Tensor) -> Tensor:
        """The control points (B, K, N, 2) of ``params`` (B, K, 2N)."""
        return params.reshape(*params.shape[:-1], -1, 2)

    def sampler(self, x: Tensor, params: Tensor) -> tuple[Callable[..., Tensor], Tensor, dict[str, Any]]:
        return kernels.sample_tps, self.control_points(params), {"target_points": self.target.to(x.device)}

    def points(self, params: Tensor, xy: Tensor, in_size: tuple[int, int]) -> Tensor:
        target = self.target.to(params.device)
        coefficients = kernels.tps_coefficients(self.control_points(params), target)  # (B, K, N + 3, 2)
        d2 = ((xy[:, None, :] - target[None, :, :]) ** 2).sum(-1)
        features = torch.cat([kernels.reference.tps_kernel(d2), torch.ones_like(xy[:, :1]), xy], -1)
        return xy + features @ coefficients


def tiled_windows(transform: Transform, k: int) -> Tensor:
    """Parameters (K, P) of K windows tiling the image: a near-square grid of equal, non-overlapping crops.

    This is the paper's initialisation for parallel attention transformers on CUB.
    """
    cols = math.ceil(math.sqrt(k))
    rows = math.ceil(k / cols)
    scale = 1.0 / max(rows, cols)
    windows = []
    for i in range(k):
        r, c = divmod(i, cols)
        windows.append(transform.window(scale, -1 + (2 * c + 1) / cols, -1 + (2 * r + 1) / rows))
    return torch.stack(windows)
