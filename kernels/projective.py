"""The projective family of the Triton sampler: its coordinate map, its parameter-gradient epilogue, its preparation.

The kernels multiply h (B, K, 3, 3) by the pixel scales of the sizes (``affine.matrix_inputs``) into pixel matrices
M with [a, b, w] = M (u, v, 1) on centred output pixels (u, v) and ix = a / w + (W - 1) / 2
(``reference.projective_to_pixels``). Points with non-finite a, b, w or |w| < PROJECTIVE_EPS read ``fill`` and pass
no gradient. The backward reduces d loss / d h inside the kernel into one partial sum per program (B, K, programs
per (b, k), 3, 3), summed in PyTorch.
"""

from __future__ import annotations

import triton
import triton.language as tl
from torch import Tensor

from . import reference
from ._autograd import register, sample
from ._device import _div, _matrix_param_grad, _pixel_matrix, _projective_map
from .affine import matrix_inputs
from .reference import Spec
from .sampler import Family

__all__ = ["PROJECTIVE", "projective"]

_EPS = tl.constexpr(reference.PROJECTIVE_EPS)


@triton.jit
def _projective_coords(
    m_ptr, a_ptr, s_ptr, bk, K, N, i, j, pmask, H, W, Ho, Wo, CDT: tl.constexpr, FMAX: tl.constexpr,
):  # fmt: skip
    # The coordinates of _projective_map under the pixel homography of (b, k).
    m00, m01, m02, m10, m11, m12, m20, m21, m22 = _pixel_matrix(m_ptr, s_ptr, bk, 3, CDT)
    ix, iy, ok, u, v, a, b, w = _projective_map(
        m00, m01, m02, m10, m11, m12, m20, m21, m22, i, j, H, W, Ho, Wo, CDT, FMAX, _EPS
    )
    return ix, iy, pmask & ok, (u, v, a, b, w)


@triton.jit
def _projective_param_grad(
    part_ptr, slot, bk, c_lo, i, j, pmask, gix, giy, terms, a_ptr, s_ptr, N, C, Ho, Wo,
    CGROUP: tl.constexpr, CDT: tl.constexpr,
):  # fmt: skip
    # d loss / d (a, b, w) from ix = a / w + cx, iy = b / w + cy (zero where invalid: gix = giy = 0 there), then the
    # program's partial sum of d loss / d h (9 entries at slot).
    u, v, a, b, w = terms
    ga = _div(gix, w)
    gb = _div(giy, w)
    gw = -_div(gix * a, w * w) - _div(giy * b, w * w)
    _matrix_param_grad(part_ptr, slot, ga, gb, gw, u, v, s_ptr, 3)


PROJECTIVE = register(
    Family("projective", _projective_coords, _projective_param_grad, matrix_inputs, reference.projective)
)


def projective(x: Tensor, h: Tensor, aux: None, spec: Spec) -> Tensor:
    """kernels.sample_projective's Triton implementation, for validated inputs."""
    return sample(PROJECTIVE, x, h, aux, spec)
