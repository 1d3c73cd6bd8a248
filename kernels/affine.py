"""The affine family of the Triton sampler: its coordinate map, its parameter-gradient epilogue, its preparation.

The kernels multiply theta (B, K, 2, 3) by the pixel scales of the sizes (:func:`matrix_inputs`) into pixel
matrices M with ix = M[0] . (u, v, 1) + (W - 1) / 2 on centred output pixels (u, v) (``reference.affine_to_pixels``).
The backward reduces d loss / d theta inside the kernel into one partial sum per program (B, K, programs per
(b, k), 2, 3), summed in PyTorch: no grid gradient ever reaches memory.
"""

from __future__ import annotations

import triton
import triton.language as tl
from torch import Tensor

from . import reference
from ._autograd import register, sample
from ._device import _affine_map, _matrix_param_grad, _pixel_matrix
from .reference import Spec
from .sampler import Family

__all__ = ["AFFINE", "affine", "matrix_inputs"]


@triton.jit
def _affine_coords(
    m_ptr, a_ptr, s_ptr, bk, K, N, i, j, pmask, H, W, Ho, Wo, CDT: tl.constexpr, FMAX: tl.constexpr,
):  # fmt: skip
    # The coordinates of _affine_map under the pixel matrix of (b, k). Every point is valid.
    m00, m01, m02, m10, m11, m12, _, _, _ = _pixel_matrix(m_ptr, s_ptr, bk, 2, CDT)
    ix, iy, u, v = _affine_map(m00, m01, m02, m10, m11, m12, i, j, H, W, Ho, Wo, CDT)
    return ix, iy, pmask, (u, v)


@triton.jit
def _affine_param_grad(
    part_ptr, slot, bk, c_lo, i, j, pmask, gix, giy, terms, a_ptr, s_ptr, N, C, Ho, Wo,
    CGROUP: tl.constexpr, CDT: tl.constexpr,
):  # fmt: skip
    # d loss / d (a, b) = (gix, giy) with ix = a + cx, iy = b + cy: the partial sum of d loss / d theta at slot.
    u, v = terms
    _matrix_param_grad(part_ptr, slot, gix, giy, giy, u, v, s_ptr, 2)


def matrix_inputs(x: Tensor, params: Tensor, aux: Tensor | None, spec: Spec) -> tuple[Tensor, Tensor, Tensor]:
    """What the affine and projective kernels read: the parameters (B, K, 2 or 3, 3) in the compute dtype,
    contiguous (no copy of the usual float32 parameters), and twice the (2 or 3, 3) pixel scales of the sizes
    (``reference.pixel_scale_matrix``, a cached constant; as the auxiliary tensor and the scalars). The kernels
    multiply the two, entry by entry, into the pixel matrices of ``reference.affine_to_pixels`` /
    ``projective_to_pixels`` (the same products, rounded once), and scale their partial sums of d loss / d M by the
    same factors: the parameters' gradient. Done on the host, the product cost a launch and an autograd node per
    call (benchmarks/RESULTS-kernels.md)."""
    dtype = reference.compute_dtype(x, params)
    in_size = (x.shape[-2], x.shape[-1])
    scale = reference.pixel_scale_matrix(params.shape[2], in_size, spec.size, spec.align_corners, dtype, params)
    return params.to(dtype).contiguous(), scale, scale


AFFINE = register(Family("affine", _affine_coords, _affine_param_grad, matrix_inputs, reference.affine))


def affine(x: Tensor, theta: Tensor, aux: None, spec: Spec) -> Tensor:
    """kernels.sample_affine's Triton implementation, for validated inputs."""
    return sample(AFFINE, x, theta, aux, spec)
