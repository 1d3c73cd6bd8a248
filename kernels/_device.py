"""Device helpers of the Triton sampler (kernels/sampler.py) and of its affine and projective families.

A sampler program computes the input pixel coordinates (ix, iy) of a 2-D tile of output pixels of one (b, k) pair
in registers (the family's coordinate map), then calls :func:`_sample_tile` (forward) or :func:`_scatter_tile`
(backward) below, which implement the semantics of ``reference._bilinear_or_nearest``: non-finite points read
``fill`` and pass no gradient, finite points are clamped to [-2, W + 1] (zeros) or [0, W - 1] (border) before any
index is formed, bilinear weights are formed exactly as in the reference so that the identity warp is bit-exact,
nearest rounds half to even, and a corner outside the image reads ``fill`` (the masked loads' ``other``).

The image is read as a 2-D block [BLOCK_C channels, BLOCK_H * BLOCK_W pixels]; the scatter backward accumulates the
image gradient in a float32 (float64 when computing in float64) buffer in x's layout with relaxed atomics. The
matrix helpers at the end serve the affine and projective families (kernels/affine.py, projective.py).
"""

import triton
import triton.language as tl


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
def _matrix_param_grad(part_ptr, slot, ga, gb, gw, u, v, s_ptr, ROWS: tl.constexpr):
    # The program's partial sum of d loss / d params (3 ROWS entries at slot) of an affine (ROWS 2) or projective
    # (ROWS 3) family, from d loss / d (a, b, w) per pixel: d loss / d M (_matrix_partials) times the pixel scales s,
    # since M = params * s entry by entry (_pixel_matrix).
    R: tl.constexpr = 8 if ROWS == 2 else 16
    r = tl.arange(0, R)
    part = _matrix_partials(ga, gb, gw, u, v, R) * tl.load(s_ptr + r, mask=r < 3 * ROWS, other=0.0)
    tl.store(part_ptr + slot.to(tl.int64) * (3 * ROWS) + r, part, mask=r < 3 * ROWS)


# The affine and projective maps (their families' coordinate maps) --------------------------------------------
@triton.jit
def _matrix(mk, ROWS: tl.constexpr, CDT: tl.constexpr):
    # The entries of the (ROWS, 3) matrix at mk as nine scalars in the compute dtype; an affine matrix (ROWS 2) gets
    # the last row (0, 0, 1), which its users ignore.
    m00, m01, m02 = _load_row3(mk, CDT)
    m10, m11, m12 = _load_row3(mk + 3, CDT)
    m20, m21, m22 = 0.0, 0.0, 1.0
    if ROWS == 3:
        m20, m21, m22 = _load_row3(mk + 6, CDT)
    return m00, m01, m02, m10, m11, m12, m20, m21, m22


@triton.jit
def _pixel_matrix(t_ptr, s_ptr, bk, ROWS: tl.constexpr, CDT: tl.constexpr):
    # The pixel matrix of (b, k): the parameters (B, K, ROWS, 3) times the pixel scales s (ROWS, 3) entry by entry,
    # one rounding each, as reference.affine_to_pixels / projective_to_pixels compute it.
    t00, t01, t02, t10, t11, t12, t20, t21, t22 = _matrix(t_ptr + bk.to(tl.int64) * (3 * ROWS), ROWS, CDT)
    s00, s01, s02, s10, s11, s12, s20, s21, s22 = _matrix(s_ptr, ROWS, CDT)
    m00, m01, m02 = t00 * s00, t01 * s01, t02 * s02
    m10, m11, m12 = t10 * s10, t11 * s11, t12 * s12
    if ROWS == 3:
        t20, t21, t22 = t20 * s20, t21 * s21, t22 * s22
    return m00, m01, m02, m10, m11, m12, t20, t21, t22


@triton.jit
def _affine_map(m00, m01, m02, m10, m11, m12, i, j, H, W, Ho, Wo, CDT: tl.constexpr):
    # Pixel coordinates of output pixels (i, j), in the reference's order of operations: ix = m00 * u + m01 * v +
    # m02 + (W - 1) / 2 with u = j - (Wo - 1) / 2, v = i - (Ho - 1) / 2. The forward and the backward both call
    # this one function, so they agree on every coordinate (and so on every floor/round).
    u = j.to(CDT) - (Wo - 1) * 0.5
    v = i.to(CDT) - (Ho - 1) * 0.5
    ix = m00 * u + m01 * v + m02 + (W - 1) * 0.5
    iy = m10 * u + m11 * v + m12 + (H - 1) * 0.5
    return ix, iy, u, v


@triton.jit
def _projective_map(
    m00, m01, m02, m10, m11, m12, m20, m21, m22, i, j, H, W, Ho, Wo, CDT: tl.constexpr, FMAX: tl.constexpr,
    EPS: tl.constexpr,
):  # fmt: skip
    # [a, b, w] = M (u, v, 1) with u = j - (Wo - 1) / 2, v = i - (Ho - 1) / 2, then ix = a / w + (W - 1) / 2.
    # Points with non-finite a, b, w or |w| < EPS are invalid (ok False); like the reference, they divide 0 by 1.
    # The forward and the backward both call this one function (see _affine_map).
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
def _corners(ix, iy, valid, H, W):
    # The bilinear corners of clamped points (ix, iy): x0 = floor(ix) as int32 (likewise y0), the weights formed
    # exactly as in the reference (w1 = t - floor(t), w0 = 1 - w1) and, as [1, pixels] masks, which of the corners
    # (x0, y0), (x0 + 1, y0), (x0, y0 + 1), (x0 + 1, y0 + 1) are inside the image (none for an invalid point).
    x0 = tl.floor(ix)
    y0 = tl.floor(iy)
    wx1 = ix - x0
    wy1 = iy - y0
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
    return xi, yi, 1.0 - wx1, wx1, 1.0 - wy1, wy1, m00, m10, m01, m11


@triton.jit
def _read_fill(ptr, mask, fill, CDT: tl.constexpr):
    # Image values in the compute dtype where mask holds, else fill, for the coordinate gradient of half-precision
    # images: as the load's other, fill would be rounded to the image's dtype, an error that the gradient's float32
    # sums over many pixels keep (0.4 % of an affine theta's gradient in bfloat16). Images in the compute dtype take
    # fill as the load's other (written out at the call site: through a function ptxas took more registers).
    return tl.where(mask, tl.load(ptr, mask=mask, other=0.0).to(CDT), fill)


@triton.jit
def _sample_tile(
    out_ptr, x_ptr, ix, iy, valid, out_pix, pmask, c_lo, c_hi, H, W, sxc, sxh, sxw, soc, fill, HAS_FILL: tl.constexpr,
    BORDER: tl.constexpr, NEAREST: tl.constexpr, BLOCK_C: tl.constexpr, CDT: tl.constexpr, IDX64: tl.constexpr,
    FMAX: tl.constexpr,
):  # fmt: skip
    """Write the samples of one tile for channels [c_lo, c_hi): out_ptr and x_ptr point at (b, k) and b; out_pix is
    i * Wo + j. A corner outside the image, and an invalid point, read ``fill``."""
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
            v = tl.load(x_ptr + xc + o[None, :], mask=cm[:, None] & m[None, :], other=fill)
            oc = _offsets(cs, soc, IDX64)[:, None]
            tl.store(out_ptr + oc + out_pix[None, :], v, mask=cm[:, None] & pmask[None, :])
    else:
        xi, yi, wx0, wx1, wy0, wy1, m00, m10, m01, m11 = _corners(ix, iy, valid, H, W)
        w00 = (wx0 * wy0)[None, :]
        w10 = (wx1 * wy0)[None, :]
        w01 = (wx0 * wy1)[None, :]
        w11 = (wx1 * wy1)[None, :]
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
            # In a half-precision image fill is rounded to its dtype by the loads: at most half an ulp of fill in
            # the sample, which is rounded to that dtype anyway (a select in float32 cost 24 to 55 registers).
            v00 = tl.load(xc + o00, mask=cm & m00, other=fill).to(CDT)
            v10 = tl.load(xc + o10, mask=cm & m10, other=fill).to(CDT)
            v01 = tl.load(xc + o01, mask=cm & m01, other=fill).to(CDT)
            v11 = tl.load(xc + o11, mask=cm & m11, other=fill).to(CDT)
            # Summed in the reference's order so that the identity warp reproduces the input exactly.
            acc = v00 * w00 + v10 * w10 + v01 * w01 + v11 * w11
            oc = _offsets(cs, soc, IDX64)[:, None]
            tl.store(out_ptr + oc + out_pix[None, :], acc, mask=cm & pmask[None, :])


@triton.jit
def _scatter_tile(
    gx_ptr, x_ptr, go_ptr, bk, K, i, j, ix, iy, valid, c_lo, c_hi, H, W,
    sxb, sxc, sxh, sxw, sgxb, sgxc, sgxh, sgxw, sgb, sgk, sgc, sgh, sgw, fill, HAS_FILL: tl.constexpr,
    BORDER: tl.constexpr, NEAREST: tl.constexpr, NEED_X_GRAD: tl.constexpr, NEED_COORD_GRAD: tl.constexpr,
    BLOCK_C: tl.constexpr, CDT: tl.constexpr, IDX64: tl.constexpr, FMAX: tl.constexpr,
):  # fmt: skip
    """Backward of one tile for channels [c_lo, c_hi): scatter grad_out into the image gradient, return the
    channels' share of d loss / d (ix, iy) per pixel.

    gx_ptr, x_ptr and go_ptr are the whole tensors (image gradient buffer, images, grad_out), located here for
    (b, k) = divmod(bk, K) and output pixels (i, j). Corners outside the image read ``fill`` for the coordinate
    gradient (a constant: they receive no image gradient).
    """
    b = (bk // K).to(tl.int64)
    gx_ptr = gx_ptr + b * sgxb
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
    if NEAREST:
        if NEED_X_GRAD:
            xi = _round_half_even(ix).to(tl.int32)
            yi = _round_half_even(iy).to(tl.int32)
            m = (valid & (xi >= 0) & (xi < W) & (yi >= 0) & (yi < H))[None, :]
            gq = (_offsets(yi, sgxh, IDX64) + _offsets(xi, sgxw, IDX64))[None, :]
            for c0 in range(c_lo, c_hi, BLOCK_C):
                cs = c0 + tl.arange(0, BLOCK_C)
                cm = (cs < c_hi)[:, None]
                g = tl.load(go_ptr + _offsets(cs, sgc, IDX64)[:, None] + go_pix[None, :], mask=cm & m, other=0.0)
                gc = gx_ptr + _offsets(cs, sgxc, IDX64)[:, None]
                tl.atomic_add(gc + gq, g.to(CDT), mask=cm & m, sem="relaxed")
    else:
        xi, yi, wx0, wx1, wy0, wy1, m00, m10, m01, m11 = _corners(ix, iy, valid, H, W)
        for c0 in range(c_lo, c_hi, BLOCK_C):
            cs = c0 + tl.arange(0, BLOCK_C)
            cm = (cs < c_hi)[:, None]
            gp = go_ptr + _offsets(cs, sgc, IDX64)[:, None] + go_pix[None, :]
            g = tl.load(gp, mask=cm & valid[None, :], other=0.0).to(CDT)
            if NEED_X_GRAD:
                gq = (
                    gx_ptr
                    + _offsets(cs, sgxc, IDX64)[:, None]
                    + (_offsets(yi, sgxh, IDX64) + _offsets(xi, sgxw, IDX64))[None, :]
                )
                tl.atomic_add(gq, g * (wx0 * wy0)[None, :], mask=cm & m00, sem="relaxed")
                tl.atomic_add(gq + sgxw, g * (wx1 * wy0)[None, :], mask=cm & m10, sem="relaxed")
                tl.atomic_add(gq + sgxh, g * (wx0 * wy1)[None, :], mask=cm & m01, sem="relaxed")
                tl.atomic_add(gq + sgxh + sgxw, g * (wx1 * wy1)[None, :], mask=cm & m11, sem="relaxed")
            if NEED_COORD_GRAD:
                ox = _offsets(xi, sxw, IDX64)
                oy = _offsets(yi, sxh, IDX64)
                xc = x_ptr + _offsets(cs, sxc, IDX64)[:, None]
                if HAS_FILL and x_ptr.dtype.element_ty != CDT:
                    v00 = _read_fill(xc + (oy + ox)[None, :], cm & m00, fill, CDT)
                    v10 = _read_fill(xc + (oy + ox + sxw)[None, :], cm & m10, fill, CDT)
                    v01 = _read_fill(xc + (oy + sxh + ox)[None, :], cm & m01, fill, CDT)
                    v11 = _read_fill(xc + (oy + sxh + ox + sxw)[None, :], cm & m11, fill, CDT)
                else:
                    v00 = tl.load(xc + (oy + ox)[None, :], mask=cm & m00, other=fill).to(CDT)
                    v10 = tl.load(xc + (oy + ox + sxw)[None, :], mask=cm & m10, other=fill).to(CDT)
                    v01 = tl.load(xc + (oy + sxh + ox)[None, :], mask=cm & m01, other=fill).to(CDT)
                    v11 = tl.load(xc + (oy + sxh + ox + sxw)[None, :], mask=cm & m11, other=fill).to(CDT)
                # d out / d ix = sum_y w_y (v(x0 + 1, y) - v(x0, y)), likewise for iy.
                gix2 += g * ((v10 - v00) * wy0[None, :] + (v11 - v01) * wy1[None, :])
                giy2 += g * ((v01 - v00) * wx0[None, :] + (v11 - v10) * wx1[None, :])
    gix = tl.where(pass_x, tl.sum(gix2, axis=0), 0.0)
    giy = tl.where(pass_y, tl.sum(giy2, axis=0), 0.0)
    return gix, giy
