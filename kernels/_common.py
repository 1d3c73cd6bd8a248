"""Shared pieces of the Triton samplers: device helpers for gathering and scattering, and launch utilities.

Every family kernel (affine.py, projective.py, tps.py, grid.py) computes the input pixel coordinates (ix, iy)
of a 2-D tile of output pixels of one (b, k) pair in registers, then calls :func:`_sample_tile` (forward) or
:func:`_scatter_tile` (backward) below, which implement the semantics of ``reference._bilinear_or_nearest``:
non-finite points read nothing and pass no gradient, finite points are clamped to [-2, W + 1] (zeros) or
[0, W - 1] (border) before any index is formed, bilinear weights are formed exactly as in the reference so
that the identity warp is bit-exact, and nearest rounds half to even.

The image is read as a 2-D block [BLOCK_C channels, BLOCK_H * BLOCK_W pixels]; the image gradient is
accumulated in a float32 (float64 when computing in float64) buffer with relaxed atomics, in x's layout or, with
``VECTOR_ATOMICS``, pixel-major so that one atomic instruction adds 4 channels. A program takes at most
``CHANNEL_GROUP`` channels, so that images of many channels spread over more programs.
"""

from __future__ import annotations

import contextlib
import functools
import os
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch
import triton
import triton.language as tl
from torch import Tensor
from triton.runtime.interpreter import InterpretedFunction

from . import reference

__all__ = [
    "CHANNEL_GROUP",
    "FWD_CONFIG_INTERPRET",
    "FWD_MAX_BLOCK_C",
    "HAS_LIBRARY_OPS",
    "VECTOR_ATOMICS",
    "acc_channels",
    "amp_backward",
    "apply_function",
    "autocast_inputs",
    "block_c",
    "bwd_config",
    "cdiv",
    "channel_group",
    "check_deterministic",
    "check_device",
    "device_context",
    "finish_image_grad",
    "fwd_autotune",
    "fwd_block_c",
    "image_grad_buffer",
    "interpreting",
    "launch",
    "library_op",
    "needs_int64",
    "num_tiles",
    "programs_per_plane",
    "reference_vjp",
    "use_library_op",
    "warp_params",
]

#: torch.library.triton_op / wrap_triton exist (torch >= 2.6); without them the ops are plain autograd.Functions.
HAS_LIBRARY_OPS = hasattr(torch.library, "triton_op") and hasattr(torch.library, "wrap_triton")


# --------------------------------------------------------------------------------------------------------------
# device helpers
# --------------------------------------------------------------------------------------------------------------
@triton.jit
def _tile_coords(C, Ho, Wo, BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr, CGROUP: tl.constexpr):
    # One program = one BLOCK_H x BLOCK_W tile of one (b, k) and one group of CGROUP channels [c_lo, c_hi). Program
    # ids run over (b, k), then channel groups, then tiles, so a (b, k)'s programs are consecutive and the program
    # id is also the program's slot among the (B * K, groups * tiles) partial sums of the parameter gradient.
    slot = tl.program_id(0)
    tiles_w = tl.cdiv(Wo, BLOCK_W)
    tiles = tl.cdiv(Ho, BLOCK_H) * tiles_w
    groups = tl.cdiv(C, CGROUP)
    tile = slot % tiles
    c_lo = ((slot // tiles) % groups) * CGROUP
    bk = slot // (tiles * groups)
    p = tl.arange(0, BLOCK_H * BLOCK_W)
    i = (tile // tiles_w) * BLOCK_H + p // BLOCK_W
    j = (tile % tiles_w) * BLOCK_W + p % BLOCK_W
    return bk, slot, c_lo, tl.minimum(c_lo + CGROUP, C), i, j, (i < Ho) & (j < Wo)


@triton.jit
def _finite(x, FMAX: tl.constexpr):
    # False for NaN (every comparison with NaN is false) and for +-inf.
    return tl.abs(x) <= FMAX


@triton.jit
def _div(a, b):
    # IEEE round-to-nearest division as in torch (Triton's float32 "/" is approximate on GPUs).
    r = a / b
    if a.dtype == tl.float32:
        r = tl.math.div_rn(a, b)
    return r


@triton.jit
def _round_half_even(x):
    # torch.round: round half to even. x is already clamped to a few pixels around the image.
    f = tl.floor(x)
    d = x - f
    odd = (f - 2.0 * tl.floor(f * 0.5)) != 0.0
    up = (d > 0.5) | ((d == 0.5) & odd)
    return tl.where(up, f + 1.0, f)


@triton.jit
def _offsets(idx, stride, IDX64: tl.constexpr):
    # idx * stride, in int64 when the tensor can hold offsets of 2**31 or more.
    if IDX64:
        return idx.to(tl.int64) * stride
    else:
        return idx * stride


@triton.jit
def _load_row3(ptr, CDT: tl.constexpr):
    # Three consecutive matrix entries as scalars in the compute dtype. Scalar loads: every thread reads the same
    # address (one broadcast transaction); picking entries out of a vector load instead costs a reduction per entry,
    # which the compiler may route through shared memory and barriers.
    return tl.load(ptr).to(CDT), tl.load(ptr + 1).to(CDT), tl.load(ptr + 2).to(CDT)


@triton.jit
def _matrix_partials(ga, gb, gw, u, v, R: tl.constexpr):
    # The tile's partial sums of a matrix's gradient, entry r = 3 * row + col: d loss / d M[row, col] =
    # sum_p g_row(p) * (u, v, 1)[col](p), with rows g = (ga, gb, gw); entries past the last row are junk the caller
    # masks. Formed as one (R, pixels) block and one reduction: one pass through shared memory for all entries.
    r = tl.arange(0, R)[:, None]
    row = r // 3
    col = r % 3
    g = tl.where(row == 0, ga[None, :], tl.where(row == 1, gb[None, :], gw[None, :]))
    f = tl.where(col == 0, u[None, :], tl.where(col == 1, v[None, :], 1.0))
    return tl.sum(g * f, axis=1)


@triton.jit
def _param_grads(part, s_ptr, R: tl.constexpr, E: tl.constexpr):
    # d loss / d params from R entries of d loss / d M (the first E real, the rest junk the caller masks), where
    # M = params * s entry by entry (see _affine_pixel_matrix, _projective_pixel_matrix).
    r = tl.arange(0, R)
    return part * tl.load(s_ptr + r, mask=r < E, other=0.0)


# The families' coordinate maps (one function each, shared by their kernels and the gather) -------------------
@triton.jit
def _affine_matrix(m_ptr, bk, CDT: tl.constexpr):
    # The six entries at m_ptr of (b, k), (B, K, 2, 3), as scalars in the compute dtype.
    mk = m_ptr + bk.to(tl.int64) * 6
    m00, m01, m02 = _load_row3(mk, CDT)
    m10, m11, m12 = _load_row3(mk + 3, CDT)
    return m00, m01, m02, m10, m11, m12


@triton.jit
def _affine_pixel_matrix(t_ptr, s_ptr, bk, CDT: tl.constexpr):
    # The pixel matrix of (b, k): theta (B, K, 2, 3) times the pixel scales s (2, 3) entry by entry, one rounding
    # each, as reference.affine_to_pixels computes it.
    t00, t01, t02, t10, t11, t12 = _affine_matrix(t_ptr, bk, CDT)
    s00, s01, s02 = _load_row3(s_ptr, CDT)
    s10, s11, s12 = _load_row3(s_ptr + 3, CDT)
    return t00 * s00, t01 * s01, t02 * s02, t10 * s10, t11 * s11, t12 * s12


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
def _projective_matrix(m_ptr, bk, CDT: tl.constexpr):
    # The nine entries at m_ptr of (b, k), (B, K, 3, 3), as scalars in the compute dtype.
    mk = m_ptr + bk.to(tl.int64) * 9
    m00, m01, m02 = _load_row3(mk, CDT)
    m10, m11, m12 = _load_row3(mk + 3, CDT)
    m20, m21, m22 = _load_row3(mk + 6, CDT)
    return m00, m01, m02, m10, m11, m12, m20, m21, m22


@triton.jit
def _projective_pixel_matrix(t_ptr, s_ptr, bk, CDT: tl.constexpr):
    # The pixel homography of (b, k): h (B, K, 3, 3) times the pixel scales s (3, 3) entry by entry, one rounding
    # each, as reference.projective_to_pixels computes it.
    t00, t01, t02, t10, t11, t12, t20, t21, t22 = _projective_matrix(t_ptr, bk, CDT)
    s00, s01, s02 = _load_row3(s_ptr, CDT)
    s10, s11, s12 = _load_row3(s_ptr + 3, CDT)
    s20, s21, s22 = _load_row3(s_ptr + 6, CDT)
    m00, m01, m02 = t00 * s00, t01 * s01, t02 * s02
    m10, m11, m12 = t10 * s10, t11 * s11, t12 * s12
    return m00, m01, m02, m10, m11, m12, t20 * s20, t21 * s21, t22 * s22


@triton.jit
def _projective_map(
    m00,
    m01,
    m02,
    m10,
    m11,
    m12,
    m20,
    m21,
    m22,
    i,
    j,
    H,
    W,
    Ho,
    Wo,
    CDT: tl.constexpr,
    FMAX: tl.constexpr,
    EPS: tl.constexpr,
):
    # [a, b, w] = M (u, v, 1) with u = j - (Wo - 1) / 2, v = i - (Ho - 1) / 2, then ix = a / w + (W - 1) / 2.
    # Points with non-finite a, b, w or |w| < EPS are invalid (ok False); like the reference, they divide 0 by 1.
    # The forward, the scatter backward and the gather backward all call this one function (see _affine_map).
    u = j.to(CDT) - (Wo - 1) * 0.5
    v = i.to(CDT) - (Ho - 1) * 0.5
    a = m00 * u + m01 * v + m02
    b = m10 * u + m11 * v + m12
    w = m20 * u + m21 * v + m22
    ok = _finite(a, FMAX) & _finite(b, FMAX) & _finite(w, FMAX) & (tl.abs(w) >= EPS)
    a = tl.where(ok, a, 0.0)
    b = tl.where(ok, b, 0.0)
    w = tl.where(ok, w, 1.0)
    ix = _div(a, w) + (W - 1) * 0.5
    iy = _div(b, w) + (H - 1) * 0.5
    return ix, iy, ok, u, v, a, b, w


@triton.jit
def _clamp_coords(ix, iy, valid, H, W, BORDER: tl.constexpr, FMAX: tl.constexpr):
    # Non-finite points become invalid and sit at 0; finite points are clamped as in the reference. Returns the
    # clamped coordinates, the validity and where torch.clamp would pass the gradient (inclusive bounds).
    valid = valid & _finite(ix, FMAX) & _finite(iy, FMAX)
    ix = tl.where(valid, ix, 0.0)
    iy = tl.where(valid, iy, 0.0)
    if BORDER:
        lo = 0.0
        hx = W - 1.0
        hy = H - 1.0
    else:
        lo = -2.0
        hx = W + 1.0
        hy = H + 1.0
    pass_x = valid & (ix >= lo) & (ix <= hx)
    pass_y = valid & (iy >= lo) & (iy <= hy)
    ix = tl.minimum(tl.maximum(ix, lo), hx)
    iy = tl.minimum(tl.maximum(iy, lo), hy)
    return ix, iy, valid, pass_x, pass_y


@triton.jit
def _sample_tile(
    out_ptr,
    x_ptr,
    ix,
    iy,
    valid,
    out_pix,
    pmask,
    c_lo,
    c_hi,
    H,
    W,
    sxc,
    sxh,
    sxw,
    soc,
    BORDER: tl.constexpr,
    NEAREST: tl.constexpr,
    BLOCK_C: tl.constexpr,
    CDT: tl.constexpr,
    IDX64: tl.constexpr,
    FMAX: tl.constexpr,
):
    """Write the samples of one tile for channels [c_lo, c_hi): out_ptr and x_ptr point at (b, k) and b; out_pix is
    i * Wo + j."""
    ix, iy, valid, _, _ = _clamp_coords(ix, iy, valid, H, W, BORDER, FMAX)
    if NEAREST:
        xi = _round_half_even(ix).to(tl.int32)
        yi = _round_half_even(iy).to(tl.int32)
        m = valid & (xi >= 0) & (xi < W) & (yi >= 0) & (yi < H)
        o = _offsets(yi, sxh, IDX64) + _offsets(xi, sxw, IDX64)
        for c0 in range(c_lo, c_hi, BLOCK_C):
            cs = c0 + tl.arange(0, BLOCK_C)
            cm = cs < c_hi
            xc = _offsets(cs, sxc, IDX64)[:, None]
            v = tl.load(x_ptr + xc + o[None, :], mask=cm[:, None] & m[None, :], other=0.0)
            oc = _offsets(cs, soc, IDX64)[:, None]
            tl.store(out_ptr + oc + out_pix[None, :], v, mask=cm[:, None] & pmask[None, :])
    else:
        x0 = tl.floor(ix)
        y0 = tl.floor(iy)
        # Weights formed exactly as in the reference: w1 = t - floor(t), w0 = 1 - w1.
        wx1 = ix - x0
        wy1 = iy - y0
        wx0 = 1.0 - wx1
        wy0 = 1.0 - wy1
        w00 = (wx0 * wy0)[None, :]
        w10 = (wx1 * wy0)[None, :]
        w01 = (wx0 * wy1)[None, :]
        w11 = (wx1 * wy1)[None, :]
        xi = x0.to(tl.int32)
        yi = y0.to(tl.int32)
        mx0 = (xi >= 0) & (xi < W)
        mx1 = (xi >= -1) & (xi < W - 1)
        my0 = valid & (yi >= 0) & (yi < H)
        my1 = valid & (yi >= -1) & (yi < H - 1)
        m00 = (my0 & mx0)[None, :]
        m10 = (my0 & mx1)[None, :]
        m01 = (my1 & mx0)[None, :]
        m11 = (my1 & mx1)[None, :]
        ox = _offsets(xi, sxw, IDX64)
        oy = _offsets(yi, sxh, IDX64)
        o00 = (oy + ox)[None, :]
        o10 = (oy + ox + sxw)[None, :]
        o01 = (oy + sxh + ox)[None, :]
        o11 = (oy + sxh + ox + sxw)[None, :]
        for c0 in range(c_lo, c_hi, BLOCK_C):
            cs = c0 + tl.arange(0, BLOCK_C)
            cm = (cs < c_hi)[:, None]
            xc = x_ptr + _offsets(cs, sxc, IDX64)[:, None]
            v00 = tl.load(xc + o00, mask=cm & m00, other=0.0).to(CDT)
            v10 = tl.load(xc + o10, mask=cm & m10, other=0.0).to(CDT)
            v01 = tl.load(xc + o01, mask=cm & m01, other=0.0).to(CDT)
            v11 = tl.load(xc + o11, mask=cm & m11, other=0.0).to(CDT)
            # Summed in the reference's order so that the identity warp reproduces the input exactly.
            acc = v00 * w00 + v10 * w10 + v01 * w01 + v11 * w11
            oc = _offsets(cs, soc, IDX64)[:, None]
            tl.store(out_ptr + oc + out_pix[None, :], acc, mask=cm & pmask[None, :])


@triton.jit
def _grad_image(gx_ptr, b, sgxb, H, W, ACC_CP: tl.constexpr):
    # Image b (int64) of the image gradient buffer: x's strides, or with ACC_CP the (B, H, W, ACC_CP) buffer, whose
    # offset is written as a multiple of ACC_CP so that Triton knows its alignment (see _grad_corner).
    if ACC_CP > 0:
        return gx_ptr + b * H * W * ACC_CP
    else:
        return gx_ptr + b * sgxb


@triton.jit
def _grad_corner(gx_ptr, cs, yi, xi, W, sgxc, sgxh, sgxw, ACC_CP: tl.constexpr, IDX64: tl.constexpr):
    # [channels, pixels] addresses of channels cs at input pixels (yi, xi) in the image gradient buffer of one image.
    # With ACC_CP a pixel's ACC_CP channels are consecutive and its offset a multiple of ACC_CP, so a thread's 2 or 4
    # channels form one aligned vector and the atomic add is one vector instruction (sm_90: atom.add.v4.f32).
    if ACC_CP > 0:
        pix = yi * W + xi
        if IDX64:
            pix = yi.to(tl.int64) * W + xi
        return gx_ptr + cs[:, None] + (pix * ACC_CP)[None, :]
    else:
        return (
            gx_ptr
            + _offsets(cs, sgxc, IDX64)[:, None]
            + (_offsets(yi, sgxh, IDX64) + _offsets(xi, sgxw, IDX64))[None, :]
        )


@triton.jit
def _grad_mask(cm, ACC_CP: tl.constexpr):
    # The channel mask of the atomic adds. The pixel-major buffer has room for every channel of a block (the padding
    # channels receive the zeros that grad_out's masked load gives), so its mask is constant along the channels,
    # which vectorising the atomics needs.
    if ACC_CP > 0:
        return tl.full(cm.shape, 1, tl.int1)
    else:
        return cm


@triton.jit
def _scatter_tile(
    gx_ptr,
    x_ptr,
    go_ptr,
    bk,
    K,
    i,
    j,
    ix,
    iy,
    valid,
    c_lo,
    c_hi,
    H,
    W,
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
    BORDER: tl.constexpr,
    NEAREST: tl.constexpr,
    NEED_X_GRAD: tl.constexpr,
    NEED_COORD_GRAD: tl.constexpr,
    BLOCK_C: tl.constexpr,
    ACC_CP: tl.constexpr,
    CDT: tl.constexpr,
    IDX64: tl.constexpr,
    FMAX: tl.constexpr,
):
    """Backward of one tile for channels [c_lo, c_hi): scatter grad_out into the image gradient, return the
    channels' share of d loss / d (ix, iy) per pixel.

    gx_ptr, x_ptr and go_ptr are the whole tensors (image gradient buffer, images, grad_out), located here for
    (b, k) = divmod(bk, K) and output pixels (i, j). With ACC_CP the image gradient buffer is pixel-major (see
    _grad_corner).
    """
    b = (bk // K).to(tl.int64)
    gx_ptr = _grad_image(gx_ptr, b, sgxb, H, W, ACC_CP)
    x_ptr = x_ptr + b * sxb
    go_ptr = go_ptr + b * sgb + (bk % K).to(tl.int64) * sgk
    go_pix = i * sgh + j * sgw
    if IDX64:
        go_pix = i.to(tl.int64) * sgh + j.to(tl.int64) * sgw
    ix, iy, valid, pass_x, pass_y = _clamp_coords(ix, iy, valid, H, W, BORDER, FMAX)
    # Channel terms of the coordinate gradient accumulate per channel lane, summed over the lanes once at the end
    # (a reduction across warps per channel block would cost a pass through shared memory each).
    gix2 = tl.zeros((BLOCK_C, ix.shape[0]), dtype=CDT)
    giy2 = tl.zeros((BLOCK_C, ix.shape[0]), dtype=CDT)
    # Channels per atomic add into a pixel-major buffer: one vector of 4 (or 2) channels.
    VEC: tl.constexpr = 4 if ACC_CP % 4 == 0 else 2
    if NEAREST:
        if NEED_X_GRAD:
            xi = _round_half_even(ix).to(tl.int32)
            yi = _round_half_even(iy).to(tl.int32)
            m = (valid & (xi >= 0) & (xi < W) & (yi >= 0) & (yi < H))[None, :]
            STEP: tl.constexpr = VEC if ACC_CP > 0 else BLOCK_C
            for c0 in range(c_lo, c_hi, STEP):
                cs = c0 + tl.arange(0, STEP)
                cm = (cs < c_hi)[:, None]
                g = tl.load(go_ptr + _offsets(cs, sgc, IDX64)[:, None] + go_pix[None, :], mask=cm & m, other=0.0)
                gq = _grad_corner(gx_ptr, cs, yi, xi, W, sgxc, sgxh, sgxw, ACC_CP, IDX64)
                tl.atomic_add(gq, g.to(CDT), mask=_grad_mask(cm, ACC_CP) & m, sem="relaxed")
    else:
        x0 = tl.floor(ix)
        y0 = tl.floor(iy)
        wx1 = ix - x0
        wy1 = iy - y0
        wx0 = 1.0 - wx1
        wy0 = 1.0 - wy1
        xi = x0.to(tl.int32)
        yi = y0.to(tl.int32)
        mx0 = (xi >= 0) & (xi < W)
        mx1 = (xi >= -1) & (xi < W - 1)
        my0 = valid & (yi >= 0) & (yi < H)
        my1 = valid & (yi >= -1) & (yi < H - 1)
        m00 = (my0 & mx0)[None, :]
        m10 = (my0 & mx1)[None, :]
        m01 = (my1 & mx0)[None, :]
        m11 = (my1 & mx1)[None, :]
        for c0 in range(c_lo, c_hi, BLOCK_C):
            cs = c0 + tl.arange(0, BLOCK_C)
            cm = (cs < c_hi)[:, None]
            gp = go_ptr + _offsets(cs, sgc, IDX64)[:, None] + go_pix[None, :]
            g = tl.load(gp, mask=cm & valid[None, :], other=0.0).to(CDT)
            if NEED_X_GRAD and ACC_CP == 0:
                gq = _grad_corner(gx_ptr, cs, yi, xi, W, sgxc, sgxh, sgxw, ACC_CP, IDX64)
                tl.atomic_add(gq, g * (wx0 * wy0)[None, :], mask=cm & m00, sem="relaxed")
                tl.atomic_add(gq + sgxw, g * (wx1 * wy0)[None, :], mask=cm & m10, sem="relaxed")
                tl.atomic_add(gq + sgxh, g * (wx0 * wy1)[None, :], mask=cm & m01, sem="relaxed")
                tl.atomic_add(gq + sgxh + sgxw, g * (wx1 * wy1)[None, :], mask=cm & m11, sem="relaxed")
            if NEED_COORD_GRAD:
                ox = _offsets(xi, sxw, IDX64)
                oy = _offsets(yi, sxh, IDX64)
                xc = x_ptr + _offsets(cs, sxc, IDX64)[:, None]
                v00 = tl.load(xc + (oy + ox)[None, :], mask=cm & m00, other=0.0).to(CDT)
                v10 = tl.load(xc + (oy + ox + sxw)[None, :], mask=cm & m10, other=0.0).to(CDT)
                v01 = tl.load(xc + (oy + sxh + ox)[None, :], mask=cm & m01, other=0.0).to(CDT)
                v11 = tl.load(xc + (oy + sxh + ox + sxw)[None, :], mask=cm & m11, other=0.0).to(CDT)
                # d out / d ix = sum_y w_y (v(x0 + 1, y) - v(x0, y)), likewise for iy.
                gix2 += g * ((v10 - v00) * wy0[None, :] + (v11 - v01) * wy1[None, :])
                giy2 += g * ((v01 - v00) * wx0[None, :] + (v11 - v10) * wx1[None, :])
        if NEED_X_GRAD and ACC_CP > 0:
            # The pixel-major buffer's vector atomics in a loop of their own, VEC channels at a time: in the loop
            # above, the corner values' per-pixel layout and the vectors' per-channel layout would be converted
            # into each other for every channel block (ptxas, sm_90: 166 to 185 registers per thread, against 64
            # to 80 this way). grad_out's tile is read a second time, mostly from the cache.
            for c0 in range(c_lo, c_hi, VEC):
                cs = c0 + tl.arange(0, VEC)
                cm = (cs < c_hi)[:, None]
                g = tl.load(
                    go_ptr + _offsets(cs, sgc, IDX64)[:, None] + go_pix[None, :], mask=cm & valid[None, :], other=0.0
                )
                g = g.to(CDT)
                gq = _grad_corner(gx_ptr, cs, yi, xi, W, sgxc, sgxh, sgxw, ACC_CP, IDX64)
                gm = _grad_mask(cm, ACC_CP)
                tl.atomic_add(gq, g * (wx0 * wy0)[None, :], mask=gm & m00, sem="relaxed")
                tl.atomic_add(gq + ACC_CP, g * (wx1 * wy0)[None, :], mask=gm & m10, sem="relaxed")
                tl.atomic_add(gq + W * ACC_CP, g * (wx0 * wy1)[None, :], mask=gm & m01, sem="relaxed")
                tl.atomic_add(gq + (W + 1) * ACC_CP, g * (wx1 * wy1)[None, :], mask=gm & m11, sem="relaxed")
    gix = tl.where(pass_x, tl.sum(gix2, axis=0), 0.0)
    giy = tl.where(pass_y, tl.sum(giy2, axis=0), 0.0)
    return gix, giy


# --------------------------------------------------------------------------------------------------------------
# launch utilities
# --------------------------------------------------------------------------------------------------------------
# Triton decides when a @triton.jit function is defined whether it runs compiled or through the interpreter
# (TRITON_INTERPRET=1), so ask a kernel of this module rather than the environment (a constant is also what
# torch.compile traces best).
_INTERPRETED = isinstance(_tile_coords, InterpretedFunction)


def interpreting() -> bool:
    """Whether the kernels run through Triton's interpreter (TRITON_INTERPRET=1 when they were imported)."""
    return _INTERPRETED


def needs_int64(*tensors: Tensor) -> bool:
    """Whether any offset into these tensors (or a product of a channel index and a plane size) can pass 2**31."""
    limit = 2**31 - 1
    for t in tensors:
        if t.numel() >= limit:
            return True
        if t.is_contiguous() or (t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last)):
            continue  # dense: the largest offset is numel - 1 (the loop below costs microseconds per call)
        span = sum((s - 1) * abs(st) for s, st in zip(t.shape, t.stride(), strict=True) if s > 0)
        if span >= limit:
            return True
    return False


def num_tiles(ho: int, wo: int, block_h: int, block_w: int) -> int:
    """Tiles of one (b, k) output plane."""
    return cdiv(ho, block_h) * cdiv(wo, block_w)


def programs_per_plane(channels: int, ho: int, wo: int, meta: dict[str, Any]) -> int:
    """Programs (and partial-sum slots) per (b, k) of a sampling kernel with ``meta``'s tile and channel group:
    channel groups times tiles (see _tile_coords)."""
    return cdiv(channels, meta["CGROUP"]) * num_tiles(ho, wo, meta["BLOCK_H"], meta["BLOCK_W"])


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for positive b, in plain Python (triton.cdiv costs microseconds per call on the host)."""
    return -(-a // b)


def device_context(x: Tensor) -> contextlib.AbstractContextManager:
    """torch.cuda.device(x.device) for CUDA tensors (Triton launches on the current device), else a no-op."""
    return torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext()


def block_c(channels: int, cap: int) -> int:
    """Channels per block: the next power of two of C, at most ``cap``."""
    # int(): a symbolic C (torch.compile) is specialised; 1 << bit_length is the next power of two, in plain Python.
    return min(1 << (int(channels) - 1).bit_length(), cap)


#: Channels per load in the forward when SPLIT_C is off. With 8, ptxas (triton 3.6, sm_90) needed 198 to 255
#: registers per thread and spilled on an 8 x 32 tile; with 4, 105 to 200 and no spills (benchmarks/sass_report.py).
FWD_MAX_BLOCK_C = 4

#: Most channels per program on GPUs (CGROUP, a power of two). With all channels in one program, feature maps
#: (feat56x2: B 64, C 128, K 2 x 28 x 28) made 512 programs of 8 warps, under one wave on an H100's 132 SMs, each
#: looping over 128 channels one dependent gather after the other; in groups of 16 they make 4096. The coordinates
#: are computed once per group, which costs little next to 16 channels of gathers.
CHANNEL_GROUP = 16


def channel_group(channels: int) -> int:
    """Channels per program: the next power of two of C, at most ``CHANNEL_GROUP`` on GPUs and 4 under the
    interpreter, where blocks take at most 2 (``fwd_block_c``, ``bwd_config``), so that the tests' C of 3 to 5 span
    several groups and several blocks per group."""
    return block_c(channels, 4 if interpreting() else CHANNEL_GROUP)


def fwd_block_c(channels: int) -> int:
    """Channels per load in the forward without SPLIT_C: at most ``FWD_MAX_BLOCK_C`` on GPUs, 2 under the
    interpreter (see ``channel_group``); never more than a group."""
    return block_c(channels, 2 if interpreting() else FWD_MAX_BLOCK_C)


#: Forward tile shapes tried by the autotuner on GPUs (BLOCK_H, BLOCK_W, num_warps): two pixels per thread, and
#: one (16 x 16 on 8 warps, 8 x 16 on 4), where each warp's gather instruction reads 32 neighbouring pixels. Each
#: is tried with and without SPLIT_C, so the first call of a forward kernel for a new shape compiles and times 6.
_FWD_CONFIGS = ((8, 32, 4), (16, 16, 8), (8, 16, 4))


def fwd_autotune(kernel: Callable) -> Callable:
    """Wrap a forward kernel in an autotuner over tile shapes and channel blocking, keyed by sizes and options.

    Each tile shape is tried twice: with the launcher's BLOCK_C channels per load (SPLIT_C False; for 3 channels
    one lane in four idles and the registers double) and one channel at a time in a loop (SPLIT_C True). Which
    is faster depends on the card and the shapes, so the autotuner measures it.
    """
    configs = [
        triton.Config({"BLOCK_H": h, "BLOCK_W": w, "SPLIT_C": split}, num_warps=nw)
        for h, w, nw in _FWD_CONFIGS
        for split in (False, True)
    ]
    key = ["C", "H", "W", "Ho", "Wo", "BORDER", "NEAREST", "BLOCK_C", "CGROUP", "IDX64"]
    return triton.autotune(configs=configs, key=key)(kernel)


#: The single forward config used under the interpreter (no autotuning there: it would time Python).
FWD_CONFIG_INTERPRET = {"BLOCK_H": 8, "BLOCK_W": 8, "SPLIT_C": False}


#: How the scatter backward accumulates the image gradient. False (the default, the layout timed on a GPU): a zeroed
#: float32 (float64) buffer in x's layout and one atomic add per channel and corner. True: a pixel-major buffer
#: (B, H, W, CP), CP = C rounded up to 2 or 4 channels, where each corner's atomic add takes 2 or 4 channels in one
#: vector instruction (sm_90: atom.global.add.v4.f32; other GPUs split it), a third of the atomics for C = 3,
#: at the price of a zeroed buffer a third larger for C = 3 and a copy into x's layout afterwards (peak memory of
#: a forward + backward of cub448x4: 490 instead of 294 MiB, above the half of PyTorch's that issue 3 allows).
#: Read at every backward call; STN_VECTOR_ATOMICS=1 sets it at import. Not yet timed on a GPU.
VECTOR_ATOMICS: bool = os.environ.get("STN_VECTOR_ATOMICS", "0") == "1"


def acc_channels(channels: int, acc_dtype: torch.dtype | None) -> int:
    """ACC_CP of the scatter backward: channels per pixel of its pixel-major image-gradient buffer (C rounded up to
    a vector of 2 or 4), or 0 for a buffer in x's layout: without ``VECTOR_ATOMICS``, for one channel, where the
    caller accumulates in no buffer of the scatter kernel's own (``acc_dtype`` None), and in float64 (no vector
    atomics exist for it, and triton 3.6 fails to compile the kernel)."""
    if not VECTOR_ATOMICS or acc_dtype != torch.float32 or channels < 2:
        return 0
    return 2 if channels == 2 else cdiv(channels, 4) * 4


def image_grad_buffer(x: Tensor, dtype: torch.dtype, acc_cp: int) -> Tensor:
    """The zeroed buffer the scatter backward accumulates the image gradient of x in, as a (B, C or ACC_CP, H, W)
    tensor: x's layout (``acc_cp`` 0), or a pixel-major (B, H, W, ACC_CP) buffer seen through a permutation."""
    if acc_cp == 0:
        return torch.zeros_like(x, dtype=dtype)
    b, _, h, w = x.shape
    return torch.zeros((b, h, w, acc_cp), device=x.device, dtype=dtype).permute(0, 3, 1, 2)


def finish_image_grad(gx: Tensor, x: Tensor, acc_cp: int) -> Tensor:
    """The image gradient in x's dtype, from the buffer of ``image_grad_buffer``; a pixel-major buffer is copied
    into x's layout (its padding channels dropped), unless it already is x's layout and dtype (channels_last
    float32 images of 2 or a multiple of 4 channels)."""
    if acc_cp == 0:
        return gx.to(x.dtype)
    view = gx[:, : x.shape[1]]
    if view.dtype == x.dtype and view.stride() == x.stride():
        return view
    return torch.empty_like(x).copy_(view)


def bwd_config(channels: int, acc_dtype: torch.dtype | None = None) -> dict[str, int]:
    """Backward tile: fixed (the parameter partial sums need the tile count before launch), and the image gradient
    buffer's layout, ACC_CP (see ``acc_channels``; ``acc_dtype``: the dtype of the buffer the scatter kernel
    accumulates the image gradient in, None without one).

    On GPUs one pixel per thread (16 x 16 pixels on 8 warps) and one channel at a time: with these, ptxas (sm_90)
    needs 55 to 64 registers per thread and the tile's reductions a handful of barriers, where two channel-pixel
    elements per thread took 110 to 130 registers (benchmarks/sass_report.py), and the per-channel loop matches the
    straightforward kernel that issue 3 quotes at 1.31 ms for the backward of cub448x4 against our 2.1 ms with 4
    channels per block. Under the interpreter, 8 x 8 pixels and up to 2 channels per block, so that the tests'
    tiny images span several tiles and channel blocks (C of 1 in the tests runs the GPUs' one-channel path).
    Programs take ``channel_group`` channels each, so a (b, k) has ``programs_per_plane`` partial-sum slots.
    With a pixel-major buffer, its atomic adds take vectors of 2 or 4 channels in a loop of their own.
    """
    if interpreting():
        block_h, block_w, bc, warps = 8, 8, block_c(channels, 2), 4
    else:
        block_h, block_w, bc, warps = 16, 16, 1, 8
    return {
        "BLOCK_H": block_h,
        "BLOCK_W": block_w,
        "BLOCK_C": bc,
        "CGROUP": channel_group(channels),
        "ACC_CP": acc_channels(channels, acc_dtype),
        "num_warps": warps,
    }


#: The configuration the autotuner chose, per autotuned kernel and call signature (see ``launch``).
_TUNED_CONFIGS: dict[tuple, Any] = {}


def launch(kernel: Any, tuned: Any | None, grid: Any, args: Sequence[Any], meta: dict, wrap: bool) -> None:
    """Launch ``kernel`` (or its autotuned wrapper ``tuned``); ``wrap`` routes it through torch.library.wrap_triton.

    ``kernel`` and ``tuned`` are Triton kernel handles (JITFunction / Autotuner, or the interpreter's wrappers),
    launched with the untyped ``handle[grid](...)`` syntax, hence ``Any``.

    An autotuned kernel goes through its autotuner once per call signature (the options in ``meta``, the scalar
    arguments and the tensors' dtypes: at least what the autotuner keys on); later calls launch the plain kernel
    with the configuration it chose. The autotuner rebuilds its key from every argument on every call: 29 us of host
    time per call on the development machine's CPU, against 9 to 13 us for this lookup and the plain kernel's launch
    (both measured with Triton's own launch stubbed out; benchmarks/RESULTS-kernels.md).

    Under the interpreter the plain kernel runs with ``FWD_CONFIG_INTERPRET`` when it is autotuned.
    """
    if interpreting():
        if tuned is not None:
            meta = {**meta, **FWD_CONFIG_INTERPRET}
        kernel[grid](*args, **meta)
        return
    if wrap and HAS_LIBRARY_OPS:  # torch.compile's graph: inductor launches (and autotunes) the kernels itself
        torch.library.wrap_triton(tuned if tuned is not None else kernel)[grid](*args, **meta)
        return
    if tuned is None:
        kernel[grid](*args, **meta)
        return
    key = (tuned, *meta.values(), *(a.dtype if isinstance(a, Tensor) else a for a in args))
    config = _TUNED_CONFIGS.get(key)
    if config is None:
        tuned[grid](*args, **meta)  # times the configurations the first time the autotuner sees its key
        _TUNED_CONFIGS[key] = tuned.best_config
    else:
        kernel[grid](*args, **meta, **config.all_kwargs())


def check_deterministic(op: str) -> None:
    """Raise (or warn, with warn_only=True) under torch.use_deterministic_algorithms: the backward uses atomics."""
    if not torch.are_deterministic_algorithms_enabled():
        return
    message = (
        f"{op} does not have a deterministic implementation (it accumulates the image gradient with atomic adds), "
        "but you set 'torch.use_deterministic_algorithms(True)'. Use backend='torch' for a deterministic backward, "
        "or torch.use_deterministic_algorithms(True, warn_only=True) to only warn."
    )
    if torch.is_deterministic_algorithms_warn_only_enabled():
        warnings.warn(message, stacklevel=3)
    else:
        raise RuntimeError(message)


def library_op(name: str) -> Any | None:
    """The already registered torch.ops.stn_lightning.<name> (when this module is imported again), else None."""
    try:
        return getattr(torch.ops.stn_lightning, name)
    except (AttributeError, RuntimeError):
        return None


def autocast_inputs(x: Tensor, params: Tensor) -> tuple[Tensor, Tensor]:
    """Under CUDA autocast the image follows the autocast dtype and the parameters stay (at least) float32."""
    if x.is_cuda and torch.is_autocast_enabled("cuda"):
        x = x.to(torch.get_autocast_dtype("cuda"))
        if params.dtype != torch.float64:
            params = params.float()
    return x, params


def check_device(x: Tensor) -> None:
    """Raise ValueError unless the Triton kernels can run on x: CUDA tensors, or any tensor under the interpreter."""
    if not x.is_cuda and not interpreting():
        raise ValueError(
            f"expected CUDA tensors for the Triton sampler (or TRITON_INTERPRET=1 for CPU tensors), got {x.device}"
        )


def use_library_op(x: Tensor) -> bool:
    """Whether to call the torch.library op instead of the autograd.Function: only while torch.compile traces.

    Both launch the same kernels. The op is what torch.compile needs to keep our kernels in its graph; eagerly it
    only adds host time (dispatcher, the registered autograd wrapper and a second op for the backward), and on
    small workloads host time is what a step costs (benchmarks/RESULTS-kernels.md: about 1.7 ms of host time
    around 0.04 ms of kernels for mnist2), so eager calls take the autograd.Function.
    """
    return HAS_LIBRARY_OPS and x.is_cuda and not interpreting() and torch.compiler.is_compiling()


def warp_params(x: Tensor, params: Tensor, size: tuple[int, int], align_corners: bool) -> tuple[Tensor, Tensor]:
    """What the affine and projective kernels read for parameters (B, K, 2 or 3, 3): the parameters in the compute
    dtype, contiguous (no copy of the usual float32 parameters), and the (2 or 3, 3) pixel scales of the sizes
    (``reference.pixel_scale_matrix``, a cached constant). The kernels multiply the two, entry by entry, into the
    pixel matrices of ``reference.affine_to_pixels`` / ``projective_to_pixels`` (the same products, rounded once),
    and scale their partial sums of d loss / d M by the same factors: the parameters' gradient. Done on the host,
    the product cost a launch and an autograd node per call (benchmarks/RESULTS-kernels.md). The gather backward
    (kernels/_gather.py) still takes the product from the host: in its loop over k the scaling cost registers."""
    dtype = reference.compute_dtype(x, params)
    in_size = (x.shape[-2], x.shape[-1])
    scale = reference.pixel_scale_matrix(params.shape[2], in_size, size, align_corners, dtype, params)
    return params.to(dtype).contiguous(), scale


def apply_function(function: Any, forward: Callable[..., Tensor], *args: Any) -> Tensor:
    """``function.apply(*args)`` (a family's autograd.Function) when autograd will need its backward, else
    ``forward(*args)``, the launcher its forward calls with the same arguments.

    Without a gradient to track (torch.no_grad, inference_mode, or no input that requires one) the Function would
    only add host time, which on small workloads is what a call costs: skipping it took the affine forward from
    about 55 to 40 us per call on the development machine's CPU (benchmarks/host_overhead.py, RESULTS-kernels.md).
    """
    if torch.is_grad_enabled():
        for a in args:  # a loop, not any() over a generator: a third of the host time
            if isinstance(a, Tensor) and a.requires_grad:
                return function.apply(*args)
    return forward(*args)


def amp_backward(backward: Callable[..., Any]) -> Callable[..., Any]:
    """Decorate a family Function's backward as ``torch.amp.custom_bwd(device_type="cuda")`` over
    ``torch.autograd.function.once_differentiable`` do, entering their contexts only when they change something.

    custom_bwd runs the backward under the autocast state of the forward (recorded by ``custom_fwd``), and
    once_differentiable under no_grad, marking the gradients non-differentiable when the graph is being recorded
    (``create_graph=True``). In the usual backward, with grad mode off and autocast off in the forward and now,
    neither changes anything, yet their two context managers cost 12 to 26 us of host time per forward + backward
    on the development machine's CPU, a tenth of the whole on small workloads (an A/B of the two decorations in
    benchmarks/host_overhead.py's calls); that case calls ``backward`` directly.
    """
    full = torch.amp.custom_bwd(device_type="cuda")(torch.autograd.function.once_differentiable(backward))

    @functools.wraps(backward)
    def wrapper(ctx: Any, *grads: Tensor) -> Any:
        if torch.is_grad_enabled() or ctx._fwd_used_autocast or torch.is_autocast_enabled("cuda"):
            return full(ctx, *grads)
        return backward(ctx, *grads)

    return wrapper


def reference_vjp(
    fn: Callable[..., Tensor], grad: Tensor, inputs: Sequence[Tensor], needs: Sequence[bool], *args: Any, **kwargs: Any
) -> list[Tensor]:
    """Gradients of ``fn(*inputs, *args, **kwargs)`` for the inputs flagged in ``needs`` (the CPU backward kernels).

    Inputs that need no gradient get an empty placeholder (a custom op returns tensors only).
    """
    # Kernels registered for a device run below autograd, so the gradient comes from torch.func.vjp, which
    # carries its own autograd level.
    wanted = [t for t, n in zip(inputs, needs, strict=True) if n]
    result = [t.new_empty(0) for t in inputs]
    if not wanted:
        return result

    def call(*diff: Tensor) -> Tensor:
        it = iter(diff)
        full = [next(it) if n else t for t, n in zip(inputs, needs, strict=True)]
        return fn(*full, *args, **kwargs)

    pullback = torch.func.vjp(call, *wanted)[1]  # (output, vjp_fn); has_aux=False, so no third element
    grads = iter(pullback(grad))
    for index, n in enumerate(needs):
        if n:
            result[index] = next(grads)
    return result
