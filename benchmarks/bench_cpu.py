"""The sampler on a CPU: ours against the best plain PyTorch, in one run (never collected by pytest).

    python benchmarks/bench_cpu.py                 # one thread, every workload
    python benchmarks/bench_cpu.py --threads 2 --reference

For each workload (B, C, input -> K x output) it times, on CPU tensors,

* ours: ``stn_lightning.kernels.sample_affine`` (and the other families) with its default backend, which on a
  CPU is kernels/torch_path.py;
* pytorch: ``F.affine_grid`` and one ``F.grid_sample`` over the K grids stacked along the output height, made
  (B, K, C, Ho, Wo) contiguous like ours: the best that two lines of PyTorch do without copying the image K times;
* reference (with ``--reference``): the same op with ``backend="reference"`` (kernels/reference.py, the exact
  oracle), for comparison;

forward, forward + backward with the parameter gradient only (training on input images), and forward + backward
with the image gradient as well. Medians of ``--repeat`` timed calls after warm-up, in milliseconds. The
parameters are random warps near the identity, so the points stay inside the image (the usual case).
"""

from __future__ import annotations

import argparse
import functools
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from stn_lightning import kernels  # noqa: E402
from stn_lightning.kernels import reference  # noqa: E402

#: (B, C, H = W of the input, K, Ho = Wo of the output): the demo (RTS 42 px), cluttered 60 -> 30, MultiMNIST-like
#: 60 -> 3 x 28, and CUB-like 224 -> 4 x 112.
WORKLOADS = [(128, 1, 42, 1, 42), (128, 1, 60, 1, 30), (64, 1, 60, 3, 28), (8, 3, 224, 4, 112)]
PASSES = ("fwd", "f+b theta", "f+b both")


def pytorch_affine(x: torch.Tensor, theta: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """F.affine_grid + one F.grid_sample over the stacked grids, as (B, K, C, Ho, Wo)."""
    b, c = x.shape[:2]
    k = theta.shape[1]
    grid = F.affine_grid(theta.reshape(b * k, 2, 3), [b * k, 1, *size], align_corners=False)
    out = F.grid_sample(x, grid.view(b, k * size[0], size[1], 2), align_corners=False)
    return out.view(b, c, k, *size).transpose(1, 2).contiguous()


def time_ms(fns: dict[str, Callable[[], object]], repeat: int) -> dict[str, float]:
    """Median wall time of each function, in ms, the functions called in turn (so that a busy machine slows all)."""
    for fn in fns.values():
        for _ in range(3):
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeat):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: 1e3 * statistics.median(t) for name, t in times.items()}


def passes(sampler: Callable, x: torch.Tensor, params: torch.Tensor, size: tuple[int, int]) -> list[Callable[[], None]]:
    """Forward, forward + backward (params only), forward + backward (params and image) of one sampler."""
    out_grad = torch.randn_like(sampler(x, params, size))
    image = x.detach().requires_grad_()
    theta = params.detach().requires_grad_()

    def fwd() -> None:
        with torch.no_grad():
            sampler(x, params, size)

    def fwd_bwd(image: torch.Tensor, *inputs: torch.Tensor) -> Callable[[], None]:
        return lambda: torch.autograd.grad(sampler(image, inputs[-1], size), inputs, out_grad)

    return [fwd, fwd_bwd(x, theta), fwd_bwd(image, image, theta)]


def compare(
    samplers: dict[str, Callable], x: torch.Tensor, params: torch.Tensor, size: tuple[int, int], repeat: int
) -> dict[str, list[float]]:
    """{sampler: [fwd, f+b theta, f+b both] ms}."""
    runs = {name: passes(s, x, params, size) for name, s in samplers.items()}
    per_pass = [time_ms({name: r[i] for name, r in runs.items()}, repeat) for i in range(len(PASSES))]
    return {name: [t[name] for t in per_pass] for name in samplers}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeat", type=int, default=20)
    parser.add_argument("--reference", action="store_true", help="also time kernels/reference.py")
    parser.add_argument("--families", action="store_true", help="also projective and thin-plate-spline warps")
    parser.add_argument("--steps", type=int, default=0, help="also time this many training steps of --configs")
    parser.add_argument("--configs", nargs="+", default=["configs/demo.yaml"], help="configs for --steps")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(
        f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} thread(s), "
        f"torch {torch.__version__}, Python {platform.python_version()}"
    )
    samplers = {"ours": kernels.sample_affine, "pytorch": pytorch_affine}
    if args.reference:
        samplers["reference"] = functools.partial(kernels.sample_affine, backend="reference")
    header = "| B, C, input -> K x output | " + " | ".join(f"{n} {p}" for p in PASSES for n in samplers) + " |"
    print("affine, ms (median of", args.repeat, "calls)")
    print(header)
    print("|" + "---|" * (1 + len(PASSES) * len(samplers)))
    for b, c, n, k, m in WORKLOADS:
        x = torch.randn(b, c, n, n)
        theta = torch.eye(2, 3).expand(b, k, 2, 3) + 0.1 * torch.randn(b, k, 2, 3)
        times = compare(samplers, x, theta, (m, m), args.repeat)
        cells = [f"{times[name][i]:.2f}" for i in range(len(PASSES)) for name in samplers]
        print(f"| {b}, {c}, {n} -> {k} x {m} | " + " | ".join(cells) + " |")
    if args.families:
        family_rows(args)
    for config in args.configs if args.steps else []:
        training_steps(config, args.steps)
    return 0


def training_steps(config: str, steps: int) -> None:
    """Training steps of a config (on-device distortions, transformers, backbone, backward, SGD step) with the
    sampler of CPU tensors (kernels/torch_path.py) and with kernels/reference.py in its place, in turn."""
    from stn_lightning.cli import main as cli_main

    cli = cli_main(["--config", config, "--trainer.accelerator", "cpu"], run=False)
    model, data = cli.model, cli.datamodule
    data.setup("fit")
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    batch = next(iter(data.train_dataloader()))

    def step() -> None:
        x, y = data.make_batch(batch, train=True)
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    def with_reference() -> None:
        # CPU tensors resolve to the "torch" row of the dispatch table: the reference's row stands in for it.
        original = kernels._TABLE["torch"]
        kernels._TABLE["torch"] = kernels._TABLE["reference"]
        try:
            step()
        finally:
            kernels._TABLE["torch"] = original

    times = time_ms({"torch path": step, "reference": with_reference}, steps)
    saved = 1 - times["torch path"] / times["reference"]
    print(
        f"\n{config}, batch {data.batch_size}, one training step (median of {steps}): torch path "
        f"{times['torch path']:.1f} ms, reference {times['reference']:.1f} ms: {100 * saved:.0f} % of the step saved"
    )


def pytorch_grid(grid: Callable) -> Callable:
    """One F.grid_sample over the stacked grids that ``grid(params, size)`` (B, K, Ho, Wo, 2) makes."""

    def sample(x: torch.Tensor, params: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        b, c = x.shape[:2]
        k = params.shape[1]
        out = F.grid_sample(x, grid(params, size).reshape(b, k * size[0], size[1], 2), align_corners=False)
        return out.view(b, c, k, *size).transpose(1, 2).contiguous()

    return sample


def projective_grid(h: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    base = reference.base_grid(size, False, h.device, h.dtype)
    p = torch.cat([base, torch.ones_like(base[..., :1])], dim=-1).view(-1, 3) @ h.transpose(-1, -2)  # (B, K, P, 3)
    return (p[..., :2] / p[..., 2:]).view(*h.shape[:2], *size, 2)


def family_rows(args: argparse.Namespace) -> None:
    """Projective and thin-plate-spline warps on the cluttered and MultiMNIST-like workloads."""
    target = reference.tps_target_points(4)

    def tps_grid(control: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        base = reference.base_grid(size, False, control.device, control.dtype)
        features = reference.tps_features(base, target).view(size[0] * size[1], -1)
        grid = base.view(-1, 2) + features @ reference.tps_coefficients(control, target)  # (B, K, P, 2)
        return grid.view(*control.shape[:2], *size, 2)

    families = {
        "projective": (
            kernels.sample_projective,
            functools.partial(kernels.sample_projective, backend="reference"),
            pytorch_grid(projective_grid),
        ),
        "tps": (
            lambda x, p, size: kernels.sample_tps(x, p, size, target_points=target),
            lambda x, p, size: kernels.sample_tps(x, p, size, target_points=target, backend="reference"),
            pytorch_grid(tps_grid),
        ),
    }
    names = ["ours", "pytorch"] + (["reference"] if args.reference else [])
    print("\nother families, ms:", " / ".join(names))
    print("| family | B, C, input -> K x output | " + " | ".join(PASSES) + " |")
    print("|---|---|" + "---|" * len(PASSES))
    for b, c, n, k, m in WORKLOADS[1:3]:
        x = torch.randn(b, c, n, n)
        params = {
            "projective": torch.eye(3).expand(b, k, 3, 3) + 0.05 * torch.randn(b, k, 3, 3),
            "tps": target.expand(b, k, -1, -1) + 0.05 * torch.randn(b, k, 16, 2),
        }
        for family, (ours, ref, plain) in families.items():
            samplers = dict(zip(["ours", "pytorch", "reference"], [ours, plain, ref], strict=True))
            times = compare({name: samplers[name] for name in names}, x, params[family], (m, m), args.repeat)
            cells = [" / ".join(f"{times[name][i]:.2f}" for name in names) for i in range(len(PASSES))]
            print(f"| {family} | {b}, {c}, {n} -> {k} x {m} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    raise SystemExit(main())
