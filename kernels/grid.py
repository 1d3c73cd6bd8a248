"""The explicit-grid family of the Triton sampler: its coordinate map, its parameter-gradient epilogue, its
preparation.

The only family whose sampling points come from memory: grid (B, K, Ho, Wo, 2) holds normalised (x, y), read
contiguous (a non-contiguous grid is copied once), and ix = x * sx + (W - 1) / 2 (see
:func:`kernels.reference.pixel_scales`). Its backward writes d loss / d grid (B, K, Ho, Wo, 2), which has the grid's
size anyway: one plane per channel group, summed by the launcher.
"""

from __future__ import annotations

import triton
import triton.language as tl
from torch import Tensor

from . import reference
from ._autograd import register, sample
from .reference import Spec
from .sampler import Family

__all__ = ["GRID", "grid"]


@triton.jit
def _grid_coords(
    grid_ptr, a_ptr, s_ptr, bk, K, N, i, j, pmask, H, W, Ho, Wo, CDT: tl.constexpr, FMAX: tl.constexpr,
):  # fmt: skip
    # s = (sx, sy) in the compute dtype; ix = grid[b, k, i, j, 0] * sx + (W - 1) / 2, likewise iy. The grid is
    # (B, K, Ho, Wo, 2) contiguous: point (i, j) of (b, k) at ((bk * Ho + i) * Wo + j) * 2.
    sx = tl.load(s_ptr).to(CDT)
    sy = tl.load(s_ptr + 1).to(CDT)
    gp = grid_ptr + ((bk.to(tl.int64) * Ho + i) * Wo + j) * 2
    ix = tl.load(gp, mask=pmask, other=0.0).to(CDT) * sx + (W - 1) * 0.5
    iy = tl.load(gp + 1, mask=pmask, other=0.0).to(CDT) * sy + (H - 1) * 0.5
    return ix, iy, pmask, (sx, sy)


@triton.jit
def _grid_param_grad(
    ggrid_ptr, slot, bk, c_lo, i, j, pmask, gix, giy, terms, a_ptr, s_ptr, N, C, Ho, Wo,
    CGROUP: tl.constexpr, CDT: tl.constexpr,
):  # fmt: skip
    # ggrid is (B, K, groups, Ho, Wo, 2) contiguous, one plane per channel group: pixel (i, j) of (b, k) and group g
    # at (((bk * groups + g) * Ho + i) * Wo + j) * 2.
    sx, sy = terms
    plane = bk.to(tl.int64) * tl.cdiv(C, CGROUP) + c_lo // CGROUP
    q = ((plane * Ho + i) * Wo + j) * 2
    tl.store(ggrid_ptr + q, gix * sx, mask=pmask)
    tl.store(ggrid_ptr + q + 1, giy * sy, mask=pmask)


def _grid_inputs(x: Tensor, grid: Tensor, aux: Tensor | None, spec: Spec) -> tuple[Tensor, Tensor, Tensor]:
    # The grid contiguous (in its own float dtype) and (sx, sy): pixels per normalised unit of the input, in the
    # compute dtype (as the auxiliary tensor and the scalars).
    h, w = x.shape[-2:]
    sx, sy, _, _ = reference.pixel_scales((h, w), (h, w), spec.align_corners)
    scalars = reference.host_constant([sx, sy], reference.compute_dtype(x, grid), x)
    return grid.contiguous(), scalars, scalars


GRID = register(Family("grid", _grid_coords, _grid_param_grad, _grid_inputs, reference.grid, per_group=True))


def grid(x: Tensor, points: Tensor, aux: None, spec: Spec) -> Tensor:
    """kernels.sample_grid's Triton implementation, for validated inputs."""
    return sample(GRID, x, points, aux, spec)
