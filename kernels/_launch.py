"""Launch and tuning of the Triton sampler: tile and channel choices, the forward's autotuner, the launch itself.

Nothing here is read from the environment: the only switch, TRITON_INTERPRET, is Triton's own, decided when triton
is imported (``interpreting``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from typing import Any

import torch
import triton
from torch import Tensor
from triton.runtime.interpreter import InterpretedFunction

from ._device import _tile_coords

__all__ = [
    "CHANNEL_GROUP",
    "FWD_CONFIG_INTERPRET",
    "FWD_MAX_BLOCK_C",
    "HAS_LIBRARY_OPS",
    "block_c",
    "bwd_config",
    "cdiv",
    "channel_group",
    "device_context",
    "fwd_autotune",
    "fwd_block_c",
    "interpreting",
    "launch",
    "needs_int64",
    "num_tiles",
    "programs_per_plane",
]

#: torch.library.triton_op / wrap_triton exist (torch >= 2.6); without them the ops are plain autograd.Functions.
HAS_LIBRARY_OPS = hasattr(torch.library, "triton_op") and hasattr(torch.library, "wrap_triton")

# Triton decides when a @triton.jit function is defined whether it runs compiled or through the interpreter
# (TRITON_INTERPRET=1), so ask a kernel of this module rather than the environment (a constant is also what
# torch.compile traces best).
_INTERPRETED = isinstance(_tile_coords, InterpretedFunction)


def interpreting() -> bool:
    """Whether the kernels run through Triton's interpreter (TRITON_INTERPRET=1 when they were imported)."""
    return _INTERPRETED


def needs_int64(*tensors: Tensor) -> bool:
    """Whether any offset into these tensors (or a product of a channel index and a plane size) can pass 2**31."""
    limit = 2**31 - 1
    for t in tensors:
        if t.numel() >= limit:
            return True
        if t.is_contiguous() or (t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last)):
            continue  # dense: the largest offset is numel - 1 (the loop below costs microseconds per call)
        span = sum((s - 1) * abs(st) for s, st in zip(t.shape, t.stride(), strict=True) if s > 0)
        if span >= limit:
            return True
    return False


def num_tiles(ho: int, wo: int, block_h: int, block_w: int) -> int:
    """Tiles of one (b, k) output plane."""
    return cdiv(ho, block_h) * cdiv(wo, block_w)


def programs_per_plane(channels: int, ho: int, wo: int, meta: dict[str, Any]) -> int:
    """Programs (and partial-sum slots) per (b, k) of a sampling kernel with ``meta``'s tile and channel group:
    channel groups times tiles (see _tile_coords)."""
    return cdiv(channels, meta["CGROUP"]) * num_tiles(ho, wo, meta["BLOCK_H"], meta["BLOCK_W"])


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for positive b, in plain Python (triton.cdiv costs microseconds per call on the host)."""
    return -(-a // b)


def device_context(x: Tensor) -> contextlib.AbstractContextManager:
    """torch.cuda.device(x.device) for CUDA tensors (Triton launches on the current device), else a no-op."""
    return torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext()


def block_c(channels: int, cap: int) -> int:
    """Channels per block: the next power of two of C, at most ``cap``."""
    # int(): a symbolic C (torch.compile) is specialised; 1 << bit_length is the next power of two, in plain Python.
    return min(1 << (int(channels) - 1).bit_length(), cap)


#: Channels per load in the forward when SPLIT_C is off. With 8, ptxas (triton 3.6, sm_90) needed 198 to 255
#: registers per thread and spilled on an 8 x 32 tile; with 4, 105 to 200 and no spills (benchmarks/sass_report.py).
FWD_MAX_BLOCK_C = 4

#: Most channels per program on GPUs (CGROUP, a power of two). With all channels in one program, feature maps
#: (feat56x2: B 64, C 128, K 2 x 28 x 28) made 512 programs of 8 warps, under one wave on an H100's 132 SMs, each
#: looping over 128 channels one dependent gather after the other; in groups of 16 they make 4096. The coordinates
#: are computed once per group, which costs little next to 16 channels of gathers.
CHANNEL_GROUP = 16


def channel_group(channels: int) -> int:
    """Channels per program: the next power of two of C, at most ``CHANNEL_GROUP`` on GPUs and 4 under the
    interpreter, where blocks take at most 2 (``fwd_block_c``, ``bwd_config``), so that the tests' C of 3 to 5 span
    several groups and several blocks per group."""
    return block_c(channels, 4 if interpreting() else CHANNEL_GROUP)


def fwd_block_c(channels: int) -> int:
    """Channels per load in the forward without SPLIT_C: at most ``FWD_MAX_BLOCK_C`` on GPUs, 2 under the
    interpreter (see ``channel_group``); never more than a group."""
    return block_c(channels, 2 if interpreting() else FWD_MAX_BLOCK_C)


#: Forward tile shapes tried by the autotuner on GPUs (BLOCK_H, BLOCK_W, num_warps): two pixels per thread, and
#: one (16 x 16 on 8 warps, 8 x 16 on 4), where each warp's gather instruction reads 32 neighbouring pixels. Each
#: is tried with and without SPLIT_C, so the first call of a forward kernel for a new shape compiles and times 6.
_FWD_CONFIGS = ((8, 32, 4), (16, 16, 8), (8, 16, 4))


def fwd_autotune(kernel: Callable) -> Callable:
    """Wrap a forward kernel in an autotuner over tile shapes and channel blocking, keyed by sizes and options.

    Each tile shape is tried twice: with the launcher's BLOCK_C channels per load (SPLIT_C False; for 3 channels
    one lane in four idles and the registers double) and one channel at a time in a loop (SPLIT_C True). Which
    is faster depends on the card and the shapes, so the autotuner measures it.
    """
    configs = [
        triton.Config({"BLOCK_H": h, "BLOCK_W": w, "SPLIT_C": split}, num_warps=nw)
        for h, w, nw in _FWD_CONFIGS
        for split in (False, True)
    ]
    key = ["C", "H", "W", "Ho", "Wo", "COORDS", "HAS_FILL", "BORDER", "NEAREST", "BLOCK_C", "CGROUP", "IDX64"]
    return triton.autotune(configs=configs, key=key)(kernel)


#: The single forward config used under the interpreter (no autotuning there: it would time Python).
FWD_CONFIG_INTERPRET = {"BLOCK_H": 8, "BLOCK_W": 8, "SPLIT_C": False}


def bwd_config(channels: int) -> dict[str, int]:
    """Backward tile: fixed (the parameter partial sums need the tile count before launch).

    On GPUs one pixel per thread (16 x 16 pixels on 8 warps) and one channel at a time: with these, ptxas (sm_90)
    needs 55 to 64 registers per thread and the tile's reductions a handful of barriers, where two channel-pixel
    elements per thread took 110 to 130 registers (benchmarks/sass_report.py), and the per-channel loop matches the
    straightforward kernel that was the timing target when these kernels were specified (1.31 ms for the backward
    of cub448x4), against our 2.1 ms with 4 channels per block. Under the interpreter, 8 x 8 pixels and up to 2
    channels per block, so that the tests' tiny images span several tiles and channel blocks (C of 1 in the tests
    runs the GPUs' one-channel path).
    Programs take ``channel_group`` channels each, so a (b, k) has ``programs_per_plane`` partial-sum slots.
    """
    if interpreting():
        block_h, block_w, bc, warps = 8, 8, block_c(channels, 2), 4
    else:
        block_h, block_w, bc, warps = 16, 16, 1, 8
    return {
        "BLOCK_H": block_h,
        "BLOCK_W": block_w,
        "BLOCK_C": bc,
        "CGROUP": channel_group(channels),
        "num_warps": warps,
    }


#: The configuration the autotuner chose, per autotuned kernel and call signature (see ``launch``).
_TUNED_CONFIGS: dict[tuple, Any] = {}


def launch(kernel: Any, tuned: Any | None, grid: Any, args: Sequence[Any], meta: dict, wrap: bool) -> None:
    """Launch ``kernel`` (or its autotuned wrapper ``tuned``); ``wrap`` routes it through torch.library.wrap_triton.

    ``kernel`` and ``tuned`` are Triton kernel handles (JITFunction / Autotuner, or the interpreter's wrappers),
    launched with the untyped ``handle[grid](...)`` syntax, hence ``Any``.

    An autotuned kernel goes through its autotuner once per call signature (the options in ``meta``, the scalar
    arguments and the tensors' dtypes: at least what the autotuner keys on); later calls launch the plain kernel
    with the configuration it chose. The autotuner rebuilds its key from every argument on every call: 29 us of host
    time per call on the development machine's CPU, against 9 to 13 us for this lookup and the plain kernel's launch
    (both measured with Triton's own launch stubbed out; benchmarks/RESULTS-kernels.md).

    Under the interpreter the plain kernel runs with ``FWD_CONFIG_INTERPRET`` when it is autotuned.
    """
    if interpreting():
        if tuned is not None:
            meta = {**meta, **FWD_CONFIG_INTERPRET}
        kernel[grid](*args, **meta)
        return
    if wrap and HAS_LIBRARY_OPS:  # torch.compile's graph: inductor launches (and autotunes) the kernels itself
        torch.library.wrap_triton(tuned if tuned is not None else kernel)[grid](*args, **meta)
        return
    if tuned is None:
        kernel[grid](*args, **meta)
        return
    key = (tuned, *meta.values(), *(a.dtype if isinstance(a, Tensor) else a for a in args))
    config = _TUNED_CONFIGS.get(key)
    if config is None:
        tuned[grid](*args, **meta)  # times the configurations the first time the autotuner sees its key
        _TUNED_CONFIGS[key] = tuned.best_config
    else:
        kernel[grid](*args, **meta, **config.all_kwargs())
