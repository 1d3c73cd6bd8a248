"""The PyTorch sampling ops (reference and torch path): exact identities, agreement with F.grid_sample, gradients."""

from __future__ import annotations

import functools
import types

import pytest
import torch
import torch.nn.functional as F
from torch.autograd import gradcheck

from stn_lightning import kernels
from stn_lightning.kernels import reference

#: The public ops with backend="reference": the oracle reached through the same calls as every other backend.
REFERENCE = types.SimpleNamespace(
    **{
        name: functools.partial(getattr(kernels, name), backend="reference")
        for name in ("sample_affine", "sample_projective", "sample_tps", "sample_grid")
    }
)
SIZES = [(1, 1), (7, 13), (28, 28), (5, 2)]


def _identity_params(b: int, k: int) -> dict[str, torch.Tensor]:
    return {
        "affine": torch.eye(2, 3).expand(b, k, 2, 3),
        "projective": torch.eye(3).expand(b, k, 3, 3),
        "tps": kernels.tps_target_points(4).expand(b, k, 16, 2),
    }


def _sample(module, op: str, x: torch.Tensor, p: torch.Tensor, size: tuple[int, int], **kw: object) -> torch.Tensor:  # type: ignore[no-untyped-def]
    fn = {"affine": module.sample_affine, "projective": module.sample_projective, "tps": module.sample_tps}[op]
    return fn(x, p, size, **kw)  # type: ignore[operator]


@pytest.mark.parametrize("op", ["affine", "projective", "tps"])
@pytest.mark.parametrize("align_corners", [False, True])
@pytest.mark.parametrize("size", SIZES)
def test_identity_is_exact(op: str, align_corners: bool, size: tuple[int, int]) -> None:
    # Exact in the reference (the oracle); the PyTorch path (kernels.torch_path, what CPU tensors run) goes through
    # F.grid_sample's normalised coordinates and is exact only to float32 rounding of the coordinate: its weights are
    # off by up to a few 1e-6 (projective: one more rounding in the division), a share of the neighbours' differences.
    x = torch.randn(2, 3, *size)
    params = _identity_params(2, 3)[op]
    out = _sample(REFERENCE, op, x, params, size, align_corners=align_corners)
    fast = _sample(kernels, op, x, params, size, align_corners=align_corners, backend="torch")
    assert out.shape == fast.shape == (2, 3, 3, *size)
    for k in range(3):
        assert torch.equal(out[:, k], x), f"transformer {k} of {op} is not the identity"
        torch.testing.assert_close(fast[:, k], x, atol=5e-5, rtol=0)


def test_identity_is_exact_channels_last_and_border() -> None:
    x = torch.randn(2, 4, 9, 11).to(memory_format=torch.channels_last)
    for module in (REFERENCE, kernels):
        out = module.sample_affine(x, torch.eye(2, 3).expand(2, 1, 2, 3), (9, 11), padding_mode="border")
        assert out.is_contiguous()
        if module is REFERENCE:
            assert torch.equal(out[:, 0], x)
        torch.testing.assert_close(out[:, 0], x, atol=1e-5, rtol=0)


@pytest.mark.parametrize("align_corners", [False, True])
@pytest.mark.parametrize("padding_mode", ["zeros", "border"])
@pytest.mark.parametrize("mode", ["bilinear", "nearest"])
def test_affine_matches_grid_sample(align_corners: bool, padding_mode: str, mode: str) -> None:
    torch.manual_seed(0)
    x = torch.randn(2, 3, 11, 17)
    theta = torch.eye(2, 3) + 0.5 * torch.randn(2, 3, 2, 3)
    out = kernels.sample_affine(x, theta, (5, 9), align_corners=align_corners, padding_mode=padding_mode, mode=mode)
    for k in range(3):
        grid = F.affine_grid(theta[:, k], [2, 3, 5, 9], align_corners=align_corners)
        expected = F.grid_sample(x, grid, mode=mode, padding_mode=padding_mode, align_corners=align_corners)
        # float32 rounding of coordinates computed in pixels vs normalised units: ~1e-6 in the weights.
        torch.testing.assert_close(out[:, k], expected, atol=2e-5, rtol=1e-5)


def test_affine_gradients_match_grid_sample() -> None:
    torch.manual_seed(1)
    x = torch.randn(2, 3, 11, 17, requires_grad=True)
    theta = (torch.eye(2, 3) + 0.4 * torch.randn(2, 3, 2, 3)).requires_grad_()
    out = kernels.sample_affine(x, theta, (6, 8))
    g = torch.randn_like(out)
    gx, gt = torch.autograd.grad(out, (x, theta), g)
    x2, t2 = x.detach().requires_grad_(), theta.detach().requires_grad_()
    ref = torch.stack(
        [
            F.grid_sample(x2, F.affine_grid(t2[:, k], [2, 3, 6, 8], align_corners=False), align_corners=False)
            for k in range(3)
        ],
        dim=1,
    )
    rx, rt = torch.autograd.grad(ref, (x2, t2), g)
    torch.testing.assert_close(gx, rx, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(gt, rt, atol=1e-3, rtol=1e-3)


def test_projective_and_tps_match_grid_sample() -> None:
    torch.manual_seed(2)
    x = torch.randn(2, 2, 13, 10)
    base = kernels.base_grid((7, 9), False, x.device, torch.float32)
    h = torch.eye(3) + 0.15 * torch.randn(2, 3, 3, 3)
    uvw = torch.cat([base, torch.ones_like(base[..., :1])], -1) @ h.transpose(-1, -2).unsqueeze(2)
    proj_grid = uvw[..., :2] / uvw[..., 2:]
    cp = kernels.tps_target_points(3) + 0.1 * torch.randn(2, 3, 9, 2)
    # The spline through its control points: evaluate it at the target points, where it must hit them.
    coeffs = kernels.tps_coefficients(cp, kernels.tps_target_points(3))
    t = kernels.tps_target_points(3)
    feats = torch.cat([reference.tps_kernel(((t[:, None] - t[None]) ** 2).sum(-1)), torch.ones(9, 1), t], -1)
    torch.testing.assert_close(t + feats @ coeffs, cp, atol=1e-5, rtol=1e-5)
    radial = reference.tps_kernel(((base[:, :, None, :] - t) ** 2).sum(-1))
    tps_grid = base + torch.cat([radial, torch.ones_like(base[..., :1]), base], -1) @ coeffs.unsqueeze(2)
    for out, grid in [
        (kernels.sample_projective(x, h, (7, 9)), proj_grid),
        (kernels.sample_tps(x, cp, (7, 9)), tps_grid),
        (kernels.sample_grid(x, proj_grid), proj_grid),
    ]:
        for k in range(3):
            expected = F.grid_sample(x, grid[:, k], align_corners=False)
            torch.testing.assert_close(out[:, k], expected, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("padding_mode", ["zeros", "border"])
@pytest.mark.parametrize("align_corners", [False, True])
def test_gradcheck_float64(padding_mode: str, align_corners: bool) -> None:
    torch.manual_seed(3)
    d = torch.float64
    x = torch.randn(2, 2, 5, 6, dtype=d, requires_grad=True)
    kw = {"align_corners": align_corners, "padding_mode": padding_mode}
    theta = (torch.eye(2, 3, dtype=d) + 0.3 * torch.randn(2, 2, 2, 3, dtype=d)).requires_grad_()
    h = (torch.eye(3, dtype=d) + 0.1 * torch.randn(2, 2, 3, 3, dtype=d)).requires_grad_()
    cp = (kernels.tps_target_points(3, dtype=d) + 0.1 * torch.randn(2, 2, 9, 2, dtype=d)).requires_grad_()
    grid = (2.4 * torch.rand(2, 2, 3, 4, 2, dtype=d) - 1.2).requires_grad_()
    assert gradcheck(lambda a, p: kernels.sample_affine(a, p, (4, 3), **kw), (x, theta))
    assert gradcheck(lambda a, p: kernels.sample_projective(a, p, (4, 3), **kw), (x, h))
    assert gradcheck(lambda a, p: kernels.sample_tps(a, p, (4, 3), **kw), (x, cp))
    assert gradcheck(lambda a, p: kernels.sample_grid(a, p, **kw), (x, grid))


def test_bad_transformer_is_isolated() -> None:
    torch.manual_seed(4)
    x = torch.randn(2, 3, 11, 17, requires_grad=True)
    good = torch.eye(2, 3) + 0.2 * torch.randn(2, 3, 2, 3)
    bad = good.clone()
    bad[0, 1] = float("nan")
    bad[1, 1, 0, 0] = float("inf")
    bad[1, 2, 0, 2] = 1e30
    theta = bad.requires_grad_()
    out = kernels.sample_affine(x, theta, (6, 8))
    out.sum().backward()
    assert torch.isfinite(out).all() and torch.isfinite(x.grad).all() and torch.isfinite(theta.grad).all()
    assert torch.equal(out[0, 1], torch.zeros_like(out[0, 1]))
    assert torch.equal(out[1, 2], torch.zeros_like(out[1, 2])), "a translation of 1e30 reads nothing"
    clean = kernels.sample_affine(x.detach(), good, (6, 8))
    torch.testing.assert_close(out[0, [0, 2]], clean[0, [0, 2]], atol=0, rtol=0)
    torch.testing.assert_close(out[1, 0], clean[1, 0], atol=0, rtol=0)


def test_projective_point_at_infinity_reads_nothing() -> None:
    x = torch.randn(1, 1, 8, 8)
    h = torch.eye(3).expand(1, 2, 3, 3).clone()
    h[0, 1, 2] = torch.tensor([0.0, 0.0, 0.0])  # w = 0 everywhere: every point is at infinity
    h.requires_grad_()
    out = kernels.sample_projective(x, h, (8, 8), padding_mode="border")
    out.sum().backward()
    assert torch.equal(out[0, 1], torch.zeros(1, 8, 8))
    assert torch.equal(out[0, 0], x[0])
    assert torch.isfinite(h.grad).all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_dtypes_follow_the_image(dtype: torch.dtype) -> None:
    x = torch.randn(1, 2, 6, 6).to(dtype)
    for module in (REFERENCE, kernels):
        out = module.sample_affine(x, torch.eye(2, 3).expand(1, 2, 2, 3), 6)
        assert out.dtype == dtype
        if module is REFERENCE:
            assert torch.equal(out[:, 0], x)
        torch.testing.assert_close(out[:, 0], x)  # the dtype's own tolerance


def test_bad_input_raises_value_error() -> None:
    x = torch.randn(2, 1, 8, 8)
    theta = torch.eye(2, 3).expand(2, 1, 2, 3)
    with pytest.raises(ValueError, match=r"\(B, C, H, W\)"):
        kernels.sample_affine(x[0], theta, 4)
    with pytest.raises(ValueError, match="theta of shape"):
        kernels.sample_affine(x, theta[:1], 4)
    with pytest.raises(ValueError, match="K >= 1"):
        kernels.sample_affine(x, theta[:, :0], 4)
    with pytest.raises(ValueError, match="output size"):
        kernels.sample_affine(x, theta, (0, 4))
    with pytest.raises(ValueError, match="dtype"):
        kernels.sample_affine(x.long(), theta, 4)
    with pytest.raises(ValueError, match="padding_mode"):
        kernels.sample_affine(x, theta, 4, padding_mode="reflection")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="backend"):
        kernels.sample_affine(x, theta, 4, backend="cuda")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="N = n \\* n"):
        kernels.sample_tps(x, torch.zeros(2, 1, 5, 2), 4)


def test_auto_backend_is_torch_on_cpu() -> None:
    assert kernels.resolve_backend("auto", torch.zeros(1)) == "torch"
    assert kernels.resolve_backend("torch", torch.zeros(1)) == "torch"
    assert kernels.resolve_backend("reference", torch.zeros(1)) == "reference"


def test_the_reference_backend_is_the_oracle() -> None:
    # backend="reference" reaches kernels.reference's family function through the same validation and dispatch.
    x = torch.randn(2, 3, 7, 6)
    theta = torch.eye(2, 3) + 0.3 * torch.randn(2, 2, 2, 3)
    spec = reference.Spec((5, 4), True, "border", "bilinear", 0.0)
    out = kernels.sample_affine(x, theta, (5, 4), align_corners=True, padding_mode="border", backend="reference")
    assert torch.equal(out, reference.affine(x, theta, None, spec))
    assert kernels._TABLE["reference"] == {f: getattr(reference, f) for f in ("affine", "projective", "tps", "grid")}


def test_tps_solve_is_cached_per_target_tensor() -> None:
    # The spline's system is solved once per target-point tensor (a model's fixed buffer) and dtype, and solved
    # again after the tensor changes in place; every cached solve equals a fresh one.
    target = kernels.tps_target_points(3)
    cp = target + 0.1 * torch.randn(2, 1, 9, 2, generator=torch.Generator().manual_seed(5))
    first = reference._tps_solver(target, torch.float32, target.device)
    assert reference._tps_solver(target, torch.float32, target.device) is first
    torch.testing.assert_close(first, reference._tps_system_inverse(target).float(), rtol=0, atol=0)
    assert reference._tps_solver(target, torch.float64, target.device).dtype == torch.float64
    before = kernels.tps_coefficients(cp, target)
    target.mul_(0.5)  # the same tensor, other points
    moved = reference._tps_solver(target, torch.float32, target.device)
    assert moved is not first
    torch.testing.assert_close(moved, reference._tps_system_inverse(target).float(), rtol=0, atol=0)
    assert not torch.allclose(kernels.tps_coefficients(cp, target), before)
    # The default lattice is one tensor per size and device, so sample_tps without target points reuses its solve.
    assert kernels._default_target_points(cp, cp.device) is kernels._default_target_points(cp, cp.device)
    # A target that requires grad is solved afresh and passes its gradient on.
    trainable = kernels.tps_target_points(3).requires_grad_()
    kernels.tps_coefficients(cp, trainable).sum().backward()
    assert trainable.grad is not None and bool(trainable.grad.abs().sum() > 0)


def test_small_constants_are_made_once() -> None:
    # The pixel-scale factors are a host-to-device copy on GPUs: made once per value, dtype and device.
    theta = torch.zeros(1, 1, 2, 3)
    first = reference.pixel_scale_matrix(2, (6, 8), (3, 4), False, torch.float32, theta)
    assert reference.pixel_scale_matrix(2, (6, 8), (3, 4), False, torch.float32, theta) is first
    assert reference.pixel_scale_matrix(2, (6, 8), (3, 4), True, torch.float32, theta) is not first
    assert reference.pixel_scale_matrix(2, (6, 8), (3, 4), False, torch.float64, theta).dtype == torch.float64
    torch.testing.assert_close(first, torch.tensor(reference.pixel_scale_factors((6, 8), (3, 4), False)[:2]))


def test_constants_made_in_inference_mode_serve_training_later() -> None:
    # trainer.test() then trainer.fit() in one process: the cached pixel-scale constant is first made under
    # inference mode and must still be usable in a graph that autograd records.
    x = torch.randn(1, 1, 13, 11)
    theta = torch.tensor([[[[0.9, 0.1, 0.05], [-0.1, 1.1, 0.0]]]])
    with torch.inference_mode():
        kernels.sample_affine(x, theta, (7, 5), backend="torch")
    theta = theta.clone().requires_grad_(True)
    kernels.sample_affine(x, theta, (7, 5), backend="torch").sum().backward()
    assert theta.grad is not None and torch.isfinite(theta.grad).all()
