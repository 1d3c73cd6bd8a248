"""Distributed training on the CPU (gloo): two ranks through the CLI, weight and metric parity, two "nodes".

Each test runs its processes with a hard time limit, so a deadlock fails the test instead of hanging CI.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from subprocess_helpers import ROOT, finish, free_port, run, start, train_cmd

from stn_lightning.module import STNModule

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not built in")

SCRIPT = ROOT / "tests" / "ddp_script.py"


def test_two_ranks_through_the_cli(tmp_path: Path) -> None:
    # Validation with the attention pictures, then --test_after_fit: the deadlock of the first validation end.
    args = [
        "fit",
        "--config",
        str(ROOT / "configs" / "demo.yaml"),
        "--trainer.accelerator",
        "cpu",
        "--trainer.devices",
        "2",
        "--trainer.strategy",
        "ddp",
        "--trainer.max_epochs",
        "2",
        "--trainer.limit_train_batches",
        "3",
        "--trainer.limit_val_batches",
        "2",
        "--trainer.limit_test_batches",
        "2",
        "--trainer.enable_progress_bar",
        "false",
        "--data.init_args.batch_size",
        "16",
        "--attention.num_images",
        "2",
        "--model.backbone",
        "test_resnet",  # timm's tiny ResNet: what is tested is the ranks' coordination, not the backbone
        "--test_after_fit",
        "true",
    ]
    code, out = run(train_cmd(*args), tmp_path, timeout=300)
    assert code == 0, out[-4000:]
    # Every epoch-level value is reduced over the ranks, and the command line is not taken for extra arguments.
    assert "sync_dist=True" not in out and "args parameter" not in out, out[-4000:]
    runs = sorted((tmp_path / "lightning_logs").iterdir())
    assert [r.name for r in runs] == ["version_0"], runs
    run_dir = runs[0]
    assert len(list(tmp_path.rglob("config.yaml"))) == 1
    assert [p.name for p in tmp_path.rglob("checkpoints")] == ["checkpoints"]
    ckpts = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    assert "last.ckpt" in ckpts and any(name.startswith("best-") for name in ckpts), ckpts
    pictures = sorted(p.name for p in tmp_path.rglob("*.png"))
    assert pictures == ["epoch_000.png", "epoch_001.png"], pictures
    assert out.count("test accuracy:") == 1, out[-3000:]
    last = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    assert last["epoch"] == 1 and last["global_step"] == 6  # 3 batches per rank and epoch


def _check_ranks(out: Path, ranks: int) -> list[dict]:
    states = [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(ranks)]
    for state in states[1:]:
        assert state["step"] == states[0]["step"] == 4
        for name, value in states[0]["params"].items():
            assert torch.equal(state["params"][name], value), f"{name} differs between ranks"
    return states


def test_two_ranks_hold_identical_weights_and_metrics_match_one_process(tmp_path: Path) -> None:
    # 61 validation digits: 31 on one rank and 30 on the other, none counted twice (DistributedSampler's padding
    # would make them 62, one digit on both ranks).
    cmd = [sys.executable, str(SCRIPT), str(tmp_path), "--devices", "2", "--val_size", "61"]
    code, log = run(cmd, ROOT, timeout=300)
    assert code == 0, log[-4000:]
    states = _check_ranks(tmp_path, 2)
    # Each rank draws its own share of the digits and its own distortions, and has its own Triton cache.
    assert not torch.equal(states[0]["x"], states[1]["x"])
    caches = [s["triton_cache"] for s in states]
    assert caches[0] != caches[1] and all(c.endswith(f"rank{r}") for r, c in enumerate(caches)), caches
    fresh = STNModule(image_size=42, backbone="test_resnet")
    moved = max((states[0]["params"][n] - p.detach()).abs().max().item() for n, p in fresh.named_parameters())
    assert moved > 0, "training did not change the weights"
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["world_size"] == 2 and metrics["images"] == 61
    assert metrics["ddp_acc"] == pytest.approx(metrics["single_acc"], abs=1e-6), metrics
    # The mean loss over 31 + 30 images (Lightning's own mean over the ranks would divide by 30, not 30.5).
    assert metrics["ddp_loss"] == pytest.approx(metrics["single_loss"], rel=1e-5), metrics
    print(f"two ranks: parameters equal after 4 steps, validation accuracy {metrics}")


def test_two_nodes_under_torchrun(tmp_path: Path) -> None:
    # Two torchrun launches on this machine, node ranks 0 and 1, one process each, rendezvous on 127.0.0.1.
    port = str(free_port())
    procs = []
    for node_rank in (0, 1):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1"]
        cmd += ["--node_rank", str(node_rank), "--master_addr", "127.0.0.1", "--master_port", port]
        cmd += [str(SCRIPT), str(tmp_path), "--devices", "1", "--num_nodes", "2"]
        procs.append(start(cmd, ROOT))
    results = [finish(p, timeout=300) for p in procs]
    for code, log in results:
        assert code == 0, log[-4000:]
    _check_ranks(tmp_path, 2)
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["world_size"] == 2
    assert metrics["ddp_acc"] == pytest.approx(metrics["single_acc"], abs=1e-6), metrics


def test_sync_batchnorm_converts_every_batchnorm() -> None:
    # `--trainer.sync_batchnorm true` is Lightning's own switch; it converts with this call (SyncBatchNorm itself
    # needs CUDA tensors, so only the conversion is checked here).
    model = STNModule(image_size=42, backbone="test_resnet")
    norms = sum(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules())
    converted = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    assert norms > 1
    assert sum(isinstance(m, torch.nn.SyncBatchNorm) for m in converted.modules()) == norms
