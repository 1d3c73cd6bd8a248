"""The localisation-recipe study: short CPU runs of an ST-CNN against the same classifier on the
whole image, under one schedule and seed, for every recipe variant.

    OMP_NUM_THREADS=1 python benchmarks/recipe_study.py --task cluttered --variants baseline plain recipe --seeds 42 1

Each run builds the DataModule and STNModule directly (no CLI), trains on one thread without validation, tests
on the 1,000 bundled test digits and prints one line: variant, seed, epochs, test error, the baseline's error at
the same seed (when run in the same call), the transformer's mean scale and fraction of points outside on the test
set, and the run's time. ``--out`` appends the lines as JSON. Results: benchmarks/RESULTS-training.md.

The classifier is ``paper_cnn`` (registered with timm below unless stn_lightning.backbones provides one): a small
position-sensitive CNN in the spirit of the paper's (two 5x5 convolutions with max-pooling, one hidden fully
connected layer, no global pooling), fast enough for a CPU study; ``--backbone`` picks any other timm model.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import time
from typing import Any

import pytorch_lightning as pl
import timm
import torch
from timm.models import register_model
from torch import Tensor, nn

from stn_lightning.data import ClutteredMNIST, MNISTAddition
from stn_lightning.module import STNModule
from stn_lightning.recipe import LocalizationTraining
from stn_lightning.transformer import TransformerSpec
from stn_lightning.transforms import Affine, Attention


class PaperCNN(nn.Module):
    """conv 5x5 (c1) -> max-pool 2 -> ReLU -> conv 5x5 (c2) -> max-pool 2 -> ReLU -> flatten -> fc(hidden) -> ReLU.

    The flattened map keeps where features are (the paper's CNN baselines end in fully connected layers too).
    """

    def __init__(
        self, in_chans: int = 1, num_classes: int = 0, channels: tuple[int, int] = (16, 32), hidden: int = 256, **_: Any
    ) -> None:
        super().__init__()
        c1, c2 = channels
        self.features = nn.Sequential(
            nn.Conv2d(in_chans, c1, 5, padding=2),
            nn.MaxPool2d(2),
            nn.ReLU(inplace=True),
            nn.Conv2d(c1, c2, 5, padding=2),
            nn.MaxPool2d(2),
            nn.ReLU(inplace=True),
        )
        self.fc = nn.Sequential(nn.Flatten(), nn.LazyLinear(hidden), nn.ReLU(inplace=True))
        self.num_features = hidden
        self.classifier = nn.Linear(hidden, num_classes) if num_classes else nn.Identity()

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.fc(x)
        return x if pre_logits else self.classifier(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


if not timm.is_model("paper_cnn"):

    @register_model
    def paper_cnn(pretrained: bool = False, **kwargs: Any) -> PaperCNN:
        return PaperCNN(**kwargs)


# The knobs only this study uses (it found that they did not help; benchmarks/RESULTS-training.md): a warm-up of the
# localisation group's rate, a pull of the warps towards their start, and a decay of the penalties.
def warmup_factor(step: int, warmup_steps: int) -> float:
    """Linear warm-up: ``(step + 1) / warmup_steps`` for the first ``warmup_steps`` steps, then 1.

    Step 0 already takes a small step (1 / warmup_steps of the rate), so the warp starts moving at once.
    """
    if warmup_steps <= 0:
        return 1.0
    return min(1.0, (step + 1) / warmup_steps)


def decay_factor(step: int, decay_steps: int | None) -> float:
    """Weight of a decaying penalty: 1 at step 0, cosine down to 0 at ``decay_steps``; None keeps it at 1."""
    if decay_steps is None:
        return 1.0
    if step >= decay_steps:
        return 0.0
    return 0.5 * (1.0 + math.cos(math.pi * step / decay_steps))


def identity_penalty(params: Tensor, target: Tensor) -> Tensor:
    """Squared distance (B, K, P) -> scalar between warp parameters and their start ``target`` (K, P) or (P,),
    summed over parameters and averaged over images and transformers."""
    return (params.float() - target.to(params.device, torch.float32)).square().sum(-1).mean()


class StudyModule(STNModule):
    """STNModule with the study's extra knobs.

    Args:
        loc_warmup_steps: linear warm-up of the localisation group's rate over this many optimiser steps (0: none),
            on top of the default cosine schedule.
        identity_weight: weight of a training-loss pull of the front transformer's warp parameters towards their start
            (:func:`identity_penalty`); 0 turns it off.
        penalty_decay_steps: the boundary and identity penalties and the coverage term decay (cosine) to 0 over this
            many steps; None keeps them constant.
        **kwargs: STNModule's arguments.
    """

    def __init__(
        self,
        loc_warmup_steps: int = 0,
        identity_weight: float = 0.0,
        penalty_decay_steps: int | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if loc_warmup_steps < 0 or identity_weight < 0:
            raise ValueError(
                f"expected loc_warmup_steps and identity_weight >= 0, got {loc_warmup_steps}, {identity_weight}"
            )
        if penalty_decay_steps is not None and penalty_decay_steps < 1:
            raise ValueError(f"expected penalty_decay_steps >= 1 or None, got {penalty_decay_steps}")
        self.loc_warmup_steps = loc_warmup_steps
        self.identity_weight = identity_weight
        self.penalty_decay_steps = penalty_decay_steps
        st = self.transformer  # where the warps start (K, P): the target of identity_weight's pull
        self.start_params = (
            st.transform(st.head.bias.detach().view(st.num_transformers, -1)).detach() if st is not None else None
        )

    def penalty_scale(self) -> float:
        return decay_factor(self.global_step, self.penalty_decay_steps)

    def localization_penalty(self, params: torch.Tensor, in_size: tuple[int, int]) -> torch.Tensor:
        penalty = super().localization_penalty(params, in_size)
        if self.identity_weight > 0 and self.start_params is not None:
            pull = self.identity_weight * identity_penalty(params, self.start_params)
            penalty = penalty + self.penalty_scale() * pull
        return penalty

    def default_scheduler(self, optimizer: torch.optim.Optimizer, steps: int) -> torch.optim.lr_scheduler.LambdaLR:
        """Cosine annealing over ``steps``, with the localisation group warmed up over ``loc_warmup_steps``."""

        def cosine(step: int) -> float:
            return 0.5 * (1.0 + math.cos(math.pi * min(step, steps) / steps))

        def warmed(step: int) -> float:
            return cosine(step) * warmup_factor(step, self.loc_warmup_steps)

        factors = [warmed if g.get("name") == "localization" else cosine for g in optimizer.param_groups]
        return torch.optim.lr_scheduler.LambdaLR(optimizer, factors)


_LOCALIZATION = {"loc_optimizer": "optimizer", "loc_lr_scale": "lr_scale", "loc_grad_clip": "grad_clip"}
_LOCALIZATION.update({k: k for k in ("boundary_weight", "overlap_weight", "coverage_weight")})
_SPEC = {f for f in TransformerSpec.__dataclass_fields__}


def module_arguments(variant: dict[str, Any]) -> dict[str, Any]:
    """A variant's flat options (as the study's tables write them) as StudyModule's arguments: the transformer's into
    ``transformer``, the localiser's training into ``localization``."""
    rest = {k: v for k, v in variant.items() if k not in _SPEC and k not in _LOCALIZATION}
    rest["transformer"] = TransformerSpec(**{k: v for k, v in variant.items() if k in _SPEC})
    rest["localization"] = LocalizationTraining(
        **{_LOCALIZATION[k]: v for k, v in variant.items() if k in _LOCALIZATION}
    )
    return rest


def adam(groups: Any) -> torch.optim.Optimizer:
    """Adam for the localisation group (``LocalizationTraining(optimizer=...)``)."""
    return torch.optim.Adam(groups, lr=1e-3)


# The paper's plain localisation, which every variant starts from: one optimiser, a plain head, no clipping (the
# study measured the recipe that STNModule now uses by default against it).
PLAIN = {"feature_norm": False, "loc_grad_clip": None, "loc_optimizer": None}


def cluttered_variants() -> dict[str, dict[str, Any]]:
    """Keyword arguments of STNModule for each variant of the cluttered-digits study (crop 30 of 60)."""
    st = {**PLAIN, "crop_size": 30, "transform": Affine(), "loc_lr_scale": 0.1, "init_scale": 1.0}
    fn = {"feature_norm": True, "loc_grad_clip": 1.0}
    resnet = {"backbone": "resnet10t", "backbone_kwargs": {"global_pool": ""}}
    return {
        "baseline": {"fusion": "none"},
        "plain": dict(st),
        "fn_clip": {**st, **fn},
        "zoom": {**st, "init_scale": 0.5},
        "zoom_fn_clip": {**st, **fn, "init_scale": 0.5},
        "warmup": {**st, "loc_warmup_steps": 60},
        "boundary": {**st, "boundary_weight": 1.0},
        "identity_pull": {**st, "identity_weight": 1.0, "penalty_decay_steps": 150},
        "attention_bounded": {
            **st,
            "transform": Attention(scale_range=(0.2, 1.0), translation_range=1.0),
            "init_scale": 0.5,
        },
        "zoom_fn_clip_boundary": {**st, **fn, "init_scale": 0.5, "boundary_weight": 1.0},
        "zoom_fn_clip_warmup": {**st, **fn, "init_scale": 0.5, "loc_warmup_steps": 60},
        "zoom_fn_clip_boundary_lr1": {**st, **fn, "init_scale": 0.5, "boundary_weight": 1.0, "loc_lr_scale": 1.0},
        "adam_loc": {**st, "loc_optimizer": adam, "loc_lr_scale": 1.0},
        "zoom_fn_clip_adam": {**st, **fn, "init_scale": 0.5, "loc_optimizer": adam, "loc_lr_scale": 1.0},
        "zoom_fn": {**st, "feature_norm": True, "loc_lr_scale": 0.01, "init_scale": 0.5},
        "zoom_fn_clip_lr1": {**st, **fn, "init_scale": 0.5, "loc_lr_scale": 1.0},
        "zoom0.7_fn_clip": {**st, **fn, "init_scale": 0.7},
        # The same with timm's resnet10t, unpooled (a position-sensitive head), for both arms.
        "baseline_resnet": {"fusion": "none", **resnet},
        "plain_resnet": {**st, **resnet},
        "zoom_fn_clip_resnet": {**st, **fn, "init_scale": 0.5, **resnet},
        # 60 x 60 crops of half the canvas (the digit upsampled 2x): resnet10t's stride of 32 leaves a 1 x 1 map on
        # 30 x 30 crops, 2 x 2 on 60 x 60 ones, like the baseline's on the whole canvas.
        "zoom_fn_clip_adam_resnet_crop60": {
            **st,
            **fn,
            "crop_size": 60,
            "init_scale": 0.5,
            "loc_optimizer": adam,
            "loc_lr_scale": 1.0,
            **resnet,
        },
        "zoom_fn_clip_adam_resnet": {
            **st,
            **fn,
            "init_scale": 0.5,
            "loc_optimizer": adam,
            "loc_lr_scale": 1.0,
            **resnet,
        },
    }


def addition_variants() -> dict[str, dict[str, Any]]:
    """Variants of the MNIST-addition study (two transformers, crops stacked as channels, 42 x 42 crops)."""
    st = {**PLAIN, "num_transformers": 2, "transform": Affine(), "loc_lr_scale": 0.1, "crop_size": 42}
    fn = {"feature_norm": True, "loc_grad_clip": 1.0}
    return {
        "baseline": {"fusion": "none"},
        "plain": dict(st),
        "fn_clip": {**st, **fn},
        # 28 x 28 crops: the default init_scale (crop/input) starts them at 2/3 of the canvas, the input's resolution.
        "fn_clip_crop28": {**st, **fn, "crop_size": 28, "init_scale": None},
        "fn_clip_crop28_adam": {
            **st,
            **fn,
            "crop_size": 28,
            "init_scale": None,
            "loc_optimizer": adam,
            "loc_lr_scale": 1.0,
        },
    }


def run(task: str, variant: str, kwargs: dict[str, Any], seed: int, epochs: int, backbone: str) -> dict[str, Any]:
    pl.seed_everything(seed, verbose=False)
    data: pl.LightningDataModule = (
        ClutteredMNIST(num_clutter=8, batch_size=128) if task == "cluttered" else MNISTAddition(batch_size=128)
    )
    kwargs = dict(kwargs)
    fusion = kwargs.pop("fusion", "channels")
    backbone = kwargs.pop("backbone", backbone)
    model = StudyModule.for_data(
        data,
        backbone=backbone,
        fusion=fusion,
        optimizer=lambda groups: torch.optim.SGD(groups, lr=0.05, momentum=0.9, weight_decay=5e-4),
        **module_arguments(kwargs),
    )
    trainer = pl.Trainer(
        max_epochs=epochs,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
    )
    start = time.perf_counter()
    trainer.fit(model, datamodule=data)
    result = trainer.test(model, datamodule=data, verbose=False)[0]
    seconds = time.perf_counter() - start
    return {
        "task": task,
        "variant": variant,
        "seed": seed,
        "epochs": epochs,
        "backbone": backbone,
        "test_error": 100.0 * (1.0 - result["test/acc"]),
        "scale": result.get("test/stn_scale"),
        "outside": result.get("test/stn_outside"),
        "seconds": seconds,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", choices=["cluttered", "addition"], default="cluttered")
    parser.add_argument("--variants", nargs="+", default=["baseline", "plain", "fn_clip", "zoom_fn_clip_boundary"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[42])
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--backbone", default="paper_cnn")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=None, help="append one JSON line per run to this file")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    variants = cluttered_variants() if args.task == "cluttered" else addition_variants()
    unknown = [v for v in args.variants if v not in variants]
    if unknown:
        parser.error(f"unknown variants {unknown}; choose from {sorted(variants)}")
    print(
        f"machine: {platform.node()}, {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs; "
        f"torch {torch.__version__}, {torch.get_num_threads()} thread(s)"
    )
    baseline: dict[int, float] = {}
    for seed in args.seeds:
        for variant in args.variants:
            r = run(args.task, variant, variants[variant], seed, args.epochs, args.backbone)
            if variant == "baseline":
                baseline[seed] = r["test_error"]
            base = baseline.get(seed)
            r["baseline_error"] = base
            extra = "" if r["scale"] is None else f"  scale {r['scale']:.2f}  outside {100 * r['outside']:.0f} %"
            print(
                f"{args.task} {variant:28s} seed {seed:3d}  {args.epochs} ep  test error {r['test_error']:5.1f} %"
                f"  (baseline {'-' if base is None else f'{base:.1f} %'}){extra}  {r['seconds']:.0f} s",
                flush=True,
            )
            if args.out:
                with open(args.out, "a") as f:
                    f.write(json.dumps(r) + "\n")


if __name__ == "__main__":
    main()
