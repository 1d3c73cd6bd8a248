"""Parity of the Triton samplers with the PyTorch reference (kernels.reference), on CPU through the interpreter.

TRITON_INTERPRET=1 is set before triton or the kernels are imported; the interpreter runs every program in Python,
so all shapes are tiny. Triton decides at import time whether its own @jit helpers (tl.cdiv, tl.sum, ...) are
interpreted, so when another test module of the same pytest process imported triton first, these tests cannot run
in this process: they are skipped here and ``test_rerun_in_fresh_interpreter`` runs this file in a subprocess.
Tests of the compiled GPU path (torch.compile, opcheck, autocast) run in a subprocess without the interpreter and
need CUDA.
"""

import os

os.environ["TRITON_INTERPRET"] = "1"

import importlib  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import textwrap  # noqa: E402
import types  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

triton = pytest.importorskip("triton")

from triton_helpers import ROOT, TOL, force_int64, interpreter_active  # noqa: E402
from triton_helpers import image as _image  # noqa: E402

from stn_lightning import kernels  # noqa: E402
from stn_lightning.kernels import reference  # noqa: E402

INTERPRETED = interpreter_active()
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy warns on NaN/inf inside the interpreter


@pytest.mark.skipif(INTERPRETED, reason="this process runs the interpreter tests itself")
def test_rerun_in_fresh_interpreter():
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    command = [sys.executable, "-m", "pytest", __file__, "-q", "-p", "no:cacheprovider"]
    run = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-2000:]


@pytest.fixture(scope="module")
def ops():
    """The backend under test, "triton": every kernel running through the interpreter."""
    if not INTERPRETED:
        pytest.skip("triton was imported without TRITON_INTERPRET=1 (see test_rerun_in_fresh_interpreter)")
    return "triton"


# --------------------------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------------------------
def _params(family, b, k, seed=0, spread=None, n_side=2):
    """Random parameters near the identity: theta, h or spline control points (on an n_side x n_side lattice)."""
    g = torch.Generator().manual_seed(seed + 1)
    if family == "affine":
        return torch.eye(2, 3) + (0.3 if spread is None else spread) * torch.randn(b, k, 2, 3, generator=g)
    if family == "projective":
        return torch.eye(3) + (0.15 if spread is None else spread) * torch.randn(b, k, 3, 3, generator=g)
    if family == "tps":
        target = reference.tps_target_points(n_side)
        return target + (0.15 if spread is None else spread) * torch.randn(b, k, n_side * n_side, 2, generator=g)
    raise ValueError(family)


def _grid(b, k, ho, wo, seed=0, spread=1.3):
    g = torch.Generator().manual_seed(seed + 2)
    return spread * (2 * torch.rand(b, k, ho, wo, 2, generator=g) - 1)


def _call(backend, family, x, p, size, target=None, **options):
    """The family's public op through ``backend`` ("triton" or "reference")."""
    if family == "affine":
        return kernels.sample_affine(x, p, size, backend=backend, **options)
    if family == "projective":
        return kernels.sample_projective(x, p, size, backend=backend, **options)
    if family == "tps":
        return kernels.sample_tps(x, p, size, target_points=target, backend=backend, **options)
    return kernels.sample_grid(x, p, backend=backend, **options)


def _target(family, p):
    if family != "tps":
        return None
    return reference.tps_target_points(round(p.shape[2] ** 0.5))


def _run(impl, family, x, p, size, grad=None, need=(True, True), **options):
    """Output and gradients (zeros where autograd gives None) of one implementation."""
    xa = x.detach().clone().requires_grad_(need[0])
    pa = p.detach().clone().requires_grad_(need[1])
    out = _call(impl, family, xa, pa, size, _target(family, p), **options)
    if grad is None:
        grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(7)).to(out.dtype)
    if need[0] or need[1]:
        out.backward(grad)
    gx = (xa.grad if xa.grad is not None else torch.zeros_like(xa)) if need[0] else None
    gp = (pa.grad if pa.grad is not None else torch.zeros_like(pa)) if need[1] else None
    return out.detach(), gx, gp, grad


def _check_parity(ops, family, x, p, size, need=(True, True), **options):
    out, gx, gp, grad = _run(ops, family, x, p, size, need=need, **options)
    ref, rgx, rgp, _ = _run("reference", family, x, p, size, grad=grad, need=need, **options)
    assert out.dtype == x.dtype and out.is_contiguous()
    assert out.shape == ref.shape
    (ro, ao), (rx, ax), (rp, ap) = TOL[x.dtype]
    torch.testing.assert_close(out, ref, rtol=ro, atol=ao, equal_nan=False)
    if need[0]:
        assert gx.dtype == x.dtype and gx.stride() == x.stride()
        torch.testing.assert_close(gx, rgx, rtol=rx, atol=ax)
    if need[1]:
        assert gp.dtype == p.dtype
        torch.testing.assert_close(gp, rgp, rtol=rp, atol=ap)
    return out, gx, gp


# (B, K, C, H, W, Ho, Wo, align_corners, padding_mode, mode, channels_last): odd and prime sizes, 1x1 inputs,
# outputs larger and smaller than the input (9 x 11 spans several 8 x 8 interpreter tiles), K 1..4, C 1..5.
CASES = [
    (1, 1, 1, 1, 1, 1, 1, False, "zeros", "bilinear", False),
    (1, 2, 2, 1, 1, 3, 4, True, "border", "bilinear", False),
    (2, 3, 3, 7, 5, 6, 9, False, "zeros", "bilinear", True),
    (2, 1, 5, 11, 13, 5, 3, True, "zeros", "bilinear", False),
    (1, 4, 1, 5, 7, 9, 11, False, "border", "bilinear", True),
    (1, 3, 4, 13, 3, 2, 17, True, "border", "nearest", False),
    (2, 2, 3, 6, 6, 6, 6, False, "zeros", "nearest", True),
    (1, 1, 2, 3, 17, 1, 5, True, "zeros", "bilinear", False),
    (1, 2, 5, 9, 9, 4, 4, True, "border", "bilinear", True),
    (3, 1, 1, 4, 4, 7, 2, False, "border", "nearest", False),
    (1, 2, 3, 2, 3, 5, 5, True, "zeros", "nearest", True),
    (1, 1, 3, 8, 8, 8, 8, False, "border", "bilinear", False),
]


def _case_id(case):
    b, k, c, h, w, ho, wo, ac, pad, mode, cl = case
    return f"B{b}K{k}C{c}-{h}x{w}-to-{ho}x{wo}-{'ac' if ac else 'noac'}-{pad}-{mode}{'-cl' if cl else ''}"


# --------------------------------------------------------------------------------------------------------------
# parity
# --------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_affine_parity(ops, case):
    b, k, c, h, w, ho, wo, ac, pad, mode, cl = case
    x = _image(b, c, h, w, channels_last=cl, seed=sum(case[:7]))
    theta = _params("affine", b, k, seed=h * w)
    _check_parity(ops, "affine", x, theta, (ho, wo), align_corners=ac, padding_mode=pad, mode=mode)


@pytest.mark.parametrize("case", CASES[1::2], ids=_case_id)
def test_projective_parity(ops, case):
    b, k, c, h, w, ho, wo, ac, pad, mode, cl = case
    x = _image(b, c, h, w, channels_last=cl, seed=sum(case[:7]))
    hom = _params("projective", b, k, seed=h + w)
    _check_parity(ops, "projective", x, hom, (ho, wo), align_corners=ac, padding_mode=pad, mode=mode)


def test_projective_horizon(ops):
    # w = 0 somewhere inside the output (a horizon), and one homography with w = 0 everywhere.
    x = _image(1, 2, 6, 7)
    hom = torch.eye(3).repeat(1, 3, 1, 1)
    hom[0, 0, 2] = torch.tensor([1.5, 0.0, 0.0])
    hom[0, 1, 2] = torch.tensor([0.0, 0.0, 0.0])
    hom[0, 2, 2] = torch.tensor([0.3, -0.2, 0.1])
    for pad in ("zeros", "border"):
        out, _, gp = _check_parity(ops, "projective", x, hom, (5, 7), padding_mode=pad)
        assert torch.all(out[0, 1] == 0) and torch.isfinite(gp).all()


@pytest.mark.parametrize("case", [CASES[2], CASES[5], CASES[8], CASES[9]], ids=_case_id)
def test_tps_parity(ops, case):
    b, k, c, h, w, ho, wo, ac, pad, mode, cl = case
    x = _image(b, c, h, w, channels_last=cl, seed=3)
    control = _params("tps", b, k, seed=5)
    _check_parity(ops, "tps", x, control, (ho, wo), align_corners=ac, padding_mode=pad, mode=mode)


def test_tps_dispatcher_control_points(ops):
    # The public sample_tps: the torch solve carries the kernel's coefficient gradient to the control points.
    x = _image(1, 2, 6, 5)
    target = reference.tps_target_points(3)
    cp = target + 0.1 * torch.randn(1, 2, 9, 2, generator=torch.Generator().manual_seed(3))
    results = []
    for backend in ("triton", "torch"):
        ca = cp.clone().requires_grad_()
        out = kernels.sample_tps(x, ca, (4, 6), backend=backend)
        out.square().sum().backward()
        results.append((out.detach(), ca.grad))
    torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(results[0][1], results[1][1], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("case", CASES[2:8], ids=_case_id)
def test_grid_parity(ops, case):
    b, k, c, h, w, ho, wo, ac, pad, mode, cl = case
    x = _image(b, c, h, w, channels_last=cl, seed=11)
    grid = _grid(b, k, ho, wo, seed=ho)
    if cl:  # a grid with non-contiguous strides: (B, K, Wo, Ho, 2) transposed
        grid = grid.transpose(2, 3).contiguous().transpose(2, 3)
    _check_parity(ops, "grid", x, grid, None, align_corners=ac, padding_mode=pad, mode=mode)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("family", ["affine", "projective", "grid"])
def test_dtypes(ops, family, dtype):
    x = _image(2, 3, 7, 6, dtype=dtype, channels_last=dtype == torch.float16, seed=4)
    p = _grid(2, 2, 5, 4) if family == "grid" else _params(family, 2, 2, seed=9)
    if dtype == torch.float64:
        p = p.double()
    _check_parity(ops, family, x, p, (5, 4), align_corners=dtype == torch.bfloat16, padding_mode="border")


def test_tps_float64(ops):
    x = _image(1, 2, 5, 6, dtype=torch.float64)
    _check_parity(ops, "tps", x, _params("tps", 1, 2, seed=2).double(), (4, 5), padding_mode="zeros")


@pytest.mark.parametrize("need", [(True, False), (False, True)], ids=["image-only", "params-only"])
def test_partial_gradients(ops, need):
    x = _image(1, 3, 6, 5, channels_last=True)
    _check_parity(ops, "affine", x, _params("affine", 1, 2), (4, 7), need=need)
    _check_parity(ops, "grid", x, _grid(1, 2, 4, 7), None, need=need, padding_mode="border")


@pytest.mark.parametrize("family", ["affine", "projective", "tps", "grid"])
def test_forward_without_autograd(ops, family):
    # Without a gradient to track, the ops call the forward launcher directly (no autograd.Function): the same
    # samples bit for bit and no graph; with one, the Function records the backward.
    x = _image(1, 2, 6, 5, seed=3)
    p = _grid(1, 2, 4, 3) if family == "grid" else _params(family, 1, 2, seed=5)
    size = None if family == "grid" else (4, 3)
    tracked = _call(ops, family, x, p.clone().requires_grad_(), size, _target(family, p))
    assert tracked.grad_fn is not None
    untracked = [_call(ops, family, x, p, size, _target(family, p))]
    with torch.no_grad():
        untracked.append(_call(ops, family, x.requires_grad_(), p, size, _target(family, p)))
    with torch.inference_mode():
        untracked.append(_call(ops, family, x, p, size, _target(family, p)))
    for out in untracked:
        assert out.grad_fn is None
        assert torch.equal(out, tracked.detach())


@pytest.mark.parametrize("family", ["affine", "projective", "tps", "grid"])
def test_backward_while_recording(ops, family):
    # The backward skips custom_bwd's and once_differentiable's contexts unless grad mode is on (create_graph) or
    # autocast is (kernels._autograd.amp_backward): with create_graph the gradients are the same bit for bit, and
    # differentiating them again raises once_differentiable's error instead of giving a wrong second derivative.
    x = _image(1, 2, 6, 5, seed=4)
    p = _grid(1, 2, 4, 3) if family == "grid" else _params(family, 1, 2, seed=6)
    size = None if family == "grid" else (4, 3)
    grads = []
    for create_graph in (False, True):
        xa, pa = x.clone().requires_grad_(), p.clone().requires_grad_()
        out = _call(ops, family, xa, pa, size, _target(family, p))
        grads.append(torch.autograd.grad(out.square().sum(), (xa, pa), create_graph=create_graph))
    for plain, recorded in zip(*grads, strict=True):
        assert plain.grad_fn is None and recorded.grad_fn is not None
        assert torch.equal(plain, recorded.detach())
    with pytest.raises(RuntimeError, match="differentiate twice"):
        grads[1][0].sum().backward()


def test_strided_images(ops):
    # Images are read with their own strides (no hidden copy): a sliced view and a batch expanded with stride 0;
    # the gradient reaches the tensor they are views of.
    base = _image(2, 3, 11, 13, seed=12)
    views = [lambda t: t[:, ::2, 1::2, ::3], lambda t: t[:1].expand(3, 3, 11, 13)]
    for view in views:
        theta = _params("affine", view(base).shape[0], 2, seed=4)
        results = []
        for backend in (ops, "reference"):
            leaf = base.clone().requires_grad_()
            x = view(leaf)
            out = kernels.sample_affine(x, theta, (4, 6), padding_mode="border", backend=backend)
            out.backward(torch.randn(out.shape, generator=torch.Generator().manual_seed(1)))
            results.append((out.detach(), leaf.grad))
        torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(results[0][1], results[1][1], rtol=1e-5, atol=1e-5)


def test_expanded_grad_out(ops):
    # out.sum() hands the backward a stride-0 gradient; it is read with its strides, not copied.
    x = _image(2, 2, 5, 5)
    theta = _params("affine", 2, 2, seed=3)
    grads = []
    for backend in (ops, "reference"):
        xa, ta = x.clone().requires_grad_(), theta.clone().requires_grad_()
        kernels.sample_affine(xa, ta, (4, 6), padding_mode="border", backend=backend).sum().backward()
        grads.append((xa.grad, ta.grad))
    torch.testing.assert_close(grads[0][0], grads[1][0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grads[0][1], grads[1][1], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("family", ["affine", "projective", "tps", "grid"])
def test_forward_one_channel_at_a_time(ops, family, monkeypatch):
    # The autotuner's SPLIT_C configs (one channel per load, in a loop over the channels) sample the same values.
    config = importlib.import_module("stn_lightning.kernels._launch").FWD_CONFIG_INTERPRET
    monkeypatch.setitem(config, "SPLIT_C", True)
    x = _image(2, 3, 7, 6, channels_last=True, seed=8)
    p = _grid(2, 2, 5, 4) if family == "grid" else _params(family, 2, 2, seed=8)
    size = None if family == "grid" else (5, 4)
    split, _, _ = _check_parity(ops, family, x, p, size, padding_mode="border")
    monkeypatch.setitem(config, "SPLIT_C", False)
    assert torch.equal(split, _call(ops, family, x, p, size, _target(family, p), padding_mode="border"))


def _check_fill(ops, family, x, p, size, fill, **options):
    """The op with ``fill`` against the reference with ``fill`` and against its definition, reference(x - fill) +
    fill (zeros padding: an outside corner reads fill; an invalid point outputs fill), output and both gradients
    (fill is a constant: no gradient of its own)."""
    out, gx, gp, grad = _run(ops, family, x, p, size, fill=fill, **options)
    ref, rgx, rgp, _ = _run("reference", family, x, p, size, grad=grad, fill=fill, **options)
    oracles = [(ref, rgx, rgp)]
    if x.dtype in (torch.float32, torch.float64):  # x - fill would round in half precision
        shifted, sgx, sgp, _ = _run("reference", family, (x - fill).detach(), p, size, grad=grad, **options)
        oracles.append(((shifted + fill).to(out.dtype), sgx, sgp))
    (ro, ao), (rx, ax), (rp, ap) = TOL[x.dtype]
    for expected, egx, egp in oracles:
        torch.testing.assert_close(out, expected, rtol=ro, atol=ao)
        torch.testing.assert_close(gx, egx, rtol=rx, atol=ax)
        torch.testing.assert_close(gp, egp, rtol=rp, atol=ap)
    return out, gx, gp


@pytest.mark.parametrize("family", ["affine", "projective", "tps", "grid"])
def test_fill(ops, family):
    # Points outside the image read fill, with both sampling modes, both layouts, align_corners, several tiles and
    # channel blocks, float32 and float64 (a fill that float32 holds exactly); border padding reads no fill.
    cases = [
        (3, False, "bilinear", False, torch.float32, -1.25),
        (5, True, "bilinear", True, torch.float32, 0.7),
        (2, False, "nearest", True, torch.float64, 2.5),
        (3, True, "bilinear", False, torch.bfloat16, 0.3),  # fill rounded to bfloat16 by the masked loads
    ]
    for c, cl, mode, ac, dtype, fill in cases:
        x = _image(2, c, 7, 9, dtype=dtype, channels_last=cl, seed=c)
        p = _grid(2, 2, 9, 11, seed=c, spread=1.6) if family == "grid" else _params(family, 2, 2, seed=c, spread=0.6)
        size = None if family == "grid" else (9, 11)
        _check_fill(ops, family, x, p.to(reference.compute_dtype(x)), size, fill, mode=mode, align_corners=ac)
    x = _image(1, 2, 5, 6, seed=1)
    p = _grid(1, 2, 4, 5) if family == "grid" else _params(family, 1, 2, seed=1, spread=0.6)
    size = None if family == "grid" else (4, 5)
    border = _call(ops, family, x, p, size, _target(family, p), padding_mode="border", fill=3.0)
    assert torch.equal(border, _call(ops, family, x, p, size, _target(family, p), padding_mode="border"))


@pytest.mark.parametrize("family", ["affine", "projective", "tps", "grid"])
def test_fill_non_finite(ops, family):
    # A non-finite transformer outputs fill everywhere and sends no gradient; the others are unchanged.
    x = _image(1, 2, 5, 6, seed=6)
    p = _grid(1, 3, 4, 5) if family == "grid" else _params(family, 1, 3, seed=6)
    p[:, 1] = float("nan")
    out, gx, gp = _check_fill(ops, family, x, p, (4, 5), -0.5)
    assert torch.all(out[:, 1] == -0.5) and torch.all(gp[:, 1] == 0) and torch.isfinite(gx).all()


def test_needs_int64():
    # Offsets past 2**31 - 1 through a large stride or a large tensor (meta tensors: no memory); dense tensors of
    # either layout and a small strided view stay int32.
    needs = importlib.import_module("stn_lightning.kernels._launch").needs_int64
    big_stride = torch.empty_strided((2, 1, 1, 1), (2**31, 1, 1, 1), device="meta")
    big = torch.empty((1, 1, 32769, 65536), device="meta")
    small = torch.empty(2, 3, 8, 8)
    assert needs(big_stride) and needs(big) and needs(small, big)
    assert not needs(small, small.to(memory_format=torch.channels_last), small[:, :, ::2], torch.empty(0))


def test_launch_reuses_the_autotuners_choice(monkeypatch):
    # On GPUs an autotuned kernel goes through its autotuner once per call signature (options, scalar arguments,
    # tensor dtypes); later calls launch the plain kernel with the configuration the autotuner chose.
    common = importlib.import_module("stn_lightning.kernels._launch")
    monkeypatch.setattr(common, "interpreting", lambda: False)
    monkeypatch.setattr(common, "_TUNED_CONFIGS", {})
    calls = []

    class Handle:  # stands in for a JITFunction / Autotuner: handle[grid](*args, **kwargs) launches
        def __init__(self, name):
            self.name, self.best_config = name, None

        def __getitem__(self, grid):
            def run(*args, **kwargs):
                calls.append((self.name, args, kwargs))
                if self.name == "tuned":  # what Autotuner.run records
                    self.best_config = triton.Config({"BLOCK_H": 16, "SPLIT_C": len(calls) > 1}, num_warps=8)

            return run

    kernel, tuned = Handle("kernel"), Handle("tuned")
    x = torch.empty(2, 3, 4, 5)
    meta = {"BORDER": False, "IDX64": False}
    common.launch(kernel, tuned, (1,), (x, 3, 4), meta, False)
    common.launch(kernel, tuned, (1,), (x, 3, 4), meta, False)  # the same signature: the autotuner's choice
    common.launch(kernel, tuned, (1,), (x.double(), 3, 4), meta, False)  # another dtype
    common.launch(kernel, tuned, (1,), (x, 3, 5), meta, False)  # another size
    common.launch(kernel, tuned, (1,), (x, 3, 4), {**meta, "BORDER": True}, False)  # another option
    common.launch(kernel, tuned, (1,), (x.clone(), 3, 4), meta, False)  # another tensor, same signature
    common.launch(kernel, None, (1,), (x, 3, 4), meta, False)  # not autotuned: as it is
    assert [name for name, _, _ in calls] == ["tuned", "kernel", "tuned", "tuned", "tuned", "kernel", "kernel"]
    first_choice = {"BLOCK_H": 16, "SPLIT_C": False, "num_warps": 8}
    for reused in (calls[1], calls[5]):
        assert reused[2].items() >= {**meta, **first_choice}.items()
    assert calls[6][2] == meta


def test_int64_offsets_path(ops, monkeypatch):
    # The int64 offset code (IDX64) is exercised on tiny tensors by forcing it; the 2**31 case runs on GPUs in
    # benchmarks/bench_kernels.py --check.
    force_int64(monkeypatch)
    x = _image(1, 3, 5, 7, channels_last=True)
    _check_parity(ops, "affine", x, _params("affine", 1, 2), (6, 5), align_corners=True)
    _check_parity(ops, "grid", x, _grid(1, 2, 3, 4), None, mode="nearest")


# --------------------------------------------------------------------------------------------------------------
# identity, extreme and non-finite parameters
# --------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("align_corners", [False, True])
@pytest.mark.parametrize("family", ["affine", "projective", "tps"])
def test_identity_is_exact(ops, family, align_corners):
    for dtype, pad, mode, cl in [
        (torch.float32, "zeros", "bilinear", False),
        (torch.float16, "border", "bilinear", True),
        (torch.bfloat16, "zeros", "nearest", False),
        (torch.float64, "border", "nearest", True),
    ]:
        x = _image(2, 3, 5, 7, dtype=dtype, channels_last=cl, seed=1)
        if family == "affine":
            p = torch.eye(2, 3).repeat(2, 2, 1, 1)
        elif family == "projective":
            p = 2.5 * torch.eye(3).repeat(2, 2, 1, 1)  # any scale of the identity homography
        else:
            p = reference.tps_target_points(2).expand(2, 2, 4, 2)  # control points on their targets
        out = _call(
            ops, family, x, p, (5, 7), _target(family, p), align_corners=align_corners, padding_mode=pad, mode=mode
        )
        for k in range(2):
            assert torch.equal(out[:, k], x), (dtype, pad, mode)


@pytest.mark.parametrize("padding_mode", ["zeros", "border"])
def test_extreme_affine(ops, padding_mode):
    x = _image(1, 2, 7, 6, seed=5)
    theta = torch.zeros(1, 4, 2, 3)
    theta[0, 0] = torch.tensor([[5.0, 0.0, 0.0], [0.0, 5.0, 0.0]])  # scale x5: lands on pixel centres exactly
    theta[0, 1] = torch.tensor([[1.0, 0.0, 3.0], [0.0, 1.0, -3.0]])  # translated out of the image
    theta[0, 2] = torch.tensor([[0.7, 0.2, -3.0], [-0.1, 1.3, 3.0]])
    # theta[0, 3] = 0: every output pixel reads the image centre
    _check_parity(ops, "affine", x, theta, (7, 6), padding_mode=padding_mode)
    _check_parity(ops, "affine", x, theta, (5, 9), padding_mode=padding_mode, align_corners=True)
    _check_parity(ops, "projective", x, torch.diag_embed(torch.tensor([5.0, 5.0, 1.0])).expand(1, 2, 3, 3), (7, 6))


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf"), 1e30])
@pytest.mark.parametrize("family", ["affine", "projective", "tps", "grid"])
def test_non_finite_isolation(ops, family, bad):
    """A bad transformer reads nothing (or the border, for 1e30) and never changes the others' outputs or grads."""
    padding_mode = "border" if family in ("affine", "grid") else "zeros"
    x = _image(1, 2, 5, 6, seed=6)
    p = _grid(1, 3, 4, 5) if family == "grid" else _params(family, 1, 3, seed=6)
    p[:, 1] = bad
    full, fgx, fgp = _check_parity(ops, family, x, p, (4, 5), padding_mode=padding_mode)
    assert torch.isfinite(full).all() and torch.isfinite(fgx).all() and torch.isfinite(fgp).all()
    # The same computation without the bad transformer (the same upstream gradient for the other two).
    keep = [0, 2]
    grad = torch.randn(full.shape, generator=torch.Generator().manual_seed(7))[:, keep].contiguous()
    part, pgx, pgp, _ = _run(ops, family, x, p[:, keep], (4, 5), grad=grad, padding_mode=padding_mode)
    assert torch.equal(full[:, keep], part)
    torch.testing.assert_close(fgp[:, keep], pgp, rtol=1e-6, atol=1e-6)
    if bad != bad or abs(bad) == float("inf"):  # non-finite: reads nothing, sends no gradient anywhere
        assert torch.all(full[:, 1] == 0) and torch.all(fgp[:, 1] == 0)
        torch.testing.assert_close(fgx, pgx, rtol=1e-6, atol=1e-6)


# --------------------------------------------------------------------------------------------------------------
# gradcheck, determinism, errors, dispatcher, library ops
# --------------------------------------------------------------------------------------------------------------
def test_gradcheck_float64(ops):
    x = _image(1, 2, 3, 4, dtype=torch.float64).requires_grad_()
    theta = _params("affine", 1, 1, seed=8).double().requires_grad_()
    affine = lambda a, t: kernels.sample_affine(a, t, (3, 2), padding_mode="border", backend=ops)
    assert torch.autograd.gradcheck(affine, (x, theta))
    hom = _params("projective", 1, 1, seed=8).double().requires_grad_()
    projective = lambda a, t: kernels.sample_projective(a, t, (2, 3), align_corners=True, backend=ops)
    assert torch.autograd.gradcheck(projective, (x, hom))


@pytest.fixture
def deterministic():
    previous = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True)
    yield
    torch.use_deterministic_algorithms(previous[0], warn_only=previous[1])


def _bwd_launches(monkeypatch):
    """The meta of every launch of the sampler's backward kernel, as they happen."""
    sampler = importlib.import_module("stn_lightning.kernels.sampler")
    launches = []
    launch = sampler.launch

    def spy_launch(kernel, tuned, grid, args, meta, wrap):
        if kernel is sampler._sample_bwd_kernel:
            launches.append(meta)
        return launch(kernel, tuned, grid, args, meta, wrap)

    monkeypatch.setattr(sampler, "launch", spy_launch)
    return launches


@pytest.mark.parametrize("family", ["affine", "projective", "tps", "grid"])
@pytest.mark.parametrize("padding_mode", ["zeros", "border"])
def test_deterministic_algorithms(ops, family, padding_mode, deterministic, monkeypatch):
    # torch.use_deterministic_algorithms(True): the image gradient comes from the reference's backward (a
    # deterministic scatter-add), the kernel adds none with atomics and still reduces the parameter gradient (no
    # atomics there); two runs give the same bits and the gradients match the reference.
    launches = _bwd_launches(monkeypatch)
    x = _image(2, 3, 7, 6, channels_last=True, seed=2)
    p = _grid(2, 3, 5, 8) if family == "grid" else _params(family, 2, 3, seed=3)
    size = None if family == "grid" else (5, 8)
    runs = [_check_parity(ops, family, x, p, size, padding_mode=padding_mode) for _ in range(2)]
    for first, second in zip(*runs, strict=True):
        assert torch.equal(first, second)
    assert launches and all(not meta["NEED_X_GRAD"] and meta["NEED_PARAM_GRAD"] for meta in launches)


def test_auto_is_deterministic_on_cuda():
    # backend="auto" on CUDA tensors: the reference when a gradient is needed under deterministic algorithms (the
    # PyTorch path's F.grid_sample adds its CUDA image gradient with atomics), else the measured table.
    cuda = types.SimpleNamespace(is_cuda=True)
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        assert kernels.resolve_backend("auto", cuda, "affine", needs_grad=True) == "reference"
        assert kernels.resolve_backend("auto", cuda, "tps", needs_grad=False) == "triton"
        assert kernels.resolve_backend("auto", types.SimpleNamespace(is_cuda=False), "affine", True) == "torch"
    finally:
        torch.use_deterministic_algorithms(previous)
    assert kernels.resolve_backend("auto", cuda, "affine", needs_grad=True) == "torch"


def test_value_errors(ops, monkeypatch):
    x = _image(1, 2, 4, 4)
    theta = _params("affine", 1, 2)
    affine = lambda *args, **kwargs: kernels.sample_affine(*args, backend=ops, **kwargs)
    with pytest.raises(ValueError, match="dtype"):
        affine(x.to(torch.int32), theta, 3)
    with pytest.raises(ValueError, match=r"\(B, C, H, W\)"):
        affine(x[0], theta, 3)
    with pytest.raises(ValueError, match="theta of shape"):
        affine(x, theta[..., :2], 3)
    with pytest.raises(ValueError, match="theta of shape"):
        affine(x, theta.expand(3, 2, 2, 3), 3)
    with pytest.raises(ValueError, match="device"):
        affine(x, theta.to("meta"), 3)
    with pytest.raises(ValueError, match="h of shape"):
        kernels.sample_projective(x, theta, 3, backend=ops)
    with pytest.raises(ValueError, match="padding_mode"):
        affine(x, theta, 3, padding_mode="reflection")
    with pytest.raises(ValueError, match="mode"):
        affine(x, theta, 3, mode="bicubic")
    with pytest.raises(ValueError, match="output size"):
        affine(x, theta, (0, 3))
    with pytest.raises(ValueError, match="grid of shape"):
        kernels.sample_grid(x, torch.zeros(1, 2, 3, 3), backend=ops)
    with pytest.raises(ValueError, match="target points"):
        kernels.sample_tps(x, torch.zeros(1, 1, 4, 2), 3, target_points=torch.zeros(4, 3), backend=ops)
    with pytest.raises(ValueError, match="control_points of shape"):
        kernels.sample_tps(x, torch.zeros(1, 1, 6, 2), 3, target_points=torch.zeros(4, 2), backend=ops)
    monkeypatch.setattr(importlib.import_module("stn_lightning.kernels._autograd"), "interpreting", lambda: False)
    with pytest.raises(ValueError, match="CUDA"):
        affine(x, theta, 3)


def test_dispatcher(ops):
    x = _image(1, 2, 5, 5)
    theta = _params("affine", 1, 2)
    assert kernels.triton_available()
    assert kernels.resolve_backend("auto", x) == "torch"
    # auto on CUDA: Triton only where the recorded GPU run measured it faster (benchmarks/RESULTS-kernels.md)
    cuda = types.SimpleNamespace(is_cuda=True)
    assert kernels.resolve_backend("auto", cuda, "tps", needs_grad=False) == "triton"
    for family in ("affine", "projective", "grid", "tps"):
        assert kernels.resolve_backend("auto", cuda, family, needs_grad=True) == "torch"
    for family in ("affine", "projective", "grid", None):
        assert kernels.resolve_backend("auto", cuda, family) == "torch"
    assert kernels.resolve_backend("auto", x, "tps") == "torch"  # CPU tensors
    assert kernels.resolve_backend("triton", x) == "triton"
    with pytest.raises(ValueError, match="backend"):
        kernels.resolve_backend("cuda", x)
    # the table a call follows: kernels.sample_affine -> _TABLE["triton"]["affine"] -> kernels.affine.affine
    out = kernels.sample_affine(x, theta, (4, 3), backend="triton")
    assert kernels._TABLE["triton"]["affine"] is importlib.import_module("stn_lightning.kernels.affine").affine
    torch.testing.assert_close(out, kernels.sample_affine(x, theta, (4, 3), backend="reference"), rtol=1e-5, atol=1e-6)
    grid = _grid(1, 2, 3, 3)
    torch.testing.assert_close(
        kernels.sample_grid(x, grid, backend="triton"),
        kernels.sample_grid(x, grid, backend="reference"),
        rtol=1e-5,
        atol=1e-6,
    )


def test_auto_picks_per_call(ops, monkeypatch):
    # backend="auto" asks resolve_backend per call with the family and whether a gradient is needed (here on CPU
    # tensors, with resolve_backend answering "triton" so that the interpreted kernels run).
    asked = []

    def resolve(backend, x, family=None, needs_grad=False):
        asked.append((backend, family, needs_grad))
        return "triton"

    monkeypatch.setattr(kernels, "resolve_backend", resolve)
    x = _image(1, 2, 5, 5)
    theta = _params("affine", 1, 2)
    out = kernels.sample_affine(x, theta, (4, 3))
    torch.testing.assert_close(
        out,
        reference.affine(x, theta, None, reference.Spec((4, 3), False, "zeros", "bilinear", 0.0)),
        rtol=1e-5,
        atol=1e-6,
    )
    kernels.sample_affine(x, theta.requires_grad_(), (4, 3))
    with torch.no_grad():
        kernels.sample_grid(x, _grid(1, 2, 3, 3))
    assert asked == [("auto", "affine", False), ("auto", "affine", True), ("auto", "grid", False)]


def _library_ops_available():
    return hasattr(torch.library, "triton_op") and hasattr(torch.library, "wrap_triton")


@pytest.mark.skipif(not _library_ops_available(), reason="torch.library.triton_op needs torch >= 2.6")
def test_library_ops_cpu_eager(ops):
    # On CPU tensors the registered ops run their "cpu" kernels: the reference and its vjp.
    x = _image(1, 2, 5, 6).requires_grad_()
    theta = _params("affine", 1, 2).requires_grad_()
    empty = torch.empty(0)
    out = torch.ops.stn_lightning.sample(x, theta, empty, "affine", 3, 4, False, "border", "bilinear", 0.0)
    out.square().sum().backward()
    xr, tr = x.detach().clone().requires_grad_(), theta.detach().clone().requires_grad_()
    ref = kernels.sample_affine(xr, tr, (3, 4), padding_mode="border", backend="reference")
    ref.square().sum().backward()
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(x.grad, xr.grad)
    torch.testing.assert_close(theta.grad, tr.grad)
    # one op (and its backward) for every family: the "cpu" kernel of each is its reference, with fill
    assert hasattr(torch.ops.stn_lightning, "sample_backward")
    assert not hasattr(torch.ops.stn_lightning, "sample_affine")
    grid = _grid(1, 2, 3, 4)
    out = torch.ops.stn_lightning.sample(x, grid, empty, "grid", 3, 4, False, "zeros", "bilinear", -0.5)
    torch.testing.assert_close(out, kernels.sample_grid(x - -0.5, grid, backend="reference") + -0.5)


_COMPILE_CPU = """
import functools
import torch
from stn_lightning import kernels
from stn_lightning.kernels import _autograd, reference

# Route CPU tensors through the library op (whose "cpu" kernel is the reference), as CUDA tensors would be.
_autograd.check_device = lambda x: None
_autograd.use_library_op = lambda x: True
x = torch.randn(2, 3, 6, 5)
theta = torch.eye(2, 3) + 0.2 * torch.randn(2, 2, 2, 3)
target = reference.tps_target_points(2)
control = target + 0.1 * torch.randn(2, 2, 4, 2)
coef = reference.tps_coefficients(control, target)
grid_ = torch.rand(2, 2, 3, 3, 2)
hom = torch.eye(3) + 0.1 * torch.randn(2, 2, 3, 3)


def filled(backend, x, theta):
    if backend == "triton":
        return kernels.sample_affine(x, theta, (4, 3), fill=0.5, backend=backend)
    return kernels.sample_affine(x - 0.5, theta, (4, 3), backend=backend) + 0.5


def loss(backend, x, theta, control, grid_, hom):
    return (
        kernels.sample_affine(x, theta, (4, 3), backend=backend).square().sum()
        + filled(backend, x, theta).square().sum()
        + kernels.sample_tps(x, control, 4, target_points=target, backend=backend).square().sum()
        + kernels.sample_grid(x, grid_, padding_mode="border", backend=backend).square().sum()
        + kernels.sample_projective(x, hom, 5, align_corners=True, backend=backend).square().sum()
    )


results = []
compiled = torch.compile(functools.partial(loss, "triton"), backend="eager", fullgraph=True)
for fn in (compiled, functools.partial(loss, "reference")):
    inputs = [t.clone().requires_grad_() for t in (x, theta, control, grid_, hom)]
    out = fn(*inputs)
    out.backward()
    results.append([out.detach()] + [t.grad for t in inputs])
for a, b in zip(*results):
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)

# opcheck's checks that need no GPU (the aot_dispatch ones run the Triton kernels on the inputs' device).
op = torch.ops.stn_lightning.sample.default
needs = [t.clone().requires_grad_() for t in (x, theta, coef, grid_, hom)]
empty = torch.empty(0)
for args in [
    (needs[0], needs[1], empty, "affine", 4, 3, False, "zeros", "bilinear", 0.0),
    (needs[0], coef.clone().requires_grad_(), target, "tps", 4, 4, True, "zeros", "nearest", 0.0),
    (needs[0], needs[3], empty, "grid", 3, 3, False, "border", "bilinear", 0.0),
    (needs[0], needs[4], empty, "projective", 5, 5, True, "zeros", "bilinear", 1.5),
]:
    torch.library.opcheck(op, args, test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))
print("OK")
"""


@pytest.mark.skipif(not _library_ops_available(), reason="torch.library.triton_op needs torch >= 2.6")
def test_library_ops_compile_fullgraph_on_cpu():
    # torch.compile(backend="eager", fullgraph=True) traces the four public ops and their backward without a graph
    # break, and opcheck's schema, autograd-registration and fake-tensor checks pass; both run the triton_op bodies
    # (launchers, wrap_triton) with fake tensors, which fails under the interpreter, hence a subprocess without it.
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, "-c", _COMPILE_CPU], cwd=ROOT, env=env, capture_output=True, text=True)
    assert run.returncode == 0 and "OK" in run.stdout, run.stderr[-4000:]


_SM90 = """
import sys
sys.path.insert(0, "benchmarks")
from sass_report import compile_sm90, kernels_to_report, sizes

# Every kernel with the tiles its launcher picks on a GPU, for an H100 (ptxas ships with triton; no GPU needed):
# catches what only the interpreter accepts.
for label, fn, consts, warps, own in kernels_to_report(3):
    own = dict(own)
    pointers = own.pop("pointers", None)
    compile_sm90(fn, {**sizes(3), **own}, consts, warps, pointers)
print("COMPILED")
"""


def test_every_kernel_compiles_for_sm90():
    # One fresh process (triton without the interpreter): every kernel of benchmarks/sass_report.py's list (each
    # family's forward and backward, with and without fill, bfloat16 images) compiles for an H100.
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, "-c", _SM90], cwd=ROOT, env=env, capture_output=True, text=True)
    assert run.returncode == 0 and run.stdout.split() == ["COMPILED"], run.stderr[-4000:]


_GPU_SCRIPT = """
import torch
from torch.library import opcheck
from stn_lightning import kernels
from stn_lightning.kernels import reference
dev = "cuda"
x = torch.randn(2, 3, 17, 13, device=dev).to(memory_format=torch.channels_last).requires_grad_()
theta = (torch.eye(2, 3, device=dev) + 0.2 * torch.randn(2, 3, 2, 3, device=dev)).requires_grad_()
for mode in ("bilinear", "nearest"):
    out = kernels.sample_affine(x, theta, (9, 11), mode=mode, backend="triton")
    ref = kernels.sample_affine(x, theta, (9, 11), mode=mode, backend="reference")
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
f = lambda x, t: kernels.sample_affine(x, t, (9, 11), padding_mode="border", backend="triton")
compiled = torch.compile(f, fullgraph=True)
compiled(x, theta).square().sum().backward()
gx, gt = x.grad.clone(), theta.grad.clone()
x.grad = theta.grad = None
kernels.sample_affine(x, theta, (9, 11), padding_mode="border", backend="reference").square().sum().backward()
torch.testing.assert_close(gx, x.grad, rtol=1e-4, atol=1e-4)
torch.testing.assert_close(gt, theta.grad, rtol=1e-3, atol=1e-3)
# Under AOT dispatch the parameter gradient's sum over tiles is compiled by inductor, which adds in another order
# than eager torch.sum: float32 differences of ~1e-5 relative (measured on an H100: 8e-5 on entries of ~3).
tol = dict(atol=1e-4, rtol=1e-4)
op = torch.ops.stn_lightning.sample.default
e = torch.empty(0, device=dev)
opcheck(op, (x, theta, e, "affine", 9, 11, False, "zeros", "bilinear", 0.0), **tol)
opcheck(op, (x, theta, e, "affine", 9, 11, False, "zeros", "bilinear", -0.5), **tol)
h = torch.eye(3, device=dev).repeat(2, 3, 1, 1).requires_grad_()
opcheck(op, (x, h, e, "projective", 5, 4, True, "border", "bilinear", 0.0), **tol)
grid = (torch.rand(2, 3, 5, 4, 2, device=dev) * 2 - 1).requires_grad_()
opcheck(op, (x, grid, e, "grid", 5, 4, False, "zeros", "bilinear", 0.0), **tol)
t = reference.tps_target_points(2, device=dev)
c = torch.zeros(2, 3, 7, 2, device=dev).requires_grad_()
opcheck(op, (x, c, t, "tps", 5, 4, False, "zeros", "bilinear", 0.0), **tol)
with torch.autocast("cuda", dtype=torch.bfloat16):
    out = kernels.sample_affine(x, theta, (9, 11), backend="triton")
assert out.dtype == torch.bfloat16, out.dtype
out.float().sum().backward()
assert theta.grad.dtype == torch.float32
print("OK")
"""


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the compiled Triton path (compile, opcheck) needs a GPU")
def test_gpu_compile_opcheck_autocast():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(_GPU_SCRIPT)], cwd=ROOT, env=env, capture_output=True, text=True
    )
    assert run.returncode == 0 and "OK" in run.stdout, run.stderr[-4000:]


_SECOND_GPU_SCRIPT = """
import torch
from stn_lightning import kernels
from stn_lightning.kernels import reference
torch.cuda.set_device(0)  # the current device is cuda:0; the tensors live on cuda:1
dev = torch.device("cuda:1")
x = torch.rand(2, 3, 17, 13, device=dev, requires_grad=True)
theta = (torch.eye(2, 3, device=dev) + 0.1 * torch.randn(2, 2, 2, 3, device=dev)).requires_grad_()
out = kernels.sample_affine(x, theta, (9, 7), backend="triton")
ref = kernels.sample_affine(x.detach(), theta.detach(), (9, 7), backend="reference")
assert out.device == dev and torch.allclose(out, ref, atol=1e-5), (out - ref).abs().max()
out.sum().backward()
assert x.grad.device == dev and theta.grad.device == dev and torch.isfinite(theta.grad).all()
assert torch.cuda.current_device() == 0
print("OK")
"""


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_kernels_launch_on_their_tensors_device():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(_SECOND_GPU_SCRIPT)], cwd=ROOT, env=env, capture_output=True, text=True
    )
    assert run.returncode == 0 and "OK" in run.stdout, run.stderr[-4000:]
