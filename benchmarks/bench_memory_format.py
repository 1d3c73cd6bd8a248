"""Training steps with the weights in channels-last memory format against the default format, per network.

    python benchmarks/bench_memory_format.py [--steps 10] [--threads 1] [--device cpu] [--only cluttered]

STNModule keeps its convolution weights channels-last when a Trainer runs it on CPUs (``channels_last=None``).
This measures that choice: for the networks of the configs (the paper's CNN and ST-CNN on distorted, cluttered and
MultiMNIST digits, the addition's 2 x ST-CNN, the demo's resnet), the median time of a training step (batch as in
the config, on-device distortion included, as benchmarks/bench_training.py times it) with ``channels_last`` forced
off and on, in the same run. ``--threads 1`` is how benchmarks/reproduce.py runs each job.
"""

from __future__ import annotations

import argparse
import platform
import statistics

import torch
from bench_training import _build, _throughput

ROWS = [
    ("RTS 42 x 42: CNN", "rts_mnist.yaml", ["--model.backbone", "stn_paper_cnn", "--model.fusion", "none"]),
    ("RTS 42 x 42: ST-CNN", "rts_mnist.yaml", []),
    ("RTS 42 x 42: ST-FCN", "rts_mnist.yaml", ["--model.backbone", "stn_paper_fcn_st"]),
    ("P 28 x 28: ST-CNN", "p_mnist.yaml", []),
    ("cluttered 60 x 60: CNN", "cluttered_mnist.yaml", ["--model.backbone", "stn_paper_cnn", "--model.fusion", "none"]),
    ("cluttered 60 x 60: ST-CNN", "cluttered_mnist.yaml", []),
    ("addition 42 x 42: 2 x ST-CNN", "mnist_addition.yaml", []),
    ("MultiMNIST 64 x 64: CNN", "multi_mnist.yaml", ["--model.backbone", "stn_paper_cnn", "--model.fusion", "none"]),
    ("MultiMNIST 64 x 64: K = 2", "multi_mnist.yaml", []),
    ("demo (resnet10t)", "demo.yaml", []),
]


def run() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--only", default="", help="only the networks whose name contains this")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    card = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    print(f"device: {card} ({torch.get_num_threads()} threads), torch {torch.__version__}; median ms per step")
    print(f"{'network':<30} {'default format':>15} {'channels-last':>14} {'change':>8}")
    for name, config, extra in [row for row in ROWS if args.only in row[0]]:
        ms = []
        for flag in ("false", "true"):
            model, data = _build(f"configs/{config}", [*extra, "--model.channels_last", flag])
            rates = _throughput(model, data, device, args.steps, args.warmup)
            ms.append(data.batch_size * 1000 / statistics.median(rates))  # type: ignore[attr-defined]
        print(f"{name:<30} {ms[0]:>15.1f} {ms[1]:>14.1f} {100 * (ms[1] / ms[0] - 1):>+7.0f}%", flush=True)


if __name__ == "__main__":
    run()
