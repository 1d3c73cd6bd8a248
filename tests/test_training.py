"""A short training run on RTS digits lowers the loss, and the attention pictures are written."""

from __future__ import annotations

from pathlib import Path

import pytorch_lightning as pl
import torch
import torch.nn.functional as F

from stn_lightning.callbacks import AttentionVisualizer
from stn_lightning.data import DistortedMNIST
from stn_lightning.module import STNModule


def test_short_rts_run_lowers_the_loss(tmp_path: Path) -> None:
    pl.seed_everything(0)
    data = DistortedMNIST("RTS", batch_size=32, val_size=64)
    data.setup("fit")
    model = STNModule(
        num_classes=data.num_classes,
        in_chans=data.in_chans,
        image_size=data.image_size,
        background=data.background,
        backbone="resnet10t",
        optimizer=lambda params: torch.optim.Adam(params, lr=2e-3),
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.StepLR(opt, 1000),
        loc_lr_scale=0.1,
    )
    val_x, val_y = data.make_batch(next(iter(data.val_dataloader())), train=False)

    def val_loss() -> float:
        # Batch statistics (train mode) so that the measure does not hinge on BatchNorm's running averages
        # after only a few dozen steps; no gradient is taken.
        model.train()
        with torch.no_grad():
            return F.cross_entropy(model(val_x), val_y).item()

    before = val_loss()
    visualizer = AttentionVisualizer(num_images=4)
    trainer = pl.Trainer(
        max_steps=60,
        accelerator="cpu",
        devices=1,
        logger=pl.loggers.CSVLogger(tmp_path),
        enable_checkpointing=False,
        enable_progress_bar=False,
        limit_val_batches=1,
        val_check_interval=60,
        callbacks=[visualizer],
        num_sanity_val_steps=0,
    )
    trainer.fit(model, datamodule=data)
    after = val_loss()
    assert after < 0.7 * before, f"validation loss went from {before:.3f} to {after:.3f}"
    assert visualizer.last_path is not None and visualizer.last_path.is_file()
    assert visualizer.last_path.stat().st_size > 1000
