"""Attention pictures: outlines where the transformers look, titles and labels, the GIF across epochs."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from PIL import Image

from stn_lightning.callbacks import AttentionVisualizer, draw_attention
from stn_lightning.data import DistortedMNIST
from stn_lightning.module import STNModule


def _square(x0: float, y0: float, side: float) -> torch.Tensor:
    pts = [[x0, y0], [x0 + side, y0], [x0 + side, y0 + side], [x0, y0 + side], [x0, y0]]
    return torch.tensor(pts).view(1, 1, 5, 2)


def test_pictures_differ_where_the_outlines_are_drawn(tmp_path: Path) -> None:
    images = torch.zeros(1, 1, 32, 32)
    crops = torch.rand(1, 1, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    a, b = tmp_path / "a.png", tmp_path / "b.png"
    for path, outline in ((a, _square(2, 2, 10)), (b, _square(18, 18, 10))):
        draw_attention(images, outline, crops, path, labels=["true 3, pred 3"], title="epoch 0, step 10")
    pa, pb = (np.asarray(Image.open(p).convert("RGB")).astype(int) for p in (a, b))
    assert pa.shape == pb.shape
    changed = np.argwhere((pa != pb).any(-1))
    assert len(changed) > 20
    # Only the input panel (the left half of a two-panel row) changes; the crop is drawn the same.
    assert changed[:, 1].max() < pa.shape[1] / 2
    # The outline is drawn in the first transformer's colour (red).
    red = (pa[..., 0] > 180) & (pa[..., 1] < 80) & (pa[..., 2] < 110)
    assert red[: pa.shape[0], : pa.shape[1] // 2].sum() > 20


def test_one_gif_frame_per_visualised_epoch(tmp_path: Path, quiet_trainer: Callable[..., pl.Trainer]) -> None:
    pl.seed_everything(0)
    data = DistortedMNIST("RTS", batch_size=8, val_size=16)
    model = STNModule(image_size=42, background=data.background, backbone="test_resnet")
    visualizer = AttentionVisualizer(num_images=2, gif=True)
    trainer = quiet_trainer(
        max_epochs=3,
        limit_train_batches=2,
        limit_val_batches=1,
        num_sanity_val_steps=0,
        logger=pl.loggers.CSVLogger(tmp_path),
        callbacks=[visualizer],
    )
    trainer.fit(model, datamodule=data)
    assert visualizer.gif_path is not None
    gif = Image.open(visualizer.gif_path)
    assert gif.n_frames == 3
    pngs = sorted(p.name for p in visualizer.gif_path.parent.glob("*.png"))
    assert pngs == ["epoch_000.png", "epoch_001.png", "epoch_002.png"]


def test_the_spline_control_grid_is_drawn(tmp_path: Path) -> None:
    from stn_lightning.transforms import ThinPlateSpline

    tps = ThinPlateSpline(4)
    params = tps.identity().view(1, 1, -1).clone()
    lines = tps.grid_lines(params, (32, 32), lines=4, per_line=9)
    assert lines.shape == (1, 1, 8, 9, 2)
    # At the identity the lattice is straight: rows at constant y, from the left edge to the right edge.
    assert torch.allclose(lines[0, 0, 0, :, 1], torch.full((9,), -0.5), atol=1e-4)
    assert lines[0, 0, 0, 0, 0].item() == pytest.approx(-0.5, abs=1e-4) and lines[0, 0, 0, -1, 0] == pytest.approx(31.5)
    bent = params + 0.2 * torch.randn(params.shape, generator=torch.Generator().manual_seed(0))
    images, crops = torch.zeros(1, 1, 32, 32), torch.zeros(1, 1, 1, 16, 16)
    outline = tps.outline(bent, (32, 32))
    plain, gridded = tmp_path / "plain.png", tmp_path / "grid.png"
    draw_attention(images, outline, crops, plain)
    draw_attention(images, outline, crops, gridded, grids=tps.grid_lines(bent, (32, 32), lines=4))
    assert not np.array_equal(np.asarray(Image.open(plain)), np.asarray(Image.open(gridded)))
