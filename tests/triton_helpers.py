"""Helpers shared by the Triton kernel tests. Import after TRITON_INTERPRET is decided (tests/conftest.py)."""

from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]

# Tolerances (rtol, atol) per image dtype for the output, the image gradient and the parameter gradient.
# float64: both sides compute in float64; only summation order differs.
# float32: outputs follow the reference's operations one for one (usually bit-equal); gradients are sums in a
#   different order (atomics or gathers, per-tile partial sums vs autograd), ~1e-6 relative, parameter sums over
#   many pixels.
# float16 / bfloat16: same float32 arithmetic, differences come from rounding the result to 11 / 8 bits.
TOL = {
    torch.float64: ((1e-12, 1e-12), (1e-12, 1e-12), (1e-10, 1e-10)),
    torch.float32: ((1e-5, 1e-5), (1e-5, 1e-5), (1e-4, 1e-4)),
    torch.float16: ((1e-3, 1e-3), (2e-3, 2e-3), (1e-3, 1e-3)),
    torch.bfloat16: ((1e-2, 1e-2), (1.6e-2, 1.6e-2), (1e-3, 1e-3)),
}


def interpreter_active() -> bool:
    """Whether this process's triton runs kernels through the interpreter (decided when triton was imported)."""
    import triton
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(triton.language.standard.cdiv, InterpretedFunction)


def image(b: int, c: int, h: int, w: int, dtype=torch.float32, channels_last: bool = False, seed: int = 0):
    """A seeded random image batch (B, C, H, W), optionally channels_last."""
    x = torch.randn(b, c, h, w, generator=torch.Generator().manual_seed(seed)).to(dtype)
    return x.to(memory_format=torch.channels_last) if channels_last else x


def force_int64(monkeypatch) -> None:
    """Make every launcher take the int64 offset code (IDX64), which real sizes reach only past 2**31 elements."""
    import importlib

    monkeypatch.setattr(importlib.import_module("stn_lightning.kernels.sampler"), "needs_int64", lambda *tensors: True)
