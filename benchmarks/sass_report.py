"""What ptxas makes of every Triton kernel for an H100 (sm_90), without a GPU (never collected by pytest).

    python benchmarks/sass_report.py                  # the cub448x4 shapes (C = 3)
    python benchmarks/sass_report.py --channels 128   # feature maps (feat56x2)

Compiles each kernel with the launchers' tile choices and the integer specialisations Triton makes at run time
(an argument equal to 1 becomes a constant, a multiple of 16 is marked divisible by 16), then reads the cubin
with the cuobjdump that ships with Triton. Per kernel it prints registers per thread, stack bytes, SASS
instructions, and the instructions that matter for a memory-bound sampler: global loads and stores, atomic
reductions, block-wide barriers, warp shuffles, shared-memory traffic (cross-warp reductions and layout
conversions) and local-memory traffic (register spills).

These are static counts of the code, not of its execution: an instruction inside a loop counts once. They say
nothing about time (benchmarks/bench_kernels.py on a GPU does); they compare two versions of a kernel on a
machine without a GPU.
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

#: SASS opcode prefixes reported, in columns.
COLUMNS = {"LDG": ("LDG",), "STG": ("STG",), "RED/ATOM": ("RED", "ATOM"), "BAR": ("BAR",), "SHFL": ("SHFL",)}
COLUMNS |= {"LDS/STS": ("LDS", "STS"), "LDL/STL": ("LDL", "STL")}
#: Opcodes that a prefix above would catch but that belong to no column: REDUX is a warp-wide reduction, not an atomic.
NOT_COUNTED = {"REDUX"}


def compile_sm90(
    fn: Any, ints: dict[str, int], consts: dict[str, Any], num_warps: int, pointers: dict[str, str] | None = None
) -> Any:
    """Compile ``fn`` for sm_90: arguments named ``*_ptr`` are pointers, 16-byte aligned, of the type ``pointers``
    gives (default float32); ``fill`` is a float32 scalar; the others are int32 taken from
    ``ints`` with Triton's run-time specialisations; ``consts`` the constexprs."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    signature: dict[str, str] = {}
    constexprs: dict[tuple[int, ...], Any] = {}
    attrs: dict[tuple[int, ...], list] = {}
    for index, name in enumerate(fn.arg_names):
        value = consts.get(name, ints.get(name))
        if name in consts or value == 1:
            signature[name] = "constexpr"
            constexprs[(index,)] = value
        elif name == "fill":
            signature[name] = "fp32"
        elif name.endswith("_ptr"):
            signature[name] = (pointers or {}).get(name, "*fp32")
            attrs[(index,)] = [["tt.divisibility", 16]]
        else:
            if value is None:
                raise KeyError(f"no value for {fn.__name__}({name})")
            signature[name] = "i32"
            if value % 16 == 0:
                attrs[(index,)] = [["tt.divisibility", 16]]
    source = ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
    return triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps})


def sass_stats(compiled: Any) -> dict[str, int]:
    """Registers, stack bytes, SASS instruction count and the COLUMNS counts of a compiled kernel."""
    import triton

    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.cubin")
        with open(path, "wb") as f:
            f.write(compiled.asm["cubin"])
        usage = subprocess.run([tool, "-res-usage", path], capture_output=True, text=True, check=True).stdout
        sass = subprocess.run([tool, "-sass", path], capture_output=True, text=True, check=True).stdout
    ops: collections.Counter[str] = collections.Counter()
    for line in sass.splitlines():
        # "/*0300*/  @!P0 LDG.E R11, desc[UR6][R8.64] ;": the opcode after the address and an optional predicate
        match = re.match(r"\s*/\*[0-9a-f]+\*/\s+(?:@!?U?P[T0-9]+\s+)?([A-Z][A-Z0-9_.]*)", line)
        if match:
            ops[match.group(1).split(".")[0]] += 1
    regs = re.search(r"REG:(\d+)", usage)
    stack = re.search(r"STACK:(\d+)", usage)
    stats = {"regs": int(regs.group(1)) if regs else -1, "stack": int(stack.group(1)) if stack else -1}
    stats["SASS"] = sum(ops.values())
    for column, prefixes in COLUMNS.items():
        stats[column] = sum(n for op, n in ops.items() if op.startswith(prefixes) and op not in NOT_COUNTED)
    return stats


def kernels_to_report(channels: int) -> list[tuple[str, Callable, dict[str, Any], int, dict[str, Any]]]:
    """(label, kernel, constexprs, num_warps, integer arguments that differ from ``sizes`` and, under "pointers",
    pointer types other than float32) for every kernel, with the tiles its launcher picks on a GPU. The sampler's
    two kernels are reported once per family (``COORDS``)."""
    from stn_lightning.kernels import affine, grid, projective, sampler, tps
    from stn_lightning.kernels._launch import _FWD_CONFIGS, bwd_config, channel_group, fwd_block_c

    fwd_h, fwd_w, fwd_warps = _FWD_CONFIGS[0]
    fwd = {"HAS_FILL": False, "BORDER": False, "NEAREST": False, "F64": False, "IDX64": False}
    fwd |= {"BLOCK_H": fwd_h, "BLOCK_W": fwd_w}
    fwd |= {"SPLIT_C": False, "BLOCK_C": fwd_block_c(channels), "CGROUP": channel_group(channels)}
    bwd_cfg = bwd_config(channels)
    bwd_warps = bwd_cfg.pop("num_warps")
    bwd = {"HAS_FILL": False, "BORDER": False, "NEAREST": False, "NEED_X_GRAD": True, "NEED_PARAM_GRAD": True}
    bwd |= {"F64": False, "IDX64": False, **bwd_cfg}
    fwd_k, bwd_k = sampler._sample_fwd_kernel, sampler._sample_bwd_kernel
    rows: list[tuple[str, Callable, dict[str, Any], int, dict[str, Any]]] = []
    # N: rows of the auxiliary tensor (the scale matrix, the spline's 16 control points, the grid's 2 scalars)
    for name, family, n in (
        ("affine", affine.AFFINE, 2),
        ("projective", projective.PROJECTIVE, 3),
        ("tps", tps.TPS, 16),
        ("grid", grid.GRID, 2),
    ):
        ints = {"N": n}
        coords = {"COORDS": family.coords}
        rows.append((f"{name} fwd", fwd_k, {**fwd, **coords}, fwd_warps, ints))
        if name == "affine":
            rows.append((f"{name} fwd (SPLIT_C)", fwd_k, {**fwd, **coords, "SPLIT_C": True}, fwd_warps, ints))
        both = {**bwd, **coords, "PARAM_GRAD": family.param_grad}
        rows.append((f"{name} bwd", bwd_k, both, bwd_warps, ints))
        # the parameter gradient only (the image gradient under torch.use_deterministic_algorithms, or not needed)
        rows.append((f"{name} bwd (params only)", bwd_k, {**both, "NEED_X_GRAD": False}, bwd_warps, ints))
        # a padding value other than 0 (HAS_FILL): the masked loads read it from a register; with a bfloat16 image,
        # a select after each load (the load's other would round fill to bfloat16)
        rows.append((f"{name} fwd (fill)", fwd_k, {**fwd, **coords, "HAS_FILL": True}, fwd_warps, ints))
        rows.append((f"{name} bwd (fill)", bwd_k, {**both, "HAS_FILL": True}, bwd_warps, ints))
        half = {**ints, "pointers": {"x_ptr": "*bf16", "out_ptr": "*bf16", "go_ptr": "*bf16"}}
        rows.append((f"{name} fwd (fill, bfloat16)", fwd_k, {**fwd, **coords, "HAS_FILL": True}, fwd_warps, half))
        rows.append((f"{name} bwd (fill, bfloat16)", bwd_k, {**both, "HAS_FILL": True}, bwd_warps, half))
    return rows


def sizes(channels: int) -> dict[str, int]:
    """Integer arguments of the cub448x4 workload (B 64, 448 x 448 -> K 4 x 224 x 224), contiguous tensors."""
    c, h, w, k, ho, wo, n = channels, 448, 448, 4, 224, 224, 16
    values = {"K": k, "C": c, "H": h, "W": w, "Ho": ho, "Wo": wo, "N": n}
    for prefix in ("sx", "sgx"):  # the image and its gradient, (B, C, H, W)
        values |= {prefix + "b": c * h * w, prefix + "c": h * w, prefix + "h": w, prefix + "w": 1}
    values |= {"sgb": k * c * ho * wo, "sgk": c * ho * wo, "sgc": ho * wo, "sgh": wo, "sgw": 1}  # grad_out
    return values


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--channels", type=int, default=3, help="image channels (3: cub448x4, 128: feat56x2)")
    parser.add_argument("--only", nargs="*", help="labels to report (substring match)")
    args = parser.parse_args(argv)
    os.environ.pop("TRITON_INTERPRET", None)  # must be unset before the kernels are imported
    import triton

    ints = sizes(args.channels)
    print(f"sm_90, float32, C {args.channels}, 448 x 448 -> 224 x 224, triton {triton.__version__}")
    header = ["kernel", "regs", "stack", "SASS", *COLUMNS]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for label, fn, consts, warps, own in kernels_to_report(args.channels):
        if args.only and not any(s in label for s in args.only):
            continue
        own = dict(own)
        pointers = own.pop("pointers", None)
        stats = sass_stats(compile_sm90(fn, {**ints, **own}, consts, warps, pointers))
        print("| " + " | ".join([label, *(str(stats[h]) for h in header[1:])]) + " |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
