"""Lightning callbacks: pictures of where the transformers look."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pytorch_lightning as pl  # noqa: E402
import torch  # noqa: E402
from torch import Tensor  # noqa: E402

__all__ = ["AttentionVisualizer", "draw_attention"]

_COLOURS = ["#e6194b", "#3cb44b", "#4363d8", "#f58231", "#911eb4", "#42d4f4", "#f032e6", "#bfef45"]


def _show(ax: Any, img: Tensor) -> None:
    # img (C, H, W): grey for one channel, RGB for three, the first channel otherwise; scaled to its own range.
    img = img.detach().float().cpu()
    img = (img - img.min()) / (img.max() - img.min()).clamp_min(1e-8)
    if img.shape[0] == 3:
        ax.imshow(img.permute(1, 2, 0).numpy())
    else:
        ax.imshow(img[0].numpy(), cmap="gray")
    ax.set_xticks([])
    ax.set_yticks([])


def draw_attention(images: Tensor, outlines: Tensor, crops: Tensor, path: str | os.PathLike[str] | None = None) -> Any:
    """Draw each image with the regions its K transformers read, followed by the K crops.

    Args:
        images: (N, C, H, W).
        outlines: (N, K, M, 2) polygons in input pixel coordinates.
        crops: (N, K, C, Ho, Wo).
        path: where to save a PNG, or None.

    Returns:
        The matplotlib figure.
    """
    n, k = crops.shape[:2]
    fig, axes = plt.subplots(n, k + 1, figsize=(1.6 * (k + 1), 1.6 * n), squeeze=False)
    for i in range(n):
        _show(axes[i, 0], images[i])
        for j in range(k):
            colour = _COLOURS[j % len(_COLOURS)]
            poly = outlines[i, j].detach().float().cpu().numpy()
            axes[i, 0].plot(poly[:, 0], poly[:, 1], color=colour, linewidth=1.2)
            _show(axes[i, j + 1], crops[i, j])
            for spine in axes[i, j + 1].spines.values():
                spine.set_edgecolor(colour)
                spine.set_linewidth(2)
        # Show the whole image and the outlines that leave it, up to half an image beyond each edge.
        h, w = images.shape[-2:]
        pts = outlines[i].detach().float().cpu().reshape(-1, 2).nan_to_num(0.0)
        x0 = max(min(-0.5, pts[:, 0].min().item()), -0.5 - w / 2)
        x1 = min(max(w - 0.5, pts[:, 0].max().item()), w - 0.5 + w / 2)
        y0 = max(min(-0.5, pts[:, 1].min().item()), -0.5 - h / 2)
        y1 = min(max(h - 0.5, pts[:, 1].max().item()), h - 0.5 + h / 2)
        axes[i, 0].set_xlim(x0, x1)
        axes[i, 0].set_ylim(y1, y0)
        # Outside the image is hatched grey (not the figure's white, which reads as bright pixels), inside framed.
        axes[i, 0].set_facecolor("#bbbbbb")
        axes[i, 0].patch.set_hatch("////")
        frame = plt.Rectangle((-0.5, -0.5), w, h, fill=False, edgecolor="black", linewidth=0.8)
        axes[i, 0].add_patch(frame)
    axes[0, 0].set_title("input", fontsize=8)
    for j in range(k):
        axes[0, j + 1].set_title(f"crop {j}", fontsize=8)
    fig.tight_layout()
    if path is not None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=100)
    return fig


class AttentionVisualizer(pl.Callback):
    """After every ``every_n_epochs`` validation epochs, draw where the transformers look on fixed validation images.

    The pictures go to ``<log_dir>/attention/epoch_NNN.png`` and, with a TensorBoard logger, to its images tab.
    Models without a transformer are skipped.

    Args:
        num_images: how many validation images to draw.
        every_n_epochs: drawing period in epochs.
    """

    def __init__(self, num_images: int = 8, every_n_epochs: int = 1) -> None:
        super().__init__()
        self.num_images = num_images
        self.every_n_epochs = every_n_epochs
        self._images: Tensor | None = None
        self.last_path: Path | None = None

    def on_validation_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if batch_idx == 0 and self._images is None:
            self._images = batch[0][: self.num_images].detach()

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        transformer = getattr(pl_module, "transformer", None)
        if transformer is None or self._images is None or trainer.sanity_checking:
            return
        if (trainer.current_epoch + 1) % self.every_n_epochs and not getattr(trainer, "fast_dev_run", False):
            return
        # trainer.log_dir is a collective under DDP: every rank asks, then only rank 0 draws (and calls nothing
        # collective while it does). fast_dev_run has no log folder: the picture is drawn but not written.
        log_dir = None if getattr(trainer, "fast_dev_run", False) else trainer.log_dir
        if not trainer.is_global_zero:
            return
        images = self._images.to(pl_module.device)
        was_training = transformer.training
        transformer.eval()
        with torch.no_grad():
            crops, params = transformer(images)
            outlines = transformer.outline(params, (images.shape[-2], images.shape[-1]))
        transformer.train(was_training)
        path = None
        if log_dir is not None:
            path = Path(log_dir) / "attention" / f"epoch_{trainer.current_epoch:03d}.png"
            self.last_path = path
        fig = draw_attention(images, outlines, crops, path)
        add_figure = getattr(getattr(trainer.logger, "experiment", None), "add_figure", None)
        if add_figure is not None:
            add_figure("attention", fig, global_step=trainer.global_step)
        plt.close(fig)
