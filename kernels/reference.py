"""The oracle: a pure-PyTorch sampler of every family, exact to the kernel contract (docs/KERNELS.md).

The other backends (kernels/torch_path.py and the Triton kernels) are tested against this module, and
``backend="reference"`` reaches it through the public ops. One function per family (:func:`affine`,
:func:`projective`, :func:`tps`, :func:`grid`) takes arguments that kernels/__init__.py has validated and a
:class:`Spec`. It follows ``F.affine_grid`` / ``F.grid_sample`` (normalised coordinates, explicit
``align_corners``) and adds what the contract asks on top of them:

* K transformers per image without copying the image K times: the B x K x Ho x Wo points of an image read its
  pixels with gathers (the backward is a scatter-add, deterministic under torch.use_deterministic_algorithms);
* coordinates in float32 (float64 when the image or the parameters are float64, so that gradcheck works);
* sampling in input pixel coordinates, so that identity parameters reproduce the input bit for bit;
* non-finite points read ``fill`` and send no gradient; finite points are clamped to [-2, W + 1] (zeros) or
  [0, W - 1] (border) before any index is formed; with zeros padding a corner outside reads ``fill``;
* a projective point with |w| < ``PROJECTIVE_EPS`` lies at infinity and counts as non-finite.
"""

from __future__ import annotations

import functools
import weakref
from collections.abc import Callable
from typing import Any, Literal, NamedTuple

import torch
from torch import Tensor

__all__ = [
    "PROJECTIVE_EPS",
    "Mode",
    "Padding",
    "FamilyFn",
    "Spec",
    "affine",
    "affine_to_pixels",
    "base_grid",
    "centred_pixels",
    "compute_dtype",
    "grid",
    "half_extent",
    "host_constant",
    "normalize_size",
    "pixel_scale_factors",
    "pixel_scale_matrix",
    "pixel_scales",
    "projective",
    "projective_to_pixels",
    "tps",
    "tps_coefficients",
    "tps_features",
    "tps_kernel",
    "tps_target_points",
]

Padding = Literal["zeros", "border"]
Mode = Literal["bilinear", "nearest"]

#: A projective point with |w| below this is at infinity and reads nothing.
PROJECTIVE_EPS = 1.0e-12


class Spec(NamedTuple):
    """One call's validated options, as every backend's family function takes them: the output size (Ho, Wo),
    align_corners, padding_mode, mode and the value ``fill`` that outside corners and invalid points read."""

    size: tuple[int, int]
    align_corners: bool
    padding_mode: str
    mode: str
    fill: float


#: A family's function in every backend: (x, params, aux, spec) -> samples (B, K, C, Ho, Wo); aux is the spline's
#: (N, 2) target points, None for the other families.
FamilyFn = Callable[[Tensor, Tensor, Any, Spec], Tensor]


def normalize_size(size: int | tuple[int, int] | list[int] | torch.Size) -> tuple[int, int]:
    """Return the output size as (Ho, Wo); an int means a square output."""
    pair = (size, size) if isinstance(size, int) else tuple(int(s) for s in size)
    if len(pair) != 2 or min(pair) < 1:
        raise ValueError(f"expected an output size (Ho, Wo) of positive integers, got {pair}")
    return pair[0], pair[1]


def compute_dtype(*tensors: Tensor) -> torch.dtype:
    """float64 when any input is float64, else float32: coordinates are never computed in half precision."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


# --------------------------------------------------------------------------------------------------------------
# coordinates
#
# Sampling happens in input pixel coordinates (0 .. W-1 at pixel centres). Output pixels are addressed by
# centred coordinates u = j - (Wo - 1) / 2, v = i - (Ho - 1) / 2, and every warp is rewritten to map (u, v)
# straight to the input pixel (ix, iy): the normalisation scales fold into the parameters. Identity parameters
# then give ix = j exactly (the scales cancel to 1.0 and half-integers are exact in floating point), so the
# identity warp reproduces the input bit for bit, which a normalised grid fed to F.grid_sample cannot promise.
# --------------------------------------------------------------------------------------------------------------
def half_extent(n: int, align_corners: bool) -> float:
    """Pixels per normalised unit along an axis of n pixels: n / 2, or (n - 1) / 2 with align_corners."""
    return (n - 1) / 2 if align_corners else n / 2


def pixel_scales(
    in_size: tuple[int, int], out_size: tuple[int, int], align_corners: bool
) -> tuple[float, float, float, float]:
    """(sx, sy, ox, oy): the half extents (see :func:`half_extent`) of the input and output axes, in pixels.

    A normalised input x maps to the pixel x * sx + (W - 1) / 2; a centred output u to the normalised u / ox.
    An output axis of one pixel with align_corners has no extent (ox = 0): its single pixel sits at 0.
    """
    sx, sy = half_extent(in_size[1], align_corners), half_extent(in_size[0], align_corners)
    ox, oy = half_extent(out_size[1], align_corners), half_extent(out_size[0], align_corners)
    return sx, sy, ox, oy


def _ratio(num: float, extent: float) -> float:
    # num / extent, and 0 for an axis without extent (its centred coordinate is always 0). Exactly 1.0 when
    # the input and output extents agree, which is what makes the identity warp exact.
    return num / extent if extent > 0 else 0.0


def host_constant(values: list, dtype: torch.dtype, like: Tensor) -> Tensor:
    """A small constant tensor of Python numbers (a flat or nested list) on ``like``'s device, made once per value.

    Making it costs a host-to-device copy and a wait for the stream (three such waits per forward + backward showed
    up in benchmarks/profile_kernels.py on an H100), so each constant is made once and kept. The cached copy is a
    blocking one: once made, its values are in place for every stream. Callers must not modify the result. Where
    ``like`` is not :func:`_cacheable`, the tensor is made afresh with a non-blocking copy.
    """
    key = tuple(tuple(v) if isinstance(v, list) else v for v in values)
    if not _cacheable(like):
        return _make_constant(key, dtype, like.device)
    return _cached_constant(key, dtype, like.device)


def _cacheable(t: Tensor) -> bool:
    # Whether a tensor made for (or from) ``t`` may be kept across calls: not while torch.compile traces (the
    # compiler folds constants itself), and not for tensor subclasses such as fake tensors, whose modes reject a
    # real tensor made outside them.
    return type(t) in (Tensor, torch.nn.Parameter) and not torch.compiler.is_compiling()


def _make_constant(values: tuple, dtype: torch.dtype, device: torch.device) -> Tensor:
    # With non_blocking=True the driver stages the pageable source before returning, so the temporary may go; the
    # copy is ordered on the current stream only.
    return torch.tensor(values, dtype=dtype).to(device, non_blocking=True)


@functools.lru_cache(maxsize=256)  # a few hundred at most: one per (sizes, align_corners, dtype, device) in use
def _cached_constant(values: tuple, dtype: torch.dtype, device: torch.device) -> Tensor:
    # A blocking copy, made once: its values are in place before any stream can read them. Made outside
    # inference mode, so that a constant first made while testing can be saved for backward while training.
    with torch.inference_mode(False):
        return torch.tensor(values, dtype=dtype, device=device)


def pixel_scale_factors(in_size: tuple[int, int], out_size: tuple[int, int], align_corners: bool) -> list[list[float]]:
    """The 3 x 3 elementwise factors, as Python numbers, that rewrite a normalised projective matrix (its first two
    rows: an affine one) to one on centred output pixels (see :func:`affine_to_pixels`)."""
    sx, sy, ox, oy = pixel_scales(in_size, out_size, align_corners)
    return [
        [_ratio(sx, ox), _ratio(sx, oy), sx],
        [_ratio(sy, ox), _ratio(sy, oy), sy],
        [_ratio(1.0, ox), _ratio(1.0, oy), 1.0],
    ]


def pixel_scale_matrix(
    rows: int,
    in_size: tuple[int, int],
    out_size: tuple[int, int],
    align_corners: bool,
    dtype: torch.dtype,
    like: Tensor,
) -> Tensor:
    """:func:`pixel_scale_factors` as a (rows, 3) tensor on ``like``'s device: 2 rows for affine, 3 for projective
    matrices; also the derivative of the rewrite, for the backward."""
    if _cacheable(like):  # the common case, looked up by its arguments (the factors and their key cost microseconds)
        return _cached_scale_matrix(rows, in_size, out_size, align_corners, dtype, like.device)
    return host_constant(pixel_scale_factors(in_size, out_size, align_corners)[:rows], dtype, like)


@functools.lru_cache(maxsize=256)
def _cached_scale_matrix(
    rows: int,
    in_size: tuple[int, int],
    out_size: tuple[int, int],
    align_corners: bool,
    dtype: torch.dtype,
    device: torch.device,
) -> Tensor:
    factors = pixel_scale_factors(in_size, out_size, align_corners)[:rows]
    return _cached_constant(tuple(tuple(row) for row in factors), dtype, device)


def affine_to_pixels(theta: Tensor, in_size: tuple[int, int], out_size: tuple[int, int], align_corners: bool) -> Tensor:
    """Rewrite (B, K, 2, 3) normalised affine matrices to map centred output pixels (u, v, 1) to input pixels.

    The result M gives ix = M[0] . (u, v, 1) + (W - 1) / 2 and iy = M[1] . (u, v, 1) + (H - 1) / 2.
    """
    return theta * pixel_scale_matrix(2, in_size, out_size, align_corners, theta.dtype, theta)


def projective_to_pixels(h: Tensor, in_size: tuple[int, int], out_size: tuple[int, int], align_corners: bool) -> Tensor:
    """Rewrite (B, K, 3, 3) normalised homographies to map centred output pixels to (centred) input pixels.

    With [a, b, w] = H' (u, v, 1): ix = a / w + (W - 1) / 2 and iy = b / w + (H - 1) / 2; w is the same as in
    normalised coordinates, so the |w| < PROJECTIVE_EPS rule is unchanged.
    """
    return h * pixel_scale_matrix(3, in_size, out_size, align_corners, h.dtype, h)


def centred_pixels(size: tuple[int, int], device: torch.device, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """Centred output pixel coordinates: u (Wo,) = j - (Wo - 1) / 2 and v (Ho,) = i - (Ho - 1) / 2."""
    ho, wo = size
    u = torch.arange(wo, device=device, dtype=dtype) - (wo - 1) / 2
    v = torch.arange(ho, device=device, dtype=dtype) - (ho - 1) / 2
    return u, v


def base_grid(size: tuple[int, int], align_corners: bool, device: torch.device, dtype: torch.dtype) -> Tensor:
    """The identity sampling grid: (Ho, Wo, 2) normalised (x, y) of every output pixel centre."""
    u, v = centred_pixels(size, device, dtype)
    _, _, ox, oy = pixel_scales(size, size, align_corners)
    return torch.stack(torch.meshgrid(u * _ratio(1.0, ox), v * _ratio(1.0, oy), indexing="xy"), dim=-1)


def _clamp(t: Tensor, lo: float, hi: float) -> Tensor:
    # t.clamp(lo, hi) whose gradient passes on the closed interval [lo, hi], as in F.grid_sample's border padding.
    # torch.clamp's own subgradient at the bounds depends on the torch version (1 in older releases, 0 in newer).
    return torch.where((t >= lo) & (t <= hi), t, t.detach().clamp(lo, hi))


def _bilinear_or_nearest(
    x: Tensor, ix: Tensor, iy: Tensor, valid: Tensor, padding_mode: str, mode: str, dtype: torch.dtype, fill: float
) -> Tensor:
    # x (B, C, H, W); ix, iy, valid (B, P) -> (B, C, P). Invalid points read nothing (they give ``fill``) and pass
    # no gradient; a corner outside the image reads ``fill``.
    b, c, h, w = x.shape
    flat = x.reshape(b, c, h * w).to(dtype)
    zero = torch.zeros((), device=x.device, dtype=dtype)
    ix, iy = torch.where(valid, ix, zero), torch.where(valid, iy, zero)
    if padding_mode == "border":
        ix, iy = _clamp(ix, 0, w - 1), _clamp(iy, 0, h - 1)
    else:
        # Anything beyond one pixel outside reads only zeros; clamping keeps floor() and the indices small.
        ix, iy = _clamp(ix, -2, w + 1), _clamp(iy, -2, h + 1)
    corners: list[Tensor] = []  # each corner's weight inside the image, (B, P)

    def read(cx: Tensor, cy: Tensor, weight: Tensor) -> Tensor:
        inside = valid & (cx >= 0) & (cx <= w - 1) & (cy >= 0) & (cy <= h - 1)
        # Integer arithmetic: in float32, cy * w + cx is inexact beyond 2**24 pixels (a 1 x 1 x 32769 x 65536 image).
        index = cy.clamp(0, h - 1).long() * w + cx.clamp(0, w - 1).long()
        values = flat.gather(2, index.unsqueeze(1).expand(b, c, -1))
        corners.append(weight * inside.to(dtype))
        return values * corners[-1].unsqueeze(1)

    if mode == "nearest":
        # Round half to even, as F.grid_sample does.
        out = read(torch.round(ix), torch.round(iy), torch.ones_like(ix))
    else:
        x0, y0 = torch.floor(ix), torch.floor(iy)
        wx1, wy1 = ix - x0, iy - y0
        wx0, wy0 = 1 - wx1, 1 - wy1
        out = (
            read(x0, y0, wx0 * wy0)
            + read(x0 + 1, y0, wx1 * wy0)
            + read(x0, y0 + 1, wx0 * wy1)
            + read(x0 + 1, y0 + 1, wx1 * wy1)
        )
    if fill != 0.0:  # the weight that no pixel inside took reads fill
        out = out + fill * (1 - torch.stack(corners).sum(0)).unsqueeze(1)
    return out


def _sample_pixels(x: Tensor, ix: Tensor, iy: Tensor, valid: Tensor | None, spec: Spec, dtype: torch.dtype) -> Tensor:
    # ix, iy, valid (B, K, Ho, Wo) in input pixels (valid None: all) -> samples (B, K, C, Ho, Wo) in x's dtype.
    b, k, ho, wo = ix.shape
    finite = torch.isfinite(ix) & torch.isfinite(iy)
    valid = finite if valid is None else valid & finite
    flat_ix, flat_iy, flat_valid = (t.reshape(b, -1) for t in (ix, iy, valid))
    out = _bilinear_or_nearest(x, flat_ix, flat_iy, flat_valid, spec.padding_mode, spec.mode, dtype, float(spec.fill))
    return out.view(b, x.shape[1], k, ho, wo).transpose(1, 2).contiguous().to(x.dtype)


def _centred_uv(x: Tensor, spec: Spec, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    # Centred output pixels shaped to broadcast against (B, K, Ho, Wo): u (1, 1, 1, Wo), v (1, 1, Ho, 1).
    u, v = centred_pixels(spec.size, x.device, dtype)
    return u.view(1, 1, 1, -1), v.view(1, 1, -1, 1)


# --------------------------------------------------------------------------------------------------------------
# families: validated inputs (kernels/__init__.py) -> samples (B, K, C, Ho, Wo), contiguous, in x's dtype
# --------------------------------------------------------------------------------------------------------------
def grid(x: Tensor, points: Tensor, aux: None, spec: Spec) -> Tensor:
    """Sample the points (B, K, Ho, Wo, 2), normalised (x, y) as for ``F.grid_sample``."""
    h, w = x.shape[-2:]
    dtype = compute_dtype(x, points)
    sx, sy, _, _ = pixel_scales((h, w), (h, w), spec.align_corners)
    g = points.to(dtype)
    return _sample_pixels(x, g[..., 0] * sx + (w - 1) / 2, g[..., 1] * sy + (h - 1) / 2, None, spec, dtype)


def affine(x: Tensor, theta: Tensor, aux: None, spec: Spec) -> Tensor:
    """Sample the affine warps theta (B, K, 2, 3), the ``F.affine_grid`` convention: [x_s, y_s] = theta @
    [x_t, y_t, 1] from output to input normalised coordinates."""
    h, w = x.shape[-2:]
    dtype = compute_dtype(x, theta)
    m = affine_to_pixels(theta.to(dtype), (h, w), spec.size, spec.align_corners)[:, :, :, :, None, None]
    u, v = _centred_uv(x, spec, dtype)
    ix = m[:, :, 0, 0] * u + m[:, :, 0, 1] * v + m[:, :, 0, 2] + (w - 1) / 2
    iy = m[:, :, 1, 0] * u + m[:, :, 1, 1] * v + m[:, :, 1, 2] + (h - 1) / 2
    return _sample_pixels(x, ix, iy, None, spec, dtype)


def projective(x: Tensor, h: Tensor, aux: None, spec: Spec) -> Tensor:
    """Sample the homographies h (B, K, 3, 3) on normalised coordinates: [a, b, w] = h @ [x_t, y_t, 1] and the
    source point is (a / w, b / w); points with |w| < ``PROJECTIVE_EPS`` read nothing."""
    height, width = x.shape[-2:]
    dtype = compute_dtype(x, h)
    m = projective_to_pixels(h.to(dtype), (height, width), spec.size, spec.align_corners)[:, :, :, :, None, None]
    u, v = _centred_uv(x, spec, dtype)
    a, b, wh = (m[:, :, r, 0] * u + m[:, :, r, 1] * v + m[:, :, r, 2] for r in range(3))
    # Divide only where the result can be finite, so that no 0 * inf reaches the gradient of h.
    ok = torch.isfinite(a) & torch.isfinite(b) & torch.isfinite(wh) & (wh.abs() >= PROJECTIVE_EPS)
    one = torch.ones((), device=x.device, dtype=dtype)
    wh = torch.where(ok, wh, one)
    ix = torch.where(ok, a, 0 * one) / wh + (width - 1) / 2
    iy = torch.where(ok, b, 0 * one) / wh + (height - 1) / 2
    return _sample_pixels(x, ix, iy, ok, spec, dtype)


def tps(x: Tensor, coefficients: Tensor, target_points: Tensor, spec: Spec) -> Tensor:
    """Sample thin-plate splines given their coefficients (B, K, N + 3, 2) (:func:`tps_coefficients`) and the
    (N, 2) target points: ix = (sx / ox) u + sx * f_x(u / ox, v / oy) + (W - 1) / 2, with f the spline's offset
    from the identity in normalised coordinates (see :func:`pixel_scales`); likewise iy."""
    h, w = x.shape[-2:]
    dtype = compute_dtype(x, coefficients)
    sx, sy, ox, oy = pixel_scales((h, w), spec.size, spec.align_corners)
    u, v = centred_pixels(spec.size, x.device, dtype)
    pu, pv = torch.meshgrid(u, v, indexing="xy")  # (Ho, Wo) each
    base = torch.stack([pu * _ratio(1.0, ox), pv * _ratio(1.0, oy)], dim=-1)  # (Ho, Wo, 2) normalised
    features = tps_features(base, target_points.to(device=x.device, dtype=dtype))  # (Ho, Wo, N + 3)
    offset = (features.flatten(0, 1) @ coefficients.to(dtype)).view(*coefficients.shape[:2], *spec.size, 2)
    ix = _ratio(sx, ox) * pu + sx * offset[..., 0] + (w - 1) / 2
    iy = _ratio(sy, oy) * pv + sy * offset[..., 1] + (h - 1) / 2
    return _sample_pixels(x, ix, iy, None, spec, dtype)


# --------------------------------------------------------------------------------------------------------------
# thin-plate spline
# --------------------------------------------------------------------------------------------------------------
def tps_target_points(grid_size: int, device: torch.device | None = None, dtype: torch.dtype = torch.float32) -> Tensor:
    """A regular grid_size x grid_size lattice of control points spanning [-1, 1]^2, as (N, 2) (x, y), row major."""
    if grid_size < 2:
        raise ValueError(f"expected a control grid of at least 2 x 2 points, got {grid_size}")
    r = torch.linspace(-1.0, 1.0, grid_size, device=device, dtype=dtype)
    return torch.stack(torch.meshgrid(r, r, indexing="xy"), dim=-1).reshape(-1, 2)


def tps_kernel(d2: Tensor) -> Tensor:
    """The radial basis U of the spline on squared distances: U = d2 * log(d2), with U(0) = 0."""
    safe = torch.where(d2 > 0, d2, torch.ones_like(d2))
    return torch.where(d2 > 0, d2 * torch.log(safe), torch.zeros_like(d2))


#: Solved systems by target-point tensor: {id(target): (weak reference to it, its version counter, {(dtype,
#: device): (N + 3, N) inverse})}. An entry goes with its tensor (weakref.finalize), and an in-place change of the
#: tensor bumps its version, which invalidates the entry.
_TPS_SOLVES: dict[int, tuple[weakref.ref, int, dict]] = {}


def _tps_solver(target: Tensor, dtype: torch.dtype, device: torch.device) -> Tensor:
    """:func:`_tps_system_inverse` of ``target`` in ``dtype`` on ``device``, solved once per target tensor.

    The solve is some twenty small ops and a matrix inverse whose error check waits for the GPU; the target points
    of a model are a fixed buffer, so one solve serves every step. Targets that require grad, inference tensors
    (no version counter) and the cases of :func:`_cacheable` are solved afresh.
    """
    if not _cacheable(target) or target.requires_grad or target.is_inference():
        return _tps_system_inverse(target).to(device=device, dtype=dtype)
    entry = _TPS_SOLVES.get(id(target))
    if entry is None or entry[0]() is not target:  # a tensor not seen before: its entry goes when it goes
        weakref.finalize(target, _TPS_SOLVES.pop, id(target), None)
        entry = None
    if entry is None or entry[1] != target._version:  # new, or changed in place since it was solved
        entry = (weakref.ref(target), target._version, {})
        _TPS_SOLVES[id(target)] = entry
    solves = entry[2]
    if (dtype, device) not in solves:
        # Solved on the CPU and copied with a blocking copy: in place for every stream before anyone reads it.
        solves[dtype, device] = _tps_system_inverse(target.detach().cpu()).to(dtype).to(device)
    return solves[dtype, device]


def _tps_system_inverse(target: Tensor) -> Tensor:
    # The (N+3, N) block of L^-1 that maps control-point offsets to spline coefficients; L is built in float64.
    t = target.to(torch.float64)
    n = t.shape[0]
    kmat = tps_kernel(((t[:, None, :] - t[None, :, :]) ** 2).sum(-1))
    p = torch.cat([torch.ones(n, 1, dtype=t.dtype, device=t.device), t], dim=1)
    top = torch.cat([kmat, p], dim=1)
    bottom = torch.cat([p.T, torch.zeros(3, 3, dtype=t.dtype, device=t.device)], dim=1)
    system = torch.cat([top, bottom], dim=0)
    return torch.linalg.inv(system)[:, :n]


def tps_features(points: Tensor, target_points: Tensor) -> Tensor:
    """The spline's features at points (..., 2): (..., N + 3), the N radial terms U(|p - t_i|^2), then 1, x, y.

    The spline's offset at the points is ``features @ coefficients`` (see :func:`tps_coefficients`).
    """
    radial = tps_kernel(((points[..., None, :] - target_points) ** 2).sum(-1))
    return torch.cat([radial, torch.ones_like(points[..., :1]), points], dim=-1)


def tps_coefficients(control_points: Tensor, target_points: Tensor) -> Tensor:
    """Solve for the spline that moves every target control point onto its control point.

    The spline is written as an offset from the identity, f(p) = p + A^T [1, x, y] + sum_i w_i U(|p - t_i|^2),
    so identity control points give all-zero coefficients and the identity warp exactly.

    Args:
        control_points: (B, K, N, 2) where each target control point lands in the input, normalised (x, y).
        target_points: (N, 2) the fixed control points in output coordinates.

    Returns:
        Coefficients (B, K, N + 3, 2): the N radial weights w_i, then the affine rows for 1, x and y.
    """
    if target_points.dim() != 2 or target_points.shape[1] != 2 or target_points.shape[0] < 3:
        raise ValueError(f"expected target points of shape (N >= 3, 2), got {tuple(target_points.shape)}")
    n = target_points.shape[0]
    if control_points.dim() != 4 or tuple(control_points.shape[2:]) != (n, 2):
        raise ValueError(f"expected control points of shape (B, K, {n}, 2), got {tuple(control_points.shape)}")
    dtype = compute_dtype(control_points)
    inverse = _tps_solver(target_points, dtype, control_points.device)
    offsets = control_points.to(dtype) - target_points.to(device=control_points.device, dtype=dtype)
    return inverse @ offsets
