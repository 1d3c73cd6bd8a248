"""Training throughput of a config, in images per second, next to the same backbone without transformer.

    python benchmarks/bench_training.py --config configs/demo.yaml [--steps 20] [--device cpu|cuda]

Both models are built through the CLI exactly as ``stn-train fit`` builds them (run=False), then timed over
``--steps`` optimiser steps on batches that the DataModule distorts on the device, after ``--warmup`` steps.
The data pipeline (on-device distortion) is included in the time, as in training.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch

from stn_lightning.cli import main


def _build(config: str, extra: list[str]) -> tuple[torch.nn.Module, object]:
    cli = main(["--config", config, *extra], run=False)
    return cli.model, cli.datamodule


def _throughput(model: torch.nn.Module, data: object, device: torch.device, steps: int, warmup: int) -> list[float]:
    data.setup("fit")  # type: ignore[attr-defined]
    loader = data.train_dataloader()  # type: ignore[attr-defined]
    model.to(device).train()
    if model.uses_channels_last(device):  # type: ignore[operator]
        model.to(memory_format=torch.channels_last)  # as STNModule.setup does under a Trainer
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    rates: list[float] = []
    batches = iter(loader)
    for i in range(warmup + steps):
        try:
            raw = next(batches)
        except StopIteration:
            batches = iter(loader)
            raw = next(batches)
        start = time.perf_counter()
        raw = {k: v.to(device) for k, v in raw.items()} if isinstance(raw, dict) else [v.to(device) for v in raw]
        x, y = data.make_batch(raw, train=True)  # type: ignore[attr-defined]
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if i >= warmup:
            rates.append(len(y) / (time.perf_counter() - start))
    return rates


def run() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/demo.yaml")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    card = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{platform.processor() or 'cpu'}"
    threads = torch.get_num_threads()
    print(f"device: {card} ({threads} threads), torch {torch.__version__}, config {args.config}")
    print(f"{'model':<28} {'images/s (median)':>18} {'min':>8} {'max':>8}")
    for name, extra in [("with transformer", []), ("baseline (fusion none)", ["--model.fusion", "none"])]:
        model, data = _build(args.config, extra)
        rates = _throughput(model, data, device, args.steps, args.warmup)
        print(f"{name:<28} {statistics.median(rates):>18.1f} {min(rates):>8.1f} {max(rates):>8.1f}")


if __name__ == "__main__":
    run()
