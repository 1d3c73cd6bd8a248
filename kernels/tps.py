"""The thin-plate-spline family of the Triton sampler: its coordinate map, its parameter-gradient epilogue, its
preparation.

The family takes the solved coefficients (B, K, N + 3, 2) of :func:`kernels.reference.tps_coefficients` (the small
solve stays in PyTorch, in kernels.sample_tps, shared by every backend) and the (N, 2) target points. Each program
evaluates the spline on its tile in registers: with normalised output coordinates (xn, yn) = (u / ox, v / oy),

    f(p) = A^T [1, xn, yn] + sum_n w_n U(|p - t_n|^2),  U(d2) = d2 log d2 (0 at 0),
    ix = (sx / ox) u + sx f_x(p) + (W - 1) / 2,  likewise iy,

and the backward reduces d loss / d coefficients inside the kernel into one partial sum per program
(B, K, programs per (b, k), N + 3, 2), scaled by (sx, sy) in the kernel and summed in PyTorch. The target points
receive no gradient.
"""

from __future__ import annotations

import triton
import triton.language as tl
from torch import Tensor

from . import reference
from ._autograd import register, sample
from .reference import Spec
from .sampler import Family

__all__ = ["TPS", "tps"]

#: Control points per block in the backward's reductions (see _tps_param_grad).
_BLOCK_N = tl.constexpr(8)


@triton.jit
def _radial(d2):
    # U(d2) = d2 log d2, and 0 at d2 = 0, as in the reference.
    return tl.where(d2 > 0, d2 * tl.log(tl.where(d2 > 0, d2, 1.0)), 0.0)


@triton.jit
def _tps_coords(
    coef_ptr, t_ptr, s_ptr, bk, K, N, i, j, pmask, H, W, Ho, Wo, CDT: tl.constexpr, FMAX: tl.constexpr,
):  # fmt: skip
    # s = (sx / ox, sy / oy, sx, sy, 1 / ox, 1 / oy) in the compute dtype (0 for an axis without extent). Every
    # parameter is a scalar load (all threads read one address); no reductions, so no barriers, in this function.
    fxx = tl.load(s_ptr).to(CDT)
    fyy = tl.load(s_ptr + 1).to(CDT)
    sx = tl.load(s_ptr + 2).to(CDT)
    sy = tl.load(s_ptr + 3).to(CDT)
    u = j.to(CDT) - (Wo - 1) * 0.5
    v = i.to(CDT) - (Ho - 1) * 0.5
    xn = u * tl.load(s_ptr + 4).to(CDT)
    yn = v * tl.load(s_ptr + 5).to(CDT)
    # coefficients of (b, k): rows 0..N-1 radial weights, N..N+2 the affine rows for 1, x, y; 2 columns each.
    cb = coef_ptr + bk.to(tl.int64) * (N + 3) * 2
    offx = tl.zeros_like(u)
    offy = tl.zeros_like(u)
    for n in range(N):
        # d2 = (xn - tx)^2 + (yn - ty)^2 as in the reference
        dx = xn - tl.load(t_ptr + 2 * n).to(CDT)
        dy = yn - tl.load(t_ptr + 2 * n + 1).to(CDT)
        rad = _radial(dx * dx + dy * dy)
        offx += rad * tl.load(cb + 2 * n).to(CDT)
        offy += rad * tl.load(cb + 2 * n + 1).to(CDT)
    ca = cb + 2 * N
    offx += tl.load(ca).to(CDT) + tl.load(ca + 2).to(CDT) * xn + tl.load(ca + 4).to(CDT) * yn
    offy += tl.load(ca + 1).to(CDT) + tl.load(ca + 3).to(CDT) * xn + tl.load(ca + 5).to(CDT) * yn
    ix = fxx * u + sx * offx + (W - 1) * 0.5
    iy = fyy * v + sy * offy + (H - 1) * 0.5
    return ix, iy, pmask, (xn, yn)


@triton.jit
def _tps_param_grad(
    part_ptr, slot, bk, c_lo, i, j, pmask, gix, giy, terms, t_ptr, s_ptr, N, C, Ho, Wo,
    CGROUP: tl.constexpr, CDT: tl.constexpr,
):  # fmt: skip
    # Partial sums of d loss / d f: row n is sum_p (gfx, gfy)(p) * feature_n(p), features [U_0..U_N-1, 1, x, y],
    # where (gfx, gfy) = (sx gix, sy giy) since ix = ... + sx * f_x (likewise iy).
    # _BLOCK_N points at a time: U as a (_BLOCK_N, pixels) block, so one 2-D reduction per block and axis rather
    # than one per point (each reduction over the tile goes through shared memory and barriers).
    xn, yn = terms
    gfx = gix * tl.load(s_ptr + 2).to(CDT)
    gfy = giy * tl.load(s_ptr + 3).to(CDT)
    part = part_ptr + slot.to(tl.int64) * (N + 3) * 2
    rn = tl.arange(0, _BLOCK_N)
    for n0 in range(0, N, _BLOCK_N):
        ns = n0 + rn
        nm = ns < N
        dx = xn[None, :] - tl.load(t_ptr + 2 * ns, mask=nm, other=0.0).to(CDT)[:, None]
        dy = yn[None, :] - tl.load(t_ptr + 2 * ns + 1, mask=nm, other=0.0).to(CDT)[:, None]
        rad = _radial(dx * dx + dy * dy)
        tl.store(part + 2 * ns, tl.sum(rad * gfx[None, :], axis=1), mask=nm)
        tl.store(part + 2 * ns + 1, tl.sum(rad * gfy[None, :], axis=1), mask=nm)
    r6 = tl.arange(0, 8)
    col = r6 // 2
    feat = tl.where((col == 0)[:, None], 1.0, tl.where((col == 1)[:, None], xn[None, :], yn[None, :]))
    g = tl.where((r6 % 2 == 0)[:, None], gfx[None, :], gfy[None, :])
    tl.store(part + 2 * N + r6, tl.sum(g * feat, axis=1), mask=r6 < 6)


def _tps_inputs(x: Tensor, coefficients: Tensor, target_points: Tensor, spec: Spec) -> tuple[Tensor, Tensor, Tensor]:
    # Coefficients and target points in the compute dtype, contiguous, and the scalars of _tps_coords.
    dtype = reference.compute_dtype(x, coefficients)
    (fxx, _, sx), (_, fyy, sy), (fwx, fwy, _) = reference.pixel_scale_factors(
        (x.shape[-2], x.shape[-1]), spec.size, spec.align_corners
    )
    scalars = reference.host_constant([fxx, fyy, sx, sy, fwx, fwy], dtype, x)
    target = target_points.detach().to(device=x.device, dtype=dtype).contiguous()
    return coefficients.to(dtype).contiguous(), target, scalars


TPS = register(Family("tps", _tps_coords, _tps_param_grad, _tps_inputs, reference.tps))


def tps(x: Tensor, coefficients: Tensor, target_points: Tensor, spec: Spec) -> Tensor:
    """kernels.sample_tps's Triton implementation, for validated inputs: the solved coefficients (B, K, N + 3, 2)
    and the (N, 2) target points (no gradient flows to them)."""
    return sample(TPS, x, coefficients, target_points, spec)
