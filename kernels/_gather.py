"""The gather backward of the image gradient for affine and projective warps: kernel and launcher.

Why gathers: the scatter backward (kernels/sampler.py) sends every output pixel's gradient to its four input
corners with atomic adds; for crops of a large image most of its time goes to those atomics (1.39 ms of a 2.55 ms
forward + backward on an H100 for B 64, C 3, 448 x 448 -> K 4 x 224 x 224). An affine or projective map has a known
inverse, so each input pixel q can instead find the few output pixels that read it and sum their contributions in
registers, then write its gradient with one plain store: no atomics, no zeroed buffer, and a deterministic sum.

The sampler's backward (kernels/sampler.py) runs :func:`gather` for affine and projective warps with zeros padding
when the image gradient is to be gathered (``image_grad="gather"``, or torch.use_deterministic_algorithms), then its
scatter kernel with ``SKIP_GATHERED`` for the (b, k) the gather flagged as not well conditioned, and adds up both
kernels' partial sums of the parameter gradient. With a padding value ``fill``, a corner outside the image reads
``fill``; its term in the coordinate gradient is ``fill`` times the corner weight's derivative, and the four
derivatives sum to zero, so the outside corners add -fill times the inside ones': the gather's pairs (candidate,
pixel inside) use x - fill.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import reference
from ._device import (
    _affine_map,
    _clamp_coords,
    _div,
    _finite,
    _matrix,
    _offsets,
    _projective_map,
    _round_half_even,
)
from ._launch import block_c, cdiv, device_context, interpreting, launch, needs_int64, num_tiles

__all__ = ["WINDOW_CAP", "gather", "gather_config"]

#: Widest window, in output pixels per axis, that the gather kernel handles (zoom-in up to about 4x); a wider or
#: undefined window (see _affine_window, _projective_window) leaves its (b, k) to the scatter kernel.
WINDOW_CAP = 8


# --------------------------------------------------------------------------------------------------------------
# kernel
# --------------------------------------------------------------------------------------------------------------
# Affine maps. Output pixel (i, j) sends grad * tent(ix - qx) * tent(iy - qy) to q (bilinear), which is nonzero
# only for |ix - qx| < 1 and |iy - qy| < 1: (u, v) lies in the preimage under M of the square q + (-1, 1)^2, a
# parallelogram centred at A (q - c - t) (A = inverse of M's 2 x 2 part, t = M's last column, c the image centre)
# whose bounding box has half-extents hu = |a00| + |a01| (columns) and hv = |a10| + |a11| (rows). Nearest mode
# needs the square q + [-1/2, 1/2]^2, half of that. The window is widened by a slack (su, sv) that bounds the
# rounding of the coordinates and of the preimage centre (see _affine_window), so the candidates cover every
# output pixel whose *computed* coordinates reach q; each candidate's coordinates are then recomputed with the
# forward's own function (_affine_map) and clamp (_clamp_coords), and the corner / rounding decisions are made
# exactly as in _scatter_tile: the gathered terms are the scatter's terms, summed in another order.
#
# Conditioning rule: a (b, k) is gathered when its six entries are finite, det(M) != 0 and the widened window
# spans at most WINDOW_CAP output pixels per axis (2 (hu + su) <= CAP: zoom-in up to about CAP / 2 = 4x).
# Everything else (theta = 0, NaN, inf, 1e30 entries, strong zoom-in, a collapsed axis such as a one-pixel output
# with align_corners) is flagged 0 and left to the scatter kernel, which handles every warp. The rule is evaluated
# once per (b, k) by the gather kernel, which writes it to a (B * K,) flag buffer that the scatter kernel then
# reads, so the two kernels can never disagree on who owns a (b, k) (no rounding-dependent double counting).
#
# Projective maps: the preimage of the square under a homography is a quadrilateral, centred near
# G(q) = adj(M) (X, Y, 1) / n2 (X, Y: q centred), but its size varies over the image. Its half extents are bounded
# by the rows of the inverse map's Jacobian, J^-1 = w adj(N) / det M (N: the numerator of the forward Jacobian, each
# entry affine in u or in v alone), at their largest over the output rectangle widened by CAP / 2 pixels: the path
# from a candidate p in the output to the centre, preimage of the segment from p's input point to q, moves at most
# RADIUS * (hu, hv) < CAP / 2 (the window fits CAP), so it cannot leave that rectangle, where the bounds hold.
# A (b, k) is gathered when w keeps its sign over the widened rectangle (no horizon near the output),
# det M is well determined, and the window (with the rounding slack of the centre's division) fits CAP as above.
# Candidates are recomputed with the forward's own map (_projective_map), so points with |w| < EPS stay invalid.


@triton.jit
def _affine_window(m00, m01, m02, m10, m11, m12, H, W, Ho, Wo, CAP: tl.constexpr, F64: tl.constexpr):
    # Per (b, k) scalars of the gather: whether it is well conditioned, A = inverse of M's 2 x 2 part, the half
    # extents (hu, hv) of the preimage of a unit-radius square in output pixels, and the slacks (su, sv).
    UNIT = 1.1102230246251565e-16 if F64 else 5.9604644775390625e-08  # unit roundoff, 2**-53 or 2**-24
    FMAX = 1.7976931348623157e308 if F64 else 3.4028234663852886e38
    det = m00 * m11 - m01 * m10
    a00 = _div(m11, det)
    a01 = _div(-m01, det)
    a10 = _div(-m10, det)
    a11 = _div(m00, det)
    hu = tl.abs(a00) + tl.abs(a01)
    hv = tl.abs(a10) + tl.abs(a11)
    # Rounding bounds (with a factor of about 4 to spare), in input pixels: |computed ix - exact ix| <= 4 UNIT tx
    # (four roundings of terms at most tx), and the preimage centre A (q - c - t) carries A's relative error, about
    # (2 kappa + 3) UNIT (kappa: the cancellation in det), times |q - c - t| <= reach. Mapped back through A, an
    # input error e moves the preimage by at most hu * e columns; rnd covers the rounding of the window's own
    # arithmetic on numbers of the size of the output (a few output pixels of headroom included).
    tx = tl.abs(m00) * ((Wo - 1) * 0.5) + tl.abs(m01) * ((Ho - 1) * 0.5) + tl.abs(m02) + (W - 1) * 0.5
    ty = tl.abs(m10) * ((Wo - 1) * 0.5) + tl.abs(m11) * ((Ho - 1) * 0.5) + tl.abs(m12) + (H - 1) * 0.5
    kappa = _div(tl.abs(m00 * m11) + tl.abs(m01 * m10), tl.abs(det))
    reach = tl.maximum(W, H) + tl.maximum(tl.abs(m02), tl.abs(m12))
    err = 16.0 * UNIT * (tl.maximum(tx, ty) + (kappa + 2.0) * reach)
    rnd = 16.0 * UNIT * (Wo + Ho + 4.0 * CAP)
    su = hu * err + rnd
    sv = hv * err + rnd
    finite = _finite(m00, FMAX) & _finite(m01, FMAX) & _finite(m02, FMAX)
    finite = finite & _finite(m10, FMAX) & _finite(m11, FMAX) & _finite(m12, FMAX)
    # NaN anywhere makes a comparison false, so a NaN or infinite window is never "well".
    well = finite & (det != 0.0) & (2.0 * (hu + su) <= CAP) & (2.0 * (hv + sv) <= CAP)
    return well, a00, a01, a10, a11, hu, hv, su, sv


@triton.jit
def _projective_window(m00, m01, m02, m10, m11, m12, m20, m21, m22, H, W, Ho, Wo, CAP: tl.constexpr, F64: tl.constexpr):
    # Per (b, k) scalars of the projective gather: whether it is well conditioned, adj(M) (the inverse up to scale,
    # for the preimage centres), bounds (hu, hv) on the half extents of the preimage of a unit-radius square in
    # output pixels, and the slacks (su, sv). See "Projective maps" above.
    UNIT = 1.1102230246251565e-16 if F64 else 5.9604644775390625e-08  # unit roundoff, 2**-53 or 2**-24
    FMAX = 1.7976931348623157e308 if F64 else 3.4028234663852886e38
    # adj(M), with adj(M) M = det(M) I, and the size of each entry's two products (its rounding scale).
    c00 = m11 * m22 - m12 * m21
    c01 = m02 * m21 - m01 * m22
    c02 = m01 * m12 - m02 * m11
    c10 = m12 * m20 - m10 * m22
    c11 = m00 * m22 - m02 * m20
    c12 = m02 * m10 - m00 * m12
    c20 = m10 * m21 - m11 * m20
    c21 = m01 * m20 - m00 * m21
    c22 = m00 * m11 - m01 * m10
    d00 = tl.abs(m11 * m22) + tl.abs(m12 * m21)
    d01 = tl.abs(m02 * m21) + tl.abs(m01 * m22)
    d02 = tl.abs(m01 * m12) + tl.abs(m02 * m11)
    d10 = tl.abs(m12 * m20) + tl.abs(m10 * m22)
    d11 = tl.abs(m00 * m22) + tl.abs(m02 * m20)
    d12 = tl.abs(m02 * m10) + tl.abs(m00 * m12)
    d20 = tl.abs(m10 * m21) + tl.abs(m11 * m20)
    d21 = tl.abs(m01 * m20) + tl.abs(m00 * m21)
    d22 = tl.abs(m00 * m11) + tl.abs(m01 * m10)
    det = m00 * c00 + m01 * c10 + m02 * c20
    ddet = 6.0 * UNIT * (tl.abs(m00) * d00 + tl.abs(m01) * d10 + tl.abs(m02) * d20)
    adet = tl.abs(det) - ddet  # a lower bound on |det M|
    # The output rectangle widened by CAP / 2 pixels (the farthest a candidate's preimage centre can be from it when
    # the window fits CAP; see "Projective maps" above), centred: |u| <= u1, |v| <= v1. Over it w is within
    # w_min..w_max in absolute value; w_min > 0 means w keeps its sign (no horizon near the output).
    u1 = (Wo - 1) * 0.5 + CAP * 0.5
    v1 = (Ho - 1) * 0.5 + CAP * 0.5
    w_max = tl.abs(m22) + tl.abs(m20) * u1 + tl.abs(m21) * v1
    w_min = tl.abs(m22) - tl.abs(m20) * u1 - tl.abs(m21) * v1
    # Rows of J^-1 = w adj(N) / det M (N affine in u or v alone), bounded by their largest values over the rectangle.
    hu = _div(w_max * (tl.abs(c00) + tl.abs(c01) + (tl.abs(c20) + tl.abs(c21)) * u1), adet)
    hv = _div(w_max * (tl.abs(c10) + tl.abs(c11) + (tl.abs(c20) + tl.abs(c21)) * v1), adet)
    # Rounding, with a factor of about 4 to spare. A candidate's computed ix: a and w carry 3 UNIT of their terms'
    # sizes, a / w adds |X| times w's relative error, |X| <= (W - 1) / 2 + 1 for points that reach the image.
    xr = (W - 1) * 0.5 + 1.0
    yr = (H - 1) * 0.5 + 1.0
    ta = tl.abs(m00) * u1 + tl.abs(m01) * v1 + tl.abs(m02)
    tb = tl.abs(m10) * u1 + tl.abs(m11) * v1 + tl.abs(m12)
    errx = _div(3.0 * UNIT * (ta + xr * w_max), w_min) + UNIT * (2.0 * xr + W)
    erry = _div(3.0 * UNIT * (tb + yr * w_max), w_min) + UNIT * (2.0 * yr + H)
    err = 4.0 * tl.maximum(errx, erry)
    # A centre n = adj(M) (X, Y, 1) carries 5 UNIT of its terms' sizes. Where the exact centre lies in the widened
    # rectangle, n2 = det / w(centre) is at least |det| / w_max and |centre| <= (u1, v1), so the quotient's error is
    # at most (dn0 + u1 dn2) / (|n2| - dn2) plus its own rounding.
    xq = (W - 1) * 0.5
    yq = (H - 1) * 0.5
    dn0 = 5.0 * UNIT * (d00 * xq + d01 * yq + d02)
    dn1 = 5.0 * UNIT * (d10 * xq + d11 * yq + d12)
    dn2 = 5.0 * UNIT * (d20 * xq + d21 * yq + d22)
    n2_min = _div(adet, w_max) - dn2
    cu_err = 4.0 * (_div(dn0 + u1 * dn2, n2_min) + UNIT * (2.0 * u1 + Wo))
    cv_err = 4.0 * (_div(dn1 + v1 * dn2, n2_min) + UNIT * (2.0 * v1 + Ho))
    rnd = 16.0 * UNIT * (Wo + Ho + 4.0 * CAP)
    su = hu * err + cu_err + rnd
    sv = hv * err + cv_err + rnd
    finite = _finite(m00, FMAX) & _finite(m01, FMAX) & _finite(m02, FMAX)
    finite = finite & _finite(m10, FMAX) & _finite(m11, FMAX) & _finite(m12, FMAX)
    finite = finite & _finite(m20, FMAX) & _finite(m21, FMAX) & _finite(m22, FMAX)
    # NaN anywhere makes a comparison false, so a NaN or infinite bound is never "well".
    well = finite & (adet > 0.0) & (ddet <= 0.125 * tl.abs(det)) & (w_min > 0.0) & (n2_min > dn2)
    well = well & (2.0 * (hu + su) <= CAP) & (2.0 * (hv + sv) <= CAP)
    return well, c00, c01, c02, c10, c11, c12, c20, c21, c22, hu, hv, su, sv


@triton.jit
def _row_sums(s0, s1, s2, s3, s4, s5, s6, s7, s8, R: tl.constexpr):
    # (sum s0, ..., sum s8, 0, ...) over the tile as one (R, pixels) block and one reduction; with R = 8 only
    # s0..s5 (the affine entries; rows 6 and 7 are zero).
    r = tl.arange(0, R)[:, None]
    rows = tl.where(r == 0, s0[None, :], tl.where(r == 1, s1[None, :], tl.where(r == 2, s2[None, :], 0.0)))
    rows = tl.where(r == 3, s3[None, :], tl.where(r == 4, s4[None, :], tl.where(r == 5, s5[None, :], rows)))
    if R > 8:
        rows = tl.where(r == 6, s6[None, :], tl.where(r == 7, s7[None, :], tl.where(r == 8, s8[None, :], rows)))
    return tl.sum(rows, axis=1)


@triton.jit
def _gather_kernel(
    gx_ptr, part_ptr, flag_ptr,  # outputs
    x_ptr, go_ptr, m_ptr,  # inputs
    K, C, H, W, Ho, Wo,  # sizes
    sxb, sxc, sxh, sxw,  # strides of x
    sgxb, sgxc, sgxh, sgxw,  # strides of the image gradient buffer
    sgb, sgk, sgc, sgh, sgw,  # strides of grad_out
    fill,  # the padding value (its share of the matrix gradient: see the module docstring)
    PROJ: tl.constexpr, HAS_FILL: tl.constexpr, NEAREST: tl.constexpr, NEED_PARAM_GRAD: tl.constexpr,  # options
    CAP: tl.constexpr, EPS: tl.constexpr, BLOCK_C: tl.constexpr, F64: tl.constexpr, IDX64: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr,  # tile
):  # fmt: skip
    # One program = one BLOCK_H x BLOCK_W tile of input pixels (qy, qx) of image b and one block of channels; it
    # loops over the K transformers and writes the tile's image gradient (zeros padding only) with plain stores,
    # and with NEED_PARAM_GRAD (bilinear) the tile's share of each well-conditioned (b, k)'s matrix gradient.
    # PROJ: projective pixel matrices (B, K, 3, 3), else affine ones (B, K, 2, 3).
    E: tl.constexpr = 9 if PROJ else 6  # entries of a matrix's gradient
    CDT = tl.float64 if F64 else tl.float32
    FMAX = 1.7976931348623157e308 if F64 else 3.4028234663852886e38
    pid = tl.program_id(0)
    cblocks = tl.cdiv(C, BLOCK_C)
    tiles_w = tl.cdiv(W, BLOCK_W)
    tiles = tl.cdiv(H, BLOCK_H) * tiles_w
    cb = pid % cblocks
    tile = (pid // cblocks) % tiles
    b = pid // (cblocks * tiles)
    p = tl.arange(0, BLOCK_H * BLOCK_W)
    ty0 = (tile // tiles_w) * BLOCK_H
    tx0 = (tile % tiles_w) * BLOCK_W
    # Pixels in column-major order within the tile: consecutive p run down a column, so the gradient's store is
    # not contiguous along p, and Triton's layout keeps a pixel's BLOCK_C channels in one thread instead of giving
    # each warp one channel of every pixel (row-major order, whose contiguous stores Triton vectorises); each
    # candidate's coordinates are then computed once per pixel, not once per warp along the channels. A warp's 32
    # lanes cover a BLOCK_H x (32 / BLOCK_H) patch, compact for the gathers of grad_out.
    qy = ty0 + p % BLOCK_H
    qx = tx0 + p // BLOCK_H
    qmask = (qy < H) & (qx < W)
    cs = cb * BLOCK_C + tl.arange(0, BLOCK_C)
    cm = (cs < C)[:, None]
    b64 = b.to(tl.int64)
    go_c = _offsets(cs, sgc, IDX64)[:, None]
    # The tile's pixels clipped to the image: centre and half extents (+1 for the tent's reach), for the skip test.
    ty1 = tl.minimum(ty0 + BLOCK_H, H) - 1
    tx1 = tl.minimum(tx0 + BLOCK_W, W) - 1
    tcx = (tx0 + tx1) * 0.5
    tcy = (ty0 + ty1) * 0.5
    tr_x = (tx1 - tx0) * 0.5 + 1.0
    tr_y = (ty1 - ty0) * 0.5 + 1.0
    # How far from q a point can be and still reach it: the bilinear tent reaches one pixel, round() half of one.
    RADIUS = 0.5 if NEAREST else 1.0
    acc = tl.zeros((BLOCK_C, BLOCK_H * BLOCK_W), dtype=CDT)
    if NEED_PARAM_GRAD:
        # The tile's image values: each (candidate p, pixel q) pair adds sum_c g_c(p) x_c(q) d w / d (ix, iy) to
        # the coordinate gradient of p, the same terms as the scatter's corner differences (with x - fill: the
        # outside corners' fill terms are -fill times the inside ones', and every q inside is visited).
        xq_off = _offsets(cs, sxc, IDX64)[:, None] + (_offsets(qy, sxh, IDX64) + _offsets(qx, sxw, IDX64))[None, :]
        xq = tl.load(x_ptr + b64 * sxb + xq_off, mask=cm & qmask[None, :], other=0.0).to(CDT)
        if HAS_FILL:
            xq -= fill
        part_tile = part_ptr + ((b * K * tiles + tile) * cblocks + cb).to(tl.int64) * E
        r = tl.arange(0, 16 if PROJ else 8)
    for k in range(0, K):
        bk = b * K + k
        if PROJ:
            m00, m01, m02, m10, m11, m12, m20, m21, m22 = _matrix(m_ptr + bk.to(tl.int64) * 9, 3, CDT)
            well, c00, c01, c02, c10, c11, c12, c20, c21, c22, hu, hv, su, sv = _projective_window(
                m00, m01, m02, m10, m11, m12, m20, m21, m22, H, W, Ho, Wo, CAP, F64
            )
        else:
            m00, m01, m02, m10, m11, m12, _, _, _ = _matrix(m_ptr + bk.to(tl.int64) * 6, 2, CDT)
            well, a00, a01, a10, a11, hu, hv, su, sv = _affine_window(
                m00, m01, m02, m10, m11, m12, H, W, Ho, Wo, CAP, F64
            )
        # One program per image writes the verdict for the scatter kernel (the same value in every program).
        tl.store(flag_ptr + bk, well.to(tl.int32), mask=(tile == 0) & (cb == 0))
        # Window half-widths in output pixels (scalars: the same for every pixel of the tile).
        ru = RADIUS * hu + su
        rv = RADIUS * hv + sv
        if PROJ:
            # Per pixel: the preimage centre (cu, cv) of q in output pixels (non-finite where q has none). Skip
            # the whole (b, k) when no pixel's window meets the output: one reduction over the tile.
            X = qx.to(CDT) - (W - 1) * 0.5
            Y = qy.to(CDT) - (H - 1) * 0.5
            n2 = c20 * X + c21 * Y + c22
            cu = _div(c00 * X + c01 * Y + c02, n2) + (Wo - 1) * 0.5
            cv = _div(c10 * X + c11 * Y + c12, n2) + (Ho - 1) * 0.5
            near = qmask & (cu + ru >= 0.0) & (cu - ru <= Wo - 1.0) & (cv + rv >= 0.0) & (cv - rv <= Ho - 1.0)
            hit = tl.where(well, tl.max(near.to(tl.int32), axis=0), 0) > 0
        else:
            # Skip the whole (b, k) when the preimage box of the tile (widened by the slack and one more pixel)
            # misses the output: with CUB-like crops most tiles are read by one or two of the K transformers.
            dxt = tcx - (W - 1) * 0.5 - m02
            dyt = tcy - (H - 1) * 0.5 - m12
            cut = a00 * dxt + a01 * dyt + (Wo - 1) * 0.5
            cvt = a10 * dxt + a11 * dyt + (Ho - 1) * 0.5
            hut = tl.abs(a00) * tr_x + tl.abs(a01) * tr_y + su + 1.0
            hvt = tl.abs(a10) * tr_x + tl.abs(a11) * tr_y + sv + 1.0
            hit = well & (cut + hut >= 0.0) & (cut - hut <= Wo - 1.0) & (cvt + hvt >= 0.0) & (cvt - hvt <= Ho - 1.0)
            # Per pixel: the preimage centre (cu, cv) of q in output pixels.
            dx = qx.to(CDT) - (W - 1) * 0.5 - m02
            dy = qy.to(CDT) - (H - 1) * 0.5 - m12
            cu = a00 * dx + a01 * dy + (Wo - 1) * 0.5
            cv = a10 * dx + a11 * dy + (Ho - 1) * 0.5
        # Trip counts: the integers of a closed interval of length 2 r number at most floor(2 r) + 1 <= CAP + 1.
        nu = tl.where(hit, tl.floor(2.0 * ru) + 1.0, 0.0).to(tl.int32)
        nv = tl.where(hit, tl.floor(2.0 * rv) + 1.0, 0.0).to(tl.int32)
        # The first candidate ceil(centre - r), clamped to a range where the int conversion is safe (a window
        # clamped there lies wholly outside the output; a non-finite centre gets such a window). (A scalar & a
        # tensor fails in the interpreter, hence no "hit &" here: without a hit the trip counts are 0 anyway.)
        lo_u = tl.where(_finite(cu, FMAX), cu - ru, -(CAP + 2.0))
        lo_v = tl.where(_finite(cv, FMAX), cv - rv, -(CAP + 2.0))
        j0 = tl.ceil(tl.minimum(tl.maximum(lo_u, -(CAP + 2.0)), Wo * 1.0)).to(tl.int32)
        i0 = tl.ceil(tl.minimum(tl.maximum(lo_v, -(CAP + 2.0)), Ho * 1.0)).to(tl.int32)
        go_bk = go_ptr + b64 * sgb + (bk.to(tl.int64) - b64 * K) * sgk
        # Per pixel q: sums over its candidates p of d loss / d (a, b, w)(p) times (u, v, 1)(p), for the partial
        # sums of the matrix gradient (affine: a = ix - cx, b = iy - cy, no w).
        s0 = tl.zeros_like(cu)
        s1 = tl.zeros_like(cu)
        s2 = tl.zeros_like(cu)
        s3 = tl.zeros_like(cu)
        s4 = tl.zeros_like(cu)
        s5 = tl.zeros_like(cu)
        s6 = tl.zeros_like(cu)
        s7 = tl.zeros_like(cu)
        s8 = tl.zeros_like(cu)
        for ti in range(0, nv):
            i = i0 + ti
            for tj in range(0, nu):
                j = j0 + tj
                cand = qmask & (i >= 0) & (i < Ho) & (j >= 0) & (j < Wo)
                # Exactly the forward's coordinates and clamp: non-finite points (and projective points with
                # |w| < EPS) are invalid and send nothing.
                if PROJ:
                    ix, iy, ok, u, v, a, bb, w = _projective_map(
                        m00, m01, m02, m10, m11, m12, m20, m21, m22, i, j, H, W, Ho, Wo, CDT, FMAX, EPS
                    )
                    cand = cand & ok
                else:
                    ix, iy, u, v = _affine_map(m00, m01, m02, m10, m11, m12, i, j, H, W, Ho, Wo, CDT)
                ix, iy, valid, pass_x, pass_y = _clamp_coords(ix, iy, cand, H, W, False, FMAX)
                if NEAREST:
                    hitq = valid & (_round_half_even(ix).to(tl.int32) == qx)
                    hitq = hitq & (_round_half_even(iy).to(tl.int32) == qy)
                    wt = tl.where(hitq, 1.0, 0.0).to(CDT)
                else:
                    # The scatter's corner weights: q is corner x0 (weight wx0 = 1 - wx1) or x0 + 1 (weight wx1)
                    # of the candidate, with x0 = floor(ix), wx1 = ix - x0; likewise for y; wt = wx * wy.
                    x0 = tl.floor(ix)
                    y0 = tl.floor(iy)
                    wx1 = ix - x0
                    wy1 = iy - y0
                    xi = x0.to(tl.int32)
                    yi = y0.to(tl.int32)
                    wx = tl.where(xi == qx, 1.0 - wx1, wx1)
                    wy = tl.where(yi == qy, 1.0 - wy1, wy1)
                    hitq = valid & ((xi == qx) | (xi + 1 == qx)) & ((yi == qy) | (yi + 1 == qy))
                    wt = tl.where(hitq, wx * wy, 0.0)
                go_pix = _offsets(i, sgh, IDX64) + _offsets(j, sgw, IDX64)
                g = tl.load(go_bk + go_c + go_pix[None, :], mask=cm & hitq[None, :], other=0.0).to(CDT)
                acc += g * wt[None, :]
                if NEED_PARAM_GRAD:
                    # d w / d ix = -wy for the x0 corner, +wy for x0 + 1 (likewise for iy); zero where the clamp of
                    # the coordinate was active, as in _scatter_tile. The channel sum stays in the thread.
                    gxy = tl.sum(g * xq, axis=0)
                    gix = tl.where(hitq & pass_x, tl.where(xi == qx, -wy, wy) * gxy, 0.0)
                    giy = tl.where(hitq & pass_y, tl.where(yi == qy, -wx, wx) * gxy, 0.0)
                    ga = gix
                    gb = giy
                    if PROJ:
                        # As the scatter kernel: d loss / d (a, b, w) from ix = a / w + cx, iy = b / w + cy.
                        ga = _div(gix, w)
                        gb = _div(giy, w)
                        gw = -_div(gix * a, w * w) - _div(giy * bb, w * w)
                        s6 += gw * u
                        s7 += gw * v
                        s8 += gw
                    s0 += ga * u
                    s1 += ga * v
                    s2 += ga
                    s3 += gb * u
                    s4 += gb * v
                    s5 += gb
        if NEED_PARAM_GRAD:
            # Zero for a (b, k) not gathered or not reaching this tile: every (b, k, tile, channel block) is written.
            part = _row_sums(s0, s1, s2, s3, s4, s5, s6, s7, s8, 16 if PROJ else 8)
            tl.store(part_tile + k * tiles * cblocks * E + r, part, mask=r < E)
    gq = _offsets(qy, sgxh, IDX64) + _offsets(qx, sgxw, IDX64)
    gx_b = gx_ptr + b64 * sgxb + _offsets(cs, sgxc, IDX64)[:, None]
    tl.store(gx_b + gq[None, :], acc, mask=cm & qmask[None, :])


# --------------------------------------------------------------------------------------------------------------
# launcher
# --------------------------------------------------------------------------------------------------------------
#: Gather tiles on GPUs per channel block: BLOCK_C -> (BLOCK_H, BLOCK_W, num_warps). One pixel per thread, with all
#: BLOCK_C channels of a pixel in its thread (see the pixel order in the kernel): with the parameter gradient, ptxas
#: (sm_90, float32, affine) needs 63 to 111 registers per thread under triton 3.6 (two pixels per thread took more;
#: see benchmarks/sass_report.py). Not timed on a GPU yet.
GATHER_TILES = {8: (8, 16, 4), 4: (8, 16, 4), 2: (8, 16, 4), 1: (16, 16, 8)}

#: Most channels per gather program on GPUs (half as many for projective warps). Every program recomputes the
#: candidates' coordinates for its channels, so larger blocks do less of that work per channel, but registers grow:
#: under triton 3.6 (the GPU machine's version), affine 8 channels took 194 registers per thread (8 warps per SM),
#: 4 take 111 (16 warps); projective 4 took 228, 2 take 128, 1 takes 96. benchmarks/sweep_tiles.py times others.
GATHER_MAX_BLOCK_C = 4


def gather_config(channels: int, projective: bool = False) -> dict[str, int]:
    """Tile of the gather kernel: from ``GATHER_TILES`` on GPUs; under the interpreter 8 x 8 pixels and at most 4
    channels, so that the tests' tiny images still span several tiles and channel blocks."""
    if interpreting():
        return {"BLOCK_H": 8, "BLOCK_W": 8, "BLOCK_C": block_c(channels, 4), "num_warps": 4}
    bc = block_c(channels, max(GATHER_MAX_BLOCK_C // 2, 1) if projective else GATHER_MAX_BLOCK_C)
    block_h, block_w, warps = GATHER_TILES[bc]
    return {"BLOCK_H": block_h, "BLOCK_W": block_w, "BLOCK_C": bc, "num_warps": warps}


def gather(
    grad: Tensor,
    x: Tensor,
    m: Tensor,
    gx: Tensor,
    size: tuple[int, int],
    mode: str,
    need_m: bool,
    fill: float,
    wrap: bool,
) -> tuple[Tensor, Tensor]:
    """Write the image gradient of every well-conditioned (b, k) into all of ``gx`` (B, C, H, W) with plain stores,
    and with ``need_m`` (bilinear) the partial sums of their matrix gradients, for pixel matrices ``m`` (B, K, 2, 3)
    (affine) or (B, K, 3, 3) (projective) and the padding value ``fill``.

    Returns the (B * K,) int32 flags, 1 where the (b, k) was gathered and 0 where it is left to the scatter kernel
    (the conditioning rules of ``_affine_window`` and ``_projective_window``), and the partial sums
    (B, K, tiles * channel blocks, 2 or 3, 3), zero for the (b, k) flagged 0 (empty without ``need_m``). Zeros padding
    only.
    """
    b, c, h, w = gx.shape
    k, rows = m.shape[1], m.shape[2]
    ho, wo = size
    flags = torch.empty(b * k, device=m.device, dtype=torch.int32)
    cfg = gather_config(c, rows == 3)
    tiles = num_tiles(h, w, cfg["BLOCK_H"], cfg["BLOCK_W"]) * cdiv(c, cfg["BLOCK_C"])
    part = m.new_empty((b, k, tiles, rows, 3) if need_m else (0,))
    args = (gx, part, flags, x, grad, m, k, c, h, w, ho, wo, *x.stride(), *gx.stride(), *grad.stride(), fill)
    meta = {
        "PROJ": rows == 3,
        "HAS_FILL": fill != 0.0,
        "NEAREST": mode == "nearest",
        "NEED_PARAM_GRAD": need_m,
        "CAP": WINDOW_CAP,
        "EPS": reference.PROJECTIVE_EPS,
        "F64": m.dtype == torch.float64,
        "IDX64": needs_int64(x, gx, grad),
        **cfg,
    }
    with device_context(gx):
        launch(_gather_kernel, None, (b * tiles,), args, meta, wrap)
    return flags, part
