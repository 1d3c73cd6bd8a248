"""The Triton implementation of the public sampling ops, with exactly the signatures of kernels.reference.

Importing this module imports triton; an ImportError here is how :func:`kernels.triton_available` learns that
the Triton backend cannot run. Eager calls launch the kernels from plain autograd.Functions (or, when nothing needs
a gradient, directly), on CUDA tensors or, under TRITON_INTERPRET=1, on CPU tensors through Triton's interpreter.
While torch.compile traces, the ops go through torch.library ops instead (``stn_lightning::*``, made with
triton_op / wrap_triton where the installed torch has them), so that torch.compile(fullgraph=True) keeps the
kernels in its graph without a graph break (``kernels._common.use_library_op``).
"""

from __future__ import annotations

import triton  # noqa: F401 - fails with ImportError where Triton is not installed

from .affine import sample_affine
from .grid import sample_grid
from .projective import sample_projective
from .tps import sample_tps_coefficients

__all__ = ["sample_affine", "sample_grid", "sample_projective", "sample_tps_coefficients"]
