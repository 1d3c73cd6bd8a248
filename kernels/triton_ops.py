"""The Triton backend: one function per family, for kernels/__init__.py's dispatch table (``FAMILIES``).

Importing this module imports triton; an ImportError here is how :func:`kernels.triton_available` learns that the
Triton backend cannot run. Every family (kernels/affine.py, projective.py, tps.py, grid.py) is a specialisation of
the one sampler (kernels/sampler.py: its kernels and launchers; kernels/_autograd.py: its autograd.Function and its
torch.library op). Eager calls launch the kernels from the autograd.Function (or, when nothing needs a gradient,
directly), on CUDA tensors or, under TRITON_INTERPRET=1, on CPU tensors through Triton's interpreter; while
torch.compile traces, they go through the torch.library op ``stn_lightning::sample``.
"""

from __future__ import annotations

import triton  # noqa: F401 - fails with ImportError where Triton is not installed

from .affine import affine
from .grid import grid
from .projective import projective
from .reference import FamilyFn
from .tps import tps

__all__ = ["FAMILIES"]

#: family -> fn(x, params, aux, spec) for validated inputs (see kernels/__init__.py).
FAMILIES: dict[str, FamilyFn] = {"affine": affine, "projective": projective, "tps": tps, "grid": grid}
