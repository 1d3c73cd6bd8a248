"""Pure-PyTorch implementation of every public sampling op, exact to the contract of DESIGN.md.

This module is the oracle that the other paths (kernels/torch_path.py, the PyTorch path that CPU tensors run,
and the Triton kernels) are tested against. It follows the conventions of ``torch.nn.functional.affine_grid``
and ``grid_sample`` (normalised coordinates in [-1, 1], explicit ``align_corners``) and adds what the kernel
contract asks for on top of them:

* K transformers per image without copying the image K times: the B x K x Ho x Wo sampling points of an image
  read its pixels with gathers (and the backward is a scatter-add), then the (B, C, K, Ho, Wo) result is made
  (B, K, C, Ho, Wo).
* Parameters and coordinates are computed in float32 (float64 when the image or the parameters are
  float64, so that gradcheck works); the image is sampled in that dtype and the output cast back.
* Sampling runs in input pixel coordinates, so identity parameters reproduce the input exactly (see the
  comment above :func:`half_extent`).
* Non-finite sampling points read nothing: their output is ``fill`` (default 0) in every padding mode and they
  send no gradient to the image or to the parameters. Finite points are clamped to [-2, W + 1] pixels (zeros
  padding: far enough to read nothing) or to [0, W - 1] (border padding) before any index is formed. With
  zeros padding, every bilinear corner outside the image reads ``fill``.
* A projective point whose homogeneous coordinate satisfies |w| < ``PROJECTIVE_EPS`` lies at infinity and
  counts as non-finite.
"""

from __future__ import annotations

import functools
import weakref
from typing import Literal

import torch
from torch import Tensor

__all__ = [
    "PROJECTIVE_EPS",
    "Mode",
    "Padding",
    "affine_to_pixels",
    "base_grid",
    "centred_pixels",
    "check_image",
    "check_grid",
    "check_options",
    "compute_dtype",
    "default_target_points",
    "half_extent",
    "host_constant",
    "normalize_size",
    "pixel_scale_factors",
    "pixel_scale_matrix",
    "pixel_scales",
    "projective_to_pixels",
    "sample_affine",
    "sample_grid",
    "sample_projective",
    "sample_tps",
    "sample_tps_coefficients",
    "solve_tps",
    "tps_coefficients",
    "tps_features",
    "tps_kernel",
    "tps_target_points",
]

Padding = Literal["zeros", "border"]
Mode = Literal["bilinear", "nearest"]

#: A projective point with |w| below this is at infinity and reads nothing.
PROJECTIVE_EPS = 1.0e-12

_IMAGE_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_PADDINGS = ("zeros", "border")
_MODES = ("bilinear", "nearest")


# --------------------------------------------------------------------------------------------------------------
# validation (shared with the Triton launchers)
# --------------------------------------------------------------------------------------------------------------
def check_image(x: Tensor) -> None:
    """Raise ValueError unless ``x`` is a (B, C, H, W) floating image the sampler accepts."""
    if not isinstance(x, Tensor):
        raise ValueError(f"expected the image to be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 4:
        raise ValueError(f"expected an image of shape (B, C, H, W), got shape {tuple(x.shape)}")
    if x.dtype not in _IMAGE_DTYPES:
        raise ValueError(f"expected an image of dtype float16, bfloat16, float32 or float64, got {x.dtype}")
    if x.shape[1] < 1 or x.shape[2] < 1 or x.shape[3] < 1:
        raise ValueError(f"expected an image with C, H and W of at least 1, got shape {tuple(x.shape)}")


def check_params(x: Tensor, params: Tensor, name: str, tail: tuple[int, ...]) -> None:
    """Raise ValueError unless ``params`` has shape (B, K, *tail) on ``x``'s device with K >= 1."""
    if not isinstance(params, Tensor):
        raise ValueError(f"expected {name} to be a torch.Tensor, got {type(params).__name__}")
    if params.dim() != 2 + len(tail) or tuple(params.shape[2:]) != tail or params.shape[0] != x.shape[0]:
        expected = f"(B={x.shape[0]}, K, {', '.join(str(t) for t in tail)})"
        raise ValueError(f"expected {name} of shape {expected}, got {tuple(params.shape)}")
    if params.shape[1] < 1:
        raise ValueError(f"expected at least one transformer (K >= 1) in {name}, got shape {tuple(params.shape)}")
    if not params.is_floating_point():
        raise ValueError(f"expected {name} to be floating point, got {params.dtype}")
    if params.device != x.device:
        raise ValueError(f"expected {name} on the image's device {x.device}, got {params.device}")


def check_grid(x: Tensor, grid: Tensor) -> None:
    """Raise ValueError unless ``x`` is an image and ``grid`` a (B, K, Ho, Wo, 2) grid for it."""
    check_image(x)
    if not isinstance(grid, Tensor) or grid.dim() != 5 or grid.shape[-1] != 2 or grid.shape[0] != x.shape[0]:
        shape = tuple(grid.shape) if isinstance(grid, Tensor) else type(grid).__name__
        raise ValueError(f"expected a grid of shape (B={x.shape[0]}, K, Ho, Wo, 2), got {shape}")
    check_params(x, grid, "grid", tuple(grid.shape[2:]))


def check_options(padding_mode: str, mode: str) -> None:
    """Raise ValueError for a padding mode or interpolation mode the sampler does not implement."""
    if padding_mode not in _PADDINGS:
        raise ValueError(f"expected padding_mode in {_PADDINGS}, got {padding_mode!r}")
    if mode not in _MODES:
        raise ValueError(f"expected mode in {_MODES}, got {mode!r}")


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


def _sample_pixels(
    x: Tensor, ix: Tensor, iy: Tensor, valid: Tensor, padding_mode: str, mode: str, dtype: torch.dtype, fill: float
) -> Tensor:
    # ix, iy, valid (B, K, Ho, Wo) in input pixels -> samples (B, K, C, Ho, Wo) in x's dtype.
    b, k, ho, wo = ix.shape
    valid = valid & torch.isfinite(ix) & torch.isfinite(iy)
    out = _bilinear_or_nearest(
        x, ix.reshape(b, -1), iy.reshape(b, -1), valid.reshape(b, -1), padding_mode, mode, dtype, float(fill)
    )
    return out.view(b, x.shape[1], k, ho, wo).transpose(1, 2).contiguous().to(x.dtype)


# --------------------------------------------------------------------------------------------------------------
# public ops
# --------------------------------------------------------------------------------------------------------------
def sample_grid(
    x: Tensor,
    grid: Tensor,
    *,
    align_corners: bool = False,
    padding_mode: Padding = "zeros",
    mode: Mode = "bilinear",
    fill: float = 0.0,
) -> Tensor:
    """Sample K grids from each image.

    Args:
        x: images (B, C, H, W), any strides.
        grid: sampling points (B, K, Ho, Wo, 2), normalised (x, y) in the input, as for ``F.grid_sample``.
        align_corners: whether -1 and 1 are the centres (True) or the outer edges (False) of the corner pixels.
        padding_mode: "zeros" or "border".
        mode: "bilinear" or "nearest".
        fill: the value read outside the image with zeros padding (each bilinear corner outside reads it), and
            the output at non-finite points in every padding mode.

    Returns:
        The samples (B, K, C, Ho, Wo), contiguous, in ``x``'s dtype.
    """
    check_grid(x, grid)
    check_options(padding_mode, mode)
    h, w = x.shape[-2:]
    dtype = compute_dtype(x, grid)
    sx, sy, _, _ = pixel_scales((h, w), (h, w), align_corners)
    g = grid.to(dtype)
    ix = g[..., 0] * sx + (w - 1) / 2
    iy = g[..., 1] * sy + (h - 1) / 2
    return _sample_pixels(x, ix, iy, torch.ones_like(ix, dtype=torch.bool), padding_mode, mode, dtype, fill)


def sample_affine(
    x: Tensor,
    theta: Tensor,
    size: int | tuple[int, int],
    *,
    align_corners: bool = False,
    padding_mode: Padding = "zeros",
    mode: Mode = "bilinear",
    fill: float = 0.0,
) -> Tensor:
    """Sample K affine warps of each image.

    Args:
        x: images (B, C, H, W).
        theta: (B, K, 2, 3) matrices mapping output to input normalised coordinates, the ``F.affine_grid``
            convention: [x_s, y_s] = theta @ [x_t, y_t, 1].
        size: output size (Ho, Wo), or an int for a square output.
        align_corners, padding_mode, mode, fill: as for :func:`sample_grid`.

    Returns:
        The samples (B, K, C, Ho, Wo).
    """
    check_image(x)
    check_params(x, theta, "theta", (2, 3))
    check_options(padding_mode, mode)
    size = normalize_size(size)
    h, w = x.shape[-2:]
    dtype = compute_dtype(x, theta)
    m = affine_to_pixels(theta.to(dtype), (h, w), size, align_corners)[:, :, :, :, None, None]
    u, v = centred_pixels(size, x.device, dtype)
    u, v = u.view(1, 1, 1, -1), v.view(1, 1, -1, 1)
    ix = m[:, :, 0, 0] * u + m[:, :, 0, 1] * v + m[:, :, 0, 2] + (w - 1) / 2
    iy = m[:, :, 1, 0] * u + m[:, :, 1, 1] * v + m[:, :, 1, 2] + (h - 1) / 2
    return _sample_pixels(x, ix, iy, torch.ones_like(ix, dtype=torch.bool), padding_mode, mode, dtype, fill)


def sample_projective(
    x: Tensor,
    h: Tensor,
    size: int | tuple[int, int],
    *,
    align_corners: bool = False,
    padding_mode: Padding = "zeros",
    mode: Mode = "bilinear",
    fill: float = 0.0,
) -> Tensor:
    """Sample K projective warps of each image.

    Args:
        x: images (B, C, H, W).
        h: (B, K, 3, 3) homographies on normalised coordinates: [u, v, w] = h @ [x_t, y_t, 1] and the source
            point is (u / w, v / w). Points with |w| < ``PROJECTIVE_EPS`` read nothing.
        size: output size (Ho, Wo), or an int.
        align_corners, padding_mode, mode, fill: as for :func:`sample_grid`.

    Returns:
        The samples (B, K, C, Ho, Wo).
    """
    check_image(x)
    check_params(x, h, "h", (3, 3))
    check_options(padding_mode, mode)
    size = normalize_size(size)
    height, width = x.shape[-2:]
    dtype = compute_dtype(x, h)
    m = projective_to_pixels(h.to(dtype), (height, width), size, align_corners)[:, :, :, :, None, None]
    u, v = centred_pixels(size, x.device, dtype)
    u, v = u.view(1, 1, 1, -1), v.view(1, 1, -1, 1)
    a = m[:, :, 0, 0] * u + m[:, :, 0, 1] * v + m[:, :, 0, 2]
    b = m[:, :, 1, 0] * u + m[:, :, 1, 1] * v + m[:, :, 1, 2]
    wh = m[:, :, 2, 0] * u + m[:, :, 2, 1] * v + m[:, :, 2, 2]
    # Divide only where the result can be finite, so that no 0 * inf reaches the gradient of h.
    ok = torch.isfinite(a) & torch.isfinite(b) & torch.isfinite(wh) & (wh.abs() >= PROJECTIVE_EPS)
    one = torch.ones((), device=x.device, dtype=dtype)
    wh = torch.where(ok, wh, one)
    ix = torch.where(ok, a, 0 * one) / wh + (width - 1) / 2
    iy = torch.where(ok, b, 0 * one) / wh + (height - 1) / 2
    return _sample_pixels(x, ix, iy, ok, padding_mode, mode, dtype, fill)


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


def sample_tps_coefficients(
    x: Tensor,
    coefficients: Tensor,
    target_points: Tensor,
    size: int | tuple[int, int],
    *,
    align_corners: bool = False,
    padding_mode: Padding = "zeros",
    mode: Mode = "bilinear",
    fill: float = 0.0,
) -> Tensor:
    """Sample K thin-plate-spline warps given their solved coefficients (see :func:`tps_coefficients`).

    In pixels: ix = (sx / ox) u + sx * f_x(u / ox, v / oy) + (W - 1) / 2, with f the spline's offset from the
    identity evaluated in normalised coordinates (see :func:`pixel_scales`); likewise iy.

    Args:
        x: images (B, C, H, W).
        coefficients: (B, K, N + 3, 2).
        target_points: (N, 2).
        size, align_corners, padding_mode, mode, fill: as for :func:`sample_affine`.

    Returns:
        The samples (B, K, C, Ho, Wo).
    """
    check_image(x)
    n = target_points.shape[0]
    check_params(x, coefficients, "coefficients", (n + 3, 2))
    check_options(padding_mode, mode)
    size = normalize_size(size)
    h, w = x.shape[-2:]
    dtype = compute_dtype(x, coefficients)
    sx, sy, ox, oy = pixel_scales((h, w), size, align_corners)
    u, v = centred_pixels(size, x.device, dtype)
    pu, pv = torch.meshgrid(u, v, indexing="xy")  # (Ho, Wo) each
    base = torch.stack([pu * _ratio(1.0, ox), pv * _ratio(1.0, oy)], dim=-1)  # (Ho, Wo, 2) normalised
    features = tps_features(base, target_points.to(device=x.device, dtype=dtype))  # (Ho, Wo, N + 3)
    offset = (features.view(-1, n + 3) @ coefficients.to(dtype)).view(*coefficients.shape[:2], *size, 2)
    ix = _ratio(sx, ox) * pu + sx * offset[..., 0] + (w - 1) / 2
    iy = _ratio(sy, oy) * pv + sy * offset[..., 1] + (h - 1) / 2
    return _sample_pixels(x, ix, iy, torch.ones_like(ix, dtype=torch.bool), padding_mode, mode, dtype, fill)


def sample_tps(
    x: Tensor,
    control_points: Tensor,
    size: int | tuple[int, int],
    *,
    target_points: Tensor | None = None,
    align_corners: bool = False,
    padding_mode: Padding = "zeros",
    mode: Mode = "bilinear",
    fill: float = 0.0,
) -> Tensor:
    """Sample K thin-plate-spline warps of each image.

    Args:
        x: images (B, C, H, W).
        control_points: (B, K, N, 2) where each target control point lands in the input, normalised (x, y).
        size: output size (Ho, Wo), or an int.
        target_points: (N, 2) fixed control points in output coordinates; default a regular sqrt(N) x sqrt(N)
            lattice over [-1, 1]^2 (see :func:`tps_target_points`).
        align_corners, padding_mode, mode, fill: as for :func:`sample_grid`.

    Returns:
        The samples (B, K, C, Ho, Wo).
    """
    coefficients, target_points = solve_tps(x, control_points, target_points)
    return sample_tps_coefficients(
        x,
        coefficients,
        target_points,
        size,
        align_corners=align_corners,
        padding_mode=padding_mode,
        mode=mode,
        fill=fill,
    )


def solve_tps(x: Tensor, control_points: Tensor, target_points: Tensor | None) -> tuple[Tensor, Tensor]:
    """Validate a spline's inputs and solve it: (coefficients (B, K, N + 3, 2), target points (N, 2)).

    Shared by both backends of ``sample_tps``: the solve always runs in PyTorch.
    """
    check_image(x)
    if target_points is None:
        target_points = default_target_points(control_points, x.device)
    check_params(x, control_points, "control_points", (target_points.shape[0], 2))
    return tps_coefficients(control_points, target_points), target_points


def default_target_points(control_points: Tensor, device: torch.device) -> Tensor:
    """The square lattice that matches ``control_points`` (B, K, N, 2); N must be a square number."""
    n = control_points.shape[-2] if control_points.dim() >= 2 else 0
    side = round(n**0.5)
    if side * side != n or side < 2:
        raise ValueError(
            f"expected N = n * n control points for the default lattice, got {tuple(control_points.shape)}; "
            "pass target_points for other layouts"
        )
    # One tensor per lattice and device, so that its solve is cached too (see _tps_solver).
    key = (side, torch.device(device))
    if not torch.compiler.is_compiling() and key in _DEFAULT_TARGETS:
        return _DEFAULT_TARGETS[key]
    target = tps_target_points(side, device=device)
    if _cacheable(target):
        _DEFAULT_TARGETS[key] = target
    return target


_DEFAULT_TARGETS: dict[tuple[int, torch.device], Tensor] = {}
