"""The Triton sampler: one forward and one backward kernel for every family, and their launchers.

A family (kernels/affine.py, projective.py, tps.py, grid.py) is a :class:`Family`: two @triton.jit functions that
the kernels take as compile-time constants (``COORDS``, ``PARAM_GRAD``), so that each family compiles to its own
specialisation of the same two kernels, and its host-side preparation of the kernels' inputs.

``COORDS(p_ptr, a_ptr, s_ptr, bk, K, N, i, j, pmask, H, W, Ho, Wo, CDT, FMAX)`` returns ``(ix, iy, valid, terms)``:
the input pixel coordinates of output pixels (i, j) of (b, k) = divmod(bk, K), whether each point is valid (invalid
points read ``fill`` and pass no gradient), and a tuple of the intermediate terms that only the family's epilogue
reads (as many as it needs). ``PARAM_GRAD(part_ptr, slot, bk, c_lo, i, j, pmask, gix, giy, terms, a_ptr, s_ptr, N,
C, Ho, Wo, CGROUP, CDT)`` writes the program's share of the parameter gradient from d loss / d (ix, iy) per pixel
(gix, giy).

The kernels' tensor inputs are the parameters ``p`` (B, K, ...) contiguous, an auxiliary tensor ``a`` whose first
dimension is ``N`` (the spline's control points; the scale matrix for the others) and the scalars ``s`` in the
compute dtype, which also fixes the compute dtype (float64 when the image or the parameters are float64, else
float32). The contract they keep is docs/KERNELS.md.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._device import _sample_tile, _scatter_tile, _tile_coords
from ._launch import (
    bwd_config,
    cdiv,
    channel_group,
    device_context,
    fwd_autotune,
    fwd_block_c,
    launch,
    needs_int64,
    programs_per_plane,
)
from .reference import FamilyFn, Spec

__all__ = ["Family", "backward", "forward", "reference_vjp"]


# --------------------------------------------------------------------------------------------------------------
# kernels
# --------------------------------------------------------------------------------------------------------------
@triton.jit
def _sample_fwd_kernel(
    out_ptr,  # output
    x_ptr, p_ptr, a_ptr, s_ptr,  # inputs
    K, N, C, H, W, Ho, Wo,  # sizes
    sxb, sxc, sxh, sxw,  # strides of x
    fill,  # the value that points outside the image (zeros padding) and invalid points read
    COORDS: tl.constexpr, HAS_FILL: tl.constexpr,  # the family's coordinate map, fill != 0
    BORDER: tl.constexpr, NEAREST: tl.constexpr, BLOCK_C: tl.constexpr, CGROUP: tl.constexpr,  # options
    F64: tl.constexpr, IDX64: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr, SPLIT_C: tl.constexpr,  # tile (autotuned)
):  # fmt: skip
    # compute dtype (float64 when the image or the parameters are float64) and its largest finite value
    CDT = tl.float64 if F64 else tl.float32
    FMAX = 1.7976931348623157e308 if F64 else 3.4028234663852886e38
    if not HAS_FILL:
        fill = 0.0  # the masked loads' zeros cost no register (with a run-time fill: 96 -> 124 for tps, sm_90)
    bk, slot, c_lo, c_hi, i, j, pmask = _tile_coords(C, Ho, Wo, BLOCK_H, BLOCK_W, CGROUP)
    ix, iy, valid, _ = COORDS(p_ptr, a_ptr, s_ptr, bk, K, N, i, j, pmask, H, W, Ho, Wo, CDT, FMAX)
    # out is (B, K, C, Ho, Wo) contiguous; (b, k) planes are C * Ho * Wo apart.
    out_bk = out_ptr + bk.to(tl.int64) * C * Ho * Wo
    x_b = x_ptr + (bk // K).to(tl.int64) * sxb
    out_pix = i * Wo + j
    if IDX64:
        out_pix = i.to(tl.int64) * Wo + j
    _sample_tile(
        out_bk, x_b, ix, iy, pmask & valid, out_pix, pmask, c_lo, c_hi, H, W, sxc, sxh, sxw, Ho * Wo, fill, HAS_FILL,
        BORDER, NEAREST, 1 if SPLIT_C else BLOCK_C, CDT, IDX64, FMAX,
    )  # fmt: skip


_sample_fwd_tuned = fwd_autotune(_sample_fwd_kernel)


@triton.jit
def _sample_bwd_kernel(
    gx_ptr, part_ptr,  # outputs: the image gradient buffer, the parameter gradient's partial sums
    x_ptr, go_ptr, p_ptr, a_ptr, s_ptr,  # inputs
    K, N, C, H, W, Ho, Wo,  # sizes
    sxb, sxc, sxh, sxw,  # strides of x
    sgxb, sgxc, sgxh, sgxw,  # strides of the image gradient buffer
    sgb, sgk, sgc, sgh, sgw,  # strides of grad_out
    fill,  # the value that points outside the image read (a constant: it enters the coordinate gradient only)
    COORDS: tl.constexpr, PARAM_GRAD: tl.constexpr, HAS_FILL: tl.constexpr,  # the family's functions, fill != 0
    BORDER: tl.constexpr, NEAREST: tl.constexpr, NEED_X_GRAD: tl.constexpr, NEED_PARAM_GRAD: tl.constexpr,
    BLOCK_C: tl.constexpr, CGROUP: tl.constexpr, F64: tl.constexpr,
    IDX64: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr,
):  # fmt: skip
    # compute dtype (float64 when the image or the parameters are float64) and its largest finite value
    CDT = tl.float64 if F64 else tl.float32
    FMAX = 1.7976931348623157e308 if F64 else 3.4028234663852886e38
    if not HAS_FILL:
        fill = 0.0  # the masked loads' zeros cost no register (with a run-time fill: 96 -> 124 for tps, sm_90)
    bk, slot, c_lo, c_hi, i, j, pmask = _tile_coords(C, Ho, Wo, BLOCK_H, BLOCK_W, CGROUP)
    # bk >= 0 always holds. The branch keeps the code ptxas made for the backward that the last GPU run timed (then
    # behind a run-time flag): without it, the affine backward takes 58 registers per thread instead of 48 for the
    # same 560 SASS instructions (sm_90, triton 3.8, benchmarks/sass_report.py), and no GPU has timed that variant.
    if bk >= 0:
        ix, iy, valid, terms = COORDS(p_ptr, a_ptr, s_ptr, bk, K, N, i, j, pmask, H, W, Ho, Wo, CDT, FMAX)
        gix, giy = _scatter_tile(
            gx_ptr, x_ptr, go_ptr, bk, K, i, j, ix, iy, pmask & valid, c_lo, c_hi, H, W,
            sxb, sxc, sxh, sxw, sgxb, sgxc, sgxh, sgxw, sgb, sgk, sgc, sgh, sgw, fill, HAS_FILL,
            BORDER, NEAREST, NEED_X_GRAD, NEED_PARAM_GRAD, BLOCK_C, CDT, IDX64, FMAX,
        )  # fmt: skip
        if NEED_PARAM_GRAD:
            PARAM_GRAD(part_ptr, slot, bk, c_lo, i, j, pmask, gix, giy, terms, a_ptr, s_ptr, N, C, Ho, Wo, CGROUP, CDT)


# --------------------------------------------------------------------------------------------------------------
# families
# --------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True, eq=False)
class Family:
    """What a family of warps contributes to the sampler.

    Attributes:
        name: the family's name ("affine", "projective", "tps", "grid"), as in the torch.library op's ``family``.
        coords: the @triton.jit coordinate map (``COORDS``, see the module docstring).
        param_grad: the @triton.jit parameter-gradient epilogue (``PARAM_GRAD``).
        prepare: (x, params, aux, spec) -> (p, a, s), the kernels' tensor inputs.
        reference: kernels.reference's function of the family: (x, params, aux, spec) -> samples. It also takes the
            prepared (p, a) in place of (params, aux).
        per_group: whether the epilogue writes one partial sum per channel group (the grid: d loss / d grid has
            the grid's size), else one per program; either way summed over that axis by the launcher.
    """

    name: str
    coords: Any
    param_grad: Any
    prepare: Callable[[Tensor, Tensor, Any, Spec], tuple[Tensor, Tensor, Tensor]]
    reference: FamilyFn
    per_group: bool = False


def _meta(family: Family, spec: Spec, x: Tensor, cdt: torch.dtype, *tensors: Tensor) -> dict[str, Any]:
    # The compile-time options that both kernels take.
    return {
        "COORDS": family.coords,
        "HAS_FILL": spec.fill != 0.0,
        "BORDER": spec.padding_mode == "border",
        "NEAREST": spec.mode == "nearest",
        "F64": cdt == torch.float64,
        "IDX64": needs_int64(x, *tensors),
    }


# --------------------------------------------------------------------------------------------------------------
# launchers
# --------------------------------------------------------------------------------------------------------------
def forward(x: Tensor, p: Tensor, a: Tensor, s: Tensor, family: Family, spec: Spec, wrap: bool = False) -> Tensor:
    """Samples (B, K, C, Ho, Wo) in x's dtype for the family's kernel inputs (p, a, s) (``Family.prepare``)."""
    b, c, h, w = x.shape
    k = p.shape[1]
    ho, wo = spec.size
    out = torch.empty((b, k, c, ho, wo), device=x.device, dtype=x.dtype)
    if out.numel() == 0:
        return out
    grid = lambda meta: (b * k * programs_per_plane(c, ho, wo, meta),)
    args = (out, x, p, a, s, k, a.shape[0], c, h, w, ho, wo, *x.stride(), spec.fill)
    meta = _meta(family, spec, x, s.dtype, out) | {"BLOCK_C": fwd_block_c(c), "CGROUP": channel_group(c)}
    with device_context(x):
        launch(_sample_fwd_kernel, _sample_fwd_tuned, grid, args, meta, wrap)
    return out


def backward(
    grad: Tensor,
    x: Tensor,
    p: Tensor,
    a: Tensor,
    s: Tensor,
    family: Family,
    spec: Spec,
    need_x: bool,
    need_p: bool,
    wrap: bool = False,
) -> tuple[Tensor | None, Tensor | None]:
    """(d loss / d x, d loss / d p) for grad (B, K, C, Ho, Wo); None where not needed.

    The kernel adds the image gradient with atomics (in an order that changes from run to run) and reduces the
    parameter gradient into partial sums without atomics. Under torch.use_deterministic_algorithms(True) the image
    gradient comes from the reference's backward instead (a deterministic scatter-add, slower than the kernel).
    """
    b, c, h, w = x.shape
    k = p.shape[1]
    ho, wo = spec.size
    cdt = s.dtype
    need_coord = need_p and spec.mode != "nearest"  # nearest has no coordinate gradient
    deterministic = need_x and torch.are_deterministic_algorithms_enabled()
    scatter_x = need_x and not deterministic
    gx = torch.zeros_like(x, dtype=cdt) if scatter_x else x.new_empty(0, dtype=cdt)
    cfg = bwd_config(c)
    programs = programs_per_plane(c, ho, wo, cfg)
    slots = cdiv(c, cfg["CGROUP"]) if family.per_group else programs
    # (B, K, slots, ...) contiguous, allocated without the slots axis when there is one slot (the same layout): the
    # gradient is then the buffer itself, which autograd can take as it is
    shape = ((b, k, slots) if slots > 1 else (b, k)) + tuple(p.shape[2:]) if need_coord else (0,)
    part = torch.empty(shape, device=x.device, dtype=cdt)
    if (scatter_x or need_coord) and grad.numel() > 0:
        gx_strides = gx.stride() if scatter_x else (0, 0, 0, 0)
        args = (gx, part, x, grad, p, a, s, k, a.shape[0], c, h, w, ho, wo, *x.stride(), *gx_strides, *grad.stride())
        meta = _meta(family, spec, x, cdt, grad, gx) | {"PARAM_GRAD": family.param_grad, **cfg}
        meta |= {"NEED_X_GRAD": scatter_x, "NEED_PARAM_GRAD": need_coord}
        with device_context(x):
            launch(_sample_bwd_kernel, None, (b * k * programs,), (*args, spec.fill), meta, wrap)
    if deterministic:
        (gx,) = reference_vjp(lambda xx: family.reference(xx, p, a, spec), grad, (x,), (True,))
    grad_x = gx.to(x.dtype) if need_x else None
    if not need_p:
        return grad_x, None
    if not (need_coord and part.numel()):
        return grad_x, torch.zeros_like(p)
    grad_p = part.sum(2) if slots > 1 else part  # (B, K, slots, ...) -> the shape of p
    return grad_x, grad_p.to(p.dtype)


def reference_vjp(
    fn: Callable[..., Tensor], grad: Tensor, inputs: Sequence[Tensor], needs: Sequence[bool]
) -> list[Tensor]:
    """Gradients of ``fn(*inputs)`` for the inputs flagged in ``needs``; an empty placeholder for the others (a
    custom op returns tensors only). For the reference's part of the backward and the library op's "cpu" kernels."""
    # Kernels registered for a device run below autograd, so the gradient comes from torch.func.vjp, which
    # carries its own autograd level.
    wanted = [t for t, n in zip(inputs, needs, strict=True) if n]
    result = [t.new_empty(0) for t in inputs]
    if not wanted:
        return result

    def call(*diff: Tensor) -> Tensor:
        it = iter(diff)
        return fn(*[next(it) if n else t for t, n in zip(inputs, needs, strict=True)])

    pullback = torch.func.vjp(call, *wanted)[1]  # (output, vjp_fn); has_aux=False, so no third element
    grads = iter(pullback(grad))
    for index, n in enumerate(needs):
        if n:
            result[index] = next(grads)
    return result
