"""A few DDP steps on the bundled digits; each rank writes what tests/test_ddp.py compares.

Run as ``python tests/ddp_script.py OUT --devices 2`` (Lightning's ddp strategy re-launches this script for the
other ranks) or under ``torchrun --nnodes 2 ... tests/ddp_script.py OUT --devices 1 --num_nodes 2``. Writes
``OUT/rank{R}.pt`` (the rank's parameters after training and its first training batch) and, on rank 0,
``OUT/metrics.json`` (validation accuracy under DDP and in one process on the same data and weights).
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch

from stn_lightning.data import DistortedMNIST
from stn_lightning.module import STNModule


class FirstBatch(pl.Callback):
    """Keeps the first training batch this rank sees (after the on-device distortions)."""

    def __init__(self) -> None:
        self.batch: tuple[torch.Tensor, torch.Tensor] | None = None

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, idx: int) -> None:
        if self.batch is None:
            self.batch = (batch[0].detach().clone(), batch[1].detach().clone())


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--devices", type=int, default=2)
    parser.add_argument("--num_nodes", type=int, default=1)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--val_size", type=int, default=64)
    args = parser.parse_args()
    torch.set_num_threads(1)
    pl.seed_everything(0)
    data = DistortedMNIST("RTS", batch_size=16, val_size=args.val_size)
    model = STNModule.for_data(
        data,
        backbone="test_resnet",
    )
    first = FirstBatch()
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=args.devices,
        num_nodes=args.num_nodes,
        strategy="ddp",
        max_steps=args.steps,
        num_sanity_val_steps=0,  # and max_steps ends fit long before the first epoch's validation
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        deterministic=True,
        callbacks=[first],
    )
    trainer.fit(model, datamodule=data)
    out, rank = Path(args.out), trainer.global_rank
    assert first.batch is not None
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    state = {"params": params, "x": first.batch[0], "y": first.batch[1], "step": trainer.global_step}
    state["triton_cache"] = os.environ.get("TRITON_CACHE_DIR", "")
    torch.save(state, out / f"rank{rank}.pt")

    # The metrics: rank 0's weights (BatchNorm statistics included) on every rank, then validation under DDP (the
    # metrics reduce their states over the ranks; with an odd --val_size the ranks hold different counts) against
    # the same computation in this process alone.
    model.load_state_dict(trainer.strategy.broadcast(model.state_dict(), src=0))
    ddp = trainer.validate(model, datamodule=data, verbose=False)[0]
    if rank == 0:
        model.eval()
        correct = seen = 0
        loss = 0.0
        with torch.no_grad():
            # Every validation sample once, in this process alone (the DataModule's own loader, attached to the
            # distributed trainer, would give this rank's share).
            for raw in torch.utils.data.DataLoader(data.val_set, batch_size=16):
                x, y = data.make_batch(raw, train=False)
                logits = model(x)
                correct += int((logits.argmax(-1) == y).sum())
                loss += float(torch.nn.functional.cross_entropy(logits, y, reduction="sum"))
                seen += len(y)
        result = {"ddp_acc": ddp["val/acc"], "single_acc": correct / seen, "images": seen}
        result.update(ddp_loss=ddp["val/loss"], single_loss=loss / seen, world_size=trainer.world_size)
        (out / "metrics.json").write_text(json.dumps(result))


if __name__ == "__main__":
    main()
