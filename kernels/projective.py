"""The projective family of the Triton sampler: its coordinate map, its parameter-gradient epilogue, its public op.

The kernels multiply h (B, K, 3, 3) by the pixel scales of the sizes (``affine.matrix_inputs``) into pixel matrices
M with [a, b, w] = M (u, v, 1) on centred output pixels (u, v) and ix = a / w + (W - 1) / 2
(``reference.projective_to_pixels``). Points with non-finite a, b, w or |w| < PROJECTIVE_EPS read ``fill`` and pass
no gradient. The backward reduces d loss / d h inside the kernel into one partial sum per program (B, K, programs
per (b, k), 3, 3), summed in PyTorch. With zeros padding the image gradient can be gathered (kernels/_gather.py).
"""

from __future__ import annotations

import triton
import triton.language as tl
from torch import Tensor

from . import reference
from ._autograd import register, sample
from ._device import _div, _matrix_param_grad, _pixel_matrix, _projective_map
from .affine import matrix_inputs
from .reference import Mode, Padding
from .sampler import Family

__all__ = ["PROJECTIVE", "sample_projective"]

_EPS = tl.constexpr(reference.PROJECTIVE_EPS)


@triton.jit
def _projective_coords(
    m_ptr,
    a_ptr,
    s_ptr,
    bk,
    K,
    N,
    i,
    j,
    pmask,
    H,
    W,
    Ho,
    Wo,
    spb,
    spk,
    sph,
    spw,
    spd,
    CDT: tl.constexpr,
    FMAX: tl.constexpr,
):
    # The coordinates of _projective_map under the pixel homography of (b, k).
    m00, m01, m02, m10, m11, m12, m20, m21, m22 = _pixel_matrix(m_ptr, s_ptr, bk, 3, CDT)
    ix, iy, ok, u, v, a, b, w = _projective_map(
        m00, m01, m02, m10, m11, m12, m20, m21, m22, i, j, H, W, Ho, Wo, CDT, FMAX, _EPS
    )
    return ix, iy, pmask & ok, u, v, a, b, w


@triton.jit
def _projective_param_grad(
    part_ptr, slot, bk, c_lo, i, j, pmask, gix, giy, u, v, a, b, w, a_ptr, s_ptr, N, C, Ho, Wo,
    CGROUP: tl.constexpr, CDT: tl.constexpr,
):  # fmt: skip
    # d loss / d (a, b, w) from ix = a / w + cx, iy = b / w + cy (zero where invalid: gix = giy = 0 there), then the
    # program's partial sum of d loss / d h (9 entries at slot).
    ga = _div(gix, w)
    gb = _div(giy, w)
    gw = -_div(gix * a, w * w) - _div(giy * b, w * w)
    _matrix_param_grad(part_ptr, slot, ga, gb, gw, u, v, s_ptr, 3)


def _reference(x, h, aux, size, align_corners, padding_mode, mode, fill):  # type: ignore[no-untyped-def]
    options = {"align_corners": align_corners, "padding_mode": padding_mode, "mode": mode, "fill": fill}
    return reference.sample_projective(x, h, size, **options)


PROJECTIVE = register(
    Family(
        "projective", "sample_projective", _projective_coords, _projective_param_grad, matrix_inputs, _reference,
        gather="projective",
    )
)  # fmt: skip


def sample_projective(
    x: Tensor,
    h: Tensor,
    size: int | tuple[int, int],
    *,
    align_corners: bool = False,
    padding_mode: Padding = "zeros",
    mode: Mode = "bilinear",
    fill: float = 0.0,
    image_grad: str | None = None,
) -> Tensor:
    """Sample K projective warps of each image with the Triton kernels; see :func:`kernels.reference.sample_projective`.

    Args:
        x: images (B, C, H, W), any strides, float16, bfloat16, float32 or float64.
        h: (B, K, 3, 3) homographies on normalised coordinates.
        size: output size (Ho, Wo), or an int.
        align_corners, padding_mode, mode: as for ``F.grid_sample``.
        fill, image_grad: as for :func:`kernels.affine.sample_affine`.

    Returns:
        (B, K, C, Ho, Wo), contiguous, in x's dtype.
    """
    reference.check_image(x)
    reference.check_params(x, h, "h", (3, 3))
    reference.check_options(padding_mode, mode)
    size = reference.normalize_size(size)
    return sample(PROJECTIVE, x, h, None, size, align_corners, padding_mode, mode, fill, image_grad)
