"""Triton sampler for K thin-plate-spline warps per image: kernels, launchers, autograd.Function, torch.library op.

The op takes the solved coefficients (B, K, N + 3, 2) of :func:`kernels.reference.tps_coefficients` (the small
solve stays in PyTorch and is shared by both backends) and the (N, 2) target points. Each program evaluates the
spline on its tile in registers: with normalised output coordinates (xn, yn) = (u / ox, v / oy),

    f(p) = A^T [1, xn, yn] + sum_n w_n U(|p - t_n|^2),  U(d2) = d2 log d2 (0 at 0),
    ix = (sx / ox) u + sx f_x(p) + (W - 1) / 2,  likewise iy,

and the backward reduces d loss / d coefficients inside the kernel into one partial sum per program
(B, K, programs per (b, k), N + 3, 2), scaled by (sx, sy) in the kernel and summed in PyTorch. The target points
receive no gradient.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import reference
from ._common import (
    HAS_LIBRARY_OPS,
    _sample_tile,
    _scatter_tile,
    _tile_coords,
    amp_backward,
    apply_function,
    autocast_inputs,
    bwd_config,
    channel_group,
    check_deterministic,
    check_device,
    device_context,
    finish_image_grad,
    fwd_autotune,
    fwd_block_c,
    image_grad_buffer,
    launch,
    library_op,
    needs_int64,
    programs_per_plane,
    reference_vjp,
    use_library_op,
)
from .reference import Mode, Padding

__all__ = ["sample_tps_coefficients"]


# --------------------------------------------------------------------------------------------------------------
# kernels
# --------------------------------------------------------------------------------------------------------------
@triton.jit
def _radial(d2):
    # U(d2) = d2 log d2, and 0 at d2 = 0, as in the reference.
    return tl.where(d2 > 0, d2 * tl.log(tl.where(d2 > 0, d2, 1.0)), 0.0)


@triton.jit
def _tps_coords(coef_ptr, t_ptr, s_ptr, bk, i, j, N, H, W, Ho, Wo, CDT: tl.constexpr):
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
    return ix, iy, xn, yn


@triton.jit
def _tps_fwd_kernel(
    # outputs
    out_ptr,
    # inputs
    x_ptr,
    coef_ptr,
    t_ptr,
    s_ptr,
    # sizes
    K,
    N,
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
    ix, iy, xn, yn = _tps_coords(coef_ptr, t_ptr, s_ptr, bk, i, j, N, H, W, Ho, Wo, CDT)
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


_tps_fwd_tuned = fwd_autotune(_tps_fwd_kernel)


@triton.jit
def _tps_bwd_kernel(
    # outputs
    gx_ptr,
    part_ptr,
    # inputs
    x_ptr,
    go_ptr,
    coef_ptr,
    t_ptr,
    s_ptr,
    # sizes
    K,
    N,
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
    BLOCK_N: tl.constexpr,
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
    ix, iy, xn, yn = _tps_coords(coef_ptr, t_ptr, s_ptr, bk, i, j, N, H, W, Ho, Wo, CDT)
    gix, giy = _scatter_tile(
        gx_ptr, x_ptr, go_ptr, bk, K, i, j, ix, iy, pmask, c_lo, c_hi, H, W,
        sxb, sxc, sxh, sxw, sgxb, sgxc, sgxh, sgxw, sgb, sgk, sgc, sgh, sgw,
        BORDER, NEAREST, NEED_X_GRAD, NEED_PARAM_GRAD, BLOCK_C, ACC_CP, CDT, IDX64, FMAX,
    )  # fmt: skip
    if NEED_PARAM_GRAD:
        # Partial sums of d loss / d f: row n is sum_p (gfx, gfy)(p) * feature_n(p), features [U_0..U_N-1, 1, x, y],
        # where (gfx, gfy) = (sx gix, sy giy) since ix = ... + sx * f_x (likewise iy).
        # BLOCK_N points at a time: U as a (BLOCK_N, pixels) block, so one 2-D reduction per block and axis rather
        # than one per point (each reduction over the tile goes through shared memory and barriers).
        gfx = gix * tl.load(s_ptr + 2).to(CDT)
        gfy = giy * tl.load(s_ptr + 3).to(CDT)
        part = part_ptr + slot.to(tl.int64) * (N + 3) * 2
        rn = tl.arange(0, BLOCK_N)
        for n0 in range(0, N, BLOCK_N):
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


# --------------------------------------------------------------------------------------------------------------
# launchers
# --------------------------------------------------------------------------------------------------------------
#: Control points per block in the backward's reductions (see _tps_bwd_kernel).
_TPS_BLOCK_N = 8


def _tps_inputs(
    x: Tensor, coefficients: Tensor, target_points: Tensor, size: tuple[int, int], align_corners: bool
) -> tuple[Tensor, Tensor, Tensor]:
    # Coefficients and target points in the compute dtype, contiguous, and the scalars of _tps_coords.
    dtype = reference.compute_dtype(x, coefficients)
    (fxx, _, sx), (_, fyy, sy), (fwx, fwy, _) = reference.pixel_scale_factors(
        (x.shape[-2], x.shape[-1]), size, align_corners
    )
    scalars = reference.host_constant([fxx, fyy, sx, sy, fwx, fwy], dtype, x)
    target = target_points.detach().to(device=x.device, dtype=dtype).contiguous()
    return coefficients.to(dtype).contiguous(), target, scalars


def _tps_forward(
    x: Tensor,
    coef: Tensor,
    target: Tensor,
    scalars: Tensor,
    size: tuple[int, int],
    padding_mode: str,
    mode: str,
    wrap: bool = False,
) -> Tensor:
    """Samples (B, K, C, Ho, Wo) in x's dtype for coefficients (B, K, N + 3, 2) in the compute dtype."""
    b, c, h, w = x.shape
    k = coef.shape[1]
    ho, wo = size
    out = torch.empty((b, k, c, ho, wo), device=x.device, dtype=x.dtype)
    if out.numel() == 0:
        return out
    m_f64 = coef.dtype == torch.float64
    grid = lambda meta: (b * k * programs_per_plane(c, ho, wo, meta),)
    args = (out, x, coef, target, scalars, k, target.shape[0], c, h, w, ho, wo, *x.stride())
    meta = {
        "BORDER": padding_mode == "border",
        "NEAREST": mode == "nearest",
        "BLOCK_C": fwd_block_c(c),
        "CGROUP": channel_group(c),
        "F64": m_f64,
        "IDX64": needs_int64(x, out),
    }
    with device_context(x):
        launch(_tps_fwd_kernel, _tps_fwd_tuned, grid, args, meta, wrap)
    return out


def _tps_backward(
    grad: Tensor,
    x: Tensor,
    coef: Tensor,
    target: Tensor,
    scalars: Tensor,
    size: tuple[int, int],
    padding_mode: str,
    mode: str,
    need_x: bool,
    need_coef: bool,
    wrap: bool = False,
) -> tuple[Tensor | None, Tensor | None]:
    """(d loss / d x, d loss / d coef) for grad (B, K, C, Ho, Wo); None where not needed."""
    if need_x:
        check_deterministic("sample_tps_coefficients_backward (Triton)")
    b, c, h, w = x.shape
    k, n3 = coef.shape[1], coef.shape[2]
    ho, wo = size
    need_coord = need_coef and mode != "nearest"  # nearest has no coordinate gradient
    cfg = bwd_config(c, coef.dtype if need_x else None)
    gx = image_grad_buffer(x, coef.dtype, cfg["ACC_CP"]) if need_x else x.new_empty(0, dtype=coef.dtype)
    programs = programs_per_plane(c, ho, wo, cfg)
    part = coef.new_empty((b, k, programs, n3, 2) if need_coord else (0,))
    if (need_x or need_coord) and grad.numel() > 0:
        m_f64 = coef.dtype == torch.float64
        gx_strides = gx.stride() if need_x else (0, 0, 0, 0)
        args: tuple[object, ...] = (gx, part, x, grad, coef, target, scalars, k, n3 - 3, c, h, w, ho, wo)
        args = (*args, *x.stride(), *gx_strides, *grad.stride())
        meta = {
            "BORDER": padding_mode == "border",
            "NEAREST": mode == "nearest",
            "NEED_X_GRAD": need_x,
            "NEED_PARAM_GRAD": need_coord,
            "F64": m_f64,
            "IDX64": needs_int64(x, grad, gx),
            "BLOCK_N": _TPS_BLOCK_N,
            **cfg,
        }
        with device_context(x):
            launch(_tps_bwd_kernel, None, (b * k * programs,), args, meta, wrap)
    grad_x = finish_image_grad(gx, x, cfg["ACC_CP"]) if need_x else None
    grad_coef = None
    if need_coef:
        grad_coef = part.sum(2) if need_coord and part.numel() else torch.zeros_like(coef)
    return grad_x, grad_coef


# --------------------------------------------------------------------------------------------------------------
# autograd.Function (CPU tensors under the interpreter, and torch without triton_op) and torch.library op
# --------------------------------------------------------------------------------------------------------------
class _SampleTps(torch.autograd.Function):
    @staticmethod
    @torch.amp.custom_fwd(device_type="cuda")
    def forward(ctx, x, coef, target, scalars, size, padding_mode, mode):  # type: ignore[no-untyped-def, override]
        ctx.save_for_backward(x, coef, target, scalars)
        ctx.options = (size, padding_mode, mode)
        return _tps_forward(x, coef, target, scalars, size, padding_mode, mode)

    @staticmethod
    @amp_backward
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        x, coef, target, scalars = ctx.saved_tensors
        needs = ctx.needs_input_grad
        size, padding_mode, mode = ctx.options
        gx, gc = _tps_backward(grad, x, coef, target, scalars, size, padding_mode, mode, needs[0], needs[1])
        return gx, gc, None, None, None, None, None


_tps_op = library_op("sample_tps_coefficients")
if HAS_LIBRARY_OPS and _tps_op is None:

    @torch.library.triton_op("stn_lightning::sample_tps_coefficients", mutates_args=())
    def _tps_fwd_op(
        x: Tensor,
        coefficients: Tensor,
        target_points: Tensor,
        height: int,
        width: int,
        align_corners: bool,
        padding_mode: str,
        mode: str,
    ) -> Tensor:
        size = (height, width)
        coef, target, scalars = _tps_inputs(x, coefficients, target_points, size, align_corners)
        return _tps_forward(x, coef, target, scalars, size, padding_mode, mode, wrap=True)

    @_tps_fwd_op.register_kernel("cpu")
    def _tps_cpu(x, coefficients, target_points, height, width, align_corners, padding_mode, mode):  # type: ignore[no-untyped-def]
        return reference.sample_tps_coefficients(
            x, coefficients, target_points, (height, width),
            align_corners=align_corners, padding_mode=padding_mode, mode=mode,
        )  # fmt: skip

    @torch.library.triton_op("stn_lightning::sample_tps_coefficients_backward", mutates_args=())
    def _tps_bwd_op(
        grad: Tensor,
        x: Tensor,
        coefficients: Tensor,
        target_points: Tensor,
        height: int,
        width: int,
        align_corners: bool,
        padding_mode: str,
        mode: str,
        need_x: bool,
        need_coefficients: bool,
    ) -> tuple[Tensor, Tensor]:
        size = (height, width)
        coef, target, scalars = _tps_inputs(x, coefficients, target_points, size, align_corners)
        gx, gc = _tps_backward(
            grad, x, coef, target, scalars, size, padding_mode, mode, need_x, need_coefficients, wrap=True
        )
        gx = gx if gx is not None else x.new_empty(0)
        gc = gc.to(coefficients.dtype) if gc is not None else coefficients.new_empty(0)
        return gx, gc

    @_tps_bwd_op.register_kernel("cpu")
    def _tps_bwd_cpu(  # type: ignore[no-untyped-def]
        grad, x, coefficients, target_points, height, width, align_corners, padding_mode, mode, need_x, need_coef
    ):
        gx, gc = reference_vjp(
            reference.sample_tps_coefficients, grad, (x, coefficients), (need_x, need_coef),
            target_points.detach(), (height, width),
            align_corners=align_corners, padding_mode=padding_mode, mode=mode,
        )  # fmt: skip
        return gx, gc

    def _tps_setup(ctx, inputs, output):  # type: ignore[no-untyped-def]
        x, coefficients, target_points, *options = inputs
        ctx.save_for_backward(x, coefficients, target_points)
        ctx.options = options

    def _tps_op_backward(ctx, grad):  # type: ignore[no-untyped-def]
        x, coefficients, target_points = ctx.saved_tensors
        need_x, need_coef = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        gx, gc = torch.ops.stn_lightning.sample_tps_coefficients_backward(
            grad, x, coefficients, target_points, *ctx.options, need_x, need_coef
        )
        return (gx if need_x else None, gc if need_coef else None, None, None, None, None, None, None)

    _tps_fwd_op.register_autograd(_tps_op_backward, setup_context=_tps_setup)
    _tps_op = _tps_fwd_op


def sample_tps_coefficients(
    x: Tensor,
    coefficients: Tensor,
    target_points: Tensor,
    size: int | tuple[int, int],
    *,
    align_corners: bool = False,
    padding_mode: Padding = "zeros",
    mode: Mode = "bilinear",
) -> Tensor:
    """Sample K thin-plate-spline warps with the Triton kernels; see :func:`kernels.reference.sample_tps_coefficients`.

    Args:
        x: images (B, C, H, W), any strides, float16, bfloat16, float32 or float64.
        coefficients: (B, K, N + 3, 2) from :func:`kernels.reference.tps_coefficients`.
        target_points: (N, 2) fixed control points in output coordinates (no gradient flows to them).
        size: output size (Ho, Wo), or an int.
        align_corners, padding_mode, mode: as for ``F.grid_sample``.

    Returns:
        (B, K, C, Ho, Wo), contiguous, in x's dtype.
    """
    reference.check_image(x)
    if not isinstance(target_points, Tensor) or target_points.dim() != 2 or target_points.shape[1] != 2:
        shape = tuple(target_points.shape) if isinstance(target_points, Tensor) else type(target_points).__name__
        raise ValueError(f"expected target points of shape (N, 2), got {shape}")
    reference.check_params(x, coefficients, "coefficients", (target_points.shape[0] + 3, 2))
    reference.check_options(padding_mode, mode)
    check_device(x)
    size = reference.normalize_size(size)
    x, coefficients = autocast_inputs(x, coefficients)
    if use_library_op(x):
        return torch.ops.stn_lightning.sample_tps_coefficients(
            x, coefficients, target_points, size[0], size[1], align_corners, padding_mode, mode
        )
    coef, target, scalars = _tps_inputs(x, coefficients, target_points, size, align_corners)
    return apply_function(_SampleTps, _tps_forward, x, coef, target, scalars, size, padding_mode, mode)
