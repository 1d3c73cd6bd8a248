"""The PyTorch path of the sampling ops: what CPU tensors and ``backend="torch"`` run.

Every op builds the (B, K, Ho, Wo, 2) normalised grid of its family, stacks the K grids along the output height
and samples them with one ``F.grid_sample`` call on the un-copied image, which is PyTorch's fused C++ (or CUDA)
sampler: a few times faster on a CPU than :mod:`kernels.reference`, whose bilinear reads are gathers and whose
backward is a scatter-add (benchmarks/bench_cpu.py). Around that call it keeps the contract (docs/KERNELS.md):

* Non-finite sampling points read nothing (they give ``fill``) and send no gradient, in every padding mode;
  ``F.grid_sample`` alone returns NaN there. Finite points are clamped to [-LIMIT, LIMIT] in normalised
  coordinates before sampling, far enough outside to read nothing, so that huge coordinates never reach
  PyTorch's index arithmetic. When every point is finite and inside that range (the usual case) the clamp is
  skipped: affine warps check a bound on their B x K x 6 parameters, the others one ``aminmax`` pass over the
  points. On CUDA tensors and while torch.compile or torch.export trace, the clamp always runs.
* ``fill``: with zeros padding, the value that a corner outside the image reads; its share is added from the
  grid (one pass over B x K x Ho x Wo points, only when ``fill`` is not 0), so the image is never shifted.
* Coordinates are computed in float32 (float64 for float64 inputs); half-precision images are sampled in float32
  and the result cast back, as in the reference.

Relaxed against the reference, and why: **identity parameters reproduce the input only to float32 rounding**
(about 1e-7 relative), not bit for bit. ``F.grid_sample`` takes normalised coordinates and maps them to pixels
itself, and the round trip pixel -> normalised -> pixel is not exact in floating point; the reference samples in
pixel coordinates and is exact. Everything else (gradients, border and zeros padding, nearest mode with
round-half-to-even, align_corners) follows ``F.grid_sample``, which the reference also follows. The tests compare
this path with the reference, which stays the oracle.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from . import reference
from .reference import Spec

__all__ = ["LIMIT", "affine", "grid", "projective", "tps"]

#: Normalised coordinates are clamped to [-LIMIT, LIMIT] before sampling; |x| >= 3 lies outside any image by at
#: least one pixel (a normalised unit is at least half a pixel), so a clamped point reads what it read before.
LIMIT = 3.0


def _stacked_sample(x: Tensor, grid: Tensor, valid: Tensor | None, spec: Spec) -> Tensor:
    """Sample the grids (B, K, Ho, Wo, 2), normalised and finite, in the compute dtype, from x (B, C, H, W).

    ``valid`` (B, K, Ho, Wo) marks the points that may read (None: all); an invalid point must already lie outside
    the image (at LIMIT). The result is (B, K, C, Ho, Wo), contiguous, in x's dtype.
    """
    b, k, ho, wo, _ = grid.shape
    h, w = x.shape[-2:]
    align_corners, padding_mode, mode, fill = spec[1:]
    if x.requires_grad and x.shape[1] > 1 and _channels_last(x):
        x = _GradInChannelsLast.apply(x)
    out = F.grid_sample(
        x.to(grid.dtype),
        grid.reshape(b, k * ho, wo, 2),
        mode=mode,
        padding_mode=padding_mode,
        align_corners=align_corners,
    )  # (B, C, K * Ho, Wo)
    out = out.view(b, x.shape[1], k, ho, wo).transpose(1, 2)
    # A point outside still reads the border pixel under border padding, and every point reads the single pixel
    # of an axis of one pixel with align_corners (it has no extent): there, invalid points are masked afterwards.
    masked = valid if padding_mode == "border" or (align_corners and min(h, w) == 1) else None
    if masked is not None:
        out = out * masked.unsqueeze(2).to(out.dtype)
    if fill != 0.0:
        out = out + float(fill) * (1 - _inside_mass(grid, masked, (h, w), align_corners, padding_mode, mode))
    return out.contiguous().to(x.dtype)


def _channels_last(x: Tensor) -> bool:
    return x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()


class _GradInChannelsLast(torch.autograd.Function):
    """The image itself, whose gradient is handed back channels-last.

    ``F.grid_sample`` returns the image's gradient contiguous (NCHW) whatever the image's layout. Inside a
    channels-last network (a transformer on a feature map, as on a CPU trainer) every op behind the sampler would
    then meet a gradient in the other layout and convert it on its own (the pooling, the batch norm, the
    convolution's backward: copies of maps up to four times the sampled one). One conversion here, of the sampled
    map's size, keeps the backward in the network's layout. With InsertedTransformer keeping the forward's layout,
    ST-CNN Multi's training step on the sequences went from 1.75x to 1.41x the CNN's on a 2-core AMD EPYC, one
    thread (benchmarks/bench_sequences.py).
    """

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:  # type: ignore[override]
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:  # type: ignore[override]
        return grad.contiguous(memory_format=torch.channels_last)


def _safe(grid: Tensor) -> tuple[Tensor, Tensor | None]:
    # :func:`_finite` unless one pass (aminmax; NaN fails the test) finds every point inside the clamp range (where
    # :func:`_may_check` allows the test).
    return (grid, None) if _may_check(grid) and _within_limit(grid) else _finite(grid)


def _may_check(t: Tensor) -> bool:
    # Whether a test of the values may choose the code path: not on a GPU (it would wait for the device), and not
    # while torch.compile or torch.export trace (their tensors have no values: they take the always-safe path).
    return not t.is_cuda and reference._cacheable(t)


def _within_limit(t: Tensor) -> bool:
    # Every value in [-LIMIT, LIMIT], in one pass (NaN fails the test).
    lo, hi = torch.aminmax(t.detach())
    return bool(lo >= -LIMIT) and bool(hi <= LIMIT)


def _homogeneous(base: Tensor) -> Tensor:
    # The base grid (Ho, Wo, 2) as homogeneous points (Ho Wo, 3): (x_t, y_t, 1).
    return torch.cat([base, torch.ones_like(base[..., :1])], dim=-1).view(-1, 3)


def _finite(grid: Tensor) -> tuple[Tensor, Tensor]:
    # (grid clamped to [-LIMIT, LIMIT] with non-finite coordinates at LIMIT, the points that had both finite).
    # clamp keeps NaN and nan_to_num sends it out; the gradient is 0 at NaN and, from clamp, beyond the range.
    return torch.nan_to_num(grid.clamp(-LIMIT, LIMIT), nan=LIMIT), torch.isfinite(grid).all(-1)


def _inside_mass(
    grid: Tensor, valid: Tensor | None, in_size: tuple[int, int], align_corners: bool, padding_mode: str, mode: str
) -> Tensor:
    # The share (B, K, 1, Ho, Wo) of each point's interpolation weight that falls on pixels inside the image; the
    # rest reads ``fill``. Separable: the weight of corner (x, y) is wx * wy, and it is inside when x and y are.
    if padding_mode == "border":
        mass = torch.ones_like(grid[..., 0])
    else:
        mass = _axis_mass(grid[..., 0], in_size[1], align_corners, mode) * _axis_mass(
            grid[..., 1], in_size[0], align_corners, mode
        )
    if valid is not None:
        mass = mass * valid.to(mass.dtype)
    return mass.unsqueeze(2)


def _axis_mass(g: Tensor, n: int, align_corners: bool, mode: str) -> Tensor:
    # g normalised along an axis of n pixels -> the weight on pixels 0 .. n - 1 (F.grid_sample's unnormalisation).
    p = (g + 1) / 2 * (n - 1) if align_corners else ((g + 1) * n - 1) / 2
    if mode == "nearest":
        q = torch.round(p)
        return ((q >= 0) & (q <= n - 1)).to(g.dtype)
    p0 = torch.floor(p)
    frac = p - p0
    return ((p0 >= 0) & (p0 <= n - 1)).to(g.dtype) * (1 - frac) + ((p0 >= -1) & (p0 <= n - 2)).to(g.dtype) * frac


class _AffineGrid(torch.autograd.Function):
    """theta (B, K, 2, 3) and the base grid (Ho, Wo, 2) -> the points theta @ (x_t, y_t, 1), (B, K, Ho, Wo, 2).

    What F.affine_grid computes, twice as fast on a CPU forward and backward (benchmarks/bench_cpu.py's workloads):
    the forward broadcasts c + a x_t + b y_t instead of a batched product with an inner size of 3, and the backward
    is one product (B K, 2, Ho Wo) @ (Ho Wo, 3). The backward is made of differentiable ops, so double backward works.
    """

    @staticmethod
    def forward(ctx, theta: Tensor, base: Tensor) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(base)
        t = theta[:, :, None, None]  # (B, K, 1, 1, 2, 3)
        return torch.addcmul(torch.addcmul(t[..., 2], t[..., 0], base[..., :1]), t[..., 1], base[..., 1:])

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        (base,) = ctx.saved_tensors
        b, k = grad.shape[:2]
        return (grad.reshape(b, k, -1, 2).transpose(-1, -2) @ _homogeneous(base)), None


class _ProjectiveGrid(torch.autograd.Function):
    """h (B, K, 3, 3) and (x_t, y_t, 1) (P, 3) -> (points (B, K, P, 2) clamped to [-LIMIT, LIMIT], valid (B, K, P)).

    With (a, b, w) = h @ (x_t, y_t, 1), the point is (a / w, b / w) where it is valid (a, b, w finite and
    |w| >= PROJECTIVE_EPS) and LIMIT elsewhere; invalid and clamped coordinates send no gradient. A Function of its
    own so that the backward is the few products it needs (autograd's would keep eight temporaries of the points
    and divide by zero at invalid points).
    """

    @staticmethod
    def forward(ctx, h: Tensor, hom: Tensor) -> tuple[Tensor, Tensor]:  # type: ignore[override]
        # p = h[:, :, 0] x_t + h[:, :, 1] y_t + h[:, :, 2] by broadcasting: faster than a product of inner size 3.
        t = h[:, :, None]  # (B, K, 1, 3, 3)
        p = torch.addcmul(torch.addcmul(t[..., 2], t[..., 0], hom[:, :1]), t[..., 1], hom[:, 1:2])  # (B, K, P, 3)
        ab, wh = p[..., :2], p[..., 2:]
        if _may_check(p) and bool(wh.amin() >= reference.PROJECTIVE_EPS):  # the usual case: w > 0 everywhere
            grid = ab / wh
            if _within_limit(grid):  # every point valid and inside: no masks, no clamp
                ctx.save_for_backward(hom, grid, wh)
                ok = torch.ones((), dtype=torch.bool, device=p.device).expand(wh.shape)
                ctx.mark_non_differentiable(ok)
                return grid, ok.squeeze(-1)
        ok = (p.abs().amax(-1, keepdim=True) < float("inf")) & (wh.abs() >= reference.PROJECTIVE_EPS)  # NaN: False
        wh = torch.where(ok, wh, torch.ones((), dtype=p.dtype, device=p.device))
        # A finite a / w may still overflow to inf: the clamp brings it to LIMIT, with the other far points.
        grid = torch.where(ok, ab / wh, LIMIT).clamp_(-LIMIT, LIMIT)
        ctx.save_for_backward(hom, grid, wh, ok & (grid.abs() < LIMIT))
        ctx.mark_non_differentiable(ok)
        return grid, ok.squeeze(-1)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: Tensor, _: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        hom, grid, wh, *passes = ctx.saved_tensors
        ga = (torch.where(passes[0], grad, 0) if passes else grad) / wh  # d/da (a / w) = 1 / w, per coordinate
        gw = -(ga * grid).sum(-1, keepdim=True)  # d/dw (a / w) = -(a / w) / w
        return torch.cat([ga, gw], dim=-1).transpose(-1, -2) @ hom, None


# --------------------------------------------------------------------------------------------------------------
# families: validated inputs (kernels/__init__.py) -> samples (B, K, C, Ho, Wo), as kernels.reference's
# --------------------------------------------------------------------------------------------------------------
def grid(x: Tensor, points: Tensor, aux: None, spec: Spec) -> Tensor:
    """:func:`kernels.reference.grid` through ``F.grid_sample``."""
    return _stacked_sample(x, *_safe(points.to(reference.compute_dtype(x, points))), spec)


def affine(x: Tensor, theta: Tensor, aux: None, spec: Spec) -> Tensor:
    """:func:`kernels.reference.affine` through ``F.grid_sample``."""
    theta = theta.to(reference.compute_dtype(x, theta))
    base = reference.base_grid(spec.size, spec.align_corners, x.device, theta.dtype)  # (Ho, Wo, 2)
    points = _AffineGrid.apply(theta, base)  # (B, K, Ho, Wo, 2)
    # Every grid point is theta @ (x_t, y_t, 1) with |x_t|, |y_t| <= 1, so |row| . 1 bounds it: when that bound is
    # finite and inside the clamp range, no point needs the clamp (a check on B x K x 6 numbers, where
    # :func:`_may_check` allows it).
    inside = _may_check(theta) and bool((theta.detach().abs().sum(-1) <= LIMIT).all())
    safe: tuple[Tensor, Tensor | None] = (points, None) if inside else _finite(points)
    return _stacked_sample(x, *safe, spec)


def projective(x: Tensor, h: Tensor, aux: None, spec: Spec) -> Tensor:
    """:func:`kernels.reference.projective` through ``F.grid_sample``."""
    dtype = reference.compute_dtype(x, h)
    base = reference.base_grid(spec.size, spec.align_corners, x.device, dtype)  # (Ho, Wo, 2)
    points, ok = _ProjectiveGrid.apply(h.to(dtype), _homogeneous(base))
    shape = (*h.shape[:2], *spec.size)
    return _stacked_sample(x, points.view(*shape, 2), ok.view(shape), spec)


def tps(x: Tensor, coefficients: Tensor, target_points: Tensor, spec: Spec) -> Tensor:
    """:func:`kernels.reference.tps` through ``F.grid_sample``."""
    dtype = reference.compute_dtype(x, coefficients)
    base = reference.base_grid(spec.size, spec.align_corners, x.device, dtype)  # (Ho, Wo, 2)
    features = reference.tps_features(base, target_points.to(device=x.device, dtype=dtype))  # (Ho, Wo, N + 3)
    coefficients = coefficients.to(dtype)
    points = base.view(-1, 2) + features.flatten(0, 1) @ coefficients
    return _stacked_sample(x, *_safe(points.view(*coefficients.shape[:2], *spec.size, 2)), spec)
