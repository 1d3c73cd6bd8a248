"""Host time of one call of the Triton ops, without a GPU: the Python and torch work around the kernel launches.

    python benchmarks/host_overhead.py [--calls 200] [--rounds 15]

On small workloads (mnist2) a GPU step costs what its host work costs: the kernels take microseconds. This script
measures that host work on any machine. It runs the ops on tiny CPU tensors under TRITON_INTERPRET=1 with the
kernel launches replaced by no-ops, so what it times is everything around them: argument checks, the pixel-matrix
rewrite, allocations, the autograd.Function and the autograd engine. Triton's own launch cost (argument binding,
the autotuner's cache lookup, the driver call) is not in it; on a GPU, bench_kernels.py's triton column times
the whole. Next to each op it times the PyTorch path of bench_kernels.py (the family's grid in PyTorch, then one
F.grid_sample) on the same tiny tensors, whose CPU compute is then a small part of its time.

Printed: microseconds per call, the best of several rounds, forward under torch.no_grad and forward + backward to the
image and the parameters.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path

os.environ["TRITON_INTERPRET"] = "1"  # before kernels (and triton) are imported
ROOT = Path(__file__).resolve().parents[1]
for path in (ROOT, ROOT / "benchmarks"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

import torch  # noqa: E402
from bench_kernels import eager_stacked, make_inputs, sample  # noqa: E402

from stn_lightning.kernels import sampler  # noqa: E402

# B, C, H, W, K, Ho, Wo: tiny, so that PyTorch's compute is small next to its host work.
SHAPE = (2, 1, 8, 8, 2, 4, 4)
FAMILIES = ("affine", "projective", "tps", "grid")


def stub_launches() -> None:
    """Replace every kernel launch of the Triton ops by a no-op (the outputs are then uninitialised)."""
    sampler.launch = lambda *args, **kwargs: None  # type: ignore[assignment]


def inputs(family: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    b, c, h, w, k, ho, wo = SHAPE
    if family == "grid":
        x = torch.randn(b, c, h, w)
        return x, 2 * torch.rand(b, k, ho, wo, 2) - 1, None
    return make_inputs(family, b, c, h, w, k, torch.float32, "cpu")


def per_call_us(fn: Callable[[], object], calls: int) -> float:
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - start) / calls * 1e6


def torch_path(family: str, x, params, target, size):  # type: ignore[no-untyped-def]
    if family == "grid":
        b, c = x.shape[:2]
        k = params.shape[1]
        out = torch.nn.functional.grid_sample(x, params.flatten(1, 2), align_corners=False)  # (B, C, K*Ho, Wo)
        return out.view(b, c, k, *size).transpose(1, 2).contiguous()
    return eager_stacked(family, x, params, target, size)


def calls_of(family: str) -> dict[str, Callable[[], object]]:
    """The four calls to time for a family: forward (no_grad) and forward + backward, Triton and PyTorch."""
    x, params, target = inputs(family)
    size = SHAPE[5:]
    xg, pg = x.clone().requires_grad_(), params.clone().requires_grad_()
    gout = torch.randn(SHAPE[0], SHAPE[4], SHAPE[1], *size)
    calls: dict[str, Callable[[], object]] = {}
    impls = {"triton": lambda *a: sample("triton", family, *a), "torch": lambda *a: torch_path(family, *a)}
    for name, fn in impls.items():

        def forward(fn=fn) -> None:
            with torch.no_grad():
                fn(x, params, target, size)

        def step(fn=fn) -> None:
            xg.grad = pg.grad = None
            fn(xg, pg, target, size).backward(gout)

        calls[f"{name}_fwd"], calls[f"{name}_fwd_bwd"] = forward, step
    return calls


def best_times(calls: dict[tuple[str, str], Callable[[], object]], count: int, rounds: int) -> dict:
    """Microseconds per call of each entry, the best of ``rounds`` rounds. All entries take turns within each
    round, so that a slow spell of a shared machine slows them alike, and the best round is the least disturbed
    one (other processes only ever add time)."""
    best = dict.fromkeys(calls, float("inf"))
    for fn in calls.values():  # warm up
        per_call_us(fn, count)
    for _ in range(rounds):
        for key, fn in calls.items():
            best[key] = min(best[key], per_call_us(fn, count))
    return best


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=200, help="calls per timing")
    parser.add_argument("--rounds", type=int, default=15, help="rounds; the best is printed")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    stub_launches()
    cpu = cpu_name()
    print(f"# host time per call, us: best of {args.rounds} rounds of {args.calls} calls; CPU {cpu}, 1 thread")
    print(f"# torch {torch.__version__}; B, C, H, W, K, Ho, Wo = {SHAPE}; Triton launches stubbed, PyTorch computing")
    print(f"{'family':<11} {'triton fwd':>11} {'torch fwd':>10} {'triton f+b':>11} {'torch f+b':>10}")
    calls = {(family, key): fn for family in FAMILIES for key, fn in calls_of(family).items()}
    best = best_times(calls, args.calls, args.rounds)
    for family in FAMILIES:
        r = {key: us for (fam, key), us in best.items() if fam == family}
        print(
            f"{family:<11} {r['triton_fwd']:>11.1f} {r['torch_fwd']:>10.1f}"
            f" {r['triton_fwd_bwd']:>11.1f} {r['torch_fwd_bwd']:>10.1f}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
