"""Triton sampler for K explicit grids per image: kernels, launchers, autograd.Function and torch.library op.

The only family whose sampling points come from memory: grid (B, K, Ho, Wo, 2) holds normalised (x, y), read
with its own strides, and ix = x * sx + (W - 1) / 2 (see :func:`kernels.reference.pixel_scales`). Its backward
writes d loss / d grid (B, K, Ho, Wo, 2), which has the grid's size anyway.
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
    cdiv,
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

__all__ = ["sample_grid"]


# --------------------------------------------------------------------------------------------------------------
# kernels
# --------------------------------------------------------------------------------------------------------------
@triton.jit
def _grid_coords(grid_ptr, s_ptr, bk, K, i, j, pmask, H, W, sgrb, sgrk, sgrh, sgrw, sgrd, CDT: tl.constexpr):
    # s = (sx, sy) in the compute dtype; ix = grid[b, k, i, j, 0] * sx + (W - 1) / 2, likewise iy.
    sx = tl.load(s_ptr).to(CDT)
    sy = tl.load(s_ptr + 1).to(CDT)
    gp = grid_ptr + (bk // K).to(tl.int64) * sgrb + (bk % K).to(tl.int64) * sgrk
    gp += i.to(tl.int64) * sgrh + j.to(tl.int64) * sgrw
    gxn = tl.load(gp, mask=pmask, other=0.0).to(CDT)
    gyn = tl.load(gp + sgrd, mask=pmask, other=0.0).to(CDT)
    ix = gxn * sx + (W - 1) * 0.5
    iy = gyn * sy + (H - 1) * 0.5
    return ix, iy, sx, sy


@triton.jit
def _grid_fwd_kernel(
    # outputs
    out_ptr,
    # inputs
    x_ptr,
    grid_ptr,
    s_ptr,
    # sizes
    K,
    C,
    H,
    W,
    Ho,
    Wo,
    # strides of x and of the grid
    sxb,
    sxc,
    sxh,
    sxw,
    sgrb,
    sgrk,
    sgrh,
    sgrw,
    sgrd,
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
    ix, iy, sx, sy = _grid_coords(grid_ptr, s_ptr, bk, K, i, j, pmask, H, W, sgrb, sgrk, sgrh, sgrw, sgrd, CDT)
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


_grid_fwd_tuned = fwd_autotune(_grid_fwd_kernel)


@triton.jit
def _grid_bwd_kernel(
    # outputs
    gx_ptr,
    ggrid_ptr,
    # inputs
    x_ptr,
    go_ptr,
    grid_ptr,
    s_ptr,
    # sizes
    K,
    C,
    H,
    W,
    Ho,
    Wo,
    # strides of x, of the image gradient buffer, of grad_out and of the grid
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
    sgrb,
    sgrk,
    sgrh,
    sgrw,
    sgrd,
    # options and tile sizes
    BORDER: tl.constexpr,
    NEAREST: tl.constexpr,
    NEED_X_GRAD: tl.constexpr,
    NEED_PARAM_GRAD: tl.constexpr,
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
    ix, iy, sx, sy = _grid_coords(grid_ptr, s_ptr, bk, K, i, j, pmask, H, W, sgrb, sgrk, sgrh, sgrw, sgrd, CDT)
    gix, giy = _scatter_tile(
        gx_ptr, x_ptr, go_ptr, bk, K, i, j, ix, iy, pmask, c_lo, c_hi, H, W,
        sxb, sxc, sxh, sxw, sgxb, sgxc, sgxh, sgxw, sgb, sgk, sgc, sgh, sgw,
        BORDER, NEAREST, NEED_X_GRAD, NEED_PARAM_GRAD, BLOCK_C, ACC_CP, CDT, IDX64, FMAX,
    )  # fmt: skip
    if NEED_PARAM_GRAD:
        # ggrid is (B, K, groups, Ho, Wo, 2) contiguous, one plane per channel group (summed by the launcher): pixel
        # (i, j) of (b, k) and group g at (((bk * groups + g) * Ho + i) * Wo + j) * 2.
        plane = bk.to(tl.int64) * tl.cdiv(C, CGROUP) + c_lo // CGROUP
        q = ((plane * Ho + i) * Wo + j) * 2
        tl.store(ggrid_ptr + q, gix * sx, mask=pmask)
        tl.store(ggrid_ptr + q + 1, giy * sy, mask=pmask)


# --------------------------------------------------------------------------------------------------------------
# launchers
# --------------------------------------------------------------------------------------------------------------
def _grid_scalars(x: Tensor, grid: Tensor, align_corners: bool) -> Tensor:
    # (sx, sy): pixels per normalised unit of the input, in the compute dtype.
    h, w = x.shape[-2:]
    sx, sy, _, _ = reference.pixel_scales((h, w), (h, w), align_corners)
    return reference.host_constant([sx, sy], reference.compute_dtype(x, grid), x)


def _grid_forward(x: Tensor, grid: Tensor, scalars: Tensor, padding_mode: str, mode: str, wrap: bool = False) -> Tensor:
    """Samples (B, K, C, Ho, Wo) in x's dtype for a grid (B, K, Ho, Wo, 2) of any strides and float dtype."""
    b, c, h, w = x.shape
    k, ho, wo = grid.shape[1:4]
    out = torch.empty((b, k, c, ho, wo), device=x.device, dtype=x.dtype)
    if out.numel() == 0:
        return out
    m_f64 = scalars.dtype == torch.float64
    launch_grid = lambda meta: (b * k * programs_per_plane(c, ho, wo, meta),)
    args = (out, x, grid, scalars, k, c, h, w, ho, wo, *x.stride(), *grid.stride())
    meta = {
        "BORDER": padding_mode == "border",
        "NEAREST": mode == "nearest",
        "BLOCK_C": fwd_block_c(c),
        "CGROUP": channel_group(c),
        "F64": m_f64,
        "IDX64": needs_int64(x, out),
    }
    with device_context(x):
        launch(_grid_fwd_kernel, _grid_fwd_tuned, launch_grid, args, meta, wrap)
    return out


def _grid_backward(
    grad: Tensor,
    x: Tensor,
    grid: Tensor,
    scalars: Tensor,
    padding_mode: str,
    mode: str,
    need_x: bool,
    need_grid: bool,
    wrap: bool = False,
) -> tuple[Tensor | None, Tensor | None]:
    """(d loss / d x, d loss / d grid) for grad (B, K, C, Ho, Wo); None where not needed."""
    if need_x:
        check_deterministic("sample_grid_backward (Triton)")
    b, c, h, w = x.shape
    k, ho, wo = grid.shape[1:4]
    need_coord = need_grid and mode != "nearest"  # nearest has no coordinate gradient
    cfg = bwd_config(c, scalars.dtype if need_x else None)
    gx = image_grad_buffer(x, scalars.dtype, cfg["ACC_CP"]) if need_x else x.new_empty(0, dtype=scalars.dtype)
    groups = cdiv(c, cfg["CGROUP"])
    # (B, K, groups, Ho, Wo, 2) contiguous, allocated without the groups axis when there is one group (same layout)
    ggrid_shape = (b, k, groups, ho, wo, 2) if groups > 1 else (b, k, ho, wo, 2)
    ggrid = torch.empty(ggrid_shape, device=x.device, dtype=scalars.dtype) if need_coord else gx.new_empty(0)
    programs = programs_per_plane(c, ho, wo, cfg)
    if (need_x or need_coord) and grad.numel() > 0:
        m_f64 = scalars.dtype == torch.float64
        gx_strides = gx.stride() if need_x else (0, 0, 0, 0)
        args: tuple[object, ...] = (gx, ggrid, x, grad, grid, scalars, k, c, h, w, ho, wo)
        args = (*args, *x.stride(), *gx_strides, *grad.stride(), *grid.stride())
        meta = {
            "BORDER": padding_mode == "border",
            "NEAREST": mode == "nearest",
            "NEED_X_GRAD": need_x,
            "NEED_PARAM_GRAD": need_coord,
            "F64": m_f64,
            "IDX64": needs_int64(x, grad, gx),
            **cfg,
        }
        with device_context(x):
            launch(_grid_bwd_kernel, None, (b * k * programs,), args, meta, wrap)
    grad_x = finish_image_grad(gx, x, cfg["ACC_CP"]) if need_x else None
    grad_grid = None
    if need_grid:
        if need_coord and ggrid.numel():
            grad_grid = (ggrid.sum(2) if groups > 1 else ggrid).to(grid.dtype)
        else:
            grad_grid = torch.zeros(grid.shape, device=x.device, dtype=grid.dtype)
    return grad_x, grad_grid


# --------------------------------------------------------------------------------------------------------------
# autograd.Function (CPU tensors under the interpreter, and torch without triton_op) and torch.library op
# --------------------------------------------------------------------------------------------------------------
class _SampleGrid(torch.autograd.Function):
    @staticmethod
    @torch.amp.custom_fwd(device_type="cuda")
    def forward(ctx, x, grid, scalars, padding_mode, mode):  # type: ignore[no-untyped-def, override]
        ctx.save_for_backward(x, grid, scalars)
        ctx.options = (padding_mode, mode)
        return _grid_forward(x, grid, scalars, padding_mode, mode)

    @staticmethod
    @amp_backward
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        x, grid, scalars = ctx.saved_tensors
        needs = ctx.needs_input_grad
        padding_mode, mode = ctx.options
        gx, gg = _grid_backward(grad, x, grid, scalars, padding_mode, mode, needs[0], needs[1])
        return gx, gg, None, None, None


_grid_op = library_op("sample_grid")
if HAS_LIBRARY_OPS and _grid_op is None:

    @torch.library.triton_op("stn_lightning::sample_grid", mutates_args=())
    def _grid_fwd_op(x: Tensor, grid: Tensor, align_corners: bool, padding_mode: str, mode: str) -> Tensor:
        return _grid_forward(x, grid, _grid_scalars(x, grid, align_corners), padding_mode, mode, wrap=True)

    @_grid_fwd_op.register_kernel("cpu")
    def _grid_cpu(x, grid, align_corners, padding_mode, mode):  # type: ignore[no-untyped-def]
        return reference.sample_grid(x, grid, align_corners=align_corners, padding_mode=padding_mode, mode=mode)

    @torch.library.triton_op("stn_lightning::sample_grid_backward", mutates_args=())
    def _grid_bwd_op(
        grad: Tensor,
        x: Tensor,
        grid: Tensor,
        align_corners: bool,
        padding_mode: str,
        mode: str,
        need_x: bool,
        need_grid: bool,
    ) -> tuple[Tensor, Tensor]:
        scalars = _grid_scalars(x, grid, align_corners)
        gx, gg = _grid_backward(grad, x, grid, scalars, padding_mode, mode, need_x, need_grid, wrap=True)
        return (gx if gx is not None else x.new_empty(0)), (gg if gg is not None else grid.new_empty(0))

    @_grid_bwd_op.register_kernel("cpu")
    def _grid_bwd_cpu(grad, x, grid, align_corners, padding_mode, mode, need_x, need_grid):  # type: ignore[no-untyped-def]
        gx, gg = reference_vjp(
            reference.sample_grid, grad, (x, grid), (need_x, need_grid),
            align_corners=align_corners, padding_mode=padding_mode, mode=mode,
        )  # fmt: skip
        return gx, gg

    def _grid_setup(ctx, inputs, output):  # type: ignore[no-untyped-def]
        x, grid, *options = inputs
        ctx.save_for_backward(x, grid)
        ctx.options = options

    def _grid_op_backward(ctx, grad):  # type: ignore[no-untyped-def]
        x, grid = ctx.saved_tensors
        need_x, need_grid = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        gx, gg = torch.ops.stn_lightning.sample_grid_backward(grad, x, grid, *ctx.options, need_x, need_grid)
        return (gx if need_x else None, gg if need_grid else None, None, None, None)

    _grid_fwd_op.register_autograd(_grid_op_backward, setup_context=_grid_setup)
    _grid_op = _grid_fwd_op


def sample_grid(
    x: Tensor,
    grid: Tensor,
    *,
    align_corners: bool = False,
    padding_mode: Padding = "zeros",
    mode: Mode = "bilinear",
) -> Tensor:
    """Sample K explicit grids with the Triton kernels; see :func:`kernels.reference.sample_grid`.

    Args:
        x: images (B, C, H, W), any strides, float16, bfloat16, float32 or float64.
        grid: (B, K, Ho, Wo, 2) normalised (x, y) sampling points, any strides.
        align_corners, padding_mode, mode: as for ``F.grid_sample``.

    Returns:
        (B, K, C, Ho, Wo), contiguous, in x's dtype.
    """
    reference.check_image(x)
    reference.check_options(padding_mode, mode)
    if not isinstance(grid, Tensor) or grid.dim() != 5 or grid.shape[-1] != 2 or grid.shape[0] != x.shape[0]:
        shape = tuple(grid.shape) if isinstance(grid, Tensor) else type(grid).__name__
        raise ValueError(f"expected a grid of shape (B={x.shape[0]}, K, Ho, Wo, 2), got {shape}")
    reference.check_params(x, grid, "grid", tuple(grid.shape[2:]))
    check_device(x)
    x, grid = autocast_inputs(x, grid)
    if use_library_op(x):
        return torch.ops.stn_lightning.sample_grid(x, grid, align_corners, padding_mode, mode)
    scalars = _grid_scalars(x, grid, align_corners)
    return apply_function(_SampleGrid, _grid_forward, x, grid, scalars, padding_mode, mode)
