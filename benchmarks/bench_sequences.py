"""Training step time of the sequence configs side by side: the CNN, ST-CNN Single and ST-CNN Multi.

The paper: ST-CNN Multi is 6 % slower than the CNN on SVHN. Each network is built from its config's model options
(configs/sequences*.yaml), trained for a few warm-up steps, then timed over interleaved rounds (one step of each
network per round, so that the machine's drift hits all three alike); the median per network is printed with its
ratio to the CNN measured in the same run.

    python benchmarks/bench_sequences.py --canvas 64 --threads 1
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
import yaml
from host_overhead import cpu_name  # benchmarks/ is on the path when this script runs

from stn_lightning.module import STNModule

CONFIGS = {"CNN": "sequences_cnn.yaml", "ST-CNN Single": "sequences_single.yaml", "ST-CNN Multi": "sequences.yaml"}
CL = True
ROOT = Path(__file__).resolve().parents[1]


def _instantiate(value: object) -> object:
    # class_path / init_args as LightningCLI would build them (enough for the configs' model options).
    if isinstance(value, dict) and "class_path" in value:
        module, _, name = value["class_path"].rpartition(".")
        cls = getattr(__import__(module, fromlist=[name]), name)
        return cls(**{k: _instantiate(v) for k, v in (value.get("init_args") or {}).items()})
    if isinstance(value, list):
        return [_instantiate(v) for v in value]
    return value


def build(config: str, canvas: int) -> STNModule:
    """The config's STNModule for 1-channel images of ``canvas`` pixels, channels-last as on a CPU trainer."""
    options = yaml.safe_load((ROOT / "configs" / config).read_text())["model"]
    options.pop("optimizer", None)
    module = STNModule(image_size=canvas, background=-0.4242, **{k: _instantiate(v) for k, v in options.items()})
    return module.to(memory_format=torch.channels_last) if CL else module


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--canvas", type=int, default=64)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    x = torch.randn(args.batch, 1, args.canvas, args.canvas)
    lengths = torch.randint(1, 6, (args.batch,))
    digits = torch.randint(0, 10, (args.batch, 5)).masked_fill(torch.arange(5) >= lengths[:, None], -1)
    y = torch.cat([lengths[:, None], digits], dim=1)
    modules = {name: build(config, args.canvas) for name, config in CONFIGS.items()}
    optimizers = {name: torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9) for name, m in modules.items()}

    def step(name: str) -> float:
        module, optimizer = modules[name], optimizers[name]
        start = time.perf_counter()
        loss = module.task.loss(module(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return time.perf_counter() - start

    times: dict[str, list[float]] = {name: [] for name in modules}
    for name in modules:
        modules[name].train()
        for _ in range(args.warmup):
            step(name)
    for _ in range(args.rounds):
        for name in modules:
            times[name].append(step(name))
    print(f"machine: {cpu_name()}, {torch.get_num_threads()} thread(s), torch {torch.__version__}")
    print(f"canvas {args.canvas} px, batch {args.batch}, median of {args.rounds} interleaved rounds")
    base = statistics.median(times["CNN"])
    print("| network | parameters | step (ms) | vs CNN |")
    print("|---|---|---|---|")
    for name, values in times.items():
        median = statistics.median(values)
        count = sum(p.numel() for p in modules[name].parameters())
        print(f"| {name} | {count:,} | {1000 * median:.1f} | {median / base:.2f}x |")


if __name__ == "__main__":
    main()
