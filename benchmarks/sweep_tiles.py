"""Time the Triton backward with other tile shapes than the launchers' fixed ones (never collected by pytest).

    python benchmarks/sweep_tiles.py                          # cub448x4, feat56x2, mnist2 and the spline, float32
    python benchmarks/sweep_tiles.py --workloads cub448x4 --rep 50

The forward kernel is autotuned; the backward kernel is not (the parameter gradient's partial sums need the
tile count before the launch), so its tiles are fixed in ``kernels._launch.bwd_config``. This script swaps in each
candidate tile (and, for inputs of many channels, each number of channels per program,
``kernels._launch.CHANNEL_GROUP``), times forward + backward with
CUDA events (median, triton.testing.do_bench) and prints one table per workload, fastest first, next to the
launchers' own choice measured in the same run. Parity is not checked here (bench_kernels.py --check does that);
the candidates only change how the same work is divided.
"""

from __future__ import annotations

import argparse
import functools
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
for path in (ROOT, ROOT / "benchmarks"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

from bench_kernels import WORKLOADS, make_inputs, measure, triton_path  # noqa: E402

#: Scatter-backward candidates: (BLOCK_H, BLOCK_W, BLOCK_C, num_warps).
BWD_TILES = [(16, 16, 1, 8), (8, 16, 1, 4), (8, 32, 1, 4), (16, 32, 1, 8), (8, 16, 4, 8), (16, 16, 2, 8)]
#: Channels per program (kernels._launch.CHANNEL_GROUP, forward and scatter backward) tried where C is larger.
CHANNEL_GROUPS = [4, 8, 32, 64, 128]


def time_step(family, x, params, target, size, rep):  # type: ignore[no-untyped-def]
    """Median ms of one forward + backward through the Triton path (bench_kernels.measure's second number)."""
    return measure(functools.partial(triton_path, family), x, params, target, size, rep)[1]


def sweep(name: str, rep: int) -> None:
    import torch

    from stn_lightning.kernels import _launch, sampler

    family, b, c, h, w, k, ho, wo = WORKLOADS[name]
    x, params, target = make_inputs(family, b, c, h, w, k, torch.float32, "cuda")
    size = (ho, wo)
    default_bwd = sampler.bwd_config  # the backward launcher's tile choice
    default_group = _launch.CHANNEL_GROUP
    rows: list[tuple[float, str]] = []

    def run(label: str) -> None:
        try:
            rows.append((time_step(family, x, params, target, size, rep), label))
        except Exception as error:  # a tile that does not compile or run: report and go on
            rows.append((float("inf"), f"{label}: {type(error).__name__}: {str(error)[:80]}"))
        torch.cuda.empty_cache()

    try:
        run(f"launcher's {default_bwd(c)}")
        for bh, bw, bc, warps in BWD_TILES:
            config = {"BLOCK_H": bh, "BLOCK_W": bw, "BLOCK_C": min(bc, _launch.block_c(c, 8)), "num_warps": warps}
            config["CGROUP"] = max(_launch.channel_group(c), config["BLOCK_C"])
            sampler.bwd_config = lambda channels, config=config: dict(config)
            run(f"{config}")
        sampler.bwd_config = default_bwd
        for group in (g for g in CHANNEL_GROUPS if g < c):
            _launch.CHANNEL_GROUP = group
            run(f"launcher's tiles, {group} channels per program")
    finally:
        sampler.bwd_config = default_bwd
        _launch.CHANNEL_GROUP = default_group
    print(f"\n## {name} float32, forward + backward ms (fastest first)")
    for ms, label in sorted(rows):
        print(f"  {ms:8.3f}  {label}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workloads", nargs="+", default=["cub448x4", "feat56x2", "mnist2", "cub448x4-tps16"])
    parser.add_argument("--rep", type=int, default=25, help="milliseconds of repetitions per timing (do_bench)")
    args = parser.parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        print("sweep_tiles: no CUDA device here; the tiles are timed on GPUs only.")
        return 0
    import triton

    print(f"# {torch.cuda.get_device_name()} | torch {torch.__version__} | triton {triton.__version__}")
    for name in args.workloads:
        sweep(name, args.rep)
    return 0


if __name__ == "__main__":
    sys.exit(main())
