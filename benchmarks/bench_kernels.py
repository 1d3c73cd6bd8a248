"""Benchmark the fused Triton samplers against PyTorch baselines on a CUDA device (never collected by pytest).

For each workload and image dtype it times (median of CUDA-event timings, triton.testing.do_bench):

* triton: the fused kernels (forward, and forward + backward to the image and the parameters);
* eager-copies: K copies of the input, then F.affine_grid (or the family's grid in PyTorch) + F.grid_sample;
* eager-stacked: the K grids stacked in one grid_sample call on the un-copied input (what kernels.reference does),
  then the (B, K, C, Ho, Wo) transpose;
* compiled: torch.compile of the eager-stacked path;
* triton-compiled: torch.compile(fullgraph=True) of the triton path (the torch.library ops in inductor's graph,
  launched from its generated code: what a user who compiles the model gets, with less host time per call);
* triton-graph, stacked-graph: the triton and eager-stacked paths captured in CUDA graphs and replayed, which
  times their kernels without the host's work (on small workloads the host is what an eager step costs);
* floor: (input read once + output written once) / the bandwidth of a device-to-device copy measured in the same
  run; for forward + backward also grad_out read and grad_in written;

and the peak memory of forward + backward (torch.cuda.max_memory_allocated above the baseline). Results are printed
as a table with the GPU name and the torch and triton versions, and written as JSON with --json.

    python benchmarks/bench_kernels.py                       # all workloads, float32 and bfloat16
    python benchmarks/bench_kernels.py --check               # GPU parity, int64 and NaN checks first
    python benchmarks/bench_kernels.py --workloads cub448x4 --dtypes float32 --json results.json
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# name: (family, B, C, H, W, K, Ho, Wo, extra)
WORKLOADS = {
    "mnist2": ("affine", 512, 1, 60, 60, 2, 28, 28),
    "cub448x4": ("affine", 64, 3, 448, 448, 4, 224, 224),
    "feat56x2": ("affine", 64, 128, 56, 56, 2, 28, 28),
    "cub448x4-projective": ("projective", 64, 3, 448, 448, 4, 224, 224),
    "cub448x4-tps16": ("tps", 64, 3, 448, 448, 4, 224, 224),
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workloads", nargs="+", default=list(WORKLOADS), choices=list(WORKLOADS))
    parser.add_argument(
        "--dtypes", nargs="+", default=["float32", "bfloat16"], choices=["float32", "bfloat16", "float16"]
    )
    parser.add_argument("--json", type=Path, default=None, help="write the results to this JSON file")
    parser.add_argument("--check", action="store_true", help="run GPU parity, int64 and NaN-isolation checks first")
    parser.add_argument("--check-only", action="store_true", help="run the checks and no benchmark")
    parser.add_argument(
        "--skip-compile",
        action="store_true",
        help="leave out torch.compile (of the eager-stacked and the triton paths)",
    )
    parser.add_argument(
        "--skip-graphs", action="store_true", help="leave out the CUDA-graph replays of triton and eager-stacked"
    )
    parser.add_argument(
        "--compile-dtypes",
        nargs="+",
        default=None,
        help="dtypes for which the torch.compile baseline is measured (default: all of --dtypes; compiling takes "
        "tens of seconds per workload)",
    )
    parser.add_argument("--rep", type=int, default=100, help="milliseconds of repetitions per timing (do_bench)")
    return parser.parse_args(argv)


# --------------------------------------------------------------------------------------------------------------
# inputs and PyTorch baselines
# --------------------------------------------------------------------------------------------------------------
def make_inputs(family, b, c, h, w, k, dtype, device):  # type: ignore[no-untyped-def]
    import torch

    from stn_lightning.kernels import reference

    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(b, c, h, w, device=device, generator=g).to(dtype)
    if family == "affine":
        # Attention crops: isotropic scale 0.5 and a translation, as the CUB models learn.
        theta = torch.zeros(b, k, 2, 3, device=device)
        theta[..., 0, 0] = theta[..., 1, 1] = 0.5
        theta[..., :, 2] = 0.4 * (torch.rand(b, k, 2, device=device, generator=g) - 0.5)
        return x, theta + 0.02 * torch.randn(b, k, 2, 3, device=device, generator=g), None
    if family == "projective":
        hom = torch.eye(3, device=device) * torch.tensor([0.5, 0.5, 1.0], device=device)
        return x, hom + 0.05 * torch.randn(b, k, 3, 3, device=device, generator=g), None
    target = reference.tps_target_points(4, device=device)
    return x, 0.5 * target + 0.05 * torch.randn(b, k, 16, 2, device=device, generator=g), target


def torch_grid(family, params, target, size, in_size):  # type: ignore[no-untyped-def]
    """The (B, K, Ho, Wo, 2) normalised grid of the family in plain PyTorch (what F.grid_sample needs)."""
    import torch
    import torch.nn.functional as F

    from stn_lightning.kernels import reference

    b, k = params.shape[:2]
    ho, wo = size
    if family == "affine":
        return F.affine_grid(params.reshape(b * k, 2, 3), [b * k, 1, ho, wo], align_corners=False).view(b, k, ho, wo, 2)
    base = reference.base_grid(size, False, params.device, torch.float32)  # (Ho, Wo, 2)
    if family == "projective":
        hom = torch.cat([base, torch.ones_like(base[..., :1])], dim=-1)  # (Ho, Wo, 3)
        p = torch.einsum("hwj,bkij->bkhwi", hom, params)
        return p[..., :2] / p[..., 2:]
    radial = reference.tps_kernel(((base[:, :, None, :] - target) ** 2).sum(-1))
    features = torch.cat([radial, torch.ones_like(base[..., :1]), base], dim=-1)
    return base + features @ reference.tps_coefficients(params, target).unsqueeze(2)  # the same solve as sample_tps


def eager_copies(family, x, params, target, size):  # type: ignore[no-untyped-def]
    import torch.nn.functional as F

    b, c, h, w = x.shape
    k = params.shape[1]
    grid = torch_grid(family, params, target, size, (h, w)).to(x.dtype)
    xs = x.repeat_interleave(k, dim=0)
    out = F.grid_sample(xs, grid.flatten(0, 1), align_corners=False)
    return out.view(b, k, c, *size)


def eager_stacked(family, x, params, target, size):  # type: ignore[no-untyped-def]
    import torch.nn.functional as F

    b, c, h, w = x.shape
    k = params.shape[1]
    grid = torch_grid(family, params, target, size, (h, w)).to(x.dtype)  # (B, K, Ho, Wo, 2)
    out = F.grid_sample(x, grid.reshape(b, k * size[0], size[1], 2), align_corners=False)  # (B, C, K*Ho, Wo)
    return out.view(b, c, k, *size).transpose(1, 2).contiguous()


def sample(backend, family, x, params, target, size, **options):  # type: ignore[no-untyped-def]
    """One family's public op (tps: from control points) through ``backend`` ("triton" or "reference")."""
    from stn_lightning import kernels

    if family == "affine":
        return kernels.sample_affine(x, params, size, backend=backend, **options)
    if family == "projective":
        return kernels.sample_projective(x, params, size, backend=backend, **options)
    if family == "tps":
        return kernels.sample_tps(x, params, size, target_points=target, backend=backend, **options)
    return kernels.sample_grid(x, params, backend=backend, **options)


def triton_path(family, x, params, target, size):  # type: ignore[no-untyped-def]
    return sample("triton", family, x, params, target, size)


def triton_compiled(family):  # type: ignore[no-untyped-def]
    """torch.compile of the triton path, without graph breaks (fullgraph), one static graph per workload."""
    import torch

    return torch.compile(functools.partial(sample, "triton", family), fullgraph=True, dynamic=False)


# --------------------------------------------------------------------------------------------------------------
# timing
# --------------------------------------------------------------------------------------------------------------
def copy_bandwidth() -> float:
    """Bytes per millisecond of a device-to-device copy (read + write) of a 1 GiB buffer."""
    import torch
    from triton.testing import do_bench

    src = torch.empty(2**28, device="cuda", dtype=torch.float32)
    dst = torch.empty_like(src)
    ms = do_bench(lambda: dst.copy_(src), rep=200, return_mode="median")
    return 2 * 2**30 / ms


def measure(fn, x, params, target, size, rep):  # type: ignore[no-untyped-def]
    """(forward ms, forward + backward ms, peak MiB of forward + backward, forward + backward ms with the parameter
    gradient only) for one implementation. The last is how a spatial transformer trains on input images, which
    need no gradient: no image gradient, so none of its atomics."""
    import torch
    from triton.testing import do_bench

    with torch.no_grad():
        fwd = do_bench(lambda: fn(x, params, target, size), rep=rep, return_mode="median")
    xg = x.detach().clone().requires_grad_()
    pg = params.detach().clone().requires_grad_()
    gout = torch.randn_like(fn(x, params, target, size))

    def step() -> None:
        fn(xg, pg, target, size).backward(gout)

    step()  # warm up (autotuning, compilation)
    both = do_bench(step, rep=rep, grad_to_none=[xg, pg], return_mode="median")
    torch.cuda.synchronize()
    xg.grad = pg.grad = None
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    step()
    torch.cuda.synchronize()
    peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    params_only = do_bench(
        lambda: fn(x, pg, target, size).backward(gout), rep=rep, grad_to_none=[pg], return_mode="median"
    )
    return fwd, both, peak, params_only


def measure_graphed(fn, x, params, target, size, rep):  # type: ignore[no-untyped-def]
    """(forward ms, forward + backward ms, NaN, NaN) of one implementation replayed from CUDA graphs: the time of its
    kernels without the host's (Python, dispatch, launches), what torch.compile's "reduce-overhead" mode or a
    graphed training step gets. Peak memory and the parameter-only backward are not measured here."""
    import torch
    from triton.testing import do_bench

    xg = x.detach().clone().requires_grad_()
    pg = params.detach().clone().requires_grad_()
    gout = torch.randn_like(fn(x, params, target, size))
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm up outside the capture: autotuning, compilation, cached constants
        for _ in range(3):
            fn(xg, pg, target, size).backward(gout)
    torch.cuda.current_stream().wait_stream(side)
    forward, step = torch.cuda.CUDAGraph(), torch.cuda.CUDAGraph()
    with torch.no_grad(), torch.cuda.graph(forward):
        fn(x, params, target, size)
    xg.grad = pg.grad = None  # allocated inside the capture, from the graph's memory pool (as torch's docs do)
    with torch.cuda.graph(step):
        fn(xg, pg, target, size).backward(gout)
    fwd = do_bench(forward.replay, rep=rep, return_mode="median")
    both = do_bench(step.replay, rep=rep, return_mode="median")
    return fwd, both, float("nan"), float("nan")


def run_benchmarks(args: argparse.Namespace, info: dict) -> dict:
    """Time every workload and dtype; the JSON file (if any) is rewritten after each row, so a run cut short
    keeps what it measured."""
    import torch

    bandwidth = copy_bandwidth()
    rows: list[dict] = []
    results = {**info, "copy_bandwidth_gb_s": bandwidth * 1e3 / 1e9, "rows": rows}
    compile_dtypes = args.dtypes if args.compile_dtypes is None else args.compile_dtypes
    for name in args.workloads:
        family, b, c, h, w, k, ho, wo = WORKLOADS[name]
        for dtype_name in args.dtypes:
            dtype = getattr(torch, dtype_name)
            x, params, target = make_inputs(family, b, c, h, w, k, dtype, "cuda")
            size = (ho, wo)
            element = x.element_size()
            fwd_bytes = (x.numel() + b * k * c * ho * wo) * element
            row = {
                "workload": name,
                "family": family,
                "dtype": dtype_name,
                "shape": {"B": b, "C": c, "H": h, "W": w, "K": k, "Ho": ho, "Wo": wo},
                "floor_fwd_ms": fwd_bytes / bandwidth,
                "floor_fwd_bwd_ms": 2 * fwd_bytes / bandwidth,
            }
            impls = {
                "triton": functools.partial(triton_path, family),
                "eager_copies": functools.partial(eager_copies, family),
                "eager_stacked": functools.partial(eager_stacked, family),
            }
            if not args.skip_compile and dtype_name in compile_dtypes:
                # dynamic=False: one static graph per workload (a dynamic-shape recompile fails in affine_grid)
                impls["compiled"] = torch.compile(functools.partial(eager_stacked, family), dynamic=False)
                impls["triton_compiled"] = triton_compiled(family)
            if not args.skip_graphs:  # last: a capture that fails cannot disturb the others
                impls["triton_graph"] = impls["triton"]
                impls["stacked_graph"] = impls["eager_stacked"]
            for impl_name, fn in impls.items():
                try:
                    timer = measure_graphed if impl_name.endswith("_graph") else measure
                    fwd, both, peak, params_only = timer(fn, x, params, target, size, args.rep)
                    row[impl_name] = {"fwd_ms": fwd, "fwd_bwd_ms": both, "peak_fwd_bwd_mib": peak}
                    row[impl_name]["fwd_bwd_params_only_ms"] = params_only
                except Exception as error:  # report and go on (e.g. out of memory for K copies)
                    row[impl_name] = {"error": f"{type(error).__name__}: {error}"[:200]}
                torch.cuda.empty_cache()
                if impl_name == "triton":
                    row["triton_fwd_config"] = forward_config(family)
            rows.append(row)
            print_row(row)
            if args.json is not None:
                args.json.write_text(json.dumps(results, indent=2))
            del x, params
            torch.cuda.empty_cache()
    return results


def forward_config(family: str) -> str:
    """The configuration the autotuner chose for the family's forward kernel at its last call."""
    import importlib

    tuned = importlib.import_module("stn_lightning.kernels.sampler")._sample_fwd_tuned  # one for every family
    return str(getattr(tuned, "best_config", None))


def print_header(info: dict) -> None:
    print(
        f"# {info['gpu']} | torch {info['torch']} | triton {info['triton']}"
        f" | channels per program: {info['channel_group']}"
    )
    print(
        f"{'workload':<22} {'dtype':<9} {'impl':<15} {'fwd ms':>9} {'fwd+bwd ms':>11} {'peak MiB':>10}"
        f" {'floor fwd':>10} {'floor f+b':>10} {'f+b, params only':>17}"
    )


def print_row(row: dict) -> None:
    impls = ("triton", "eager_copies", "eager_stacked", "compiled", "triton_compiled", "triton_graph", "stacked_graph")
    for impl in impls:
        if impl not in row:
            continue
        r = row[impl]
        if "error" in r:
            print(f"{row['workload']:<22} {row['dtype']:<9} {impl:<15} {r['error']}")
            continue
        print(
            f"{row['workload']:<22} {row['dtype']:<9} {impl:<15} {r['fwd_ms']:>9.3f} {r['fwd_bwd_ms']:>11.3f}"
            f" {r['peak_fwd_bwd_mib']:>10.1f} {row['floor_fwd_ms']:>10.3f} {row['floor_fwd_bwd_ms']:>10.3f}"
            f" {r['fwd_bwd_params_only_ms']:>17.3f}"
        )
        if impl == "triton":
            print(f"#   triton forward config: {row.get('triton_fwd_config')}")


# --------------------------------------------------------------------------------------------------------------
# --check
# --------------------------------------------------------------------------------------------------------------
def _report(name: str, ok: bool, detail: str = "") -> bool:
    print(f"{'PASS' if ok else 'FAIL'}  {name}{'  ' + detail if detail else ''}")
    return ok


def _max_err(a, b) -> float:  # type: ignore[no-untyped-def]
    return float((a.double() - b.double()).abs().max()) if a.numel() else 0.0


def _mixed_err(a, b) -> float:  # type: ignore[no-untyped-def]
    """Largest |a - b| / (1 + |b|): absolute for small values, relative for large ones."""
    return float(((a.double() - b.double()).abs() / (1 + b.double().abs())).max()) if a.numel() else 0.0


def _mismatch_fraction(a, b) -> float:  # type: ignore[no-untyped-def]
    """Fraction of elements where |a - b| > 1e-2 (1 + |b|)."""
    a, b = a.double(), b.double()
    return float(((a - b).abs() > 1e-2 * (1 + b.abs())).double().mean())


def _parity_case(family, dtype, pad, mode, ac, cl, target, g, fill=0.0):  # type: ignore[no-untyped-def]
    """Errors (output, image gradient, parameter gradient) of the Triton ops against the float32 reference.

    The reference runs on the same (rounded) half-precision values upcast to float32, with the same rounded
    grad_out: that is what the kernels compute, accumulating in float32, so the remaining differences are the
    final rounding of the output and image gradient (half an ulp: 2**-11 in float16, 2**-8 in bfloat16) and
    the order of float32 sums. Nearest sampling can flip at exact ties between pixels (the coordinates are
    computed along different paths), so its output error is the fraction of elements that differ instead.
    """
    import torch

    dev = "cuda"
    x = torch.randn(3, 5, 37, 29, device=dev, generator=g).to(dtype)
    if cl:
        x = x.to(memory_format=torch.channels_last)
    k, size = 3, (23, 31)
    if family == "affine":
        p = torch.eye(2, 3, device=dev) + 0.3 * torch.randn(3, k, 2, 3, device=dev, generator=g)
    elif family == "projective":
        p = torch.eye(3, device=dev) + 0.1 * torch.randn(3, k, 3, 3, device=dev, generator=g)
    elif family == "tps":
        p = target + 0.1 * torch.randn(3, k, 16, 2, device=dev, generator=g)
    else:
        p = 1.2 * (2 * torch.rand(3, k, *size, 2, device=dev, generator=g) - 1)
    grad = None
    results = []
    for backend, xin in (("triton", x), ("reference", x.float())):
        xa, pa = xin.detach().clone().requires_grad_(), p.detach().clone().requires_grad_()
        out = sample(backend, family, xa, pa, target, size, align_corners=ac, padding_mode=pad, mode=mode, fill=fill)
        if grad is None:
            assert out.dtype == dtype and xa.is_contiguous(memory_format=torch.channels_last) == cl
            grad = torch.randn(out.shape, device=dev, generator=torch.Generator(device=dev).manual_seed(1)).to(dtype)
        out.backward(grad.to(out.dtype))
        pgrad = pa.grad if pa.grad is not None else torch.zeros_like(pa)
        results.append((out.detach(), xa.grad, pgrad))
    (o, gx, gp), (ro, rgx, rgp) = results
    assert gx.dtype == dtype and gx.stride() == x.stride(), (gx.dtype, gx.stride(), x.stride())
    # The first call went through the forward's autotuner; a second with the same signature launches the kernel
    # with the autotuner's choice directly (kernels._launch.launch): the same kernel, so the same output bit for bit.
    with torch.no_grad():
        again = sample("triton", family, x, p, target, size, align_corners=ac, padding_mode=pad, mode=mode, fill=fill)
    assert torch.equal(again, o), "a second call (the autotuner's cached choice) changed the output"
    err = _mismatch_fraction if mode == "nearest" else _mixed_err
    out_err, gx_err = err(o, ro), err(gx, rgx)
    return out_err, gx_err, _max_err(gp, rgp) / (float(rgp.abs().max()) + 1.0)


def run_checks() -> bool:
    import traceback

    import torch

    from stn_lightning import kernels
    from stn_lightning.kernels import reference

    ok = True
    dev = "cuda"
    g = torch.Generator(device=dev).manual_seed(0)
    # Bounds on (output, image gradient, parameter gradient relative to its largest entry) from _parity_case:
    # float32 sums in another order (the spline's radial terms move its coordinates by ~1e-6, which moves
    # outputs by ~1e-5 where the image is steep); one final rounding in float16 (2**-11 = 4.9e-4) and bfloat16
    # (2**-8 = 3.9e-3) with room for a tie flip; for nearest sampling, the fraction of differing elements.
    tol = {torch.float32: (1e-4, 1e-4, 1e-4), torch.float16: (1e-3, 1.5e-3, 1e-4), torch.bfloat16: (8e-3, 1e-2, 1e-4)}
    nearest_tol = (1e-3, 1e-3)
    target = reference.tps_target_points(4, device=dev)
    # STN_CHECK_DTYPES="bfloat16 float16" limits the parity checks to those dtypes (to finish a cut-short run),
    # STN_CHECK_FAMILIES="affine" to those families.
    only = os.environ.get("STN_CHECK_DTYPES", "").split()
    families = os.environ.get("STN_CHECK_FAMILIES", "").split() or ["affine", "projective", "tps", "grid"]
    for dtype, bounds in tol.items():
        if only and str(dtype)[6:] not in only:
            continue
        for family in families:
            for pad, mode, ac, cl, fill in (
                ("zeros", "bilinear", False, False, 0.0),
                ("border", "bilinear", True, True, 0.0),
                ("zeros", "nearest", True, False, 0.0),
                ("zeros", "bilinear", False, True, -0.75),  # a padding value: outside corners read it
            ):
                name = f"parity {family} {str(dtype)[6:]} {pad} {mode} ac={ac} cl={cl} fill={fill}"
                try:
                    errs = _parity_case(family, dtype, pad, mode, ac, cl, target, g, fill)
                except Exception:  # report and go on: one broken variant must not hide the others
                    ok &= _report(name, False, traceback.format_exc(limit=-3).replace("\n", " | ")[-1500:])
                    continue
                limit = (*nearest_tol, bounds[2]) if mode == "nearest" else bounds
                good = all(e <= t for e, t in zip(errs, limit, strict=True))
                detail = "errors out {:.2e} image-grad {:.2e} param-grad(rel) {:.2e}".format(*errs)
                ok &= _report(name, good, detail + f"  (bounds {limit[0]:.0e} {limit[1]:.0e} {limit[2]:.0e})")
    # int64 offsets: a 1 x 1 x 32769 x 65536 image (2**31 + 2**16 elements) sampled at its far corner.
    for dtype in (torch.float16, torch.float32):
        try:
            x = torch.empty(1, 1, 32769, 65536, device=dev, dtype=dtype)
            x[..., -8:, -8:] = torch.randn(8, 8, device=dev, generator=g).to(dtype)
            x[..., :-8, :].zero_()
            x[..., -8:, :-8].zero_()
            h, w = x.shape[-2:]
            # Crop the bottom-right 6 x 6 pixels: centre (W - 4, H - 4) pixels, half-size 3 pixels.
            sx, sy = 3 / (w / 2), 3 / (h / 2)
            tx, ty = (w - 4.0 - (w - 1) / 2) / (w / 2), (h - 4.0 - (h - 1) / 2) / (h / 2)
            theta = torch.tensor([[[[sx, 0.0, tx], [0.0, sy, ty]]]], device=dev, requires_grad=True)
            out = kernels.sample_affine(x, theta, 6, backend="triton")
            out.sum().backward()
            # The float32 reference (a float16 grid could not address single pixels of a 65536-wide image).
            ref_theta = theta.detach().clone().requires_grad_()
            ref = kernels.sample_affine(x.float(), ref_theta, 6, backend="reference")
            ref.sum().backward()
            err = _mixed_err(out, ref)
            perr = _max_err(theta.grad, ref_theta.grad) / (float(ref_theta.grad.abs().max()) + 1.0)
            good = err <= (1e-3 if dtype == torch.float16 else 1e-5) and float(ref.abs().max()) > 0 and perr <= 1e-3
            detail = f"output error {err:.2e} param-grad(rel) {perr:.2e}"
            ok &= _report(f"int64 offsets {str(dtype)[6:]} 1x1x32769x65536 far corner", good, detail)
            del x, out, ref
        except Exception:  # out of memory, or a kernel that fails
            ok &= _report(f"int64 offsets {str(dtype)[6:]}", False, traceback.format_exc(limit=-3)[-1500:])
        torch.cuda.empty_cache()
    # NaN isolation: a NaN transformer reads nothing and leaves the others' outputs and gradients unchanged.
    x = torch.randn(2, 3, 31, 27, device=dev, generator=g)
    theta = torch.eye(2, 3, device=dev) + 0.2 * torch.randn(2, 3, 2, 3, device=dev, generator=g)
    theta[:, 1] = float("nan")
    full_t = theta.clone().requires_grad_()
    full = kernels.sample_affine(x, full_t, (17, 19), backend="triton")
    full[:, [0, 2]].square().sum().backward()
    part_t = theta[:, [0, 2]].clone().requires_grad_()
    part = kernels.sample_affine(x, part_t, (17, 19), backend="triton")
    part.square().sum().backward()
    good = bool((full[:, 1] == 0).all()) and torch.equal(full[:, [0, 2]], part)
    good &= torch.allclose(full_t.grad[:, [0, 2]], part_t.grad, rtol=1e-5, atol=1e-5)
    good &= bool((full_t.grad[:, 1] == 0).all())
    ok &= _report("NaN isolation affine", good)
    return ok


# --------------------------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        print("bench_kernels: no CUDA device here; the Triton kernels are benchmarked on GPUs only.")
        return 0
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    import triton

    from stn_lightning.kernels import _launch

    info = {
        "gpu": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "channel_group": _launch.CHANNEL_GROUP,
    }
    passed = True
    if args.check or args.check_only:
        print(f"# checks on {info['gpu']} | torch {info['torch']} | triton {info['triton']}")
        passed = run_checks()
        print("ALL CHECKS PASS" if passed else "SOME CHECKS FAILED")
    if args.check_only:
        return 0 if passed else 1
    # The timings are worth having even when a check failed (the exit status still says it failed).
    print_header(info)
    results = run_benchmarks(args, info)
    print(f"# device-to-device copy bandwidth {results['copy_bandwidth_gb_s']:.0f} GB/s")
    if args.json is not None:
        print(f"# wrote {args.json}")
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
