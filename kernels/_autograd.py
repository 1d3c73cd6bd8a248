"""The sampler's autograd: one autograd.Function and one torch.library op for every family.

Eager calls go through :class:`_Sample` (or, when nothing needs a gradient, straight to the forward launcher);
while torch.compile traces, through the torch.library ops ``stn_lightning::sample`` and
``stn_lightning::sample_backward`` (triton_op / wrap_triton, where the installed torch has them), whose ``family``
argument names the family and whose "cpu" kernels are the PyTorch reference. Nothing here reads the environment.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from ._launch import HAS_LIBRARY_OPS, interpreting
from .reference import Spec
from .sampler import Family, backward, forward, reference_vjp

__all__ = ["FAMILIES", "register", "sample"]


#: The registered families by name (kernels/affine.py, projective.py, tps.py, grid.py register theirs).
FAMILIES: dict[str, Family] = {}


def register(family: Family) -> Family:
    """Make ``family`` known to the torch.library op (by its name); returns it."""
    FAMILIES[family.name] = family
    return family


# --------------------------------------------------------------------------------------------------------------
# host helpers
# --------------------------------------------------------------------------------------------------------------
def autocast_inputs(x: Tensor, params: Tensor) -> tuple[Tensor, Tensor]:
    """Under CUDA autocast the image follows the autocast dtype and the parameters stay (at least) float32."""
    if x.is_cuda and torch.is_autocast_enabled("cuda"):
        x = x.to(torch.get_autocast_dtype("cuda"))
        if params.dtype != torch.float64:
            params = params.float()
    return x, params


def check_device(x: Tensor) -> None:
    """Raise ValueError unless the Triton kernels can run on x: CUDA tensors, or any tensor under the interpreter."""
    if not x.is_cuda and not interpreting():
        raise ValueError(
            f"expected CUDA tensors for the Triton sampler (or TRITON_INTERPRET=1 for CPU tensors), got {x.device}"
        )


def use_library_op(x: Tensor) -> bool:
    """Whether to call the torch.library op instead of the autograd.Function: only while torch.compile traces.

    Both launch the same kernels. The op is what torch.compile needs to keep our kernels in its graph; eagerly it
    only adds host time (dispatcher, the registered autograd wrapper and a second op for the backward), and on
    small workloads host time is what a step costs (benchmarks/RESULTS-kernels.md: about 1.7 ms of host time
    around 0.04 ms of kernels for mnist2), so eager calls take the autograd.Function.
    """
    return HAS_LIBRARY_OPS and x.is_cuda and not interpreting() and torch.compiler.is_compiling()


def amp_backward(backward: Callable[..., Any]) -> Callable[..., Any]:
    """Decorate a Function's backward as ``torch.amp.custom_bwd(device_type="cuda")`` over
    ``torch.autograd.function.once_differentiable`` do, entering their contexts only when they change something.

    custom_bwd runs the backward under the autocast state of the forward (recorded by ``custom_fwd``), and
    once_differentiable under no_grad, marking the gradients non-differentiable when the graph is being recorded
    (``create_graph=True``). In the usual backward, with grad mode off and autocast off in the forward and now,
    neither changes anything, yet their two context managers cost 12 to 26 us of host time per forward + backward
    on the development machine's CPU, a tenth of the whole on small workloads (an A/B of the two decorations in
    benchmarks/host_overhead.py's calls); that case calls ``backward`` directly.
    """
    full = torch.amp.custom_bwd(device_type="cuda")(torch.autograd.function.once_differentiable(backward))

    @functools.wraps(backward)
    def wrapper(ctx: Any, *grads: Tensor) -> Any:
        if torch.is_grad_enabled() or ctx._fwd_used_autocast or torch.is_autocast_enabled("cuda"):
            return full(ctx, *grads)
        return backward(ctx, *grads)

    return wrapper


# --------------------------------------------------------------------------------------------------------------
# autograd.Function (eager calls) and torch.library op (torch.compile)
# --------------------------------------------------------------------------------------------------------------
class _Sample(torch.autograd.Function):
    @staticmethod
    @torch.amp.custom_fwd(device_type="cuda")
    def forward(ctx, x: Tensor, p: Tensor, a: Tensor, s: Tensor, family: Family, spec: Spec) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(x, p, a, s)
        ctx.family, ctx.spec = family, spec
        return forward(x, p, a, s, family, spec)

    @staticmethod
    @amp_backward
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        x, p, a, s = ctx.saved_tensors
        needs = ctx.needs_input_grad
        gx, gp = backward(grad, x, p, a, s, ctx.family, ctx.spec, needs[0], needs[1])
        return gx, gp, None, None, None, None


def _library_op() -> Any | None:
    # The already registered torch.ops.stn_lightning.sample (when this module is imported again), else None.
    try:
        return torch.ops.stn_lightning.sample
    except (AttributeError, RuntimeError):
        return None


def _unpack(family: str, height: int, width: int, align_corners: bool, padding_mode: str, mode: str, fill: float
            ) -> tuple[Family, Spec]:  # fmt: skip
    # The library ops' scalar arguments as the launchers take them.
    return FAMILIES[family], Spec((height, width), align_corners, padding_mode, mode, fill)


if HAS_LIBRARY_OPS and _library_op() is None:

    @torch.library.triton_op("stn_lightning::sample", mutates_args=())
    def _sample_op(
        x: Tensor, params: Tensor, aux: Tensor, family: str, height: int, width: int, align_corners: bool,
        padding_mode: str, mode: str, fill: float,
    ) -> Tensor:  # fmt: skip
        fam, spec = _unpack(family, height, width, align_corners, padding_mode, mode, fill)
        return forward(x, *fam.prepare(x, params, aux, spec), fam, spec, wrap=True)

    @_sample_op.register_kernel("cpu")
    def _sample_cpu(x, params, aux, *options):  # type: ignore[no-untyped-def]
        fam, spec = _unpack(*options)
        return fam.reference(x, params, aux, spec)

    @torch.library.triton_op("stn_lightning::sample_backward", mutates_args=())
    def _sample_bwd_op(
        grad: Tensor, x: Tensor, params: Tensor, aux: Tensor, family: str, height: int, width: int,
        align_corners: bool, padding_mode: str, mode: str, fill: float, need_x: bool, need_params: bool,
    ) -> tuple[Tensor, Tensor]:  # fmt: skip
        fam, spec = _unpack(family, height, width, align_corners, padding_mode, mode, fill)
        gx, gp = backward(grad, x, *fam.prepare(x, params, aux, spec), fam, spec, need_x, need_params, wrap=True)
        gx = gx if gx is not None else x.new_empty(0)
        return gx, (gp.to(params.dtype) if gp is not None else params.new_empty(0))

    @_sample_bwd_op.register_kernel("cpu")
    def _sample_bwd_cpu(grad, x, params, aux, *options):  # type: ignore[no-untyped-def]
        fam, spec = _unpack(*options[:-2])
        call = lambda xx, pp: fam.reference(xx, pp, aux.detach(), spec)
        gx, gp = reference_vjp(call, grad, (x, params), options[-2:])
        return gx, gp

    def _setup(ctx, inputs, output):  # type: ignore[no-untyped-def]
        x, params, aux, *options_ = inputs
        ctx.save_for_backward(x, params, aux)
        ctx.options = options_

    def _op_backward(ctx, grad):  # type: ignore[no-untyped-def]
        x, params, aux = ctx.saved_tensors
        need_x, need_params = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        gx, gp = torch.ops.stn_lightning.sample_backward(grad, x, params, aux, *ctx.options, need_x, need_params)
        return (gx if need_x else None, gp if need_params else None) + (None,) * 8

    _sample_op.register_autograd(_op_backward, setup_context=_setup)


# --------------------------------------------------------------------------------------------------------------
# the entry point of every family
# --------------------------------------------------------------------------------------------------------------
def sample(family: Family, x: Tensor, params: Tensor, aux: Tensor | None, spec: Spec) -> Tensor:
    """Samples (B, K, C, Ho, Wo) of ``family`` for validated inputs (kernels/__init__.py): the Function (or, without
    a gradient to track, the forward launcher) eagerly, the torch.library op while torch.compile traces."""
    check_device(x)
    x, params = autocast_inputs(x, params)
    if use_library_op(x):
        aux = x.new_empty(0) if aux is None else aux
        return torch.ops.stn_lightning.sample(x, params, aux, family.name, *spec.size, *spec[1:])
    p, a, s = family.prepare(x, params, aux, spec)
    if torch.is_grad_enabled():
        # the Function only when autograd will need its backward: otherwise it only adds host time, which on small
        # workloads is what a call costs (affine forward about 55 -> 40 us per call on the development machine's
        # CPU, benchmarks/host_overhead.py). A loop, not any() over a generator: a third of the host time.
        for t in (x, p):
            if t.requires_grad:
                return _Sample.apply(x, p, a, s, family, spec)
    return forward(x, p, a, s, family, spec)
