"""Sampling ops for K parallel spatial transformers, and the dispatcher between their two implementations.

Every public op takes images (B, C, H, W) and K sets of warp parameters per image and returns the samples
(B, K, C, Ho, Wo), contiguous. ``backend`` picks the implementation:

* ``"torch"``: the PyTorch path (kernels.torch_path: ``F.grid_sample`` over the stacked grids, with the
  contract's handling of non-finite points and ``fill``), on any device; kernels.reference is the exact oracle;
* ``"triton"``: the fused Triton kernels (on CUDA tensors, or on CPU tensors under TRITON_INTERPRET=1);
* ``"auto"`` (default): on CUDA tensors, Triton for the ops and passes where the last GPU run recorded in
  benchmarks/RESULTS-kernels.md shows it faster than the PyTorch path (``_AUTO_TRITON``), else PyTorch.
"""

from __future__ import annotations

from typing import Literal

import torch
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


#: The (op, pass) pairs for which backend="auto" takes Triton on CUDA tensors. The rule: Triton only where the last GPU
#: run recorded in benchmarks/RESULTS-kernels.md (2026-11-27, H100, triton 3.6) measured it faster than the PyTorch
#: path (its eager-stacked column, F.grid_sample over the stacked grids) for every workload and dtype it measured
#: for that op; "forward" is a call without a gradient to track, "backward" one with (timed as forward + backward).
#: Measured there: tps forward 0.77 / 0.84 ms against 2.14 / 2.15 (float32 / bfloat16): Triton. Every other pair
#: lost somewhere or was not measured: tps forward + backward 7.70 against 4.05 ms, projective forward 0.92 against
#: 0.68 and forward + backward 3.77 against 3.09 (float32), affine forward and forward + backward on feat56x2 and
#: mnist2 (e.g. 1.28-1.50 against 0.68-0.84 ms), grid never timed. A new GPU run (benchmarks/gpu_session.sh) is what
#: may move a pair in.
_AUTO_TRITON = frozenset({("sample_tps_coefficients", "forward")})


def resolve_backend(
    backend: str, x: Tensor, op: str | None = None, needs_grad: bool = False
) -> Literal["torch", "triton"]:
    """The implementation that ``backend`` selects for the image ``x``, for the op named ``op`` (e.g.
    "sample_affine") and a call that needs gradients (``needs_grad``) or not. "auto" without an op: PyTorch.

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
    if not x.is_cuda or (op, "backward" if needs_grad else "forward") not in _AUTO_TRITON:
        return "torch"
    return "triton" if triton_available() else "torch"


class _Auto:
    """backend="auto" on CUDA: each op picks its implementation per call, from ``_AUTO_TRITON``."""

    def __getattr__(self, op: str):  # type: ignore[no-untyped-def]
        def call(x: Tensor, params: Tensor, *args, **kwargs):  # type: ignore[no-untyped-def]
            needs_grad = torch.is_grad_enabled() and (x.requires_grad or params.requires_grad)
            if resolve_backend("auto", x, op, needs_grad) == "triton":
                from . import triton_ops

                return getattr(triton_ops, op)(x, params, *args, **kwargs)
            return getattr(torch_path, op)(x, params, *args, **kwargs)

        return call


_AUTO = _Auto()


def _impl(backend: str, x: Tensor):  # type: ignore[no-untyped-def]
    if backend == "auto" and x.is_cuda:
        return _AUTO
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
