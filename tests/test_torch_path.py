"""kernels/torch_path.py, the PyTorch path that CPU tensors run, against kernels/reference.py, the exact oracle."""

from __future__ import annotations

import itertools
from collections.abc import Callable

import pytest
import torch
from torch.autograd import gradcheck

from stn_lightning import kernels
from stn_lightning.kernels import reference, torch_path

FAMILIES = ["affine", "projective", "tps", "grid"]
OPTIONS = list(itertools.product(["zeros", "border"], ["bilinear", "nearest"], [False, True], [0.0, -0.7]))
TARGET = reference.tps_target_points(3, dtype=torch.float64)


def _params(family: str, b: int, k: int, spread: float, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    g = torch.Generator().manual_seed(hash((family, b, k, spread)) % 2**31)
    noise = lambda *shape: spread * torch.randn(*shape, generator=g, dtype=dtype)  # noqa: E731
    if family == "affine":
        return torch.eye(2, 3, dtype=dtype) + noise(b, k, 2, 3)
    if family == "projective":
        return torch.eye(3, dtype=dtype) + noise(b, k, 3, 3)
    if family == "tps":
        return TARGET.to(dtype) + noise(b, k, TARGET.shape[0], 2)  # control points
    return 1.5 * noise(b, k, 5, 6, 2) / max(spread, 1e-3)  # a grid reaching past the image


def _op(backend: str, family: str, **options: object) -> Callable:  # type: ignore[no-untyped-def]
    # The public op of the family through ``backend`` ("torch" or "reference").
    size = (5, 6)
    options["backend"] = backend
    if family == "affine":
        return lambda x, p: kernels.sample_affine(x, p, size, **options)
    if family == "projective":
        return lambda x, p: kernels.sample_projective(x, p, size, **options)
    if family == "tps":
        return lambda x, p: kernels.sample_tps(x, p, size, target_points=TARGET.to(p.dtype), **options)
    return lambda x, p: kernels.sample_grid(x, p, **options)


def _outputs_and_grads(fn: Callable, x: torch.Tensor, p: torch.Tensor) -> list[torch.Tensor]:
    x, p = x.detach().requires_grad_(), p.detach().requires_grad_()
    out = fn(x, p)
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=out.dtype)
    grads = torch.autograd.grad((out * weights).sum(), (x, p), allow_unused=True)
    return [out] + [torch.zeros_like(t) if g is None else g for g, t in zip(grads, (x, p), strict=True)]


def _assert_same(fn_fast: Callable, fn_ref: Callable, x: torch.Tensor, p: torch.Tensor, tol: float) -> None:
    fast, ref = _outputs_and_grads(fn_fast, x, p), _outputs_and_grads(fn_ref, x, p)
    for name, a, b in zip(("output", "image gradient", "parameter gradient"), fast, ref, strict=True):
        assert torch.isfinite(a).all(), f"{name} is not finite"
        torch.testing.assert_close(a, b, atol=tol, rtol=tol, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("k", [1, 3])
def test_matches_the_reference_in_float64(family: str, k: int) -> None:
    # Every padding, mode, align_corners and fill; parameters that send part of the points outside the image.
    x = torch.randn(2, 3, 7, 11, dtype=torch.float64)
    p = _params(family, 2, k, 0.4)
    for padding_mode, mode, align_corners, fill in OPTIONS:
        options = {"padding_mode": padding_mode, "mode": mode, "align_corners": align_corners, "fill": fill}
        _assert_same(_op("torch", family, **options), _op("reference", family, **options), x, p, 1e-10)


def _extreme(family: str) -> torch.Tensor:
    # Parameters with NaN, inf and huge entries in some transformers; the others are ordinary warps.
    p = _params(family, 2, 3, 0.3)
    if family == "affine":
        p[0, 1] = float("nan")
        p[1, 1, 0, 0] = float("inf")
        p[1, 2, 0, 2] = 1e30
    elif family == "projective":
        p[0, 1, 2] = 0.0  # w = 0 everywhere: every point at infinity
        p[1, 1, 0, 1] = float("nan")
        p[1, 2, 2, 0] = 1e-30  # w tiny but valid: a / w overflows
        p[1, 2, 0, 2] = 1e30
    elif family == "tps":
        p[0, 1, 0, 0] = float("nan")
        p[1, 2, -1, 1] = 1e30
    else:
        p[0, 0, 0, 0, 0] = float("nan")
        p[0, 1, 1, 1, 1] = float("inf")
        p[1, 1, 2, 2, 0] = -float("inf")
        p[1, 2, 3, 3] = 1e30
    return p


@pytest.mark.parametrize("family", FAMILIES)
def test_non_finite_and_huge_parameters_read_nothing_as_in_the_reference(family: str) -> None:
    x = torch.randn(2, 2, 7, 11, dtype=torch.float64)
    for padding_mode, align_corners, fill in itertools.product(["zeros", "border"], [False, True], [0.0, 0.5]):
        options = {"padding_mode": padding_mode, "align_corners": align_corners, "fill": fill}
        _assert_same(_op("torch", family, **options), _op("reference", family, **options), x, _extreme(family), 1e-10)


def test_nan_transformer_gives_the_fill_and_leaves_the_others_alone() -> None:
    x = torch.randn(2, 1, 9, 9)
    theta = _params("affine", 2, 2, 0.2, torch.float32)
    clean = kernels.sample_affine(x, theta, 9, fill=-0.5, backend="torch")
    theta[0, 1] = float("nan")
    out = kernels.sample_affine(x, theta, 9, fill=-0.5, backend="torch")
    assert torch.equal(out[0, 1], torch.full_like(out[0, 1], -0.5))
    assert torch.equal(out[0, 0], clean[0, 0]) and torch.equal(out[1], clean[1])


@pytest.mark.parametrize("family", FAMILIES)
def test_float32_and_half_images_follow_the_reference(family: str) -> None:
    x = torch.randn(3, 2, 28, 28)
    p = _params(family, 3, 3, 0.3, torch.float32)
    fast, ref = _op("torch", family), _op("reference", family)
    torch.testing.assert_close(fast(x, p), ref(x, p), atol=2e-5, rtol=1e-5)
    for dtype in (torch.float16, torch.bfloat16):
        out = fast(x.to(dtype), p)
        assert out.dtype == dtype
        torch.testing.assert_close(out, ref(x.to(dtype), p))  # sampled in float32 both: the dtype's rounding apart
    cl = x.to(memory_format=torch.channels_last)
    torch.testing.assert_close(fast(cl, p), ref(x, p), atol=2e-5, rtol=1e-5)


def test_fill_is_the_value_outside_the_image() -> None:
    # With zeros padding, sampling with fill f is sampling x - f and adding f back, the copy it replaces.
    x = torch.randn(2, 3, 7, 11, dtype=torch.float64)
    for family in FAMILIES:
        p = _params(family, 2, 2, 0.5)
        for module in ("torch", "reference"):
            with_fill = _op(module, family, fill=0.3)(x, p)
            shifted = _op(module, family)(x - 0.3, p) + 0.3
            torch.testing.assert_close(with_fill, shifted, atol=1e-12, rtol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_gradcheck_float64(family: str) -> None:
    x = torch.randn(1, 2, 5, 4, dtype=torch.float64, requires_grad=True)
    p = _params(family, 1, 2, 0.3).requires_grad_()
    for padding_mode in ("zeros", "border"):
        assert gradcheck(_op("torch", family, padding_mode=padding_mode, fill=0.2), (x, p))


def test_cpu_tensors_run_the_torch_path() -> None:
    x = torch.randn(2, 1, 8, 8)
    theta = _params("affine", 2, 2, 0.2, torch.float32)
    for backend in ("auto", "torch"):
        out = kernels.sample_affine(x, theta, 5, backend=backend)  # type: ignore[arg-type]
        spec = reference.Spec((5, 5), False, "zeros", "bilinear", 0.0)
        assert torch.equal(out, torch_path.affine(x, theta, None, spec))


@pytest.mark.parametrize("family", FAMILIES)
def test_channels_last_image_gets_its_gradient_channels_last(family: str) -> None:
    # Inside a channels-last network the image's gradient comes back in its layout, equal to the contiguous case's.
    x = torch.randn(2, 3, 7, 6, dtype=torch.float64)
    p = _params(family, 2, 2, 0.3)
    grads = []
    for layout in (torch.contiguous_format, torch.channels_last):
        xi = x.to(memory_format=layout).requires_grad_()
        out = _op("torch", family, fill=0.2)(xi, p)
        (g,) = torch.autograd.grad(out, xi, torch.cos(torch.arange(out.numel(), dtype=x.dtype)).view_as(out))
        assert g.is_contiguous(memory_format=layout)
        grads.append(g)
    torch.testing.assert_close(grads[1], grads[0], atol=1e-12, rtol=0)
    cl = x.to(memory_format=torch.channels_last).requires_grad_()
    assert gradcheck(_op("torch", family), (cl, p.clone().requires_grad_()))
