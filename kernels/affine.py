"""Triton sampler for K affine warps per image: kernels, launchers, autograd.Function and torch.library op.

The kernels multiply theta (B, K, 2, 3) by the pixel scales of the sizes (``_common.warp_params``) into pixel
matrices M with ix = M[0] . (u, v, 1) + (W - 1) / 2 on centred output pixels (u, v) (``reference.affine_to_pixels``).
The backward reduces d loss / d theta inside the kernel into one partial sum per program (B, K, programs per
(b, k), 2, 3), summed in PyTorch: no grid gradient ever reaches memory.

The image gradient has two implementations, picked by the module attribute ``IMAGE_GRAD`` (read at every
backward call; the environment variable ``STN_AFFINE_IMAGE_GRAD`` sets it at import). The default stays "scatter",
the implementation verified and timed on a GPU, until "gather" has been too (it is verified on CPU only, through the
interpreter and an sm_90 compile):

* "scatter": ``_affine_bwd_kernel`` sends every output pixel's gradient to its four input corners with atomic
  adds into a zeroed float32 (float64) buffer. Used for border padding in any case.
* "gather" (zeros padding): ``kernels._gather`` inverts each warp, and every input pixel sums the few output
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
    _affine_map,
    _affine_pixel_matrix,
    _matrix_partials,
    _param_grads,
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
from ._gather import WINDOW_CAP, _gathered, gather, matrix_backward
from .reference import Mode, Padding

__all__ = ["IMAGE_GRAD", "WINDOW_CAP", "sample_affine"]

#: How the backward computes the image gradient with zeros padding: "gather" (each input pixel sums the output
#: pixels that read it, plain stores; see kernels/_gather.py) or "scatter" (atomic adds, _affine_bwd_kernel).
#: Read at every backward call; STN_AFFINE_IMAGE_GRAD sets it at import.
IMAGE_GRAD: str = os.environ.get("STN_AFFINE_IMAGE_GRAD", "scatter")


# --------------------------------------------------------------------------------------------------------------
# kernels
# --------------------------------------------------------------------------------------------------------------
@triton.jit
def _affine_coords(m_ptr, s_ptr, bk, i, j, H, W, Ho, Wo, CDT: tl.constexpr):
    # Pixel coordinates of output pixels (i, j) under the pixel matrix of (b, k); see _affine_map.
    m00, m01, m02, m10, m11, m12 = _affine_pixel_matrix(m_ptr, s_ptr, bk, CDT)
    ix, iy, u, v = _affine_map(m00, m01, m02, m10, m11, m12, i, j, H, W, Ho, Wo, CDT)
    return ix, iy, u, v


@triton.jit
def _affine_fwd_kernel(
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
    BLOCK_H: tl.constexpr,
    BLOCK_W: tl.constexpr,
    SPLIT_C: tl.constexpr,
):
    # compute dtype (float64 when the image or the parameters are float64) and its largest finite value
    CDT = tl.float64 if F64 else tl.float32
    FMAX = 1.7976931348623157e308 if F64 else 3.4028234663852886e38
    bk, slot, c_lo, c_hi, i, j, pmask = _tile_coords(C, Ho, Wo, BLOCK_H, BLOCK_W, CGROUP)
    ix, iy, u, v = _affine_coords(m_ptr, s_ptr, bk, i, j, H, W, Ho, Wo, CDT)
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
    BLOCK_H: tl.constexpr,
    BLOCK_W: tl.constexpr,
):
    # compute dtype (float64 when the image or the parameters are float64) and its largest finite value
    CDT = tl.float64 if F64 else tl.float32
    FMAX = 1.7976931348623157e308 if F64 else 3.4028234663852886e38
    bk, slot, c_lo, c_hi, i, j, pmask = _tile_coords(C, Ho, Wo, BLOCK_H, BLOCK_W, CGROUP)
    part = part_ptr + slot.to(tl.int64) * 6
    r = tl.arange(0, 8)
    if _gathered(flag_ptr, bk, SKIP_GATHERED):
        if NEED_PARAM_GRAD:
            tl.store(part + r, tl.zeros((8,), dtype=CDT), mask=r < 6)
    else:
        ix, iy, u, v = _affine_coords(m_ptr, s_ptr, bk, i, j, H, W, Ho, Wo, CDT)
        gix, giy = _scatter_tile(
            gx_ptr, x_ptr, go_ptr, bk, K, i, j, ix, iy, pmask, c_lo, c_hi, H, W,
            sxb, sxc, sxh, sxw, sgxb, sgxc, sgxh, sgxw, sgb, sgk, sgc, sgh, sgw,
            BORDER, NEAREST, NEED_X_GRAD, NEED_PARAM_GRAD, BLOCK_C, ACC_CP, CDT, IDX64, FMAX,
        )  # fmt: skip
        if NEED_PARAM_GRAD:
            tl.store(part + r, _param_grads(_matrix_partials(gix, giy, giy, u, v, 8), s_ptr, 8, 6), mask=r < 6)


# --------------------------------------------------------------------------------------------------------------
# launchers
# --------------------------------------------------------------------------------------------------------------
def _affine_forward(
    x: Tensor, m: Tensor, s: Tensor, size: tuple[int, int], padding_mode: str, mode: str, wrap: bool = False
) -> Tensor:
    """Samples (B, K, C, Ho, Wo) in x's dtype for theta m (B, K, 2, 3) and pixel scales s (2, 3), both in the
    compute dtype (``warp_params``)."""
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
    }
    with device_context(x):
        launch(_affine_fwd_kernel, _affine_fwd_tuned, grid, args, meta, wrap)
    return out


#: The gather launcher (kernels._gather.gather), a name of this module's own so that tests can watch its flags.
_affine_gather = gather


def _affine_backward(
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
    """(d loss / d x, d loss / d m) for grad (B, K, C, Ho, Wo), theta m and scales s as for _affine_forward; None
    where not needed."""
    if need_x:
        # Still atomics for the ill-conditioned (b, k) (and for border padding) even when gathering.
        check_deterministic("sample_affine_backward (Triton)")
    switch = "kernels.affine.IMAGE_GRAD (STN_AFFINE_IMAGE_GRAD)"
    return matrix_backward(
        _affine_bwd_kernel, grad, x, m, s, size, padding_mode, mode, need_x, need_m, wrap,
        image_grad=IMAGE_GRAD, switch=switch, gather_fn=_affine_gather, meta={},
    )  # fmt: skip


# --------------------------------------------------------------------------------------------------------------
# autograd.Function (CPU tensors under the interpreter, and torch without triton_op) and torch.library op
# --------------------------------------------------------------------------------------------------------------
class _SampleAffine(torch.autograd.Function):
    @staticmethod
    @torch.amp.custom_fwd(device_type="cuda")
    def forward(ctx, x: Tensor, m: Tensor, s: Tensor, size: tuple[int, int], padding_mode: str, mode: str) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(x, m, s)
        ctx.options = (size, padding_mode, mode)
        return _affine_forward(x, m, s, size, padding_mode, mode)

    @staticmethod
    @amp_backward
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        x, m, s = ctx.saved_tensors
        size, padding_mode, mode = ctx.options
        needs = ctx.needs_input_grad
        gx, gm = _affine_backward(grad, x, m, s, size, padding_mode, mode, needs[0], needs[1])
        return gx, gm, None, None, None, None


_affine_op = library_op("sample_affine")
if HAS_LIBRARY_OPS and _affine_op is None:

    @torch.library.triton_op("stn_lightning::sample_affine", mutates_args=())
    def _affine_fwd_op(
        x: Tensor, theta: Tensor, height: int, width: int, align_corners: bool, padding_mode: str, mode: str
    ) -> Tensor:
        m, s = warp_params(x, theta, (height, width), align_corners)
        return _affine_forward(x, m, s, (height, width), padding_mode, mode, wrap=True)

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
        m, s = warp_params(x, theta, size, align_corners)
        gx, gm = _affine_backward(grad, x, m, s, size, padding_mode, mode, need_x, need_theta, wrap=True)
        gx = gx if gx is not None else x.new_empty(0)
        gt = gm.to(theta.dtype) if gm is not None else theta.new_empty(0)
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
    m, s = warp_params(x, theta, size, align_corners)
    return apply_function(_SampleAffine, _affine_forward, x, m, s, size, padding_mode, mode)
