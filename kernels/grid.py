"""The explicit-grid family of the Triton sampler: its coordinate map, its parameter-gradient epilogue, its op.

The only family whose sampling points come from memory: grid (B, K, Ho, Wo, 2) holds normalised (x, y), read
with its own strides, and ix = x * sx + (W - 1) / 2 (see :func:`kernels.reference.pixel_scales`). Its backward
writes d loss / d grid (B, K, Ho, Wo, 2), which has the grid's size anyway: one plane per channel group, summed by
the launcher.
"""

from __future__ import annotations

import triton
import triton.language as tl
from torch import Tensor

from . import reference
from ._autograd import register, sample
from .reference import Mode, Padding
from .sampler import Family

__all__ = ["GRID", "sample_grid"]


@triton.jit
def _grid_coords(
    grid_ptr, a_ptr, s_ptr, bk, K, N, i, j, pmask, H, W, Ho, Wo, sgrb, sgrk, sgrh, sgrw, sgrd,
    CDT: tl.constexpr, FMAX: tl.constexpr,
):  # fmt: skip
    # s = (sx, sy) in the compute dtype; ix = grid[b, k, i, j, 0] * sx + (W - 1) / 2, likewise iy.
    sx = tl.load(s_ptr).to(CDT)
    sy = tl.load(s_ptr + 1).to(CDT)
    gp = grid_ptr + (bk // K).to(tl.int64) * sgrb + (bk % K).to(tl.int64) * sgrk
    gp += i.to(tl.int64) * sgrh + j.to(tl.int64) * sgrw
    gxn = tl.load(gp, mask=pmask, other=0.0).to(CDT)
    gyn = tl.load(gp + sgrd, mask=pmask, other=0.0).to(CDT)
    ix = gxn * sx + (W - 1) * 0.5
    iy = gyn * sy + (H - 1) * 0.5
    return ix, iy, pmask, sx, sy, sx, sx, sx


@triton.jit
def _grid_param_grad(
    ggrid_ptr, slot, bk, c_lo, i, j, pmask, gix, giy, sx, sy, e2, e3, e4, a_ptr, s_ptr, N, C, Ho, Wo,
    CGROUP: tl.constexpr, CDT: tl.constexpr,
):  # fmt: skip
    # ggrid is (B, K, groups, Ho, Wo, 2) contiguous, one plane per channel group: pixel (i, j) of (b, k) and group g
    # at (((bk * groups + g) * Ho + i) * Wo + j) * 2.
    plane = bk.to(tl.int64) * tl.cdiv(C, CGROUP) + c_lo // CGROUP
    q = ((plane * Ho + i) * Wo + j) * 2
    tl.store(ggrid_ptr + q, gix * sx, mask=pmask)
    tl.store(ggrid_ptr + q + 1, giy * sy, mask=pmask)


def _grid_inputs(
    x: Tensor, grid: Tensor, aux: Tensor | None, size: tuple[int, int], align_corners: bool
) -> tuple[Tensor, Tensor, Tensor]:
    # The grid as it is (any strides and float dtype) and (sx, sy): pixels per normalised unit of the input, in the
    # compute dtype (as the auxiliary tensor and the scalars).
    h, w = x.shape[-2:]
    sx, sy, _, _ = reference.pixel_scales((h, w), (h, w), align_corners)
    scalars = reference.host_constant([sx, sy], reference.compute_dtype(x, grid), x)
    return grid, scalars, scalars


def _reference(x, grid, aux, size, align_corners, padding_mode, mode, fill):  # type: ignore[no-untyped-def]
    return reference.sample_grid(x, grid, align_corners=align_corners, padding_mode=padding_mode, mode=mode, fill=fill)


GRID = register(
    Family(
        "grid", "sample_grid", _grid_coords, _grid_param_grad, _grid_inputs, _reference, strided=True, per_group=True
    )
)


def sample_grid(
    x: Tensor,
    grid: Tensor,
    *,
    align_corners: bool = False,
    padding_mode: Padding = "zeros",
    mode: Mode = "bilinear",
    fill: float = 0.0,
    image_grad: str | None = None,
) -> Tensor:
    """Sample K explicit grids with the Triton kernels; see :func:`kernels.reference.sample_grid`.

    Args:
        x: images (B, C, H, W), any strides, float16, bfloat16, float32 or float64.
        grid: (B, K, Ho, Wo, 2) normalised (x, y) sampling points, any strides.
        align_corners, padding_mode, mode: as for ``F.grid_sample``.
        fill, image_grad: as for :func:`kernels.affine.sample_affine` (the grid's image gradient always scatters).

    Returns:
        (B, K, C, Ho, Wo), contiguous, in x's dtype.
    """
    reference.check_grid(x, grid)
    reference.check_options(padding_mode, mode)
    size = (grid.shape[2], grid.shape[3])
    return sample(GRID, x, grid, None, size, align_corners, padding_mode, mode, fill, image_grad)
