"""The gather backward of sample_affine and sample_projective (image_grad="gather") against the reference.

The gather kernel inverts each warp and lets every input pixel sum the output pixels that read it; warps it cannot
bound (singular, non-finite, zoomed in beyond WINDOW_CAP, a horizon near the output) are flagged and left to the
scatter kernel. These
tests check the image and parameter gradients against kernels.reference with autograd, that the gather really took
the warps it should (the flags), that mixing good and bad warps changes nothing for the good ones, and that the
parameter gradient the gather reduces agrees with the scatter kernel's. Without a GPU the kernels run through
Triton's interpreter, so every case is tiny (an 8 x 8 tile per program there); with a GPU (and triton imported
without the interpreter) the same tests run the compiled kernels on CUDA tensors through the torch.library ops.
"""

import math
import os
import subprocess
import sys

import pytest
import torch

triton = pytest.importorskip("triton")  # after tests/conftest.py has decided on TRITON_INTERPRET

from triton_helpers import ROOT, TOL, force_int64, interpreter_active  # noqa: E402
from triton_helpers import image as _image  # noqa: E402

from stn_lightning.kernels import reference  # noqa: E402

INTERPRETED = interpreter_active()
DEVICE = "cpu" if INTERPRETED else "cuda"
pytestmark = [
    pytest.mark.filterwarnings("ignore::RuntimeWarning"),  # numpy warns on NaN/inf inside the interpreter
    pytest.mark.skipif(
        not INTERPRETED and not torch.cuda.is_available(),
        reason="triton was imported without TRITON_INTERPRET=1 and there is no GPU (tests/test_kernels_triton.py "
        "covers the interpreter in a fresh process)",
    ),
]


def _gathering(monkeypatch, family):
    """kernels.<family> with options.image_grad = "gather"; ``module.flags`` collects the flags of every gather."""
    import importlib

    module = importlib.import_module(f"stn_lightning.kernels.{family}")
    sampler = importlib.import_module("stn_lightning.kernels.sampler")
    options = importlib.import_module("stn_lightning.kernels._autograd").options
    monkeypatch.setattr(options, "_image_grad", options.image_grad)  # restored after the test
    options.set_image_grad("gather")
    launches = []
    gather = sampler.gather

    def recording(*args, **kwargs):
        flags, part = gather(*args, **kwargs)
        launches.append(flags)
        return flags, part

    monkeypatch.setattr(sampler, "gather", recording)
    monkeypatch.setattr(module, "flags", launches, raising=False)
    return module


@pytest.fixture
def affine(monkeypatch):
    return _gathering(monkeypatch, "affine")


@pytest.fixture
def projective(monkeypatch):
    return _gathering(monkeypatch, "projective")


def _theta(*rows):
    """(1, K, 2, 3) from K (a, b, tx, c, d, ty) tuples."""
    return torch.tensor(rows, dtype=torch.float64).view(1, len(rows), 2, 3)


def _rotation(degrees, scale=1.0, tx=0.0, ty=0.0):
    c, s = scale * math.cos(math.radians(degrees)), scale * math.sin(math.radians(degrees))
    return (c, -s, tx, s, c, ty)


IDENTITY = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
ROT30 = _rotation(30)
ZOOM_IN = (0.4, 0.0, 0.1, 0.0, 0.4, -0.05)  # 2.5x: a 5-pixel window per axis
ZOOM_OUT = (2.0, 0.0, 0.0, 0.0, 2.0, 0.0)
SHEAR = (1.3, 0.4, 0.1, -0.2, 0.7, 0.0)  # anisotropic and sheared
OUTSIDE = (1.0, 0.0, 0.8, 0.0, 1.0, -0.6)  # part of the output reads outside the input


def _homography(*rows):
    """(1, K, 3, 3) from K 9-tuples (row-major), normalised coordinates as kernels.sample_projective takes them."""
    return torch.tensor(rows, dtype=torch.float64).view(1, len(rows), 3, 3)


H_IDENTITY = (1.0, 0, 0, 0, 1.0, 0, 0, 0, 1.0)
H_TILT = (1.0, 0.1, 0.05, -0.05, 0.9, 0.0, 0.15, -0.1, 1.0)  # a mild perspective
H_ZOOM_OUT = (1.6, 0.2, 0.1, 0.0, 1.4, -0.2, -0.1, 0.2, 1.0)  # zoom out, sheared, perspective the other way
H_SCALED = tuple(2.5 * v for v in H_TILT)  # the same warp: a homography is defined up to scale
H_ZOOM_IN = (0.45, 0.0, 0.1, 0.0, 0.45, 0.0, 0.05, 0.05, 1.0)  # 2.2x: a window of about 5 pixels
H_HORIZON = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 1.2, 0.0, 0.3)  # w = 1.2 u + 0.3 changes sign inside the output
H_MILD = (1.0, 0.05, 0.0, 0.0, 1.0, 0.1, 0.05, 0.0, 1.0)  # a slight perspective (H_TILT's bound exceeds the cap 2x in)


def _grads(impl, x, theta, size, grad, need=(True, True), family="affine", **options):
    xa = x.detach().clone().requires_grad_(need[0])
    ta = theta.detach().clone().requires_grad_(need[1])
    out = getattr(impl, f"sample_{family}")(xa, ta, size, **options)
    out.backward(grad)
    # In nearest mode the reference's theta gets no gradient at all (None): compare zeros with zeros.
    gt = ta.grad if ta.grad is not None or not need[1] else torch.zeros_like(ta)
    return xa.grad, gt


def _check(module, x, theta, size, grad=None, flags=None, **options):
    """Image and parameter gradients of the Triton op of ``module`` (kernels.affine or kernels.projective, gathering)
    against the reference; returns them."""
    family = module.__name__.rsplit(".", 1)[-1]
    x, theta = x.to(DEVICE), theta.to(device=DEVICE, dtype=reference.compute_dtype(x))
    b, k = theta.shape[:2]
    if grad is None:
        shape = (b, k, x.shape[1], *size)
        grad = torch.randn(shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    grad = grad.to(device=DEVICE, dtype=x.dtype)
    gx, gt = _grads(module, x, theta, size, grad, family=family, **options)
    rgx, rgt = _grads(reference, x, theta, size, grad, family=family, **options)
    # The image gradient's tolerance: the gather adds the same terms as the scatter and the reference (same
    # coordinates, corners and weights), in another order.
    rtol, atol = TOL[x.dtype][1]
    assert gx.dtype == x.dtype and gx.stride() == x.stride()
    torch.testing.assert_close(gx, rgx, rtol=rtol, atol=atol)
    torch.testing.assert_close(gt, rgt, rtol=1e-4 if x.dtype != torch.float64 else 1e-10, atol=1e-4)
    assert len(module.flags) == 1, "the image gradient did not go through the gather kernel"
    expected = torch.ones(b * k, dtype=torch.int32) if flags is None else torch.tensor(flags, dtype=torch.int32)
    assert torch.equal(module.flags[0].cpu(), expected)
    return gx, gt


# (name, B, C, H, W, Ho, Wo, dtype, align_corners, mode, channels_last, theta rows per image)
CASES = [
    ("identity-rot-zoomin", 1, 1, 7, 5, 7, 5, torch.float64, False, "bilinear", False, [IDENTITY, ROT30, ZOOM_IN]),
    # 11 x 13 spans 2 x 2 interpreter tiles; the output is smaller than the input.
    ("zoomout-shear-outside", 2, 5, 11, 13, 5, 7, torch.float32, True, "bilinear", True, [ZOOM_OUT, SHEAR, OUTSIDE]),
    ("rot30-larger-output", 1, 3, 5, 6, 9, 11, torch.float32, False, "bilinear", False, [_rotation(-30, 0.9, 0.2)]),
    ("nearest-f64", 1, 2, 6, 7, 7, 5, torch.float64, True, "nearest", False, [_rotation(30, 0.7), ZOOM_OUT]),
    ("nearest-f32-cl", 1, 5, 7, 3, 3, 7, torch.float32, False, "nearest", True, [SHEAR, _rotation(5, 0.8)]),
    ("float16-cl", 1, 3, 5, 7, 6, 4, torch.float16, False, "bilinear", True, [_rotation(10, 1.1, -0.3, 0.2)]),
]


def test_strided_grad_out(affine):
    # grad_out read with its own strides: a transposed copy and an expanded (stride 0) gradient.
    x = _image(1, 2, 6, 5, seed=2)
    theta = _theta(_rotation(20, 0.8, 0.1), SHEAR)
    transposed = torch.randn(1, 2, 2, 7, 4, generator=torch.Generator().manual_seed(5)).transpose(-1, -2)
    _check(affine, x, theta, (4, 7), grad=transposed)
    affine.flags.clear()
    _check(affine, x, theta, (4, 7), grad=torch.ones(()).expand(1, 2, 2, 4, 7))


def test_mixed_conditioning(affine):
    """Good and ill-conditioned warps in one batch: the gather takes the good ones, the scatter the rest, and a
    non-finite warp changes nothing for the others (the extreme parameters of test_kernels_triton.py)."""
    nan, inf = float("nan"), float("inf")
    good = [_rotation(15, 0.9), SHEAR]
    theta = torch.cat(
        [
            _theta((5.0, 0, 0, 0, 5.0, 0), (1.0, 0, 3.0, 0, 1.0, -3.0), (0,) * 6, (nan,) * 6),
            _theta((1e30,) * 6, (inf,) * 6, *good),
        ]
    )
    x = _image(2, 2, 7, 6, seed=5)
    size = (7, 6)
    # x5 and +-3 translation are well conditioned; theta = 0 (singular), NaN, 1e30 (det overflows) and inf are not.
    gx, gt = _check(affine, x, theta, size, flags=[1, 1, 0, 0, 0, 0, 1, 1])
    assert torch.isfinite(gx).all() and torch.isfinite(gt).all()
    # Dropping the non-finite warps (which read nothing and send nothing) leaves every other gradient as it was.
    full_grad = torch.randn(2, 4, 2, *size, generator=torch.Generator().manual_seed(7), dtype=torch.float64).float()
    keep = torch.tensor([[0, 1, 2], [0, 2, 3]])
    part_theta = torch.stack([theta[i, keep[i]] for i in range(2)]).float()
    part_grad = torch.stack([full_grad[i, keep[i]] for i in range(2)])
    affine.flags.clear()
    pgx, pgt = _check(affine, x, part_theta, size, grad=part_grad, flags=[1, 1, 0, 0, 1, 1])
    torch.testing.assert_close(gx, pgx, rtol=1e-6, atol=1e-6)
    for i in range(2):
        torch.testing.assert_close(gt[i, keep[i]], pgt[i], rtol=1e-6, atol=1e-6)


def test_window_cap_and_degenerate_axes(affine):
    # A 5x zoom-in needs a 10-pixel window (> WINDOW_CAP = 8): scattered; 3x (6.7 pixels) is gathered.
    x = _image(1, 2, 6, 5, seed=9)
    theta = _theta((0.2, 0, 0.1, 0, 0.2, 0), (1 / 3, 0, -0.1, 0, 1 / 3, 0.2))
    _check(affine, x, theta, (6, 5), flags=[0, 1])
    # A one-pixel-wide output with align_corners has no extent along u: M's 2 x 2 part is singular, so scattered.
    affine.flags.clear()
    _check(affine, x, _theta(IDENTITY, SHEAR), (4, 1), align_corners=True, flags=[0, 0])


@pytest.mark.parametrize("family", ["affine", "projective"])
def test_parameter_gradient_matches_the_scatter_kernel(family, monkeypatch):
    # The gather reduces the matrix gradient of the (b, k) it takes from its (output, input pixel) pairs: the scatter
    # kernel's terms in another order. Image-only and parameter-only backward passes work too.
    module = _gathering(monkeypatch, family)
    x = _image(2, 3, 6, 7, channels_last=True, seed=4).to(DEVICE)
    rows = _theta(_rotation(25, 0.8), ZOOM_OUT) if family == "affine" else _homography(H_TILT, H_ZOOM_OUT)
    params = (rows.expand(2, -1, -1, -1).float() + 0.02).to(DEVICE)
    grad = torch.randn(2, 2, 3, 5, 4, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    gx, gt = _grads(module, x, params, (5, 4), grad, family=family)
    assert torch.equal(module.flags[0].cpu(), torch.ones(4, dtype=torch.int32))
    sx, st = _grads(module, x, params, (5, 4), grad, family=family, image_grad="scatter")
    assert len(module.flags) == 1  # the scatter setting does not gather
    # float32 sums of some 50 terms of size ~1 in two orders
    torch.testing.assert_close(gt, st, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gx, sx, rtol=1e-5, atol=1e-5)
    ox, none = _grads(module, x, params, (5, 4), grad, need=(True, False), family=family)
    assert none is None and torch.equal(ox, gx)
    none, ot = _grads(module, x, params, (5, 4), grad, need=(False, True), family=family)
    assert none is None and torch.equal(ot, st)  # without an image gradient there is nothing to gather
    assert len(module.flags) == 2


def test_border_padding_scatters(affine):
    # Border padding clamps onto the edge pixels (no bounded window): always the scatter kernel.
    x = _image(1, 2, 5, 6, seed=3).to(DEVICE)
    theta = _theta(SHEAR).float().to(DEVICE)
    grad = torch.randn(1, 1, 2, 4, 4, generator=torch.Generator().manual_seed(2)).to(DEVICE)
    gx, _ = _grads(affine, x, theta, (4, 4), grad, padding_mode="border")
    rgx, _ = _grads(reference, x, theta, (4, 4), grad, padding_mode="border")
    torch.testing.assert_close(gx, rgx, rtol=1e-5, atol=1e-5)
    assert affine.flags == []


def test_int64_offsets(affine, monkeypatch):
    # The IDX64 code of the gather and scatter kernels, forced on tiny tensors.
    force_int64(monkeypatch)
    _check(affine, _image(1, 3, 5, 7, channels_last=True), _theta(SHEAR, ZOOM_IN), (6, 5), align_corners=True)


@pytest.mark.parametrize("family", ["affine", "projective"])
def test_fill(family, monkeypatch):
    # With a padding value, an outside corner reads fill: the gather's parameter gradient uses x - fill (the outside
    # corners' terms), its image gradient is unchanged; reference(x - fill) + fill is the definition.
    module = _gathering(monkeypatch, family)
    x = _image(2, 3, 6, 7, seed=4).to(DEVICE)
    rows = _theta(OUTSIDE, ZOOM_OUT) if family == "affine" else _homography(H_TILT, H_ZOOM_OUT)
    params = rows.expand(2, -1, -1, -1).float().to(DEVICE)
    grad = torch.randn(2, 2, 3, 5, 4, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    gx, gt = _grads(module, x, params, (5, 4), grad, family=family, fill=-1.5)
    rgx, rgt = _grads(reference, x - (-1.5), params, (5, 4), grad, family=family)
    torch.testing.assert_close(gx, rgx, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gt, rgt, rtol=1e-4, atol=1e-4)
    assert len(module.flags) == 1 and bool(module.flags[0].all())


@pytest.mark.parametrize("family", ["affine", "projective"])
def test_deterministic_algorithms_bitwise(family):
    # torch.use_deterministic_algorithms(True) gathers the image gradient whatever options.image_grad says: the
    # same bits on every run (on a GPU the scatter's atomics add in a different order on every run), the warps the
    # gather leaves (here one singular warp) from the reference.
    import importlib

    ops = importlib.import_module("stn_lightning.kernels.triton_ops")
    h, w = (9, 7) if INTERPRETED else (96, 80)
    x = _image(2, 3, h, w, seed=8).to(DEVICE)
    rows = _theta(_rotation(20, 0.9), ZOOM_OUT, (0,) * 6) if family == "affine" else _homography(H_TILT, H_ZOOM_OUT)
    params = rows.expand(2, -1, -1, -1).float().to(DEVICE)
    grad = torch.randn(2, params.shape[1], 3, h - 2, w + 3, generator=torch.Generator().manual_seed(3)).to(DEVICE)
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        runs = [_grads(ops, x, params, (h - 2, w + 3), grad, family=family) for _ in range(3)]
    finally:
        torch.use_deterministic_algorithms(previous)
    for gx, gt in runs[1:]:
        assert torch.equal(gx, runs[0][0]) and torch.equal(gt, runs[0][1])
    rgx, rgt = _grads(reference, x, params, (h - 2, w + 3), grad, family=family)
    torch.testing.assert_close(runs[0][0], rgx, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(runs[0][1], rgt, rtol=1e-4, atol=1e-4)


_FRESH = """
import sys
sys.path.insert(0, "benchmarks")
from sass_report import compile_sm90, kernels_to_report, sizes
import stn_lightning.kernels._gather as _gather
import stn_lightning.kernels.triton_ops as T

print(T.options.image_grad)
# Every kernel with the tiles its launcher picks on a GPU, for an H100 (ptxas ships with triton; no GPU needed):
# catches what only the interpreter accepts.
for label, fn, consts, warps, own in kernels_to_report(3):
    own = dict(own)
    pointers = own.pop("pointers", None)
    compile_sm90(fn, {**sizes(3), **own}, consts, warps, pointers)
# The gather's other variants (affine and projective), on the feature-map tile: nearest and bilinear with the
# parameter gradient, float64 compute with bfloat16 images and int64 offsets.
tile = _gather.gather_config(128)
warps = tile.pop("num_warps")
pointers = {"gx_ptr": "*fp64", "part_ptr": "*fp64", "m_ptr": "*fp64", "x_ptr": "*bf16", "go_ptr": "*bf16"}
for proj, nearest in ((False, True), (False, False), (True, True), (True, False)):
    consts = dict(NEAREST=nearest, NEED_PARAM_GRAD=not nearest, CAP=_gather.WINDOW_CAP, F64=True, IDX64=True, **tile)
    consts["HAS_FILL"] = not nearest
    compile_sm90(_gather._gather_kernel, sizes(128), {**consts, "PROJ": proj, "EPS": 1e-8}, warps, pointers)
print("COMPILED")
"""


def test_no_env_switch_and_sm90_compile():
    # One fresh process (triton without the interpreter): the environment variables that used to set the image
    # gradient change nothing (options are arguments or kernels._autograd.options), and every kernel
    # (benchmarks/sass_report.py's list: each family's forward and backward, with and without fill) compiles for an
    # H100.
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env |= {"STN_AFFINE_IMAGE_GRAD": "gather", "STN_VECTOR_ATOMICS": "1"}  # no longer read
    run = subprocess.run([sys.executable, "-c", _FRESH], cwd=ROOT, env=env, capture_output=True, text=True)
    assert run.returncode == 0 and run.stdout.split() == ["scatter", "COMPILED"], run.stderr[-4000:]


def test_random_warps_float64(affine):
    # Random rotations, anisotropic scales (zoom in up to about 3x, out up to about 3x), shears and translations
    # in float64, where the gathered sums must equal the reference's to rounding, image and parameter gradients.
    g = torch.Generator().manual_seed(11)
    for trial in range(6):
        c = 1 + trial % 3
        h, w = (int(v) for v in torch.randint(3, 11, (2,), generator=g))
        ho, wo = (int(v) for v in torch.randint(2, 10, (2,), generator=g))
        rows = []
        for _ in range(2):
            angle, scale_x, scale_y, shear, tx, ty = torch.rand(6, generator=g, dtype=torch.float64).tolist()
            cos, sin = math.cos(6.3 * angle), math.sin(6.3 * angle)
            sx, sy, sh = 0.35 + 2.6 * scale_x, 0.35 + 2.6 * scale_y, 0.4 * (shear - 0.5)
            rows.append((sx * cos, -sy * sin + sh, 1.5 * (tx - 0.5), sx * sin, sy * cos, 1.5 * (ty - 0.5)))
        x = _image(1, c, h, w, dtype=torch.float64, seed=trial)
        affine.flags.clear()
        _check(affine, x, _theta(*rows), (ho, wo), align_corners=bool(trial % 2))


# --------------------------------------------------------------------------------------------------------------
# projective warps
# --------------------------------------------------------------------------------------------------------------
# (name, B, C, H, W, Ho, Wo, dtype, align_corners, mode, channels_last, homography rows per image)
PROJECTIVE_CASES = [
    (
        "identity-tilt-zoomin",
        1,
        1,
        7,
        5,
        7,
        5,
        torch.float64,
        False,
        "bilinear",
        False,
        [H_IDENTITY, H_TILT, H_ZOOM_IN],
    ),
    ("zoomout-scaled-f32", 2, 3, 11, 13, 5, 7, torch.float32, True, "bilinear", True, [H_ZOOM_OUT, H_SCALED]),
    ("larger-output", 1, 2, 5, 6, 9, 11, torch.float32, False, "bilinear", False, [H_MILD]),
    ("nearest-f64", 1, 2, 6, 7, 7, 5, torch.float64, True, "nearest", False, [H_TILT, H_ZOOM_OUT]),
]


PARITY = [("affine", case) for case in CASES] + [("projective", case) for case in PROJECTIVE_CASES]


@pytest.mark.parametrize(("family", "case"), PARITY, ids=[f"{family}-{case[0]}" for family, case in PARITY])
def test_image_gradient_parity(family, case, monkeypatch):
    _, b, c, h, w, ho, wo, dtype, ac, mode, cl, rows = case
    module = _gathering(monkeypatch, family)
    x = _image(b, c, h, w, dtype=dtype, channels_last=cl, seed=h * w)
    params = (_theta if family == "affine" else _homography)(*rows).expand(b, -1, -1, -1).clone()
    if b > 1:  # not the same warps in every image
        noise = torch.randn(params[1:].shape, generator=torch.Generator().manual_seed(3), dtype=params.dtype)
        params[1:] += (0.05 if family == "affine" else 0.03) * noise
    _check(module, x, params, (ho, wo), align_corners=ac, mode=mode)


def test_projective_conditioning(projective):
    # A horizon inside the output, a singular matrix, NaN and a 5x zoom-in are left to the scatter kernel; the
    # gradients stay right for all of them, and the well-conditioned warps beside them are gathered.
    nan = float("nan")
    rows = [H_TILT, H_HORIZON, (1.0, 0, 0, 0, 1.0, 0, 0, 0, 0), (nan,) * 9, (0.2, 0, 0, 0, 0.2, 0, 0, 0, 1.0)]
    x = _image(1, 2, 7, 6, seed=5)
    gx, gt = _check(projective, x, _homography(*rows), (6, 5), flags=[1, 0, 0, 0, 0])
    assert torch.isfinite(gt[:, [0, 1, 2, 4]]).all()


def test_projective_random_warps_float64(projective):
    # Random homographies (rotation, anisotropic scale from 0.6x to 1.8x, shear, translation and a perspective
    # part of up to 0.15) in float64: the gathered sums equal the reference's to rounding wherever the gather takes
    # the warp, and the scatter kernel gets the rest (a horizon near the output, a window wider than WINDOW_CAP).
    g = torch.Generator().manual_seed(12)
    gathered = 0
    for trial in range(6):
        c = 1 + trial % 2
        h, w = (int(v) for v in torch.randint(3, 10, (2,), generator=g))
        ho, wo = (int(v) for v in torch.randint(2, 9, (2,), generator=g))
        rows = []
        for _ in range(2):
            angle, scale_x, scale_y, shear, tx, ty, px, py = torch.rand(8, generator=g, dtype=torch.float64).tolist()
            cos, sin = math.cos(6.3 * angle), math.sin(6.3 * angle)
            sx, sy, sh = 0.6 + 1.2 * scale_x, 0.6 + 1.2 * scale_y, 0.4 * (shear - 0.5)
            perspective = (0.3 * (px - 0.5), 0.3 * (py - 0.5), 1.0)
            rows.append((sx * cos, -sy * sin + sh, tx - 0.5, sx * sin, sy * cos, ty - 0.5, *perspective))
        x = _image(1, c, h, w, dtype=torch.float64, seed=trial)
        hom = _homography(*rows)
        projective.flags.clear()
        xa, ha = x.to(DEVICE), hom.to(DEVICE)
        grad = torch.randn(1, 2, c, ho, wo, generator=torch.Generator().manual_seed(trial), dtype=torch.float64)
        gx, gt = _grads(
            projective, xa, ha, (ho, wo), grad.to(DEVICE), family="projective", align_corners=bool(trial % 2)
        )
        rgx, rgt = _grads(
            reference, xa, ha, (ho, wo), grad.to(DEVICE), family="projective", align_corners=bool(trial % 2)
        )
        torch.testing.assert_close(gx, rgx, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(gt, rgt, rtol=1e-10, atol=1e-10)
        gathered += int(projective.flags[0].sum())
    assert gathered >= 6  # most of the 12 warps are well conditioned
