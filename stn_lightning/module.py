"""The LightningModule: builds the classifier from the data's shape, trains it, logs metrics and warp statistics."""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal, cast

import pytorch_lightning as pl
import torch
import torchmetrics
from pytorch_lightning.utilities.rank_zero import rank_zero_warn
from torch import Tensor, nn

from stn_lightning.kernels.reference import normalize_size

from .checkpointing import NonFiniteError
from .insertion import InnerTransformers, InsertedTransformer, inserted_transformers
from .metrics import CoLocalization, content_coverage, overlap_penalty
from .model import Fusion, STNClassifier
from .nonfinite import NonFiniteWatch
from .recipe import GroupedOptimizer, LocalizationTraining, OptimizerCallable, boundary_penalty
from .tasks import Task
from .transformer import SpatialTransformer, TransformerSpec

__all__ = ["STNModule"]


def _first(names: list[str], limit: int = 5) -> str:
    return ", ".join(names[:limit]) + (f" and {len(names) - limit} more" if len(names) > limit else "")


LRSchedulerCallable = Callable[[torch.optim.Optimizer], Any]


class STNModule(pl.LightningModule):
    """Classification with K parallel spatial transformers in front of a timm backbone.

    ``num_classes``, ``in_chans``, ``image_size`` and ``background`` describe the data; the CLI links them from
    the DataModule. Everything else picks the model and its training.

    Args:
        num_classes: classes to predict.
        in_chans: channels of the input images.
        image_size: input (H, W), or an int.
        background: normalised value of an empty pixel; the sampler pads with it.
        backbone: any timm model name.
        pretrained: True for timm's published backbone weights (needs a network connection once), a path of
            local weights (nothing is downloaded), or None.
        transformer: how the SpatialTransformer in front is built (:class:`~stn_lightning.transformer.TransformerSpec`:
            transformation family, K, crop size, localiser, start, sampler), once the data's channels, size and
            background are known; ignored with fusion "none". In YAML the block ``model.transformer``; checkpoints keep
            it as plain data, so ``load_from_checkpoint`` rebuilds the same transformer.
        fusion: "channels", "features" or "none" (no transformer in front: the baseline, or transformers only
            inside the backbone with ``inner``); see STNClassifier.
        task: what the network answers: head, loss and metrics (:mod:`stn_lightning.tasks`); default
            :class:`~stn_lightning.tasks.Classification`. Labels that are sums of per-object labels (MultiMNIST,
            addition) take :class:`~stn_lightning.tasks.SumOfObjects` with fusion "features"; digit strings
            :class:`~stn_lightning.tasks.SequenceReading`. ``test/acc`` is the task's headline accuracy.
        inner: spatial transformers inside the backbone, before named submodules
            (:class:`~stn_lightning.insertion.InnerTransformers`; the paper's ST-CNN Multi); their regions are drawn
            in the attention pictures and their parameters take the boundary penalty like the front transformer's.
        object_channels: each input channel holds one object whose labels sum to the label (MNIST addition), with
            a per-object task (SumOfObjects): with fusion "features" and one transformer per channel, crop k keeps
            only channel k; with fusion "none", the backbone reads each channel as one object (see STNClassifier).
        optimizer: a callable taking parameter groups; default SGD(lr=0.01, momentum=0.9, weight_decay=5e-4).
        lr_scheduler: a callable taking the optimiser; default cosine annealing over all training steps.
        localization: how the localisation nets learn (:class:`~stn_lightning.recipe.LocalizationTraining`: their own
            optimiser, default Adam; rate scale; gradient clip, default 1.0; the boundary, overlap and coverage terms
            of the training loss). In YAML the block ``model.localization``.
        label_smoothing: label smoothing of the cross-entropy.
        backbone_kwargs: extra arguments for ``timm.create_model``.
        nonfinite: what a training batch with NaN or inf pixels, a non-finite loss or a non-finite gradient does:
            "raise" stops the run with a :class:`~stn_lightning.checkpointing.NonFiniteError` naming the first such
            step and batch (and which transformers' warps, gradients and weights were non-finite). Its flags stay on
            the device (:class:`~stn_lightning.nonfinite.NonFiniteWatch`: no device-to-host copy per step) and are
            read every ``log_every_n_steps`` batches, at the end of each training epoch and before each checkpoint,
            so the run stops at most ``log_every_n_steps`` steps late; until then a flagged step's gradient is zeroed
            on the device and NaN pixels read 0, so weights and BatchNorm statistics stay finite (momentum and decay
            still move the weights). "skip" decides every step (a device-to-host copy per step), skips the optimiser
            step exactly and counts it (``train/skipped_steps``). Checkpoints are never written with non-finite
            weights either way.
        channels_last: keep the convolution weights in channels-last memory format once a Trainer sets the module
            up, so that the convolutions of the localiser and the backbone run in oneDNN's channels-last kernels
            (the values and the results are those of the default format up to float rounding). None (the
            default): on when the Trainer runs on CPUs, where the configs' networks train as fast or faster with it
            (benchmarks/bench_memory_format.py: up to 40 % shorter training steps), off on accelerators, where it
            is not measured; True or False forces it.

    Batches are ``(x, y)`` or ``(x, y, boxes)``; with boxes (B, D, 4) of the objects in input pixels (MultiMNIST's
    validation and test batches) and a transformer, :class:`~stn_lightning.metrics.CoLocalization` is logged as
    ``val/coloc``, ``val/hit_<k>`` and ``val/contains_<k>`` (``test/...`` in testing).
    """

    def __init__(
        self,
        num_classes: int = 10,
        in_chans: int = 1,
        image_size: int | tuple[int, int] = 28,
        background: float = 0.0,
        backbone: str = "resnet10t",
        pretrained: bool | str | None = None,
        fusion: Fusion = "channels",
        task: Task | None = None,
        inner: InnerTransformers | None = None,
        object_channels: bool = False,
        transformer: TransformerSpec = TransformerSpec(),  # noqa: B008 - frozen: one shared default is safe
        localization: LocalizationTraining = LocalizationTraining(),  # noqa: B008
        optimizer: OptimizerCallable | None = None,
        lr_scheduler: LRSchedulerCallable | None = None,
        label_smoothing: float = 0.0,
        backbone_kwargs: dict[str, Any] | None = None,
        nonfinite: Literal["raise", "skip"] = "raise",
        channels_last: bool | None = None,
    ) -> None:
        super().__init__()
        objects = ["optimizer", "lr_scheduler", "transformer", "localization", "task", "inner"]
        self.save_hyperparameters(ignore=objects)
        # Plain data in the checkpoint (load_from_checkpoint gives them back as dicts): no code runs to rebuild them.
        if isinstance(task, dict):
            task = Task.from_config(task)
        if task is not None:
            self.hparams["task"] = task.config()
        if isinstance(transformer, dict):
            transformer = TransformerSpec.from_config(transformer)
        if isinstance(localization, dict):
            localization = LocalizationTraining.from_config(localization)
        self.hparams["transformer"] = transformer.config()
        self.hparams["localization"] = localization.config()
        if nonfinite not in ("raise", "skip"):
            raise ValueError(f"expected nonfinite 'raise' or 'skip', got {nonfinite!r}")
        self.image_size = normalize_size(image_size)
        self.localization = localization
        front = transformer.build(in_chans, self.image_size, float(background)) if fusion != "none" else None
        self.model = STNClassifier(
            backbone,
            num_classes,
            in_chans,
            front,
            fusion,
            task=task,
            pretrained=pretrained,
            backbone_kwargs=backbone_kwargs,
            input_size=self.image_size,
            object_channels=object_channels,
            inner=inner,
        )
        self.optimizer_factory = optimizer
        self.scheduler_factory = lr_scheduler
        self.label_smoothing = label_smoothing
        self.nonfinite = nonfinite
        self.channels_last = channels_last
        self._skip_step = False  # set by training_step, read by on_after_backward and on_before_optimizer_step
        self._watch = NonFiniteWatch()  # nonfinite="raise": the steps' flags, on the device
        self._skipped = 0
        collection = torchmetrics.MetricCollection(dict(self.task.metrics()))
        # ModuleDict keys must not shadow nn.Module attributes such as train(), hence the "_metrics" suffix.
        self.metrics = nn.ModuleDict(
            {f"{s}_metrics": collection.clone(prefix=f"{s}/") for s in ("train", "val", "test")}
        )
        # Validation and test means of the logged values (loss, warp statistics, penalties), one per key, made at
        # the first value (see _log_mean).
        self.eval_means = nn.ModuleDict()
        k = self.transformer.num_transformers if self.transformer is not None else 0
        self.val_coloc = CoLocalization(k) if k else None
        self.test_coloc = CoLocalization(k) if k else None

    # What only the data knows: the CLI links these options from the DataModule (for_data does the same in Python).
    DATA_OPTIONS = ("num_classes", "in_chans", "image_size", "background")

    @classmethod
    def for_data(cls, data: Any, **kwargs: Any) -> STNModule:
        """The module for a DataModule's images: its ``num_classes``, ``in_chans``, ``image_size`` and ``background``
        (what the CLI links from ``data`` to ``model``) with the other arguments given here."""
        return cls(**{name: getattr(data, name) for name in cls.DATA_OPTIONS}, **kwargs)

    @property
    def transformer(self) -> SpatialTransformer | None:
        """The SpatialTransformer in front of the backbone, or None."""
        return self.model.transformer

    @property
    def inner_transformers(self) -> dict[str, InsertedTransformer]:
        """The transformers inside the backbone by place (``inner``), in forward order; empty without."""
        return inserted_transformers(self.model.backbone)

    def localization_modules(self) -> list[SpatialTransformer]:
        """Every spatial transformer of the model: the one in front, then those inside the backbone."""
        found = [] if self.transformer is None else [self.transformer]
        return found + [wrapper.transformer for wrapper in self.inner_transformers.values()]

    @property
    def task(self) -> Task:
        """What the network answers: its head, loss and metrics."""
        return self.model.task

    def forward(self, x: Tensor) -> Tensor:
        """The task's outputs (B, num_outputs) of images (B, C, H, W): logits (B, num_classes) for classification."""
        return self.model(x)[0]

    def _forward(self, x: Tensor, y: Tensor, boxes: Tensor | None, stage: str) -> tuple[Tensor, Tensor | None, Tensor]:
        """Logits, warp parameters and the loss: the cross-entropy, the attention terms and, in training, the
        recipe's penalties."""
        logits, params = self.model(x)
        loss = self.task.loss(logits, y, label_smoothing=self.label_smoothing)
        if params is not None and self.transformer is not None:
            loss = loss + self._attention_terms(x, params, boxes, stage)
            if stage == "train":
                loss = loss + self.localization_penalty(params, (x.shape[-2], x.shape[-1]))
        for place, wrapper in self.inner_transformers.items():
            inner = wrapper.params
            if inner is None:
                continue
            size = wrapper.transformer.output_size
            for key, value in wrapper.transformer.transform.statistics(inner, size).items():
                self._log_mean(stage, f"inner_{place.replace('.', '_')}_{key}", value, len(x))
            if stage == "train" and self.localization.boundary_weight > 0:
                weight = self.localization.boundary_weight * self.penalty_scale()
                loss = loss + weight * boundary_penalty(wrapper.transformer.transform, inner, size)
        return logits, params, loss

    def _step(self, batch: tuple[Tensor, ...], stage: str) -> Tensor:
        x, y = batch[0], batch[1]
        boxes = batch[2] if len(batch) > 2 else None
        logits, params, loss = self._forward(x, y, boxes, stage)
        self._log_step(stage, x, y, logits, params, loss)
        return loss

    def _log_step(self, stage: str, x: Tensor, y: Tensor, logits: Tensor, params: Tensor | None, loss: Tensor) -> None:
        self._log_mean(stage, "loss", loss, len(y), on_step=stage == "train", prog_bar=True)
        metrics: Any = self.metrics[f"{stage}_metrics"]
        metrics(logits, y)
        for name, metric in metrics.items():  # names carry the stage: "val/acc"
            headline = name == f"{stage}/acc"
            self.log(name, metric, on_step=False, on_epoch=True, prog_bar=headline, batch_size=len(y))
        if params is not None and self.transformer is not None:
            stats = self.transformer.transform.statistics(params, (x.shape[-2], x.shape[-1]))
            for key, value in stats.items():
                self._log_mean(stage, f"stn_{key}", value, len(y))

    def _log_mean(
        self, stage: str, name: str, value: Tensor, batch_size: int, on_step: bool = False, prog_bar: bool = False
    ) -> None:
        """Log ``stage/name``, the epoch's mean of ``value`` over every image of every rank.

        Training logs through Lightning (sync_dist), whose ranks see equal batches. Validation and test go through a
        torchmetrics MeanMetric: under DDP their ranks may hold one image more or less (data.sampling), and
        Lightning's own mean over ranks divides by an integer mean of the ranks' image counts, which floors
        (measured with Lightning's default: 500 validation images on 3 ranks gave 2.3122 for a loss of 2.3030).
        """
        key = f"{stage}/{name}"
        if stage == "train":
            self.log(
                key, value, on_step=on_step, on_epoch=True, prog_bar=prog_bar, batch_size=batch_size, sync_dist=True
            )
            return
        slot = key.replace("/", "_")  # a plain attribute name under eval_means
        if slot not in self.eval_means:
            self.eval_means[slot] = torchmetrics.MeanMetric().to(value.device)
        mean = cast(torchmetrics.MeanMetric, self.eval_means[slot])
        mean.update(value.detach().float(), batch_size)
        # metric_attribute: Lightning maps its metric objects to attribute names once, before these exist.
        attribute = f"eval_means.{slot}"
        self.log(key, mean, on_step=False, on_epoch=True, prog_bar=prog_bar, metric_attribute=attribute)

    def _any_rank(self, flag: Tensor) -> bool:
        # One decision for every DDP rank, so that all raise or skip together (a lone rank would deadlock).
        trainer = self._trainer
        if trainer is None or trainer.world_size == 1:
            return bool(flag)
        return bool(trainer.strategy.reduce_boolean_decision(bool(flag), all=False))

    def _nonfinite(self, what: str) -> None:
        step = self._trainer.global_step if self._trainer is not None else 0
        epoch = self._trainer.current_epoch if self._trainer is not None else 0
        message = f"{what} at global step {step} (epoch {epoch})"
        if self.nonfinite == "raise":
            raise NonFiniteError(f"{message}; stopping (STNModule(nonfinite='skip') skips such steps instead)")
        self._skip_step = True
        self._skipped += 1
        rank_zero_warn(f"{message}; skipping this step ({self._skipped} skipped so far)")

    def _attention_terms(self, x: Tensor, params: Tensor, boxes: Tensor | None, stage: str) -> Tensor:
        # The overlap penalty (logged; added to the training loss with its weight) and the co-localisation update.
        transformer = self.transformer
        assert transformer is not None
        extra = x.new_zeros(())
        if transformer.num_transformers < 2 and boxes is None and self.localization.coverage_weight == 0:
            return extra
        regions = transformer.outline(params, (x.shape[-2], x.shape[-1]))  # (B, K, M, 2) in input pixels
        if self.localization.coverage_weight > 0:
            once = self.localization.coverage_once
            coverage = content_coverage(regions, x, transformer.background, once=once).mean()
            self._log_mean(stage, "coverage", coverage, len(x))
            if stage == "train":
                weight = self.localization.coverage_weight * self.penalty_scale()
                extra = extra + weight * (1 - coverage)
        if transformer.num_transformers > 1:
            penalty = overlap_penalty(regions)
            self._log_mean(stage, "overlap", penalty, len(x))
            if stage == "train" and self.localization.overlap_weight > 0:
                extra = extra + self.localization.overlap_weight * penalty
        metric = self._coloc(stage)
        if boxes is not None and metric is not None:
            metric.update(regions.detach(), boxes)
        return extra

    def _coloc(self, stage: str) -> CoLocalization | None:
        return {"val": self.val_coloc, "test": self.test_coloc}.get(stage)

    def _log_coloc(self, stage: str) -> None:
        metric = self._coloc(stage)
        if metric is not None and metric.update_count > 0:
            # compute() has already summed the counts over the ranks, so every rank holds the same values and
            # sync_dist's mean leaves them as they are; without it Lightning warns once per key under DDP.
            self.log_dict({f"{stage}/{k}": v for k, v in metric.compute().items()}, sync_dist=True)
            metric.reset()

    def training_step(self, batch: tuple[Tensor, ...], batch_idx: int) -> Tensor:
        trainer = self._trainer
        if trainer is not None and trainer.optimizers:
            # The rate of every parameter group (the backbone's and the localisation's), logged each step.
            for i, group in enumerate(trainer.optimizers[0].param_groups):
                self.log(f"train/lr_{group.get('name', i)}", float(group["lr"]), on_step=True, on_epoch=False)
        x, y = batch[0], batch[1]
        if self.nonfinite == "raise":
            # No device-to-host copy here: the flags stay on the device until the next check (see _check_nonfinite).
            step, epoch = (trainer.global_step, trainer.current_epoch) if trainer is not None else (0, 0)
            x = self._watch.clean(x, step, epoch, batch_idx)
            logits, params, loss = self._forward(x, y, None, "train")
            self._watch.watch_loss(loss, params)
            self._log_step("train", x, y, logits, params, loss)
            return loss
        self._skip_step = False
        bad_pixels = ~torch.isfinite(x)
        if self._any_rank(bad_pixels.any()):
            count, images = int(bad_pixels.sum()), int(bad_pixels.flatten(1).any(1).sum())
            self._nonfinite(f"batch {batch_idx}: {count} NaN or inf pixels in {images} of {len(x)} images")
            # Skipping (the step, not the batch's backward: every DDP rank must run one): a clean copy, no update.
            x = torch.nan_to_num(x, nan=0.0, posinf=0.0, neginf=0.0)
        logits, params, loss = self._forward(x, y, None, "train")
        if not self._skip_step and self._any_rank(~torch.isfinite(loss)):
            self._nonfinite(f"non-finite training loss ({loss.item()}){self._describe_params(params)}")
        if self._skip_step:
            loss = torch.nan_to_num(loss) * 0.0
        else:
            self._log_step("train", x, y, logits, params, loss)
        self.log(
            "train/skipped_steps", float(self._skipped), on_step=False, on_epoch=True, reduce_fx="max", sync_dist=True
        )
        return loss

    def _check_nonfinite(self) -> None:
        """Raise a NonFiniteError if a training step since the start was flagged (``nonfinite="raise"``): one
        device-to-host copy. Every DDP rank holds the same flags (they are reduced over the ranks each step), so all
        raise together."""
        found = self._watch.read() if self.nonfinite == "raise" else None
        if found is None:
            return
        row, loss, warps, grads = found
        what = self._watch.describe(row, loss)
        if warps:
            what += "; warp parameters non-finite for transformer " + ", ".join(map(str, warps))
        if grads:
            what += f"; non-finite gradient in {_first([self._watch.names[i] for i in grads])}"
        weights = [n for n, p in self.named_parameters() if not bool(torch.isfinite(p).all())]
        if weights:
            what += f"; non-finite weights: {_first(weights)}"
        raise NonFiniteError(
            f"{what} at global step {row[0]} (epoch {row[1]}); stopping (found at global step "
            f"{self.global_step}; STNModule(nonfinite='skip') skips such steps instead)"
        )

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        trainer = self._trainer
        every = getattr(trainer, "log_every_n_steps", 1)  # set by the Trainer's logger connector
        if (batch_idx + 1) % max(1, every) == 0:  # as often as Lightning logs (and reads the logged values)
            self._check_nonfinite()

    def on_train_epoch_end(self) -> None:
        self._check_nonfinite()

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self._check_nonfinite()  # a checkpoint never holds the weights of a flagged run

    def _describe_params(self, params: Tensor | None) -> str:
        parts = []
        if params is not None:
            bad = ~torch.isfinite(params).flatten(2).all(-1)  # (B, K): transformer k's warp of image b
            ks = [k for k in range(bad.shape[1]) if bad[:, k].any()]
            if ks:
                parts.append("; warp parameters non-finite for transformer " + ", ".join(map(str, ks)))
        names = [n for n, p in self.named_parameters() if not bool(torch.isfinite(p).all())]
        if names:
            parts.append(f"; non-finite weights: {_first(names)}")
        return "".join(parts)

    def on_after_backward(self) -> None:
        if self._skip_step or self.nonfinite == "raise":
            return
        if self._scaler_skips_inf():
            return
        grads = [p.grad for p in self.parameters() if p.grad is not None]
        if not grads:
            return
        norm = torch.nn.utils.get_total_norm(grads)
        if not bool(torch.isfinite(norm)):  # gradients are already reduced over the ranks: one answer everywhere
            names = [n for n, p in self.named_parameters() if p.grad is not None and not bool(p.grad.isfinite().all())]
            self._nonfinite(f"non-finite gradient in {_first(names)}")

    def _scaler_skips_inf(self) -> bool:
        # float16 mixed precision: the gradient scaler skips steps with inf gradients itself
        trainer = self._trainer
        return trainer is not None and getattr(trainer.precision_plugin, "scaler", None) is not None

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        if self.nonfinite == "raise":
            params = [p for group in optimizer.param_groups for p in group["params"]]
            if len(self._watch.names) != len(params):
                names = {id(p): n for n, p in self.named_parameters()}
                self._watch.names = [names.get(id(p), "?") for p in params]
            flag = self._watch.watch_grads([None if self._scaler_skips_inf() else p.grad for p in params])
            trainer = self._trainer
            if trainer is not None and trainer.world_size > 1:  # one flag for every rank, on the device
                flag = trainer.strategy.reduce(flag.float(), reduce_op="sum") > 0
            self._watch.commit(flag)
            # A flagged step updates nothing from its gradient (momentum and decay still move the weights), so the
            # weights stay finite until the check stops the run.
            for p in params:
                if p.grad is not None:
                    p.grad.masked_fill_(flag, 0.0)
            return
        if self._skip_step:
            # Parameters without a gradient are left alone by torch's optimisers (no decay, no momentum step).
            for group in optimizer.param_groups:
                for p in group["params"]:
                    p.grad = None

    def validation_step(self, batch: tuple[Tensor, ...], batch_idx: int) -> None:
        self._step(batch, "val")

    def test_step(self, batch: tuple[Tensor, ...], batch_idx: int) -> None:
        self._step(batch, "test")

    def on_validation_epoch_end(self) -> None:
        self._log_coloc("val")

    def on_test_epoch_end(self) -> None:
        self._log_coloc("test")

    def predict_step(self, batch: Any, batch_idx: int) -> dict[str, Any]:
        """What the task decodes (``Task.decode``: class probabilities (B, num_classes) and the prediction for
        classification), and with a transformer its parameters (B, K, P) and the regions it read (B, K, M, 2) in input
        pixels; ``labels`` and ``paths`` when the batch has them."""
        x = batch[0] if isinstance(batch, (tuple, list)) else batch
        logits, params = self.model(x)
        out: dict[str, Any] = dict(self.task.decode(logits))
        if params is not None and self.transformer is not None:
            out["params"] = params
            out["regions"] = self.transformer.outline(params, (x.shape[-2], x.shape[-1]), per_side=4)
        if isinstance(batch, (tuple, list)) and len(batch) > 1:
            if isinstance(batch[1], Tensor):
                out["labels"] = batch[1]
            if isinstance(batch[-1], (list, tuple)) and all(isinstance(p, str) for p in batch[-1]):
                out["paths"] = list(batch[-1])
        return out

    def setup(self, stage: str) -> None:
        trainer = self._trainer
        # Before the strategy moves the module and wraps it (DDP's gradient buckets take the parameters' layout).
        if self.uses_channels_last(trainer.strategy.root_device if trainer is not None else self.device):
            self.to(memory_format=torch.channels_last)
        # Each rank compiles Triton kernels into its own cache folder (ranks on one node would otherwise race).
        if trainer is not None and trainer.world_size > 1 and "TRITON_CACHE_DIR" not in os.environ:
            base = Path.home() / ".triton" / "cache"
            os.environ["TRITON_CACHE_DIR"] = str(base / f"rank{trainer.global_rank}")

    def uses_channels_last(self, device: torch.device) -> bool:
        """Whether training or inference on ``device`` keeps the weights channels-last (see ``channels_last``)."""
        return device.type == "cpu" if self.channels_last is None else self.channels_last

    def penalty_scale(self) -> float:
        """The factor of the boundary and coverage terms at the current step: 1 (a study may decay them)."""
        return 1.0

    def localization_penalty(self, params: Tensor, in_size: tuple[int, int]) -> Tensor:
        """The penalty on the front transformer's warp parameters (B, K, P) at the current step: the boundary
        penalty, weighted and scaled (0 when its weight is 0)."""
        penalty = params.new_zeros(())
        weight = self.localization.boundary_weight * self.penalty_scale()
        if self.transformer is None or weight == 0.0:
            return penalty
        return penalty + weight * boundary_penalty(self.transformer.transform, params, in_size)

    def parameter_groups(self) -> list[dict[str, Any]]:
        """The backbone and head first, then the localisation nets and their heads (at ``localization.lr_scale``):
        the front transformer's and those inside the backbone."""
        loc = [p for module in self.localization_modules() for p in module.parameters()]
        loc_ids = {id(p) for p in loc}
        rest = [p for p in self.parameters() if id(p) not in loc_ids]
        groups = [{"params": rest, "name": "model"}]
        if loc:
            groups.append({"params": loc, "name": "localization"})
        return groups

    def configure_gradient_clipping(
        self,
        optimizer: torch.optim.Optimizer,
        gradient_clip_val: float | None = None,
        gradient_clip_algorithm: str | None = None,
    ) -> None:
        # The localisation head's first steps can throw the warp out of the image, where it gets no gradient back;
        # clipping only its gradient keeps the warp's steps small without slowing the classifier.
        modules = self.localization_modules()
        if modules:
            params = [p for module in modules for p in module.parameters() if p.grad is not None]
            if params:
                clip = self.localization.grad_clip if self.localization.grad_clip is not None else float("inf")
                norm = nn.utils.clip_grad_norm_(params, clip)
                self.log("train/loc_grad_norm", norm, on_step=True, on_epoch=False)
        self.clip_gradients(optimizer, gradient_clip_val, gradient_clip_algorithm)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # A checkpoint saved with one optimiser (localization.optimizer None) holds its groups, one with a localiser of
        # its own a GroupedOptimizer's, whose groups name their part ("optimizer"); resuming across the two would fail
        # deep inside load_state_dict or the first step.
        # Only fitting restores the optimiser; testing, predicting and load_from_checkpoint read the weights alone.
        fitting = self._trainer is not None and self._trainer.state.fn == "fit"
        states = checkpoint.get("optimizer_states") or []
        if not fitting or not states or not self.localization_modules():
            return
        if "optimizers" in states[0]:
            raise ValueError(
                "this checkpoint's optimiser state has the layout of an older stn-lightning (a GroupedOptimizer before "
                "it became one torch optimiser); load only its weights (STNModule.load_from_checkpoint)"
            )
        saved_grouped = any("optimizer" in g for g in states[0].get("param_groups", []))
        grouped_now = self.localization.optimizer is not None
        if saved_grouped != grouped_now:
            how = "its own optimiser for the localiser" if saved_grouped else "one optimiser for everything"
            now = "a localisation optimiser (the default, Adam)" if grouped_now else "one optimiser"
            fix = (
                "set localization.optimizer to null (--model.localization.optimizer null)"
                if grouped_now
                else "set localization.optimizer"
            )
            raise ValueError(
                f"this checkpoint was trained with {how} and this run is set up with {now}; to resume it, {fix}, "
                "or load only its weights (STNModule.load_from_checkpoint)"
            )

    def configure_optimizers(self) -> Any:
        groups = self.parameter_groups()
        optimizer: torch.optim.Optimizer
        loc_factory = self.localization.optimizer
        loc_groups = [g for g in groups if g["name"] == "localization"] if loc_factory is not None else []
        main_groups = [g for g in groups if not any(g is h for h in loc_groups)]
        if self.optimizer_factory is None:
            optimizer = torch.optim.SGD(main_groups, lr=0.01, momentum=0.9, weight_decay=5e-4)
        else:
            optimizer = self.optimizer_factory(main_groups)
        if loc_groups and loc_factory is not None:
            optimizer = GroupedOptimizer([optimizer, loc_factory(loc_groups)])
        # The optimiser gave every group the base rate; the localisation group runs at a fraction of it.
        for group in optimizer.param_groups:
            if group.get("name") == "localization":
                group["lr"] = group["lr"] * self.localization.lr_scale
        if self.scheduler_factory is None:
            steps = max(1, int(self.trainer.estimated_stepping_batches))
            scheduler = self.default_scheduler(optimizer, steps)
            return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
        return {"optimizer": optimizer, "lr_scheduler": self.scheduler_factory(optimizer)}

    def default_scheduler(self, optimizer: torch.optim.Optimizer, steps: int) -> torch.optim.lr_scheduler.LambdaLR:
        """Cosine annealing over ``steps``, one factor for every parameter group."""

        def cosine(step: int) -> float:
            return 0.5 * (1.0 + math.cos(math.pi * min(step, steps) / steps))

        return torch.optim.lr_scheduler.LambdaLR(optimizer, cosine)
