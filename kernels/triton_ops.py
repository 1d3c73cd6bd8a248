"""The Triton implementation of the public sampling ops, with exactly the signatures of kernels.reference.

Importing this module imports triton; an ImportError here is how :func:`kernels.triton_available` learns that
the Triton backend cannot run. On CUDA tensors the ops go through torch.library ops (``stn_lightning::*``, made
with triton_op / wrap_triton where the installed torch has them, so torch.compile(fullgraph=True) traces them
without a graph break); on CPU tensors under TRITON_INTERPRET=1 they run the same kernels through Triton's
interpreter via plain autograd.Functions.
"""

from __future__ import annotations

import triton  # noqa: F401 - fails with ImportError where Triton is not installed

from .affine import sample_affine
from .grid import sample_grid
from .projective import sample_projective
from .tps import sample_tps_coefficients

__all__ = ["sample_affine", "sample_grid", "sample_projective", "sample_tps_coefficients"]
