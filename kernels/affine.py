"""The affine family of the Triton sampler: its coordinate map, its parameter-gradient epilogue, its public op.

The kernels multiply theta (B, K, 2, 3) by the pixel scales of the sizes (:func:`matrix_inputs`) into pixel
matrices M with ix = M[0] . (u, v, 1) + (W - 1) / 2 on centred output pixels (u, v) (``reference.affine_to_pixels``).
The backward reduces d loss / d theta inside the kernel into one partial sum per program (B, K, programs per
(b, k), 2, 3), summed in PyTorch: no grid gradient ever reaches memory. With zeros padding the image gradient can be
gathered without atomics (kernels/_gather.py; ``image_grad="gather"``, and always under
torch.use_deterministic_algorithms).
"""

from __future__ import annotations

import triton
import triton.language as tl
from torch import Tensor

from . import reference
from ._autograd import register, sample
from ._device import _affine_map, _matrix_param_grad, _pixel_matrix
from .reference import Mode, Padding
from .sampler import Family

__all__ = ["AFFINE", "matrix_inputs", "sample_affine"]


@triton.jit
def _affine_coords(
    m_ptr, a_ptr, s_ptr, bk, K, N, i, j, pmask, H, W, Ho, Wo, spb, spk, sph, spw, spd,
    CDT: tl.constexpr, FMAX: tl.constexpr,
):  # fmt: skip
    # The coordinates of _affine_map under the pixel matrix of (b, k). Every point is valid.
    m00, m01, m02, m10, m11, m12, _, _, _ = _pixel_matrix(m_ptr, s_ptr, bk, 2, CDT)
    ix, iy, u, v = _affine_map(m00, m01, m02, m10, m11, m12, i, j, H, W, Ho, Wo, CDT)
    return ix, iy, pmask, u, v, u, u, u


@triton.jit
def _affine_param_grad(
    part_ptr, slot, bk, c_lo, i, j, pmask, gix, giy, u, v, e2, e3, e4, a_ptr, s_ptr, N, C, Ho, Wo,
    CGROUP: tl.constexpr, CDT: tl.constexpr,
):  # fmt: skip
    # d loss / d (a, b) = (gix, giy) with ix = a + cx, iy = b + cy: the partial sum of d loss / d theta at slot.
    _matrix_param_grad(part_ptr, slot, gix, giy, giy, u, v, s_ptr, 2)


def matrix_inputs(
    x: Tensor, params: Tensor, aux: Tensor | None, size: tuple[int, int], align_corners: bool
) -> tuple[Tensor, Tensor, Tensor]:
    """What the affine and projective kernels read: the parameters (B, K, 2 or 3, 3) in the compute dtype,
    contiguous (no copy of the usual float32 parameters), and twice the (2 or 3, 3) pixel scales of the sizes
    (``reference.pixel_scale_matrix``, a cached constant; as the auxiliary tensor and the scalars). The kernels
    multiply the two, entry by entry, into the pixel matrices of ``reference.affine_to_pixels`` /
    ``projective_to_pixels`` (the same products, rounded once), and scale their partial sums of d loss / d M by the
    same factors: the parameters' gradient. Done on the host, the product cost a launch and an autograd node per
    call (benchmarks/RESULTS-kernels.md). The gather backward takes the product from the host."""
    dtype = reference.compute_dtype(x, params)
    in_size = (x.shape[-2], x.shape[-1])
    scale = reference.pixel_scale_matrix(params.shape[2], in_size, size, align_corners, dtype, params)
    return params.to(dtype).contiguous(), scale, scale


def _reference(x, theta, aux, size, align_corners, padding_mode, mode, fill):  # type: ignore[no-untyped-def]
    options = {"align_corners": align_corners, "padding_mode": padding_mode, "mode": mode, "fill": fill}
    return reference.sample_affine(x, theta, size, **options)


AFFINE = register(
    Family("affine", "sample_affine", _affine_coords, _affine_param_grad, matrix_inputs, _reference, gather="affine")
)


def sample_affine(
    x: Tensor,
    theta: Tensor,
    size: int | tuple[int, int],
    *,
    align_corners: bool = False,
    padding_mode: Padding = "zeros",
    mode: Mode = "bilinear",
    fill: float = 0.0,
    image_grad: str | None = None,
) -> Tensor:
    """Sample K affine warps of each image with the Triton kernels; see :func:`kernels.reference.sample_affine`.

    Args:
        x: images (B, C, H, W), any strides, float16, bfloat16, float32 or float64.
        theta: (B, K, 2, 3), the ``F.affine_grid`` convention.
        size: output size (Ho, Wo), or an int.
        align_corners, padding_mode, mode: as for ``F.grid_sample``.
        fill: what points outside the image read with zeros padding (and invalid points with either padding),
            rounded to float32 (a kernel scalar) and then to x's dtype.
        image_grad: "scatter" or "gather" (see ``kernels._autograd.SamplerOptions``); None: ``options.image_grad``.

    Returns:
        (B, K, C, Ho, Wo), contiguous, in x's dtype.
    """
    reference.check_image(x)
    reference.check_params(x, theta, "theta", (2, 3))
    reference.check_options(padding_mode, mode)
    size = reference.normalize_size(size)
    return sample(AFFINE, x, theta, None, size, align_corners, padding_mode, mode, fill, image_grad)
