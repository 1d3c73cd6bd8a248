"""Where the time of one Triton forward + backward goes: the CUDA kernels and their share (never collected by pytest).

    python benchmarks/profile_kernels.py cub448x4 mnist2

Prints, per workload (float32), the wall time of one forward + backward measured from the host next to the
GPU time of the kernels it launched (torch.profiler), then the kernels sorted by GPU time. A wall time far
above the kernels' sum means the host (Python, dispatch, small torch ops) is the bottleneck.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench_kernels import WORKLOADS, make_inputs, triton_path  # noqa: E402


def profile_one(name: str) -> None:
    import torch
    from torch.profiler import ProfilerActivity, profile

    family, b, c, h, w, k, ho, wo = WORKLOADS[name]
    x, params, target = make_inputs(family, b, c, h, w, k, torch.float32, "cuda")
    x.requires_grad_()
    params.requires_grad_()
    gout = torch.randn_like(triton_path(family, x, params, target, (ho, wo)))

    def step() -> None:
        triton_path(family, x, params, target, (ho, wo)).backward(gout)

    for _ in range(3):
        step()  # autotuning and compilation
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(20):
        step()
    torch.cuda.synchronize()
    wall = (time.perf_counter() - start) / 20 * 1e3
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            step()
        torch.cuda.synchronize()
    events = [e for e in prof.key_averages() if e.device_time_total > 0]
    gpu = sum(e.device_time_total for e in events) / 5 / 1e3
    print(f"\n## {name} float32 forward + backward: wall {wall:.3f} ms, GPU kernels {gpu:.3f} ms")
    for e in sorted(events, key=lambda e: -e.device_time_total)[:10]:
        print(f"  {e.device_time_total / 5 / 1e3:8.3f} ms  x{e.count // 5:<3d} {e.key[:90]}")


def main(argv: list[str]) -> int:
    import torch

    if not torch.cuda.is_available():
        print("profile_kernels: no CUDA device here.")
        return 0
    print(f"# {torch.cuda.get_device_name()} | torch {torch.__version__}")
    for name in argv or ["cub448x4", "mnist2"]:
        profile_one(name)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
