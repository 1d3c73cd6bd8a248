"""Triton sampler for K affine warps per image: kernels, launchers, autograd.Function and torch.library op.

The launcher folds the normalisation into the (B, K, 2, 3) matrices in PyTorch (``reference.affine_to_pixels``),
so the kernels see pixel matrices M with ix = M[0] . (u, v, 1) + (W - 1) / 2 on centred output pixels (u, v),
and autograd carries d loss / d M back to theta. The backward reduces d loss / d M inside the kernel into one
partial sum per program (B * K, programs per (b, k), 6), summed in PyTorch: no grid gradient ever reaches memory.

The image gradient has two implementations, picked by the module attribute ``IMAGE_GRAD`` (read at every
backward call; the environment variable ``STN_AFFINE_IMAGE_GRAD`` sets it at import). The default stays "scatter",
the implementation verified and timed on a GPU, until "gather" has been too (it is verified on CPU only, through the
interpreter and an sm_90 compile):

* "scatter": ``_affine_bwd_kernel`` sends every output pixel's gradient to its four input corners with atomic
  adds into a zeroed float32 (float64) buffer. Used for border padding in any case.
* "gather" (zeros padding): ``_affine_gather_kernel`` inverts each warp, and every input pixel sums the few output
  pixels that read it, then stores its gradient once: no atomics, no zeroed buffer. The same (output pixel, input
  pixel) pairs give the matrix gradient (bilinear), reduced per input tile. It takes the well-conditioned (b, k)
  (finite, invertible, window of at most ``WINDOW_CAP`` output pixels per axis) and flags the others, which
  ``_affine_bwd_kernel`` then handles (``SKIP_GATHERED``: its programs of gathered (b, k) do nothing). With
  well-conditioned warps the backward is one pass of the gather kernel.

Switch with ``kernels.affine.IMAGE_GRAD = "gather"`` (benchmarks/gpu_session.sh compares both on the same card).
Either way the image gradient of ill-conditioned warps uses atomics, so torch.use_deterministic_algorithms still
refuses the image gradient.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import reference
from ._common import (
    HAS_LIBRARY_OPS,
    _clamp_coords,
    _div,
    _finite,
    _grad_image,
    _load_row3,
    _matrix_partials,
    _offsets,
    _round_half_even,
    _sample_tile,
    _scatter_tile,
    _tile_coords,
    autocast_inputs,
    block_c,
    bwd_config,
    cdiv,
    channel_group,
    check_deterministic,
    check_device,
    device_context,
    finish_image_grad,
    fwd_autotune,
    fwd_block_c,
    image_grad_buffer,
    interpreting,
    launch,
    library_op,
    needs_int64,
    num_tiles,
    programs_per_plane,
    reference_vjp,
    use_library_op,
)
from .reference import Mode, Padding

__all__ = ["IMAGE_GRAD", "WINDOW_CAP", "sample_affine"]

#: How the backward computes the image gradient with zeros padding: "gather" (each input pixel sums the output
#: pixels that read it, plain stores; see _affine_gather_kernel) or "scatter" (atomic adds, _affine_bwd_kernel).
#: Read at every backward call; STN_AFFINE_IMAGE_GRAD sets it at import.
IMAGE_GRAD: str = os.environ.get("STN_AFFINE_IMAGE_GRAD", "scatter")
_IMAGE_GRADS = ("gather", "scatter")

#: Widest window, in output pixels per axis, that the gather kernel handles (zoom-in up to about 4x); a wider or
#: undefined window (see _affine_window) leaves its (b, k) to the scatter kernel.
WINDOW_CAP = 8


# --------------------------------------------------------------------------------------------------------------
# kernels
# --------------------------------------------------------------------------------------------------------------
@triton.jit
def _affine_matrix(m_ptr, bk, CDT: tl.constexpr):
    # The six entries of the pixel matrix of (b, k) as scalars in the compute dtype.
    mk = m_ptr + bk.to(tl.int64) * 6
    m00, m01, m02 = _load_row3(mk, CDT)
    m10, m11, m12 = _load_row3(mk + 3, CDT)
    return m00, m01, m02, m10, m11, m12


@triton.jit
def _affine_map(m00, m01, m02, m10, m11, m12, i, j, H, W, Ho, Wo, CDT: tl.constexpr):
    # Pixel coordinates of output pixels (i, j), in the reference's order of operations: ix = m00 * u + m01 * v +
    # m02 + (W - 1) / 2 with u = j - (Wo - 1) / 2, v = i - (Ho - 1) / 2. The forward, the scatter backward and the
    # gather backward all call this one function, so they agree on every coordinate (and so on every floor/round).
    u = j.to(CDT) - (Wo - 1) * 0.5
    v = i.to(CDT) - (Ho - 1) * 0.5
    ix = m00 * u + m01 * v + m02 + (W - 1) * 0.5
    iy = m10 * u + m11 * v + m12 + (H - 1) * 0.5
    return ix, iy, u, v


@triton.jit
def _affine_coords(m_ptr, bk, i, j, H, W, Ho, Wo, CDT: tl.constexpr):
    # Pixel coordinates of output pixels (i, j) under the pixel matrix of (b, k); see _affine_map.
    m00, m01, m02, m10, m11, m12 = _affine_matrix(m_ptr, bk, CDT)
    ix, iy, u, v = _affine_map(m00, m01, m02, m10, m11, m12, i, j, H, W, Ho, Wo, CDT)
    return ix, iy, u, v


@triton.jit
def _affine_fwd_kernel(
    # outputs
    out_ptr,
    # inputs
    x_ptr,
    m_ptr,
    # sizes
    K,
    C,
    H,
    W,
    Ho,
    Wo,
    # strides of x
    sxb,
    sxc,
    sxh,
    sxw,
    # options and tile sizes
    BORDER: tl.constexpr,
    NEAREST: tl.constexpr,
    BLOCK_C: tl.constexpr,
    CGROUP: tl.constexpr,
    F64: tl.constexpr,
    IDX64: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_W: tl.constexpr,
    SPLIT_C: tl.constexpr,
):
    # compute dtype (float64 when the image or the parameters are float64) and its largest finite value
    CDT = tl.float64 if F64 else tl.float32
    FMAX = 1.7976931348623157e308 if F64 else 3.4028234663852886e38
    bk, slot, c_lo, c_hi, i, j, pmask = _tile_coords(C, Ho, Wo, BLOCK_H, BLOCK_W, CGROUP)
    ix, iy, u, v = _affine_coords(m_ptr, bk, i, j, H, W, Ho, Wo, CDT)
    # out is (B, K, C, Ho, Wo) contiguous; (b, k) planes are C * Ho * Wo apart.
    out_bk = out_ptr + bk.to(tl.int64) * C * Ho * Wo
    x_b = x_ptr + (bk // K).to(tl.int64) * sxb
    out_pix = i * Wo + j
    if IDX64:
        out_pix = i.to(tl.int64) * Wo + j
    _sample_tile(
        out_bk, x_b, ix, iy, pmask, out_pix, pmask, c_lo, c_hi, H, W, sxc, sxh, sxw, Ho * Wo,
        BORDER, NEAREST, 1 if SPLIT_C else BLOCK_C, CDT, IDX64, FMAX,
    )  # fmt: skip


_affine_fwd_tuned = fwd_autotune(_affine_fwd_kernel)


@triton.jit
def _affine_bwd_kernel(
    # outputs
    gx_ptr,
    part_ptr,
    # inputs
    x_ptr,
    go_ptr,
    m_ptr,
    flag_ptr,
    # sizes
    K,
    C,
    H,
    W,
    Ho,
    Wo,
    # strides of x, of the image gradient buffer and of grad_out
    sxb,
    sxc,
    sxh,
    sxw,
    sgxb,
    sgxc,
    sgxh,
    sgxw,
    sgb,
    sgk,
    sgc,
    sgh,
    sgw,
    # options and tile sizes
    BORDER: tl.constexpr,
    NEAREST: tl.constexpr,
    NEED_X_GRAD: tl.constexpr,
    NEED_PARAM_GRAD: tl.constexpr,
    SKIP_GATHERED: tl.constexpr,
    BLOCK_C: tl.constexpr,
    CGROUP: tl.constexpr,
    ACC_CP: tl.constexpr,
    F64: tl.constexpr,
    IDX64: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_W: tl.constexpr,
):
    # compute dtype (float64 when the image or the parameters are float64) and its largest finite value
    CDT = tl.float64 if F64 else tl.float32
    FMAX = 1.7976931348623157e308 if F64 else 3.4028234663852886e38
    bk, slot, c_lo, c_hi, i, j, pmask = _tile_coords(C, Ho, Wo, BLOCK_H, BLOCK_W, CGROUP)
    part = part_ptr + slot.to(tl.int64) * 6
    r = tl.arange(0, 8)
    # With SKIP_GATHERED the gather kernel has written both gradients of the (b, k) it flagged 1 (well conditioned):
    # their programs here only zero their partial sums. The others scatter their image gradient on top of the
    # gather's plain stores (same stream, so ordered after them).
    gathered = bk < 0  # a false scalar of the flag's type
    if SKIP_GATHERED:
        gathered = tl.load(flag_ptr + bk) != 0
    if gathered:
        if NEED_PARAM_GRAD:
            tl.store(part + r, tl.zeros((8,), dtype=CDT), mask=r < 6)
    else:
        ix, iy, u, v = _affine_coords(m_ptr, bk, i, j, H, W, Ho, Wo, CDT)
        b = (bk // K).to(tl.int64)
        go_bk = go_ptr + b * sgb + (bk % K).to(tl.int64) * sgk
        go_pix = i * sgh + j * sgw
        if IDX64:
            go_pix = i.to(tl.int64) * sgh + j.to(tl.int64) * sgw
        gx_b = _grad_image(gx_ptr, b, sgxb, H, W, ACC_CP)
        gix, giy = _scatter_tile(
            gx_b, x_ptr + b * sxb, go_bk, ix, iy, pmask, go_pix, c_lo, c_hi, H, W,
            sxc, sxh, sxw, sgxc, sgxh, sgxw, sgc,
            BORDER, NEAREST, NEED_X_GRAD, NEED_PARAM_GRAD, BLOCK_C, ACC_CP, CDT, IDX64, FMAX,
        )  # fmt: skip
        if NEED_PARAM_GRAD:
            tl.store(part + r, _matrix_partials(gix, giy, giy, u, v, 8), mask=r < 6)


# The gather backward of the image gradient -------------------------------------------------------------------
#
# Why gathers: the scatter backward above sends every output pixel's gradient to its four input corners with
# atomic adds; for crops of a large image most of its time goes to those atomics (1.39 ms of a 2.55 ms forward +
# backward on an H100 for B 64, C 3, 448 x 448 -> K 4 x 224 x 224). An affine map has a known inverse, so each
# input pixel q can instead find the few output pixels that read it and sum their contributions in registers,
# then write its gradient with one plain store: no atomics, no zeroed buffer, and a deterministic sum.
#
# Window bound: output pixel (i, j) sends grad * tent(ix - qx) * tent(iy - qy) to q (bilinear), which is nonzero
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
def _row_sums6(a, b, c, d, e, f):
    # (sum a, sum b, ..., sum f, 0, 0) over the tile: one (8, pixels) block and one reduction.
    r = tl.arange(0, 8)[:, None]
    rows = tl.where(r == 0, a[None, :], tl.where(r == 1, b[None, :], tl.where(r == 2, c[None, :], 0.0)))
    rows = tl.where(r == 3, d[None, :], tl.where(r == 4, e[None, :], tl.where(r == 5, f[None, :], rows)))
    return tl.sum(rows, axis=1)


@triton.jit
def _affine_gather_kernel(
    # outputs
    gx_ptr,
    part_ptr,
    flag_ptr,
    # inputs
    x_ptr,
    go_ptr,
    m_ptr,
    # sizes
    K,
    C,
    H,
    W,
    Ho,
    Wo,
    # strides of x, of the image gradient buffer and of grad_out
    sxb,
    sxc,
    sxh,
    sxw,
    sgxb,
    sgxc,
    sgxh,
    sgxw,
    sgb,
    sgk,
    sgc,
    sgh,
    sgw,
    # options and tile sizes
    NEAREST: tl.constexpr,
    NEED_PARAM_GRAD: tl.constexpr,
    CAP: tl.constexpr,
    BLOCK_C: tl.constexpr,
    F64: tl.constexpr,
    IDX64: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_W: tl.constexpr,
):
    # One program = one BLOCK_H x BLOCK_W tile of input pixels (qy, qx) of image b and one block of channels; it
    # loops over the K transformers and writes the tile's image gradient (zeros padding only) with plain stores,
    # and with NEED_PARAM_GRAD (bilinear) the tile's share of each well-conditioned (b, k)'s matrix gradient.
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
        # the coordinate gradient of p, the same terms as the scatter's corner differences (x is 0 outside the
        # image with zeros padding, and every q inside is visited).
        xq_off = _offsets(cs, sxc, IDX64)[:, None] + (_offsets(qy, sxh, IDX64) + _offsets(qx, sxw, IDX64))[None, :]
        xq = tl.load(x_ptr + b64 * sxb + xq_off, mask=cm & qmask[None, :], other=0.0).to(CDT)
        part_tile = part_ptr + ((b * K * tiles + tile) * cblocks + cb).to(tl.int64) * 6
        r = tl.arange(0, 8)
    for k in range(0, K):
        bk = b * K + k
        m00, m01, m02, m10, m11, m12 = _affine_matrix(m_ptr, bk, CDT)
        well, a00, a01, a10, a11, hu, hv, su, sv = _affine_window(m00, m01, m02, m10, m11, m12, H, W, Ho, Wo, CAP, F64)
        # One program per image writes the verdict for the scatter kernel (the same value in every program).
        tl.store(flag_ptr + bk, well.to(tl.int32), mask=(tile == 0) & (cb == 0))
        # Skip the whole (b, k) when the preimage box of the tile (widened by the slack and one more pixel)
        # misses the output: with CUB-like crops most tiles are read by one or two of the K transformers.
        dxt = tcx - (W - 1) * 0.5 - m02
        dyt = tcy - (H - 1) * 0.5 - m12
        cut = a00 * dxt + a01 * dyt + (Wo - 1) * 0.5
        cvt = a10 * dxt + a11 * dyt + (Ho - 1) * 0.5
        hut = tl.abs(a00) * tr_x + tl.abs(a01) * tr_y + su + 1.0
        hvt = tl.abs(a10) * tr_x + tl.abs(a11) * tr_y + sv + 1.0
        hit = well & (cut + hut >= 0.0) & (cut - hut <= Wo - 1.0) & (cvt + hvt >= 0.0) & (cvt - hvt <= Ho - 1.0)
        # Window half-widths in output pixels and trip counts (scalars: the same for every pixel of the tile):
        # the integers of a closed interval of length 2 r number at most floor(2 r) + 1 <= CAP + 1.
        ru = RADIUS * hu + su
        rv = RADIUS * hv + sv
        nu = tl.where(hit, tl.floor(2.0 * ru) + 1.0, 0.0).to(tl.int32)
        nv = tl.where(hit, tl.floor(2.0 * rv) + 1.0, 0.0).to(tl.int32)
        # Per pixel: the preimage centre (cu, cv) of q in output pixels, and the first candidate ceil(centre - r),
        # clamped to a range where the int conversion is safe (a window clamped there lies wholly outside).
        dx = qx.to(CDT) - (W - 1) * 0.5 - m02
        dy = qy.to(CDT) - (H - 1) * 0.5 - m12
        cu = a00 * dx + a01 * dy + (Wo - 1) * 0.5
        cv = a10 * dx + a11 * dy + (Ho - 1) * 0.5
        lo_u = tl.where(hit, cu - ru, 0.0)
        lo_v = tl.where(hit, cv - rv, 0.0)
        j0 = tl.ceil(tl.minimum(tl.maximum(lo_u, -(CAP + 2.0)), Wo * 1.0)).to(tl.int32)
        i0 = tl.ceil(tl.minimum(tl.maximum(lo_v, -(CAP + 2.0)), Ho * 1.0)).to(tl.int32)
        go_bk = go_ptr + b64 * sgb + (bk.to(tl.int64) - b64 * K) * sgk
        # Per pixel q: sums over its candidates p of d loss / d (ix, iy)(p) times (u, v, 1)(p), for the partial sums.
        sxu = tl.zeros_like(cu)
        sxv = tl.zeros_like(cu)
        sx1 = tl.zeros_like(cu)
        syu = tl.zeros_like(cu)
        syv = tl.zeros_like(cu)
        sy1 = tl.zeros_like(cu)
        for ti in range(0, nv):
            i = i0 + ti
            for tj in range(0, nu):
                j = j0 + tj
                cand = qmask & (i >= 0) & (i < Ho) & (j >= 0) & (j < Wo)
                # Exactly the forward's coordinates and clamp: non-finite points are invalid and send nothing.
                ix, iy, u, v = _affine_map(m00, m01, m02, m10, m11, m12, i, j, H, W, Ho, Wo, CDT)
                ix, iy, valid, pass_x, pass_y = _clamp_coords(ix, iy, cand, H, W, False, FMAX)
                if NEAREST:
                    hitq = valid & (_round_half_even(ix).to(tl.int32) == qx)
                    hitq = hitq & (_round_half_even(iy).to(tl.int32) == qy)
                    w = tl.where(hitq, 1.0, 0.0).to(CDT)
                else:
                    # The scatter's corner weights: q is corner x0 (weight wx0 = 1 - wx1) or x0 + 1 (weight wx1)
                    # of the candidate, with x0 = floor(ix), wx1 = ix - x0; likewise for y; w = wx * wy.
                    x0 = tl.floor(ix)
                    y0 = tl.floor(iy)
                    wx1 = ix - x0
                    wy1 = iy - y0
                    xi = x0.to(tl.int32)
                    yi = y0.to(tl.int32)
                    wx = tl.where(xi == qx, 1.0 - wx1, wx1)
                    wy = tl.where(yi == qy, 1.0 - wy1, wy1)
                    hitq = valid & ((xi == qx) | (xi + 1 == qx)) & ((yi == qy) | (yi + 1 == qy))
                    w = tl.where(hitq, wx * wy, 0.0)
                go_pix = _offsets(i, sgh, IDX64) + _offsets(j, sgw, IDX64)
                g = tl.load(go_bk + go_c + go_pix[None, :], mask=cm & hitq[None, :], other=0.0).to(CDT)
                acc += g * w[None, :]
                if NEED_PARAM_GRAD:
                    # d w / d ix = -wy for the x0 corner, +wy for x0 + 1 (likewise for iy); zero where the clamp of
                    # the coordinate was active, as in _scatter_tile. The channel sum stays in the thread.
                    gxy = tl.sum(g * xq, axis=0)
                    gix = tl.where(hitq & pass_x, tl.where(xi == qx, -wy, wy) * gxy, 0.0)
                    giy = tl.where(hitq & pass_y, tl.where(yi == qy, -wx, wx) * gxy, 0.0)
                    sxu += gix * u
                    sxv += gix * v
                    sx1 += gix
                    syu += giy * u
                    syv += giy * v
                    sy1 += giy
        if NEED_PARAM_GRAD:
            # Zero for a (b, k) not gathered or not reaching this tile: every (b, k, tile, channel block) is written.
            part = _row_sums6(sxu, sxv, sx1, syu, syv, sy1)
            tl.store(part_tile + k * tiles * cblocks * 6 + r, part, mask=r < 6)
    gq = _offsets(qy, sgxh, IDX64) + _offsets(qx, sgxw, IDX64)
    gx_b = gx_ptr + b64 * sgxb + _offsets(cs, sgxc, IDX64)[:, None]
    tl.store(gx_b + gq[None, :], acc, mask=cm & qmask[None, :])


# --------------------------------------------------------------------------------------------------------------
# launchers
# --------------------------------------------------------------------------------------------------------------
def _pixel_matrix(x: Tensor, theta: Tensor, size: tuple[int, int], align_corners: bool) -> Tensor:
    # (B, K, 2, 3) pixel matrices in the compute dtype, contiguous for the kernels.
    dtype = reference.compute_dtype(x, theta)
    return reference.affine_to_pixels(theta.to(dtype), (x.shape[-2], x.shape[-1]), size, align_corners).contiguous()


def _affine_forward(
    x: Tensor, m: Tensor, size: tuple[int, int], padding_mode: str, mode: str, wrap: bool = False
) -> Tensor:
    """Samples (B, K, C, Ho, Wo) in x's dtype for pixel matrices m (B, K, 2, 3) in the compute dtype."""
    b, c, h, w = x.shape
    k = m.shape[1]
    ho, wo = size
    out = torch.empty((b, k, c, ho, wo), device=x.device, dtype=x.dtype)
    if out.numel() == 0:
        return out
    m_f64 = m.dtype == torch.float64
    grid = lambda meta: (b * k * programs_per_plane(c, ho, wo, meta),)
    args = (out, x, m, k, c, h, w, ho, wo, *x.stride())
    meta = {
        "BORDER": padding_mode == "border",
        "NEAREST": mode == "nearest",
        "BLOCK_C": fwd_block_c(c),
        "CGROUP": channel_group(c),
        "F64": m_f64,
        "IDX64": needs_int64(x, out),
    }
    with device_context(x):
        launch(_affine_fwd_kernel, _affine_fwd_tuned, grid, args, meta, wrap)
    return out


def _gathers(padding_mode: str) -> bool:
    """Whether the image gradient is gathered (IMAGE_GRAD "gather", zeros padding), read at every call."""
    if IMAGE_GRAD not in _IMAGE_GRADS:
        raise ValueError(
            f"expected kernels.affine.IMAGE_GRAD (or STN_AFFINE_IMAGE_GRAD) in {_IMAGE_GRADS}, got {IMAGE_GRAD!r}"
        )
    # Border padding clamps every outside point onto an edge pixel, which then receives the gradient of
    # unboundedly many output pixels: no window bounds them, so border padding always scatters.
    return IMAGE_GRAD == "gather" and padding_mode == "zeros"


#: Gather tiles on GPUs per channel block: BLOCK_C -> (BLOCK_H, BLOCK_W, num_warps). One pixel per thread, with all
#: BLOCK_C channels of a pixel in its thread (see the pixel order in the kernel): with the parameter gradient, ptxas
#: (sm_90, float32) needs 63 to 111 registers per thread under triton 3.6 (two pixels per thread took more; see
#: benchmarks/sass_report.py). Not timed on a GPU yet.
_GATHER_TILES = {8: (8, 16, 4), 4: (8, 16, 4), 2: (8, 16, 4), 1: (16, 16, 8)}

#: Most channels per gather program on GPUs. Every program recomputes the candidates' coordinates for its channels,
#: so larger blocks do less of that work per channel, but 8 channels took 194 registers per thread under triton 3.6
#: (the GPU machine's version; 127 under 3.8), which leaves room for 8 warps per SM, against 111 and 16 warps with 4.
#: benchmarks/sweep_tiles.py times both.
_GATHER_MAX_BLOCK_C = 4


def _gather_config(channels: int) -> dict[str, int]:
    """Tile of the gather kernel: from ``_GATHER_TILES`` on GPUs; under the interpreter 8 x 8 pixels and at most 4
    channels, so that the tests' tiny images still span several tiles and channel blocks."""
    if interpreting():
        return {"BLOCK_H": 8, "BLOCK_W": 8, "BLOCK_C": block_c(channels, 4), "num_warps": 4}
    bc = block_c(channels, _GATHER_MAX_BLOCK_C)
    block_h, block_w, warps = _GATHER_TILES[bc]
    return {"BLOCK_H": block_h, "BLOCK_W": block_w, "BLOCK_C": bc, "num_warps": warps}


def _affine_gather(
    grad: Tensor, x: Tensor, m: Tensor, gx: Tensor, size: tuple[int, int], mode: str, need_m: bool, wrap: bool
) -> tuple[Tensor, Tensor]:
    """Write the image gradient of every well-conditioned (b, k) into all of ``gx`` (B, C, H, W) with plain stores,
    and with ``need_m`` (bilinear) the partial sums of their matrix gradients.

    Returns the (B * K,) int32 flags, 1 where the (b, k) was gathered and 0 where it is left to the scatter kernel
    (the conditioning rule of ``_affine_window``), and the partial sums (B * K, tiles * channel blocks, 6), zero for
    the (b, k) flagged 0 (empty without ``need_m``). Zeros padding only.
    """
    b, c, h, w = gx.shape
    k = m.shape[1]
    ho, wo = size
    flags = torch.empty(b * k, device=m.device, dtype=torch.int32)
    cfg = _gather_config(c)
    tiles = num_tiles(h, w, cfg["BLOCK_H"], cfg["BLOCK_W"]) * cdiv(c, cfg["BLOCK_C"])
    part = m.new_empty((b * k, tiles, 6) if need_m else (0,))
    args = (gx, part, flags, x, grad, m, k, c, h, w, ho, wo, *x.stride(), *gx.stride(), *grad.stride())
    meta = {
        "NEAREST": mode == "nearest",
        "NEED_PARAM_GRAD": need_m,
        "CAP": WINDOW_CAP,
        "F64": m.dtype == torch.float64,
        "IDX64": needs_int64(x, gx, grad),
        **cfg,
    }
    with device_context(gx):
        launch(_affine_gather_kernel, None, (b * tiles,), args, meta, wrap)
    return flags, part


def _affine_backward(
    grad: Tensor,
    x: Tensor,
    m: Tensor,
    size: tuple[int, int],
    padding_mode: str,
    mode: str,
    need_x: bool,
    need_m: bool,
    wrap: bool = False,
) -> tuple[Tensor | None, Tensor | None]:
    """(d loss / d x, d loss / d m) for grad (B, K, C, Ho, Wo); None where not needed."""
    if need_x:
        # Still atomics for the ill-conditioned (b, k) (and for border padding) even when gathering.
        check_deterministic("sample_affine_backward (Triton)")
    b, c, h, w = x.shape
    k = m.shape[1]
    ho, wo = size
    need_coord = need_m and mode != "nearest"  # nearest has no coordinate gradient
    gather = need_x and grad.numel() > 0 and _gathers(padding_mode)
    flags = m.new_empty(0, dtype=torch.int32)
    gathered_part = None
    # The scatter kernel accumulates in a buffer of its own (pixel-major with VECTOR_ATOMICS) unless gathering.
    cfg = bwd_config(c, m.dtype if need_x and not gather else None)
    if gather:
        # The gather kernel stores every pixel of gx (no zeroing) and the matrix gradients of the (b, k) it takes;
        # the scatter kernel adds the ill-conditioned rest.
        gx = torch.empty_like(x, dtype=m.dtype)
        flags, gathered_part = _affine_gather(grad, x, m, gx, size, mode, need_coord, wrap)
    else:
        gx = image_grad_buffer(x, m.dtype, cfg["ACC_CP"]) if need_x else x.new_empty(0, dtype=m.dtype)
    programs = programs_per_plane(c, ho, wo, cfg)
    part = m.new_empty((b * k, programs, 6) if need_coord else (0,))
    if (need_x or need_coord) and grad.numel() > 0:
        m_f64 = m.dtype == torch.float64
        gx_strides = gx.stride() if need_x else (0, 0, 0, 0)
        args = (gx, part, x, grad, m, flags, k, c, h, w, ho, wo, *x.stride(), *gx_strides, *grad.stride())
        meta = {
            "BORDER": padding_mode == "border",
            "NEAREST": mode == "nearest",
            "NEED_X_GRAD": need_x,
            "NEED_PARAM_GRAD": need_coord,
            "SKIP_GATHERED": gather,
            "F64": m_f64,
            "IDX64": needs_int64(x, grad, gx),
            **cfg,
        }
        with device_context(x):
            launch(_affine_bwd_kernel, None, (b * k * programs,), args, meta, wrap)
    grad_x = finish_image_grad(gx, x, cfg["ACC_CP"]) if need_x else None
    grad_m = None
    if need_m:
        grad_m = part.sum(1).view(b, k, 2, 3) if need_coord and part.numel() else torch.zeros_like(m)
        if gathered_part is not None and gathered_part.numel():
            # Each (b, k)'s partial sums are zero in the kernel that does not own it.
            grad_m = grad_m + gathered_part.sum(1).view(b, k, 2, 3)
    return grad_x, grad_m


# --------------------------------------------------------------------------------------------------------------
# autograd.Function (CPU tensors under the interpreter, and torch without triton_op) and torch.library op
# --------------------------------------------------------------------------------------------------------------
class _SampleAffine(torch.autograd.Function):
    @staticmethod
    @torch.amp.custom_fwd(device_type="cuda")
    def forward(ctx, x: Tensor, m: Tensor, size: tuple[int, int], padding_mode: str, mode: str) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(x, m)
        ctx.options = (size, padding_mode, mode)
        return _affine_forward(x, m, size, padding_mode, mode)

    @staticmethod
    @torch.amp.custom_bwd(device_type="cuda")
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        x, m = ctx.saved_tensors
        size, padding_mode, mode = ctx.options
        needs = ctx.needs_input_grad
        gx, gm = _affine_backward(grad, x, m, size, padding_mode, mode, needs[0], needs[1])
        return gx, gm, None, None, None


def _affine_scale(theta: Tensor, x: Tensor, size: tuple[int, int], align_corners: bool) -> Tensor:
    # d M / d theta: M = theta * scale elementwise (see reference.affine_to_pixels).
    dtype = reference.compute_dtype(x, theta)
    return reference.pixel_scale_matrix(2, (x.shape[-2], x.shape[-1]), size, align_corners, dtype, theta)


_affine_op = library_op("sample_affine")
if HAS_LIBRARY_OPS and _affine_op is None:

    @torch.library.triton_op("stn_lightning::sample_affine", mutates_args=())
    def _affine_fwd_op(
        x: Tensor, theta: Tensor, height: int, width: int, align_corners: bool, padding_mode: str, mode: str
    ) -> Tensor:
        m = _pixel_matrix(x, theta, (height, width), align_corners)
        return _affine_forward(x, m, (height, width), padding_mode, mode, wrap=True)

    @_affine_fwd_op.register_kernel("cpu")
    def _affine_cpu(x, theta, height, width, align_corners, padding_mode, mode):  # type: ignore[no-untyped-def]
        return reference.sample_affine(
            x, theta, (height, width), align_corners=align_corners, padding_mode=padding_mode, mode=mode
        )

    @torch.library.triton_op("stn_lightning::sample_affine_backward", mutates_args=())
    def _affine_bwd_op(
        grad: Tensor,
        x: Tensor,
        theta: Tensor,
        height: int,
        width: int,
        align_corners: bool,
        padding_mode: str,
        mode: str,
        need_x: bool,
        need_theta: bool,
    ) -> tuple[Tensor, Tensor]:
        size = (height, width)
        m = _pixel_matrix(x, theta, size, align_corners)
        gx, gm = _affine_backward(grad, x, m, size, padding_mode, mode, need_x, need_theta, wrap=True)
        gx = gx if gx is not None else x.new_empty(0)
        gt = theta.new_empty(0)
        if gm is not None:
            gt = (gm * _affine_scale(theta, x, size, align_corners)).to(theta.dtype)
        return gx, gt

    @_affine_bwd_op.register_kernel("cpu")
    def _affine_bwd_cpu(grad, x, theta, height, width, align_corners, padding_mode, mode, need_x, need_theta):  # type: ignore[no-untyped-def]
        gx, gt = reference_vjp(
            reference.sample_affine, grad, (x, theta), (need_x, need_theta), (height, width),
            align_corners=align_corners, padding_mode=padding_mode, mode=mode,
        )  # fmt: skip
        return gx, gt

    def _affine_setup(ctx, inputs, output):  # type: ignore[no-untyped-def]
        x, theta, *options = inputs
        ctx.save_for_backward(x, theta)
        ctx.options = options

    def _affine_op_backward(ctx, grad):  # type: ignore[no-untyped-def]
        x, theta = ctx.saved_tensors
        need_x, need_theta = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        gx, gt = torch.ops.stn_lightning.sample_affine_backward(grad, x, theta, *ctx.options, need_x, need_theta)
        return (gx if need_x else None, gt if need_theta else None, None, None, None, None, None)

    _affine_fwd_op.register_autograd(_affine_op_backward, setup_context=_affine_setup)
    _affine_op = _affine_fwd_op


def sample_affine(
    x: Tensor,
    theta: Tensor,
    size: int | tuple[int, int],
    *,
    align_corners: bool = False,
    padding_mode: Padding = "zeros",
    mode: Mode = "bilinear",
) -> Tensor:
    """Sample K affine warps of each image with the Triton kernels; see :func:`kernels.reference.sample_affine`.

    Args:
        x: images (B, C, H, W), any strides, float16, bfloat16, float32 or float64.
        theta: (B, K, 2, 3), the ``F.affine_grid`` convention.
        size: output size (Ho, Wo), or an int.
        align_corners, padding_mode, mode: as for ``F.grid_sample``.

    Returns:
        (B, K, C, Ho, Wo), contiguous, in x's dtype.
    """
    reference.check_image(x)
    reference.check_params(x, theta, "theta", (2, 3))
    reference.check_options(padding_mode, mode)
    check_device(x)
    size = reference.normalize_size(size)
    x, theta = autocast_inputs(x, theta)
    if use_library_op(x):
        return torch.ops.stn_lightning.sample_affine(x, theta, size[0], size[1], align_corners, padding_mode, mode)
    return _SampleAffine.apply(x, _pixel_matrix(x, theta, size, align_corners), size, padding_mode, mode)
