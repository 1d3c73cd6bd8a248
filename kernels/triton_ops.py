"""The Triton implementation of the public sampling ops, with the signatures of kernels.reference (plus ``fill``
and ``image_grad``).

Importing this module imports triton; an ImportError here is how :func:`kernels.triton_available` learns that
the Triton backend cannot run. Every op is one family (kernels/affine.py, projective.py, tps.py, grid.py) of the
one sampler (kernels/sampler.py: its kernels and launchers; kernels/_autograd.py: its autograd.Function, its
torch.library op and its options). Eager calls launch the kernels from the autograd.Function (or, when nothing needs
a gradient, directly), on CUDA tensors or, under TRITON_INTERPRET=1, on CPU tensors through Triton's interpreter;
while torch.compile traces, they go through the torch.library op ``stn_lightning::sample``.
"""

from __future__ import annotations

import triton  # noqa: F401 - fails with ImportError where Triton is not installed

from ._autograd import SamplerOptions, options
from .affine import sample_affine
from .grid import sample_grid
from .projective import sample_projective
from .tps import sample_tps_coefficients

__all__ = [
    "SamplerOptions",
    "options",
    "sample_affine",
    "sample_grid",
    "sample_projective",
    "sample_tps_coefficients",
]
