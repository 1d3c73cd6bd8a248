"""The Triton sampler: one forward and one backward kernel for every family, and their launchers.

A family (kernels/affine.py, projective.py, tps.py, grid.py) is a :class:`Family`: two @triton.jit functions that
the kernels take as compile-time constants (``COORDS``, ``PARAM_GRAD``), so that each family compiles to its own
specialisation of the same two kernels, and its host-side preparation of the kernels' inputs.

``COORDS(p_ptr, a_ptr, s_ptr, bk, K, N, i, j, pmask, H, W, Ho, Wo, spb, spk, sph, spw, spd, CDT, FMAX)`` returns
``(ix, iy, valid, e0, e1, e2, e3, e4)``: the input pixel coordinates of output pixels (i, j) of (b, k) = divmod(bk,
K), whether each point is valid (invalid points read ``fill`` and pass no gradient), and five values that only the
family's epilogue reads (its coordinates' intermediate terms). ``PARAM_GRAD(part_ptr, slot, bk, c_lo, i, j, pmask,
gix, giy, e0, e1, e2, e3, e4, a_ptr, s_ptr, N, C, Ho, Wo, CGROUP, CDT)`` writes the program's share of the
parameter gradient from d loss / d (ix, iy) per pixel (gix, giy).

The kernels' tensor inputs are the parameters ``p`` (B, K, ...), an auxiliary tensor ``a`` whose first dimension is
``N`` (the spline's control points; the scale matrix for the others) and the scalars ``s`` in the compute dtype,
which also fixes the compute dtype (float64 when the image or the parameters are float64, else float32).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._device import _sample_tile, _scatter_tile, _tile_coords
from ._gather import gather
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

__all__ = ["IMAGE_GRADS", "Family", "Spec", "backward", "forward", "reference_vjp"]

#: The backward's implementations of the image gradient: "scatter" (atomic adds, every family and padding) and
#: "gather" (affine and projective warps with zeros padding: kernels/_gather.py, no atomics, deterministic).
IMAGE_GRADS = ("scatter", "gather")


# --------------------------------------------------------------------------------------------------------------
# kernels
# --------------------------------------------------------------------------------------------------------------
@triton.jit
def _sample_fwd_kernel(
    out_ptr,  # output
    x_ptr, p_ptr, a_ptr, s_ptr,  # inputs
    K, N, C, H, W, Ho, Wo,  # sizes
    sxb, sxc, sxh, sxw,  # strides of x
    spb, spk, sph, spw, spd,  # strides of the parameters (read by the grid family only)
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
    ix, iy, valid, e0, e1, e2, e3, e4 = COORDS(
        p_ptr, a_ptr, s_ptr, bk, K, N, i, j, pmask, H, W, Ho, Wo, spb, spk, sph, spw, spd, CDT, FMAX
    )
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
    x_ptr, go_ptr, p_ptr, a_ptr, s_ptr, flag_ptr,  # inputs (flag_ptr: the gather's flags, with SKIP_GATHERED)
    K, N, C, H, W, Ho, Wo,  # sizes
    sxb, sxc, sxh, sxw,  # strides of x
    sgxb, sgxc, sgxh, sgxw,  # strides of the image gradient buffer
    sgb, sgk, sgc, sgh, sgw,  # strides of grad_out
    spb, spk, sph, spw, spd,  # strides of the parameters (read by the grid family only)
    fill,  # the value that points outside the image read (a constant: it enters the coordinate gradient only)
    COORDS: tl.constexpr, PARAM_GRAD: tl.constexpr, HAS_FILL: tl.constexpr,  # the family's functions, fill != 0
    BORDER: tl.constexpr, NEAREST: tl.constexpr, NEED_X_GRAD: tl.constexpr, NEED_PARAM_GRAD: tl.constexpr,
    SKIP_GATHERED: tl.constexpr, BLOCK_C: tl.constexpr, CGROUP: tl.constexpr, F64: tl.constexpr,
    IDX64: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr,
):  # fmt: skip
    # compute dtype (float64 when the image or the parameters are float64) and its largest finite value
    CDT = tl.float64 if F64 else tl.float32
    FMAX = 1.7976931348623157e308 if F64 else 3.4028234663852886e38
    if not HAS_FILL:
        fill = 0.0  # the masked loads' zeros cost no register (with a run-time fill: 96 -> 124 for tps, sm_90)
    bk, slot, c_lo, c_hi, i, j, pmask = _tile_coords(C, Ho, Wo, BLOCK_H, BLOCK_W, CGROUP)
    # With SKIP_GATHERED the gather kernel has written the gradients of the (b, k) it flagged 1; their programs do
    # nothing (their partial sums stay the zeros the launcher allocated). The others scatter on top of the gather's
    # plain stores (same stream, so ordered after them).
    mine = bk >= 0  # a true scalar of the flag's type
    if SKIP_GATHERED:
        mine = tl.load(flag_ptr + bk) == 0
    if mine:
        ix, iy, valid, e0, e1, e2, e3, e4 = COORDS(
            p_ptr, a_ptr, s_ptr, bk, K, N, i, j, pmask, H, W, Ho, Wo, spb, spk, sph, spw, spd, CDT, FMAX
        )
        gix, giy = _scatter_tile(
            gx_ptr, x_ptr, go_ptr, bk, K, i, j, ix, iy, pmask & valid, c_lo, c_hi, H, W,
            sxb, sxc, sxh, sxw, sgxb, sgxc, sgxh, sgxw, sgb, sgk, sgc, sgh, sgw, fill, HAS_FILL,
            BORDER, NEAREST, NEED_X_GRAD, NEED_PARAM_GRAD, BLOCK_C, CDT, IDX64, FMAX,
        )  # fmt: skip
        if NEED_PARAM_GRAD:
            PARAM_GRAD(
                part_ptr, slot, bk, c_lo, i, j, pmask, gix, giy, e0, e1, e2, e3, e4, a_ptr, s_ptr, N, C, Ho, Wo,
                CGROUP, CDT,
            )  # fmt: skip


# --------------------------------------------------------------------------------------------------------------
# families and options
# --------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True, eq=False)
class Family:
    """What a family of warps contributes to the sampler.

    Attributes:
        name: the family's name, as in ``sample_<name>`` and the torch.library op's ``family`` argument.
        op: the public op's name, for error messages.
        coords: the @triton.jit coordinate map (``COORDS``, see the module docstring).
        param_grad: the @triton.jit parameter-gradient epilogue (``PARAM_GRAD``).
        prepare: (x, params, aux, size, align_corners) -> (p, a, s), the kernels' tensor inputs.
        reference: (x, params, aux, size, align_corners, padding_mode, mode, fill) -> samples, the PyTorch
            reference (kernels.reference).
        gather: whether the gather backward (kernels/_gather.py) handles it ("affine" or "projective"), else None.
        strided: whether the kernels read p with its own strides (the grid), else p is contiguous.
        per_group: whether the epilogue writes one partial sum per channel group (the grid: d loss / d grid has
            the grid's size), else one per program; either way summed over that axis by the launcher.
    """

    name: str
    op: str
    coords: Any
    param_grad: Any
    prepare: Callable[..., tuple[Tensor, Tensor, Tensor]]
    reference: Callable[..., Tensor]
    gather: str | None = None
    strided: bool = False
    per_group: bool = False


class Spec(NamedTuple):
    """One call's options, recorded at the forward for the backward: the output size (Ho, Wo), align_corners,
    padding_mode, mode, the padding value ``fill`` and the image gradient's implementation (``IMAGE_GRADS``). A
    named tuple: made on every call, and a frozen dataclass takes twice as long to make."""

    family: Family
    size: tuple[int, int]
    align_corners: bool
    padding_mode: str
    mode: str
    fill: float
    image_grad: str

    def reference(self, x: Tensor, params: Tensor, aux: Tensor) -> Tensor:
        """The same call of the family's PyTorch reference."""
        return self.family.reference(
            x, params, aux, self.size, self.align_corners, self.padding_mode, self.mode, self.fill
        )


def _param_strides(p: Tensor, family: Family) -> tuple[int, ...]:
    # (B, K, Ho, Wo, 2) strides of the grid; the other families' kernels read p contiguous (zeros: unused).
    return tuple(p.stride()) if family.strided else (0, 0, 0, 0, 0)


# --------------------------------------------------------------------------------------------------------------
# launchers
# --------------------------------------------------------------------------------------------------------------
def forward(x: Tensor, p: Tensor, a: Tensor, s: Tensor, spec: Spec, wrap: bool = False) -> Tensor:
    """Samples (B, K, C, Ho, Wo) in x's dtype for the family's kernel inputs (p, a, s) (``Family.prepare``)."""
    b, c, h, w = x.shape
    k = p.shape[1]
    ho, wo = spec.size
    out = torch.empty((b, k, c, ho, wo), device=x.device, dtype=x.dtype)
    if out.numel() == 0:
        return out
    grid = lambda meta: (b * k * programs_per_plane(c, ho, wo, meta),)
    args = (out, x, p, a, s, k, a.shape[0], c, h, w, ho, wo, *x.stride(), *_param_strides(p, spec.family), spec.fill)
    meta = {
        "COORDS": spec.family.coords,
        "HAS_FILL": spec.fill != 0.0,
        "BORDER": spec.padding_mode == "border",
        "NEAREST": spec.mode == "nearest",
        "BLOCK_C": fwd_block_c(c),
        "CGROUP": channel_group(c),
        "F64": s.dtype == torch.float64,
        "IDX64": needs_int64(x, out),
    }
    with device_context(x):
        launch(_sample_fwd_kernel, _sample_fwd_tuned, grid, args, meta, wrap)
    return out


def backward(
    grad: Tensor,
    x: Tensor,
    p: Tensor,
    a: Tensor,
    s: Tensor,
    spec: Spec,
    need_x: bool,
    need_p: bool,
    wrap: bool = False,
) -> tuple[Tensor | None, Tensor | None]:
    """(d loss / d x, d loss / d p) for grad (B, K, C, Ho, Wo); None where not needed.

    The image gradient is gathered (no atomics) when the family has a gather, the padding is zeros and either
    ``spec.image_grad`` is "gather" or torch.use_deterministic_algorithms(True) is set; the gather takes the
    well-conditioned (b, k) and the scatter kernel the rest. Under deterministic algorithms the rest's image
    gradient comes from the PyTorch reference instead of atomics (deterministic there), and a family or padding
    without a gather raises RuntimeError (a warning with warn_only=True, then atomics).
    """
    b, c, h, w = x.shape
    k = p.shape[1]
    ho, wo = spec.size
    cdt = s.dtype
    need_coord = need_p and spec.mode != "nearest"  # nearest has no coordinate gradient
    deterministic = need_x and torch.are_deterministic_algorithms_enabled()
    can_gather = spec.family.gather is not None and spec.padding_mode == "zeros"
    if deterministic and not can_gather:
        _refuse_nondeterministic(spec)
        deterministic = False  # warn_only: warned, and atomics as usual
    gathered = need_x and grad.numel() > 0 and can_gather and (deterministic or spec.image_grad == "gather")
    flags, gathered_part = x.new_empty(0, dtype=torch.int32), None
    if gathered:
        # The gather stores every pixel of gx (no zeroing) and the matrix gradients of the (b, k) it takes. It reads
        # pixel matrices (scaling the parameters in its loop over k cost it 17 registers per thread and spills under
        # triton 3.6), so the product is formed here, and its partial sums are of d loss / d (p * s).
        gx = torch.empty_like(x, dtype=cdt)
        flags, gathered_part = gather(grad, x, p * s, gx, spec.size, spec.mode, need_coord, spec.fill, wrap)
    else:
        gx = torch.zeros_like(x, dtype=cdt) if need_x else x.new_empty(0, dtype=cdt)
    cfg = bwd_config(c)
    programs = programs_per_plane(c, ho, wo, cfg)
    slots = cdiv(c, cfg["CGROUP"]) if spec.family.per_group else programs
    # (B, K, slots, ...) contiguous, allocated without the slots axis when there is one slot (the same layout): the
    # gradient is then the buffer itself, which autograd can take as it is
    shape = ((b, k, slots) if slots > 1 else (b, k)) + tuple(p.shape[2:]) if need_coord else (0,)
    part = (
        torch.zeros(shape, device=x.device, dtype=cdt) if gathered else torch.empty(shape, device=x.device, dtype=cdt)
    )
    scatter_x = need_x and not deterministic
    if (scatter_x or need_coord) and grad.numel() > 0:
        gx_strides = gx.stride() if need_x else (0, 0, 0, 0)
        args: tuple[object, ...] = (gx, part, x, grad, p, a, s, flags, k, a.shape[0], c, h, w, ho, wo)
        args = (*args, *x.stride(), *gx_strides, *grad.stride(), *_param_strides(p, spec.family), spec.fill)
        meta = {
            "COORDS": spec.family.coords,
            "PARAM_GRAD": spec.family.param_grad,
            "HAS_FILL": spec.fill != 0.0,
            "BORDER": spec.padding_mode == "border",
            "NEAREST": spec.mode == "nearest",
            "NEED_X_GRAD": scatter_x,
            "NEED_PARAM_GRAD": need_coord,
            "SKIP_GATHERED": gathered,
            "F64": cdt == torch.float64,
            "IDX64": needs_int64(x, grad, gx),
            **cfg,
        }
        with device_context(x):
            launch(_sample_bwd_kernel, None, (b * k * programs,), args, meta, wrap)
    if deterministic and gathered:
        gx = _reference_leftovers(grad, x, p, a, spec, flags, gx, wrap)
    grad_x = gx.to(x.dtype) if need_x else None
    if not need_p:
        return grad_x, None
    if not (need_coord and part.numel()):
        return grad_x, torch.zeros_like(p)
    grad_p = part.sum(2) if slots > 1 else part  # (B, K, slots, ...) -> the shape of p
    if gathered_part is not None and gathered_part.numel():
        grad_p = grad_p + gathered_part.sum(2) * s  # each kernel's partial sums are zero where the other owns (b, k)
    return grad_x, grad_p.to(p.dtype)


def _refuse_nondeterministic(spec: Spec) -> None:
    # As PyTorch does for its own nondeterministic ops: an error, or a warning with warn_only=True.
    import warnings

    why = "border padding" if spec.family.gather is not None else "this family"
    message = (
        f"{spec.family.op} (Triton) backward does not have a deterministic implementation for {why}: it adds the "
        "image gradient with atomics, but you set 'torch.use_deterministic_algorithms(True)'. Use backend='torch', "
        "an affine or projective warp with zeros padding (gathered without atomics), or "
        "torch.use_deterministic_algorithms(True, warn_only=True) to only warn."
    )
    if torch.is_deterministic_algorithms_warn_only_enabled():
        warnings.warn(message, stacklevel=4)
    else:
        raise RuntimeError(message)


def _reference_leftovers(
    grad: Tensor, x: Tensor, p: Tensor, a: Tensor, spec: Spec, flags: Tensor, gx: Tensor, wrap: bool
) -> Tensor:
    # gx plus the image gradient of the (b, k) the gather left (flag 0), from the PyTorch reference: deterministic
    # under torch.use_deterministic_algorithms, where the scatter kernel's atomics are not. Eagerly only when some
    # (b, k) is left (a host sync, in deterministic mode only); while torch.compile traces, always (no sync there).
    if not wrap and bool(flags.all()):
        return gx
    left = (flags == 0).view(*p.shape[:2], 1, 1, 1).to(grad.dtype)
    (gx_left,) = reference_vjp(
        lambda xx: spec.reference(xx, p, a),
        grad * left,
        (x,),
        (True,),
    )
    return gx + gx_left.to(gx.dtype)


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
