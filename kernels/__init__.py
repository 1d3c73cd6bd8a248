"""Sampling ops for K parallel spatial transformers: the four public ops and the table that dispatches them.

Every public op takes images (B, C, H, W) and K sets of warp parameters per image and returns the samples
(B, K, C, Ho, Wo), contiguous. It validates its inputs once, here, then calls one private function of the backend
that ``backend`` selects (``_TABLE[backend][family]``); each such function takes the validated inputs, an auxiliary
tensor (the spline's target points, else None) and a :class:`kernels.reference.Spec` of the options:

* ``"reference"``: kernels/reference.py, the exact oracle (gathers and scatter-adds; deterministic);
* ``"torch"``: kernels/torch_path.py, ``F.grid_sample`` over the stacked grids with the contract's handling of
  non-finite points and ``fill``, on any device;
* ``"triton"``: kernels/triton_ops.py, the fused Triton kernels (on CUDA tensors, or on CPU tensors under
  TRITON_INTERPRET=1);
* ``"auto"`` (default): see :func:`resolve_backend`.

The contract every backend keeps (shapes, dtypes, coordinates, determinism) is docs/KERNELS.md.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from . import reference, torch_path
from .reference import FamilyFn, Mode, Padding, Spec, base_grid, normalize_size, tps_coefficients, tps_target_points

__all__ = [
    "Backend",
    "Mode",
    "Padding",
    "base_grid",
    "resolve_backend",
    "sample_affine",
    "sample_grid",
    "sample_projective",
    "sample_tps",
    "tps_coefficients",
    "tps_target_points",
    "triton_available",
]

Backend = Literal["auto", "torch", "triton", "reference"]
_BACKENDS = ("auto", "torch", "triton", "reference")
_IMAGE_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_PADDINGS = ("zeros", "border")
_MODES = ("bilinear", "nearest")

#: backend -> family -> the function that samples validated inputs: fn(x, params, aux, spec) -> (B, K, C, Ho, Wo).
#: The Triton row is added on first use (:func:`_implementation`): importing it imports triton.
_TABLE: dict[str, dict[str, FamilyFn]] = {
    "reference": {
        "affine": reference.affine,
        "projective": reference.projective,
        "tps": reference.tps,
        "grid": reference.grid,
    },
    "torch": {
        "affine": torch_path.affine,
        "projective": torch_path.projective,
        "tps": torch_path.tps,
        "grid": torch_path.grid,
    },
}

#: The (family, pass) pairs for which backend="auto" takes Triton on CUDA tensors. The rule: Triton only where the last
#: GPU run recorded in benchmarks/RESULTS-kernels.md (2026-11-27, H100, triton 3.6) measured it faster than the
#: PyTorch path (its eager-stacked column, F.grid_sample over the stacked grids) for every workload and dtype it
#: measured for that family; "forward" is a call without a gradient to track, "backward" one with (timed as forward +
#: backward). Measured there: tps forward 0.77 / 0.84 ms against 2.14 / 2.15 (float32 / bfloat16): Triton. Every
#: other pair lost somewhere or was not measured: tps forward + backward 7.70 against 4.05 ms, projective forward 0.92
#: against 0.68 and forward + backward 3.77 against 3.09 (float32), affine forward and forward + backward on feat56x2
#: and mnist2 (e.g. 1.28-1.50 against 0.68-0.84 ms), grid never timed. A new GPU run (benchmarks/gpu_session.sh) is
#: what may move a pair in.
_AUTO_TRITON = frozenset({("tps", "forward")})


def triton_available() -> bool:
    """Whether the Triton implementation of the ops can be imported here."""
    try:
        from . import triton_ops  # noqa: F401
    except ImportError:
        return False
    return True


def resolve_backend(
    backend: str, x: Tensor, family: str | None = None, needs_grad: bool = False
) -> Literal["torch", "triton", "reference"]:
    """The backend that ``backend`` selects for the image ``x``, a family ("affine", "projective", "tps", "grid")
    and a call that needs gradients (``needs_grad``) or not.

    "auto" takes Triton on CUDA tensors for the pairs in ``_AUTO_TRITON`` (where Triton can be imported), the
    reference on CUDA tensors when a gradient is needed under torch.use_deterministic_algorithms(True) (its backward
    is a deterministic scatter-add, where F.grid_sample's on CUDA adds with atomics), and PyTorch otherwise.

    Raises:
        ValueError: for an unknown backend name.
        RuntimeError: when "triton" is asked for and Triton cannot run here.
    """
    if backend not in _BACKENDS:
        raise ValueError(f"expected backend in {_BACKENDS}, got {backend!r}")
    if backend == "triton" and not triton_available():
        raise RuntimeError("backend='triton' was asked for, but the Triton kernels cannot be imported here")
    if backend != "auto":
        return backend  # type: ignore[return-value]
    if not x.is_cuda:
        return "torch"
    if needs_grad and torch.are_deterministic_algorithms_enabled():
        return "reference"
    if (family, "backward" if needs_grad else "forward") in _AUTO_TRITON and triton_available():
        return "triton"
    return "torch"


def _implementation(backend: str, family: str) -> FamilyFn:
    if backend == "triton" and "triton" not in _TABLE:
        from . import triton_ops

        _TABLE["triton"] = triton_ops.FAMILIES
    return _TABLE[backend][family]


def _sample(family: str, x: Tensor, params: Tensor, aux: Tensor | None, spec: Spec, backend: str) -> Tensor:
    # The one dispatch of every public op, after validation.
    needs_grad = torch.is_grad_enabled() and (x.requires_grad or params.requires_grad)
    return _implementation(resolve_backend(backend, x, family, needs_grad), family)(x, params, aux, spec)


# --------------------------------------------------------------------------------------------------------------
# validation
# --------------------------------------------------------------------------------------------------------------
def _check_image(x: Tensor) -> None:
    if not isinstance(x, Tensor):
        raise ValueError(f"expected the image to be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 4:
        raise ValueError(f"expected an image of shape (B, C, H, W), got shape {tuple(x.shape)}")
    if x.dtype not in _IMAGE_DTYPES:
        raise ValueError(f"expected an image of dtype float16, bfloat16, float32 or float64, got {x.dtype}")
    if x.shape[1] < 1 or x.shape[2] < 1 or x.shape[3] < 1:
        raise ValueError(f"expected an image with C, H and W of at least 1, got shape {tuple(x.shape)}")


def _check_params(x: Tensor, params: Tensor, name: str, tail: tuple[int, ...]) -> None:
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


def _spec(
    x: Tensor, size: int | tuple[int, int], align_corners: bool, padding_mode: str, mode: str, fill: float
) -> Spec:
    # Validates the image and the options; returns them as the backends take them.
    _check_image(x)
    if padding_mode not in _PADDINGS:
        raise ValueError(f"expected padding_mode in {_PADDINGS}, got {padding_mode!r}")
    if mode not in _MODES:
        raise ValueError(f"expected mode in {_MODES}, got {mode!r}")
    return Spec(normalize_size(size), bool(align_corners), padding_mode, mode, float(fill))


def _default_target_points(control_points: Tensor, device: torch.device) -> Tensor:
    # The square lattice that matches control_points (B, K, N, 2), one tensor per lattice and device, so that its
    # solve is cached too (reference._tps_solver). N must be a square number.
    n = control_points.shape[-2] if control_points.dim() >= 2 else 0
    side = round(n**0.5)
    if side * side != n or side < 2:
        raise ValueError(
            f"expected N = n * n control points for the default lattice, got {tuple(control_points.shape)}; "
            "pass target_points for other layouts"
        )
    key = (side, torch.device(device))
    if not torch.compiler.is_compiling() and key in _DEFAULT_TARGETS:
        return _DEFAULT_TARGETS[key]
    target = tps_target_points(side, device=device)
    if reference._cacheable(target):
        _DEFAULT_TARGETS[key] = target
    return target


_DEFAULT_TARGETS: dict[tuple[int, torch.device], Tensor] = {}


# --------------------------------------------------------------------------------------------------------------
# the public ops
# --------------------------------------------------------------------------------------------------------------
def sample_affine(
    x: Tensor, theta: Tensor, size: int | tuple[int, int], *, align_corners: bool = False,
    padding_mode: Padding = "zeros", mode: Mode = "bilinear", fill: float = 0.0, backend: Backend = "auto",
) -> Tensor:  # fmt: skip
    """Sample K affine warps of each image.

    Args:
        x: images (B, C, H, W), any strides, float16, bfloat16, float32 or float64.
        theta: (B, K, 2, 3) matrices from output to input normalised coordinates, the ``F.affine_grid``
            convention: [x_s, y_s] = theta @ [x_t, y_t, 1].
        size: output size (Ho, Wo), or an int for a square output.
        align_corners: whether -1 and 1 are the centres (True) or the outer edges (False) of the corner pixels.
        padding_mode: "zeros" or "border".
        mode: "bilinear" or "nearest".
        fill: what each corner outside the image reads with zeros padding, and the output at non-finite points in
            either padding (the Triton kernels take it as a float32 scalar).
        backend: "auto", "torch", "triton" or "reference" (see the module docstring).

    Returns:
        The samples (B, K, C, Ho, Wo), contiguous, in x's dtype.
    """
    spec = _spec(x, size, align_corners, padding_mode, mode, fill)
    _check_params(x, theta, "theta", (2, 3))
    return _sample("affine", x, theta, None, spec, backend)


def sample_projective(
    x: Tensor, h: Tensor, size: int | tuple[int, int], *, align_corners: bool = False,
    padding_mode: Padding = "zeros", mode: Mode = "bilinear", fill: float = 0.0, backend: Backend = "auto",
) -> Tensor:  # fmt: skip
    """Sample K projective warps of each image.

    Args:
        x: images (B, C, H, W).
        h: (B, K, 3, 3) homographies on normalised coordinates: [a, b, w] = h @ [x_t, y_t, 1] and the source point
            is (a / w, b / w). Points with |w| < ``kernels.reference.PROJECTIVE_EPS`` read ``fill``.
        size, align_corners, padding_mode, mode, fill, backend: as for :func:`sample_affine`.

    Returns:
        The samples (B, K, C, Ho, Wo).
    """
    spec = _spec(x, size, align_corners, padding_mode, mode, fill)
    _check_params(x, h, "h", (3, 3))
    return _sample("projective", x, h, None, spec, backend)


def sample_tps(
    x: Tensor, control_points: Tensor, size: int | tuple[int, int], *, target_points: Tensor | None = None,
    align_corners: bool = False, padding_mode: Padding = "zeros", mode: Mode = "bilinear", fill: float = 0.0,
    backend: Backend = "auto",
) -> Tensor:  # fmt: skip
    """Sample K thin-plate-spline warps of each image.

    The spline coefficients come from one small solve (a product with a constant matrix, :func:`tps_coefficients`)
    in PyTorch, shared by every backend; the backend then evaluates the spline and samples.

    Args:
        x: images (B, C, H, W).
        control_points: (B, K, N, 2) where each target control point lands in the input, normalised (x, y).
        size: output size (Ho, Wo), or an int.
        target_points: (N, 2) fixed control points in output coordinates (they receive no gradient in the Triton
            kernels); default a regular sqrt(N) x sqrt(N) lattice over [-1, 1]^2 (:func:`tps_target_points`).
        align_corners, padding_mode, mode, fill, backend: as for :func:`sample_affine`.

    Returns:
        The samples (B, K, C, Ho, Wo).
    """
    spec = _spec(x, size, align_corners, padding_mode, mode, fill)
    if target_points is None:
        target_points = _default_target_points(control_points, x.device)
    if not isinstance(target_points, Tensor) or target_points.dim() != 2 or target_points.shape[1] != 2:
        shape = tuple(target_points.shape) if isinstance(target_points, Tensor) else type(target_points).__name__
        raise ValueError(f"expected target points of shape (N, 2), got {shape}")
    _check_params(x, control_points, "control_points", (target_points.shape[0], 2))
    coefficients = tps_coefficients(control_points, target_points)
    return _sample("tps", x, coefficients, target_points, spec, backend)


def sample_grid(
    x: Tensor, grid: Tensor, *, align_corners: bool = False, padding_mode: Padding = "zeros", mode: Mode = "bilinear",
    fill: float = 0.0, backend: Backend = "auto",
) -> Tensor:  # fmt: skip
    """Sample K explicit grids from each image, for any other warp.

    Args:
        x: images (B, C, H, W).
        grid: (B, K, Ho, Wo, 2) normalised (x, y) sampling points in the input, as for ``F.grid_sample``.
        align_corners, padding_mode, mode, fill, backend: as for :func:`sample_affine`.

    Returns:
        The samples (B, K, C, Ho, Wo).
    """
    if not isinstance(grid, Tensor) or grid.dim() != 5 or grid.shape[-1] != 2:
        shape = tuple(grid.shape) if isinstance(grid, Tensor) else type(grid).__name__
        raise ValueError(f"expected a grid of shape (B, K, Ho, Wo, 2), got {shape}")
    spec = _spec(x, (grid.shape[2], grid.shape[3]), align_corners, padding_mode, mode, fill)
    _check_params(x, grid, "grid", tuple(grid.shape[2:]))
    return _sample("grid", x, grid, None, spec, backend)
