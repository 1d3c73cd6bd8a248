"""Lightning callbacks: pictures of where the transformers look, the prediction file, a stop for runs that learn
nothing."""

from __future__ import annotations

import csv
import io
import json
import math
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import BasePredictionWriter
from torch import Tensor, nn

from .insertion import inner_points, inner_regions
from .kernels import sample_grid
from .tasks import Classification
from .writing import AtomicFile, atomic_path, atomic_write

__all__ = [
    "AttentionVisualizer",
    "PredictionWriter",
    "StallDetector",
    "chance_accuracy",
    "chance_loss",
    "class_names_of",
    "draw_attention",
    "is_stalled",
    "stall_message",
]


def _pyplot() -> Any:
    # matplotlib loads on the first picture, not with the package (it takes a second or more to import).
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


_COLOURS = ["#e6194b", "#3cb44b", "#4363d8", "#f58231", "#911eb4", "#42d4f4", "#f032e6", "#bfef45"]


def class_names_of(trainer: Any) -> tuple[str, ...] | None:
    """The class names of the trainer's DataModule (its ``class_names`` attribute), or None when it has none."""
    names = getattr(getattr(trainer, "datamodule", None), "class_names", None)
    if isinstance(names, Sequence) and not isinstance(names, str) and all(isinstance(n, str) for n in names):
        return tuple(names)
    return None


def _name(names: Sequence[str] | None, label: int | str) -> str:
    # A class's name when the data gives one, else its index; an answer already written out (a string) as it is.
    if isinstance(label, str):
        return label
    return names[label] if names is not None and 0 <= label < len(names) else str(label)


def _caption(parts: list[str]) -> str:
    # Short captions on one line ("true 3, pred 8"); long class names ("true Ankle boot") one part per line.
    line = ", ".join(parts)
    return line if len(line) <= 24 else "\n".join(parts)


def _show(ax: Any, img: Tensor) -> None:
    # img (C, H, W): grey for one channel, RGB for three, the first channel otherwise; scaled to its own range. A flat
    # image (an empty crop: bilinear sampling of a constant background varies by float rounding, ~1e-7) stays flat
    # instead of showing that rounding stretched into noise.
    img = img.detach().float().cpu()
    img = (img - img.min()) / (img.max() - img.min()).clamp_min(1e-3)
    if img.shape[0] == 3:
        ax.imshow(img.permute(1, 2, 0).numpy())
    else:
        ax.imshow(img[0].numpy(), cmap="gray", vmin=0.0, vmax=1.0)  # imshow would stretch a flat image again
    ax.set_xticks([])
    ax.set_yticks([])


def draw_attention(
    images: Tensor,
    outlines: Tensor,
    crops: Tensor,
    path: str | os.PathLike[str] | None = None,
    *,
    labels: Sequence[str] | None = None,
    title: str | None = None,
    grids: Tensor | None = None,
    crop_titles: Sequence[str] | None = None,
) -> Any:
    """Draw each image with the regions its K transformers read (one colour each), followed by the K crops.

    Args:
        images: (N, C, H, W).
        outlines: (N, K, M, 2) polygons in input pixel coordinates.
        crops: (N, K, C, Ho, Wo).
        path: where to save a PNG, or None.
        labels: a caption per image (e.g. "true 3, pred 8" or "true Coat, pred Shirt"), shown under it.
        title: the figure's title (e.g. the epoch and step).
        grids: (N, K, L, Q, 2) polylines drawn thin in each transformer's colour inside its outline (the warped
            control grid of a thin-plate spline: :meth:`Transform.grid_lines`), or None.
        crop_titles: a title per crop column (default "crop 0", "crop 1", ...).

    Returns:
        The matplotlib figure.
    """
    plt = _pyplot()
    n, k = crops.shape[:2]
    fig, axes = plt.subplots(n, k + 1, figsize=(1.6 * (k + 1), 1.6 * n), squeeze=False)
    for i in range(n):
        _show(axes[i, 0], images[i])
        for j in range(k):
            colour = _COLOURS[j % len(_COLOURS)]
            poly = outlines[i, j].detach().float().cpu().numpy()
            axes[i, 0].plot(poly[:, 0], poly[:, 1], color=colour, linewidth=1.2)
            if grids is not None:
                for line in grids[i, j].detach().float().cpu().numpy():
                    axes[i, 0].plot(line[:, 0], line[:, 1], color=colour, linewidth=0.5, alpha=0.8)
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
        if labels is not None:
            axes[i, 0].set_xlabel(labels[i], fontsize=7, labelpad=2)
    axes[0, 0].set_title("input", fontsize=8)
    for j in range(k):
        name = crop_titles[j] if crop_titles is not None else f"crop {j}"
        axes[0, j + 1].set_title(name, fontsize=8, color=_COLOURS[j % len(_COLOURS)])
    if title is not None:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    if path is not None:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=100)
    return fig


class AttentionVisualizer(pl.Callback):
    """After every ``every_n_epochs`` validation epochs, draw where the transformers look on fixed validation images.

    Each picture is titled with the epoch and step and gives every image's true and predicted class, by name when
    the DataModule has ``class_names`` (Fashion-MNIST's "Coat", a class folder's name), else by index. The pictures
    go to ``<log_dir>/attention/epoch_NNN.png`` and, with a TensorBoard logger, to its images tab (one entry per
    visualised epoch, so TensorBoard's step slider plays them in order); with ``gif=True``
    ``<log_dir>/attention/attention.gif`` holds them as an animation, one frame per visualised epoch. Models
    without a transformer are skipped. Only rank 0 draws, and it calls nothing collective while it does.

    Args:
        num_images: how many validation images to draw.
        every_n_epochs: drawing period in epochs.
        gif: also write the animated GIF (rewritten after each visualised epoch).
    """

    def __init__(self, num_images: int = 8, every_n_epochs: int = 1, gif: bool = False) -> None:
        super().__init__()
        self.num_images = num_images
        self.every_n_epochs = every_n_epochs
        self.gif = gif
        self._images: Tensor | None = None
        self._labels: Tensor | None = None
        self._frames: list[Any] = []
        self.last_path: Path | None = None
        self.gif_path: Path | None = None
        self.last_captions: list[str] = []  # the captions of the latest picture

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
            labels = batch[1] if isinstance(batch, (tuple, list)) and len(batch) > 1 else None
            self._labels = labels[: self.num_images].detach() if isinstance(labels, Tensor) else None

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: Any) -> None:
        transformer = getattr(pl_module, "transformer", None)
        inner = getattr(pl_module, "inner_transformers", {})
        if (transformer is None and not inner) or self._images is None or trainer.sanity_checking:
            return
        if (trainer.current_epoch + 1) % self.every_n_epochs and not getattr(trainer, "fast_dev_run", False):
            return
        # trainer.log_dir is a collective under DDP: every rank asks, then only rank 0 draws (and calls nothing
        # collective while it does). fast_dev_run has no log folder: the picture is drawn but not written.
        log_dir = None if getattr(trainer, "fast_dev_run", False) else trainer.log_dir
        if not trainer.is_global_zero:
            return
        images = self._images.to(pl_module.device)
        size = (images.shape[-2], images.shape[-1])
        with torch.no_grad():
            outputs = pl_module(images).cpu()  # also runs the transformers inside the backbone
            places = None
            if transformer is not None:
                crops, params = transformer(images)
                outlines = transformer.outline(params, size)
                grids = _control_grid(transformer, params, size)
            else:
                outlines, crops = inner_views(pl_module.model.backbone, images)
                grids = None
                places = [f"before {place}" for place in inner]
        truth = self._labels.cpu() if self._labels is not None else None
        names = class_names_of(trainer)
        task = pl_module.task
        predicted = task.decode(outputs)["prediction"]
        labels = [
            _caption(
                ([f"true {task.format(truth[i], names)}"] if truth is not None else [])
                + [f"pred {task.format(predicted[i], names)}"]
            )
            for i in range(len(images))
        ]
        self.last_captions = labels
        title = f"epoch {trainer.current_epoch}, step {trainer.global_step}"
        path = None
        if log_dir is not None:
            path = Path(log_dir) / "attention" / f"epoch_{trainer.current_epoch:03d}.png"
            self.last_path = path
        fig = draw_attention(images, outlines, crops, path, labels=labels, title=title, grids=grids, crop_titles=places)
        add_figure = getattr(getattr(trainer.logger, "experiment", None), "add_figure", None)
        if self.gif and path is not None:
            self._frames.append(_figure_image(fig))
            self.gif_path = path.parent / "attention.gif"
            _write_gif(self._frames, self.gif_path)
        if add_figure is not None:
            add_figure("attention", fig, global_step=trainer.global_step)
        _pyplot().close(fig)


def inner_views(model: nn.Module, images: Tensor, crop: int = 32) -> tuple[Tensor, Tensor]:
    """Where each transformer inside ``model`` looked during its last forward on ``images`` (B, C, H, W), in the images'
    pixels: the regions (B, P, M, 2) of the P places (composed through the earlier places, :func:`inner_regions`) and
    the images resampled over each region, (B, P, C, crop, crop): what the place's warp made of the whole image."""
    size = (images.shape[-2], images.shape[-1])
    regions = inner_regions(model, size, per_side=16)
    r = (torch.arange(crop, device=images.device, dtype=torch.float32) * 2 + 1) / crop - 1  # pixel centres
    lattice = torch.stack(torch.meshgrid(r, r, indexing="xy"), -1).reshape(-1, 2)
    points = inner_points(model, size, lattice)
    grid = torch.cat(list(points.values()), dim=1).unflatten(2, (crop, crop))  # (B, P, crop, crop, 2)
    crops = sample_grid(images.float(), grid, fill=float(images.amin()), backend="torch")
    return torch.cat(list(regions.values()), dim=1), crops


def _control_grid(transformer: Any, params: Tensor, in_size: tuple[int, int]) -> Tensor | None:
    # Quadrilaterals say all there is to say about affine and projective warps; a spline bends its control grid.
    family = transformer.transform
    lines = getattr(family, "grid_size", None)
    if lines is None:
        return None
    return family.grid_lines(params, in_size, lines=lines, align_corners=transformer.align_corners)


def _figure_image(fig: Any) -> Any:
    from PIL import Image

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=80)
    buffer.seek(0)
    return Image.open(buffer).convert("RGB")


def _write_gif(frames: list[Any], path: Path) -> None:
    # Frames of one run share a layout; a resized frame would make PIL pad, so all take the first one's size.
    size = frames[0].size
    frames = [f if f.size == size else f.resize(size) for f in frames]
    with atomic_path(path) as tmp:
        frames[0].save(tmp, format="GIF", save_all=True, append_images=frames[1:], duration=700, loop=0)


# ----------------------------------------------------------------------------------------------------------------
# predictions
# ----------------------------------------------------------------------------------------------------------------
class PredictionWriter(BasePredictionWriter):
    """Write one row per predicted image: what it is, the predicted class, the top-k and where each transformer
    looked; and the attention picture of the first images.

    A row holds ``image`` (the file, or the index in the DataModule's predict set), ``label`` when known,
    ``pred``, ``prob``, ``top`` (the top-k classes with their probabilities) and, per transformer, ``params`` (its
    warp parameters) and ``region`` (the polygon it read, in input pixels, corners included). When the DataModule
    has ``class_names``, ``class_name`` names the predicted class and ``top_names`` the top-k (the CSV's columns
    are then filled; ``.jsonl`` rows have the keys only then), and the picture's captions use the names.
    ``.csv`` files hold the lists as JSON strings; ``.jsonl`` files one JSON object per line. Under DDP every
    rank writes its own part and rank 0 merges them, in index order, into ``output`` at the end.

    The file appears whole or not at all: rows go to a temporary file next to ``output``, which replaces it only
    when the prediction ends, so a failed run never truncates an earlier file (:mod:`stn_lightning.writing`).
    Image files (``--images``) that cannot be read get no row: each is named on stderr, the others are predicted,
    and the command then ends with one line saying how many failed (exit status 2); ``stop_on_bad_image`` stops at
    the first one instead, leaving ``output`` as it was. Regions of image files are in the file's own pixels
    (rounded to 0.01): letterboxed images (the default ``resize``) keep their aspect ratio, padded with the
    background to the model's size; ``resize="squash"`` stretches them instead.

    Args:
        output: the file to write (``.csv`` or ``.jsonl``); default ``<log_dir>/predictions.csv``.
        top_k: how many classes ``top`` lists.
        num_images: how many images the attention picture (``predictions.png`` next to the file) shows; 0 for
            none.
        resize: how image files reach the model's size: "letterbox" (keep the aspect ratio) or "squash".
        stop_on_bad_image: stop at the first image file that cannot be read.
    """

    def __init__(
        self,
        output: str | None = None,
        top_k: int = 5,
        num_images: int = 8,
        resize: Literal["letterbox", "squash"] = "letterbox",
        stop_on_bad_image: bool = False,
    ) -> None:
        super().__init__(write_interval="batch")
        if output is not None and Path(output).suffix not in (".csv", ".jsonl"):
            raise ValueError(f"expected a prediction file ending in .csv or .jsonl, got {output!r}")
        if top_k < 1 or num_images < 0:
            raise ValueError(f"expected top_k >= 1 and num_images >= 0, got {top_k} and {num_images}")
        if resize not in ("letterbox", "squash"):
            raise ValueError(f"expected resize 'letterbox' or 'squash', got {resize!r}")
        self.output = output
        self.top_k = top_k
        self.num_images = num_images
        self.resize = resize
        self.stop_on_bad_image = stop_on_bad_image
        self.path: Path | None = None
        self.rows = 0
        self.bad: list[str] = []  # why each unreadable image file could not be read
        self._out: AtomicFile | None = None
        self._picture: list[tuple[Tensor, Tensor, Tensor, list[str]]] = []

    @property
    def _file(self) -> Any:
        return self._out.file if self._out is not None else None

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "predict":
            return
        log_dir = trainer.log_dir  # a collective under DDP: every rank asks
        self.path = Path(self.output) if self.output else Path(log_dir or trainer.default_root_dir) / "predictions.csv"
        world = trainer.world_size
        part = self.path if world == 1 else self.path.with_name(f".{self.path.name}.rank{trainer.global_rank}")
        self._out = AtomicFile(part, "w", newline="")
        self.rows = 0
        self.bad = []
        self._picture = []
        data = getattr(trainer, "datamodule", None)
        if data is not None and hasattr(data, "stop_on_error") and hasattr(data, "resize"):  # ImageFilesDataModule
            data.resize, data.stop_on_error = self.resize, self.stop_on_bad_image

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        if self._out is not None:  # the earlier file stays as it was
            self._out.discard()
            self._out = None

    def _rows(
        self,
        prediction: dict[str, Any],
        indices: Sequence[int],
        names: Sequence[str] | None = None,
        task: Any = None,
    ) -> list[dict[str, Any]]:
        probs = prediction["probs"].detach().float().cpu()
        if probs.dim() == 1:  # a task whose answer is not one class (a digit string): its text and probability
            return self._structured_rows(prediction, indices, names, task)
        top_p, top_c = probs.topk(min(self.top_k, probs.shape[1]), dim=1)
        rows = []
        for i, index in enumerate(indices):
            row: dict[str, Any] = {"image": prediction["paths"][i] if "paths" in prediction else int(index)}
            row["index"] = int(index)
            if "labels" in prediction:
                row["label"] = int(prediction["labels"][i])
            row["pred"] = int(top_c[i, 0])
            if names is not None:
                row["class_name"] = _name(names, row["pred"])
            row["prob"] = round(float(top_p[i, 0]), 6)
            row["top"] = [[int(c), round(float(p), 6)] for c, p in zip(top_c[i], top_p[i], strict=True)]
            if names is not None:
                row["top_names"] = [_name(names, int(c)) for c in top_c[i]]
            row.update(self._transformers(prediction, i, _frame_of(prediction, i)))
            rows.append(row)
        return rows

    def _structured_rows(
        self, prediction: dict[str, Any], indices: Sequence[int], names: Sequence[str] | None, task: Any
    ) -> list[dict[str, Any]]:
        # One row per image for tasks that answer with a structure (SequenceReading): the answer as the task writes
        # it ("905"), its probability; no top-k.
        rows = []
        for i, index in enumerate(indices):
            row: dict[str, Any] = {"image": prediction["paths"][i] if "paths" in prediction else int(index)}
            row["index"] = int(index)
            if "labels" in prediction:
                row["label"] = task.format(prediction["labels"][i], names)
            row["pred"] = task.format(prediction["prediction"][i], names)
            row["prob"] = round(float(prediction["probs"][i]), 6)
            row["top"] = []
            row.update(self._transformers(prediction, i, _frame_of(prediction, i)))
            rows.append(row)
        return rows

    @staticmethod
    def _transformers(prediction: dict[str, Any], i: int, frame: Tensor | None = None) -> dict[str, Any]:
        # Image i's warp parameters and regions, per transformer, when the model has a transformer in front; the
        # regions in the file's pixels when ``frame`` ((4,) [ax, bx, ay, by], see GreyTransform.frame) is given.
        if "params" not in prediction:
            return {}
        params = prediction["params"][i].detach().float().cpu()
        regions = prediction["regions"][i].detach().double().cpu()
        if frame is not None:
            ax, bx, ay, by = frame.double().tolist()
            regions = torch.stack([regions[..., 0] * ax + bx, regions[..., 1] * ay + by], dim=-1)
        return {
            "transformers": [
                {"params": [round(v, 6) for v in params[k].tolist()], "region": regions[k].round(decimals=2).tolist()}
                for k in range(params.shape[0])
            ]
        }

    def _write(self, rows: list[dict[str, Any]]) -> None:
        if self.path is not None and self.path.suffix == ".jsonl":
            for row in rows:
                self._file.write(json.dumps(row) + "\n")
            return
        writer = csv.writer(self._file)
        if self._file.tell() == 0:
            header = ["image", "index", "label", "pred", "class_name", "prob", "top", "top_names", "transformers"]
            writer.writerow(header)
        for row in rows:
            start = [row["image"], row["index"], row.get("label", ""), row["pred"], row.get("class_name", "")]
            top_names = json.dumps(row["top_names"]) if "top_names" in row else ""
            end = [row["prob"], json.dumps(row["top"]), top_names, json.dumps(row.get("transformers", []))]
            writer.writerow(start + end)

    def write_on_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        prediction: Any,
        batch_indices: Sequence[int] | None,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if self._file is None:
            return
        n = len(prediction["probs"])
        indices = list(batch_indices) if batch_indices is not None else list(range(self.rows, self.rows + n))
        info = batch[1] if isinstance(batch, (tuple, list)) and len(batch) > 2 and isinstance(batch[1], dict) else {}
        if "frame" in info:  # image files (ImageFilesDataset): where the model's pixels are in each file's
            prediction = {**prediction, "frames": info["frame"]}
        errors = list(info.get("error", [""] * n))
        self.bad += [e for e in errors if e]
        names = class_names_of(trainer)
        rows = self._rows(prediction, indices, names, getattr(pl_module, "task", None))
        good = [i for i in range(n) if not errors[i]]
        rows = [rows[i] for i in good]
        self._write(rows)
        self.rows += len(rows)
        have = sum(len(p[0]) for p in self._picture)
        if trainer.is_global_zero and have < self.num_images and "regions" in prediction and good:
            take = good[: self.num_images - have]
            x = batch[0][take].detach()
            transformer = getattr(pl_module, "transformer", None)
            if transformer is not None:
                with torch.no_grad():
                    crops = transformer(x).crops
                captions = [
                    _caption(
                        ([f"true {_name(names, r['label'])}"] if "label" in r else [])
                        + [f"pred {r.get('class_name', _name(names, r['pred']))} ({r['prob']:.2f})"]
                    )
                    for r in rows[: len(take)]
                ]
                self._picture.append((x.cpu(), prediction["regions"][take].cpu(), crops.cpu(), captions))

    def on_predict_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        out, self._out = self._out, None
        if out is None or self.path is None:
            return
        bad = _gathered(self.bad, trainer)
        if trainer.world_size > 1:
            out.commit()  # this rank's part, merged by rank 0
            trainer.strategy.barrier("PredictionWriter")
            if trainer.is_global_zero:
                self.rows = _merge_parts(self.path, trainer.world_size, keep_old=bool(bad))
        elif self.rows == 0 and bad:
            out.discard()  # nothing could be read: the earlier file stays
        else:
            out.commit()
        if trainer.is_global_zero:
            message = f"predictions: {self.rows} rows in {self.path}"
            if self._picture:
                images = torch.cat([p[0] for p in self._picture])
                regions = torch.cat([p[1] for p in self._picture])
                crops = torch.cat([p[2] for p in self._picture])
                captions = [c for p in self._picture for c in p[3]]
                picture = self.path.with_suffix(".png")
                fig = draw_attention(images, regions, crops, picture, labels=captions, title="predictions")
                _pyplot().close(fig)
                message += f"; picture of the first {len(images)} in {picture}"
            if self.rows or not bad:
                print(message)
            for line in bad:
                print(line, file=sys.stderr)
        if bad:
            from .data.imagefolder import BadImageError

            total = self.rows + len(bad) if trainer.world_size == 1 else None
            of = f" of {total}" if total is not None else ""
            where = f"the other {self.rows} are in {self.path}" if self.rows else f"{self.path} is unchanged"
            raise BadImageError(f"{len(bad)}{of} image files could not be read (each named above); {where}")


def _frame_of(prediction: dict[str, Any], i: int) -> Tensor | None:
    frames = prediction.get("frames")
    return frames[i] if isinstance(frames, Tensor) else None


def _gathered(items: list[str], trainer: pl.Trainer) -> list[str]:
    # Every rank's list, in rank order, on every rank (one collective under DDP).
    if trainer.world_size == 1 or not torch.distributed.is_available() or not torch.distributed.is_initialized():
        return list(items)
    everyone: list[Any] = [None] * trainer.world_size
    torch.distributed.all_gather_object(everyone, list(items))
    return [item for part in everyone for item in part]


def _row_index(line: str, suffix: str) -> int:
    return int(json.loads(line)["index"]) if suffix == ".jsonl" else int(next(csv.reader([line]))[1])


def _merge_parts(path: Path, world: int, keep_old: bool = False) -> int:
    # One part per rank, each in its rank's index order; the merged file is sorted by index, each index once
    # (DistributedSampler repeats a few samples to give every rank the same count). With no row and keep_old (every
    # image file unreadable) the earlier file stays.
    parts = [path.with_name(f".{path.name}.rank{r}") for r in range(world)]
    seen: dict[int, str] = {}
    header = ""
    for part in parts:
        lines = part.read_text().splitlines(keepends=True)
        if path.suffix == ".csv" and lines:
            header, lines = lines[0], lines[1:]
        for line in lines:
            seen.setdefault(_row_index(line, path.suffix), line)
    try:
        if seen or not keep_old:
            with atomic_write(path, "w", newline="") as f:
                f.write(header)
                f.writelines(seen[i] for i in sorted(seen))
    finally:
        for part in parts:
            part.unlink(missing_ok=True)
    return len(seen)


# ----------------------------------------------------------------------------------------------------------------
# runs that learn nothing
# ----------------------------------------------------------------------------------------------------------------
def chance_loss(label_counts: Sequence[float]) -> float:
    """The cross-entropy of a network that learnt nothing but the label frequencies: their entropy (natural log).

    log(C) for C equally frequent classes (2.303 for ten), less for skewed labels (the sums of two digits: 2.65,
    against log 19 = 2.94). Answering uniformly costs log(C), more than this, so both count as chance.
    """
    total = float(sum(label_counts))
    return -sum(c / total * math.log(c / total) for c in label_counts if c > 0) if total > 0 else 0.0


def chance_accuracy(label_counts: Sequence[float]) -> float:
    """The accuracy of always answering the likeliest label: its frequency (1 / C for balanced classes)."""
    total = float(sum(label_counts))
    return max(label_counts) / total if total > 0 else 0.0


def is_stalled(
    loss: float,
    chance: float,
    val_acc: float | None,
    val_chance: float | None,
    loss_ratio: float = 0.97,
    acc_margin: float = 0.015,
) -> bool:
    """Whether an epoch learnt nothing: its mean training loss is above ``loss_ratio`` times the chance loss and
    (when validated) its validation accuracy is at most ``acc_margin`` above the chance accuracy.

    Args:
        loss: the epoch's mean training loss.
        chance: the chance loss (:func:`chance_loss`; log(C) for balanced classes).
        val_acc: the validation accuracy in [0, 1], or None when the run is not validated (the loss decides alone).
        val_chance: the chance accuracy on the validation set (:func:`chance_accuracy`), or None for ``val_acc``
            None.
        loss_ratio: how close to chance the loss must be.
        acc_margin: how far above chance the accuracy may be (0.015: 1.5 points).
    """
    if not math.isfinite(loss) or chance <= 0 or loss <= loss_ratio * chance:
        return False
    return val_acc is None or val_chance is None or val_acc <= val_chance + acc_margin


def _num_classes(trainer: Any, pl_module: Any) -> int | None:
    # The model's hyperparameter first (it sizes the head), else the DataModule's attribute.
    hparams = getattr(pl_module, "hparams", {})
    for value in (
        hparams.get("num_classes") if hasattr(hparams, "get") else None,
        getattr(getattr(trainer, "datamodule", None), "num_classes", None),
    ):
        if isinstance(value, int) and value >= 2:
            return value
    return None


def _batch_labels(batch: Any) -> Tensor | None:
    labels = batch[1] if isinstance(batch, (tuple, list)) and len(batch) > 1 else None
    return labels if isinstance(labels, Tensor) and labels.dim() == 1 and not labels.is_floating_point() else None


def _count(counts: Tensor | None, labels: Tensor, num_classes: int) -> Tensor:
    # Label counts kept on the labels' device: index_add_ needs no synchronisation (bincount would).
    if counts is None:
        counts = torch.zeros(num_classes, device=labels.device, dtype=torch.float32)
    index = labels.clamp(0, num_classes - 1)
    return counts.index_add_(0, index, torch.ones_like(index, dtype=counts.dtype))


class StallDetector(pl.Callback):
    """Stop a run that learns nothing, and say so.

    After each training epoch it compares the epoch's mean training loss (the loss ``training_step`` returns) with
    the chance loss, the entropy of the epoch's training labels (:func:`chance_loss`: log(C) for balanced classes),
    and the latest validation accuracy (``val/acc``) with the chance accuracy of the validation labels (always
    answering the likeliest: 1 / C for balanced classes). When the loss is above ``loss_ratio`` times chance and
    the accuracy within ``acc_margin`` of chance (or the loss alone, in runs without ``val/acc``) for
    ``patience_epochs`` epochs in a row, it sets ``trainer.should_stop``, prints one line saying what happened and
    what to try, adds it to TensorBoard's text tab, and keeps it in :attr:`message` (the CLI's summary repeats
    it, and ``stn-train`` then exits with status 1).

    Runs whose task answers one class per image are judged (:class:`~stn_lightning.tasks.Classification` and
    :class:`~stn_lightning.tasks.SumOfObjects`); the chance levels of other tasks are not these.
    A run is judged only once it has made ``min_steps`` optimiser steps: the first epochs of a short run sit near
    chance while it learns. Every DDP rank reaches the same verdict (the counts are summed over the ranks).
    ``fast_dev_run`` is never judged.

    Args:
        enabled: judge at all.
        patience_epochs: consecutive judged epochs at chance before the run stops.
        min_steps: optimiser steps before the first judged epoch.
        loss_ratio: the loss is at chance above ``loss_ratio`` times the chance loss.
        acc_margin: the accuracy is at chance below the chance accuracy plus this (0.015: 1.5 points).
    """

    def __init__(
        self,
        enabled: bool = True,
        patience_epochs: int = 1,
        min_steps: int = 100,
        loss_ratio: float = 0.97,
        acc_margin: float = 0.015,
    ) -> None:
        super().__init__()
        if patience_epochs < 1 or min_steps < 0:
            raise ValueError(f"expected patience_epochs >= 1 and min_steps >= 0, got {patience_epochs}, {min_steps}")
        if not 0 < loss_ratio <= 1 or not 0 <= acc_margin < 1:
            raise ValueError(f"expected 0 < loss_ratio <= 1 and 0 <= acc_margin < 1, got {loss_ratio}, {acc_margin}")
        self.enabled = enabled
        self.patience_epochs = patience_epochs
        self.min_steps = min_steps
        self.loss_ratio = loss_ratio
        self.acc_margin = acc_margin
        #: The line printed when the detector stopped the run; None while it has not.
        self.message: str | None = None
        self._num_classes: int | None = None
        self._epochs_at_chance: list[int] = []
        self._loss: Tensor | None = None  # (2,): the epoch's sum of batch losses and their number
        self._train_counts: Tensor | None = None
        self._val_counts: Tensor | None = None
        self._val_acc: float | None = None

    @property
    def stalled(self) -> bool:
        """Whether the detector stopped the run."""
        return self.message is not None

    def _active(self, trainer: pl.Trainer) -> bool:
        return self.enabled and self._num_classes is not None and not getattr(trainer, "fast_dev_run", False)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.message = None
        self._epochs_at_chance = []
        # The chance levels are those of one class per image: other tasks (a digit string, a set) are not judged.
        one_class = isinstance(getattr(pl_module, "task", None), (Classification, type(None)))
        self._num_classes = _num_classes(trainer, pl_module) if one_class else None
        self._val_acc, self._val_counts = None, None

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._loss, self._train_counts = None, None

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if not self._active(trainer):
            return
        loss = outputs.get("loss") if isinstance(outputs, Mapping) else outputs
        if not isinstance(loss, Tensor) or loss.numel() != 1:
            return
        entry = torch.stack([loss.detach().float().reshape(()), loss.new_ones((), dtype=torch.float32)])
        self._loss = entry if self._loss is None else self._loss + entry
        labels = _batch_labels(batch)
        if labels is not None and self._num_classes is not None:
            self._train_counts = _count(self._train_counts, labels, self._num_classes)

    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.sanity_checking:
            self._val_counts = None

    def on_validation_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        labels = _batch_labels(batch)
        if self._active(trainer) and not trainer.sanity_checking and labels is not None and self._num_classes:
            self._val_counts = _count(self._val_counts, labels, self._num_classes)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # After the epoch's metrics are computed (and, for val/acc, reduced over the ranks).
        acc = trainer.callback_metrics.get("val/acc")
        if not trainer.sanity_checking and acc is not None:
            self._val_acc = float(acc)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self._active(trainer) or self._loss is None or trainer.global_step < self.min_steps:
            return
        assert self._num_classes is not None
        # One collective on every rank (each gets here with the same step count): the sums over all ranks.
        counts = self._train_counts if self._train_counts is not None else self._loss.new_zeros(self._num_classes)
        val_counts = self._val_counts if self._val_counts is not None else self._loss.new_zeros(self._num_classes)
        local = torch.cat([self._loss, counts, val_counts])
        summed = trainer.strategy.reduce(local, reduce_op="sum")
        values = (summed if isinstance(summed, Tensor) else local).tolist()
        loss = values[0] / max(values[1], 1.0)
        train_counts = values[2 : 2 + self._num_classes]
        val_labels = values[2 + self._num_classes :]
        # Without labels in the batches, balanced classes are assumed: log(C).
        chance = chance_loss(train_counts) if sum(train_counts) > 0 else math.log(self._num_classes)
        val_chance = chance_accuracy(val_labels) if sum(val_labels) > 0 else 1 / self._num_classes
        epoch = trainer.current_epoch
        if not is_stalled(loss, chance, self._val_acc, val_chance, self.loss_ratio, self.acc_margin):
            self._epochs_at_chance = []
            return
        self._epochs_at_chance.append(epoch)
        if len(self._epochs_at_chance) < self.patience_epochs:
            return
        trainer.should_stop = True
        self.message = self._describe(loss, chance, val_chance, train_counts)
        if trainer.is_global_zero:
            print(f"StallDetector: {self.message}", file=sys.stderr, flush=True)
            add_text = getattr(getattr(trainer.logger, "experiment", None), "add_text", None)
            if add_text is not None:
                add_text("stall", self.message, global_step=trainer.global_step)

    def _describe(self, loss: float, chance: float, val_chance: float, train_counts: list[float]) -> str:
        c = self._num_classes
        assert c is not None
        # An epoch's labels of balanced classes have an entropy a little under log(C): call it log(C) within 5 %.
        balanced = sum(train_counts) == 0 or abs(chance - math.log(c)) < 0.05 * math.log(c)
        reference = f"log {c} = {math.log(c):.3f}" if balanced else f"the entropy of the labels, {chance:.3f}"
        first, last = self._epochs_at_chance[0], self._epochs_at_chance[-1]
        when = f"epoch {last}" if first == last else f"epochs {first} to {last}"
        what = f"training loss {loss:.3f} after {when} is at chance ({reference})"
        if self._val_acc is not None:
            what += (
                f" and validation accuracy {100 * self._val_acc:.1f} % no better than chance "
                f"({100 * val_chance:.1f} %, always answering the likeliest class)"
            )
        return (
            f"{what}: the network learns nothing, so the run stops. Try a lower learning rate, a warm-up "
            f"(model.loc_warmup_steps, or a scheduler), another seed (--seed_everything), or check the data "
            f"(do the labels belong to the images?); --stall.enabled false lets such a run go on."
        )


def stall_message(trainer: Any) -> str | None:
    """The line of the :class:`StallDetector` that stopped the trainer's run, or None when none did."""
    for callback in getattr(trainer, "callbacks", []):
        if isinstance(callback, StallDetector) and callback.message is not None:
            return callback.message
    return None
