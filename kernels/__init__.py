"""Sampling ops for K parallel spatial transformers, and the dispatcher between their two implementations.

Every public op takes images (B, C, H, W) and K sets of warp parameters per image and returns the samples
(B, K, C, Ho, Wo), contiguous. ``backend`` picks the implementation:

* ``"torch"``: the PyTorch path (kernels.torch_path: ``F.grid_sample`` over the stacked grids, with the
  contract's handling of non-finite points and ``fill``), on any device; kernels.reference is the exact oracle;
* ``"triton"``: the fused Triton kernels (on CUDA tensors, or on CPU tensors under TRITON_INTERPRET=1);
* ``"auto"`` (default): Triton for CUDA tensors when the Triton kernels are available, else PyTorch.
"""

from __future__ import annotations

from typing import Literal

from torch import Tensor

from . import reference, torch_path
from .reference import (
    Mode,
    Padding,
    base_grid,
    tps_coefficients,
    tps_target_points,
)

__all__ = [
    "Backend",
    "Mode",
    "Padding",
    "base_grid",
    "resolve_backend",
    "sample_affine",
    "sample_grid",
    "sample_projective",
    "sample_tps",
    "tps_coefficients",
    "tps_target_points",
    "triton_available",
]

Backend = Literal["auto", "torch", "triton"]
_BACKENDS = ("auto", "torch", "triton")


def triton_available() -> bool:
    """Whether the Triton implementation of the ops can be imported here."""
    try:
        from . import triton_ops  # noqa: F401
    except ImportError:
        return False
    return True


def resolve_backend(backend: str, x: Tensor) -> Literal["torch", "triton"]:
    """The implementation that ``backend`` selects for the image ``x``.

    Raises:
        ValueError: for an unknown backend name.
        RuntimeError: when "triton" is asked for and Triton cannot run here.
    """
    if backend not in _BACKENDS:
        raise ValueError(f"expected backend in {_BACKENDS}, got {backend!r}")
    if backend == "torch":
        return "torch"
    if backend == "triton":
        if not triton_available():
            raise RuntimeError("backend='triton' was asked for, but the Triton kernels cannot be imported here")
        return "triton"
    return "triton" if x.is_cuda and triton_available() else "torch"


def _impl(backend: str, x: Tensor):  # type: ignore[no-untyped-def]
    if resolve_backend(backend, x) == "triton":
        from . import triton_ops

        return triton_ops
    return torch_path


def _fill(fill: float) -> dict[str, float]:
    # Passed on only when set, so that an implementation without the option still serves the default.
    return {"fill": float(fill)} if fill != 0.0 else {}


def sample_affine(
    x: Tensor,
    theta: Tensor,
    size: int | tuple[int, int],
    *,
    align_corners: bool = False,
    padding_mode: Padding = "zeros",
    mode: Mode = "bilinear",
    fill: float = 0.0,
    backend: Backend = "auto",
) -> Tensor:
    """Sample K affine warps of each image; see :func:`kernels.reference.sample_affine`.

    Args:
        x: images (B, C, H, W).
        theta: (B, K, 2, 3), the ``F.affine_grid`` convention.
        size: output size (Ho, Wo), or an int.
        align_corners, padding_mode, mode: as for ``F.grid_sample``.
        fill: the value that points outside the image read with zeros padding, and non-finite points in any mode.
        backend: "auto", "torch" or "triton".

    Returns:
        (B, K, C, Ho, Wo).
    """
    return _impl(backend, x).sample_affine(
        x, theta, size, align_corners=align_corners, padding_mode=padding_mode, mode=mode, **_fill(fill)
    )


def sample_projective(
    x: Tensor,
    h: Tensor,
    size: int | tuple[int, int],
    *,
    align_corners: bool = False,
    padding_mode: Padding = "zeros",
    mode: Mode = "bilinear",
    fill: float = 0.0,
    backend: Backend = "auto",
) -> Tensor:
    """Sample K projective warps of each image; see :func:`kernels.reference.sample_projective`.

    Args:
        x: images (B, C, H, W).
        h: (B, K, 3, 3) homographies on normalised coordinates.
        size: output size (Ho, Wo), or an int.
        align_corners, padding_mode, mode: as for ``F.grid_sample``.
        fill: the value that points outside the image read with zeros padding, and non-finite points in any mode.
        backend: "auto", "torch" or "triton".

    Returns:
        (B, K, C, Ho, Wo).
    """
    return _impl(backend, x).sample_projective(
        x, h, size, align_corners=align_corners, padding_mode=padding_mode, mode=mode, **_fill(fill)
    )


def sample_tps(
    x: Tensor,
    control_points: Tensor,
    size: int | tuple[int, int],
    *,
    target_points: Tensor | None = None,
    align_corners: bool = False,
    padding_mode: Padding = "zeros",
    mode: Mode = "bilinear",
    fill: float = 0.0,
    backend: Backend = "auto",
) -> Tensor:
    """Sample K thin-plate-spline warps of each image; see :func:`kernels.reference.sample_tps`.

    The spline coefficients come from one small solve (a product with a constant matrix) in PyTorch, shared by
    both backends; the backend then evaluates the spline and samples.

    Args:
        x: images (B, C, H, W).
        control_points: (B, K, N, 2) where each target control point lands in the input.
        size: output size (Ho, Wo), or an int.
        target_points: (N, 2) fixed control points; default a square lattice over [-1, 1]^2.
        align_corners, padding_mode, mode: as for ``F.grid_sample``.
        fill: the value that points outside the image read with zeros padding, and non-finite points in any mode.
        backend: "auto", "torch" or "triton".

    Returns:
        (B, K, C, Ho, Wo).
    """
    coefficients, target_points = reference.solve_tps(x, control_points, target_points)
    return _impl(backend, x).sample_tps_coefficients(
        x,
        coefficients,
        target_points,
        size,
        align_corners=align_corners,
        padding_mode=padding_mode,
        mode=mode,
        **_fill(fill),
    )


def sample_grid(
    x: Tensor,
    grid: Tensor,
    *,
    align_corners: bool = False,
    padding_mode: Padding = "zeros",
    mode: Mode = "bilinear",
    fill: float = 0.0,
    backend: Backend = "auto",
) -> Tensor:
    """Sample K explicit grids from each image; see :func:`kernels.reference.sample_grid`.

    Args:
        x: images (B, C, H, W).
        grid: (B, K, Ho, Wo, 2) normalised (x, y) sampling points.
        align_corners, padding_mode, mode: as for ``F.grid_sample``.
        fill: the value that points outside the image read with zeros padding, and non-finite points in any mode.
        backend: "auto", "torch" or "triton".

    Returns:
        (B, K, C, Ho, Wo).
    """
    return _impl(backend, x).sample_grid(
        x, grid, align_corners=align_corners, padding_mode=padding_mode, mode=mode, **_fill(fill)
    )
