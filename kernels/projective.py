"""Triton sampler for K projective warps per image: kernels, launchers, autograd.Function and torch.library op.

The kernels multiply h (B, K, 3, 3) by the pixel scales of the sizes (``_common.warp_params``) into pixel matrices
M with [a, b, w] = M (u, v, 1) on centred output pixels (u, v) and ix = a / w + (W - 1) / 2
(``reference.projective_to_pixels``). Points with non-finite a, b, w or |w| < PROJECTIVE_EPS read nothing and
pass no gradient. The backward reduces d loss / d h inside the kernel into one partial sum per program (B, K,
programs per (b, k), 3, 3), summed in PyTorch.

With zeros padding and ``IMAGE_GRAD = "gather"`` (opt-in, ``STN_PROJECTIVE_IMAGE_GRAD=gather``), the backward
first runs the gather kernel of kernels/_gather.py, which writes the image and parameter gradients of every
well-conditioned (b, k) without atomics, then this module's scatter kernel for the others (``SKIP_GATHERED``).
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
    _div,
    _matrix_partials,
    _param_grads,
    _projective_map,
    _projective_pixel_matrix,
    _sample_tile,
    _scatter_tile,
    _tile_coords,
    amp_backward,
    apply_function,
    autocast_inputs,
    channel_group,
    check_deterministic,
    check_device,
    device_context,
    fwd_autotune,
    fwd_block_c,
    launch,
    library_op,
    needs_int64,
    programs_per_plane,
    reference_vjp,
    use_library_op,
    warp_params,
)
from ._gather import _gathered, gather, matrix_backward
from .reference import Mode, Padding

__all__ = ["IMAGE_GRAD", "sample_projective"]

#: How the backward computes the image gradient with zeros padding: "gather" (each input pixel sums the output
#: pixels that read it, plain stores; see kernels/_gather.py) or "scatter" (atomic adds, _projective_bwd_kernel).
#: Read at every backward call; STN_PROJECTIVE_IMAGE_GRAD sets it at import. "scatter" stays the default until the
#: gather has been timed on a GPU (it is verified on CPU only, through the interpreter and an sm_90 compile).
IMAGE_GRAD: str = os.environ.get("STN_PROJECTIVE_IMAGE_GRAD", "scatter")


# --------------------------------------------------------------------------------------------------------------
# kernels
# --------------------------------------------------------------------------------------------------------------
@triton.jit
def _projective_coords(m_ptr, s_ptr, bk, i, j, H, W, Ho, Wo, CDT: tl.constexpr, FMAX: tl.constexpr, EPS: tl.constexpr):
    # Pixel coordinates of output pixels (i, j) under the pixel homography of (b, k); see _projective_map.
    m00, m01, m02, m10, m11, m12, m20, m21, m22 = _projective_pixel_matrix(m_ptr, s_ptr, bk, CDT)
    return _projective_map(m00, m01, m02, m10, m11, m12, m20, m21, m22, i, j, H, W, Ho, Wo, CDT, FMAX, EPS)


@triton.jit
def _projective_fwd_kernel(
    # outputs
    out_ptr,
    # inputs
    x_ptr,
    m_ptr,
    s_ptr,
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
    EPS: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_W: tl.constexpr,
    SPLIT_C: tl.constexpr,
):
    # compute dtype (float64 when the image or the parameters are float64) and its largest finite value
    CDT = tl.float64 if F64 else tl.float32
    FMAX = 1.7976931348623157e308 if F64 else 3.4028234663852886e38
    bk, slot, c_lo, c_hi, i, j, pmask = _tile_coords(C, Ho, Wo, BLOCK_H, BLOCK_W, CGROUP)
    ix, iy, ok, u, v, a, b, w = _projective_coords(m_ptr, s_ptr, bk, i, j, H, W, Ho, Wo, CDT, FMAX, EPS)
    # out is (B, K, C, Ho, Wo) contiguous; (b, k) planes are C * Ho * Wo apart.
    out_bk = out_ptr + bk.to(tl.int64) * C * Ho * Wo
    x_b = x_ptr + (bk // K).to(tl.int64) * sxb
    out_pix = i * Wo + j
    if IDX64:
        out_pix = i.to(tl.int64) * Wo + j
    _sample_tile(
        out_bk, x_b, ix, iy, pmask & ok, out_pix, pmask, c_lo, c_hi, H, W, sxc, sxh, sxw, Ho * Wo,
        BORDER, NEAREST, 1 if SPLIT_C else BLOCK_C, CDT, IDX64, FMAX,
    )  # fmt: skip


_projective_fwd_tuned = fwd_autotune(_projective_fwd_kernel)


@triton.jit
def _projective_bwd_kernel(
    # outputs
    gx_ptr,
    part_ptr,
    # inputs
    x_ptr,
    go_ptr,
    m_ptr,
    s_ptr,
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
    EPS: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_W: tl.constexpr,
):
    # compute dtype (float64 when the image or the parameters are float64) and its largest finite value
    CDT = tl.float64 if F64 else tl.float32
    FMAX = 1.7976931348623157e308 if F64 else 3.4028234663852886e38
    bk, slot, c_lo, c_hi, i, j, pmask = _tile_coords(C, Ho, Wo, BLOCK_H, BLOCK_W, CGROUP)
    part = part_ptr + slot.to(tl.int64) * 9
    r = tl.arange(0, 16)
    if _gathered(flag_ptr, bk, SKIP_GATHERED):
        if NEED_PARAM_GRAD:
            tl.store(part + r, tl.zeros((16,), dtype=CDT), mask=r < 9)
    else:
        ix, iy, ok, u, v, a, b, w = _projective_coords(m_ptr, s_ptr, bk, i, j, H, W, Ho, Wo, CDT, FMAX, EPS)
        gix, giy = _scatter_tile(
            gx_ptr, x_ptr, go_ptr, bk, K, i, j, ix, iy, pmask & ok, c_lo, c_hi, H, W,
            sxb, sxc, sxh, sxw, sgxb, sgxc, sgxh, sgxw, sgb, sgk, sgc, sgh, sgw,
            BORDER, NEAREST, NEED_X_GRAD, NEED_PARAM_GRAD, BLOCK_C, ACC_CP, CDT, IDX64, FMAX,
        )  # fmt: skip
        if NEED_PARAM_GRAD:
            # d loss / d (a, b, w) from ix = a / w + cx, iy = b / w + cy (zero where invalid: gix = giy = 0 there).
            ga = _div(gix, w)
            gb = _div(giy, w)
            gw = -_div(gix * a, w * w) - _div(giy * b, w * w)
            tl.store(part + r, _param_grads(_matrix_partials(ga, gb, gw, u, v, 16), s_ptr, 16, 9), mask=r < 9)


# --------------------------------------------------------------------------------------------------------------
# launchers
# --------------------------------------------------------------------------------------------------------------
def _projective_forward(
    x: Tensor, m: Tensor, s: Tensor, size: tuple[int, int], padding_mode: str, mode: str, wrap: bool = False
) -> Tensor:
    """Samples (B, K, C, Ho, Wo) in x's dtype for homographies m (B, K, 3, 3) and pixel scales s (3, 3), both in
    the compute dtype (``warp_params``)."""
    b, c, h, w = x.shape
    k = m.shape[1]
    ho, wo = size
    out = torch.empty((b, k, c, ho, wo), device=x.device, dtype=x.dtype)
    if out.numel() == 0:
        return out
    m_f64 = m.dtype == torch.float64
    grid = lambda meta: (b * k * programs_per_plane(c, ho, wo, meta),)
    args = (out, x, m, s, k, c, h, w, ho, wo, *x.stride())
    meta = {
        "BORDER": padding_mode == "border",
        "NEAREST": mode == "nearest",
        "BLOCK_C": fwd_block_c(c),
        "CGROUP": channel_group(c),
        "F64": m_f64,
        "IDX64": needs_int64(x, out),
        "EPS": reference.PROJECTIVE_EPS,
    }
    with device_context(x):
        launch(_projective_fwd_kernel, _projective_fwd_tuned, grid, args, meta, wrap)
    return out


#: The gather launcher (kernels._gather.gather), a name of this module's own so that tests can watch its flags.
_projective_gather = gather


def _projective_backward(
    grad: Tensor,
    x: Tensor,
    m: Tensor,
    s: Tensor,
    size: tuple[int, int],
    padding_mode: str,
    mode: str,
    need_x: bool,
    need_m: bool,
    wrap: bool = False,
) -> tuple[Tensor | None, Tensor | None]:
    """(d loss / d x, d loss / d m) for grad (B, K, C, Ho, Wo), homographies m and scales s as for
    _projective_forward; None where not needed."""
    if need_x:
        check_deterministic("sample_projective_backward (Triton)")
    switch = "kernels.projective.IMAGE_GRAD (STN_PROJECTIVE_IMAGE_GRAD)"
    return matrix_backward(
        _projective_bwd_kernel, grad, x, m, s, size, padding_mode, mode, need_x, need_m, wrap,
        image_grad=IMAGE_GRAD, switch=switch, gather_fn=_projective_gather, meta={"EPS": reference.PROJECTIVE_EPS},
    )  # fmt: skip


# --------------------------------------------------------------------------------------------------------------
# autograd.Function (CPU tensors under the interpreter, and torch without triton_op) and torch.library op
# --------------------------------------------------------------------------------------------------------------
class _SampleProjective(torch.autograd.Function):
    @staticmethod
    @torch.amp.custom_fwd(device_type="cuda")
    def forward(ctx, x: Tensor, m: Tensor, s: Tensor, size: tuple[int, int], padding_mode: str, mode: str) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(x, m, s)
        ctx.options = (size, padding_mode, mode)
        return _projective_forward(x, m, s, size, padding_mode, mode)

    @staticmethod
    @amp_backward
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        x, m, s = ctx.saved_tensors
        size, padding_mode, mode = ctx.options
        needs = ctx.needs_input_grad
        gx, gm = _projective_backward(grad, x, m, s, size, padding_mode, mode, needs[0], needs[1])
        return gx, gm, None, None, None, None


_projective_op = library_op("sample_projective")
if HAS_LIBRARY_OPS and _projective_op is None:

    @torch.library.triton_op("stn_lightning::sample_projective", mutates_args=())
    def _projective_fwd_op(
        x: Tensor, h: Tensor, height: int, width: int, align_corners: bool, padding_mode: str, mode: str
    ) -> Tensor:
        m, s = warp_params(x, h, (height, width), align_corners)
        return _projective_forward(x, m, s, (height, width), padding_mode, mode, wrap=True)

    @_projective_fwd_op.register_kernel("cpu")
    def _projective_cpu(x, h, height, width, align_corners, padding_mode, mode):  # type: ignore[no-untyped-def]
        return reference.sample_projective(
            x, h, (height, width), align_corners=align_corners, padding_mode=padding_mode, mode=mode
        )

    @torch.library.triton_op("stn_lightning::sample_projective_backward", mutates_args=())
    def _projective_bwd_op(
        grad: Tensor,
        x: Tensor,
        h: Tensor,
        height: int,
        width: int,
        align_corners: bool,
        padding_mode: str,
        mode: str,
        need_x: bool,
        need_h: bool,
    ) -> tuple[Tensor, Tensor]:
        size = (height, width)
        m, s = warp_params(x, h, size, align_corners)
        gx, gm = _projective_backward(grad, x, m, s, size, padding_mode, mode, need_x, need_h, wrap=True)
        gx = gx if gx is not None else x.new_empty(0)
        gt = gm.to(h.dtype) if gm is not None else h.new_empty(0)
        return gx, gt

    @_projective_bwd_op.register_kernel("cpu")
    def _projective_bwd_cpu(grad, x, h, height, width, align_corners, padding_mode, mode, need_x, need_h):  # type: ignore[no-untyped-def]
        gx, gt = reference_vjp(
            reference.sample_projective, grad, (x, h), (need_x, need_h), (height, width),
            align_corners=align_corners, padding_mode=padding_mode, mode=mode,
        )  # fmt: skip
        return gx, gt

    def _projective_setup(ctx, inputs, output):  # type: ignore[no-untyped-def]
        x, h, *options = inputs
        ctx.save_for_backward(x, h)
        ctx.options = options

    def _projective_op_backward(ctx, grad):  # type: ignore[no-untyped-def]
        x, h = ctx.saved_tensors
        need_x, need_h = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        gx, gt = torch.ops.stn_lightning.sample_projective_backward(grad, x, h, *ctx.options, need_x, need_h)
        return (gx if need_x else None, gt if need_h else None, None, None, None, None, None)

    _projective_fwd_op.register_autograd(_projective_op_backward, setup_context=_projective_setup)
    _projective_op = _projective_fwd_op


def sample_projective(
    x: Tensor,
    h: Tensor,
    size: int | tuple[int, int],
    *,
    align_corners: bool = False,
    padding_mode: Padding = "zeros",
    mode: Mode = "bilinear",
) -> Tensor:
    """Sample K projective warps of each image with the Triton kernels; see :func:`kernels.reference.sample_projective`.

    Args:
        x: images (B, C, H, W), any strides, float16, bfloat16, float32 or float64.
        h: (B, K, 3, 3) homographies on normalised coordinates.
        size: output size (Ho, Wo), or an int.
        align_corners, padding_mode, mode: as for ``F.grid_sample``.

    Returns:
        (B, K, C, Ho, Wo), contiguous, in x's dtype.
    """
    reference.check_image(x)
    reference.check_params(x, h, "h", (3, 3))
    reference.check_options(padding_mode, mode)
    check_device(x)
    size = reference.normalize_size(size)
    x, h = autocast_inputs(x, h)
    if use_library_op(x):
        return torch.ops.stn_lightning.sample_projective(x, h, size[0], size[1], align_corners, padding_mode, mode)
    m, s = warp_params(x, h, size, align_corners)
    return apply_function(_SampleProjective, _projective_forward, x, m, s, size, padding_mode, mode)
