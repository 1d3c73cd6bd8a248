"""Command line: LightningCLI around STNModule and any DataModule, with the data's shape linked into the model.

``stn-train fit --config configs/rts_mnist.yaml`` (or ``python train.py ...``) trains; ``validate``, ``test``
and ``predict`` work the same way, ``--print_config`` shows the full configuration.
"""

from __future__ import annotations

import sys
from typing import Any

import pytorch_lightning as pl
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.cli import LightningArgumentParser, LightningCLI

from .callbacks import AttentionVisualizer
from .module import STNModule

__all__ = ["STNCLI", "console", "main"]

# What only the data knows, read from the instantiated DataModule and passed to the model.
_LINKED = ("num_classes", "in_chans", "image_size", "background")


class STNCLI(LightningCLI):
    """LightningCLI with data-to-model links, checkpointing on validation accuracy and attention pictures."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        for name in _LINKED:
            parser.link_arguments(f"data.{name}", f"model.{name}", apply_on="instantiate")
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.set_defaults(
            {
                "checkpoint.monitor": "val/acc",
                "checkpoint.mode": "max",
                "checkpoint.filename": "best-{epoch:03d}",
                "checkpoint.auto_insert_metric_name": False,
                "checkpoint.save_last": True,
            }
        )
        parser.add_lightning_class_args(AttentionVisualizer, "attention")
        parser.add_argument(
            "--test_after_fit",
            type=bool,
            default=False,
            help="After fit, test the best checkpoint and print a summary.",
        )

    def after_fit(self) -> None:
        if not self.config[self.subcommand].get("test_after_fit"):
            return
        checkpoint = self.trainer.checkpoint_callback
        ckpt = "best" if isinstance(checkpoint, ModelCheckpoint) and checkpoint.best_model_path else None
        results = self.trainer.test(self.model, datamodule=self.datamodule, ckpt_path=ckpt)
        if self.trainer.is_global_zero:
            _summary(self.trainer, results)


def _summary(trainer: pl.Trainer, results: list[Any]) -> None:
    acc = results[0].get("test/acc") if results else None
    pictures = next((cb.last_path for cb in trainer.callbacks if isinstance(cb, AttentionVisualizer)), None)  # type: ignore[attr-defined]
    lines = [
        f"test accuracy: {acc:.4f}" if acc is not None else "test accuracy: n/a",
        f"logs:          {trainer.log_dir}",
        f"pictures:      {pictures.parent if pictures else 'none (no transformer or no validation run)'}",
    ]
    print("\n".join(["", *lines, ""]))


def main(args: list[str] | None = None, run: bool = True) -> STNCLI:
    """Run the CLI on ``args`` (default: sys.argv) and return it.

    Bad input (ValueError, FileNotFoundError) exits with status 2 and a one-line message instead of a traceback.
    """
    try:
        return STNCLI(
            STNModule,
            pl.LightningDataModule,
            subclass_mode_data=True,
            args=args,
            run=run,
            seed_everything_default=42,
            save_config_kwargs={"overwrite": True},
        )
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None


def console() -> None:
    """Entry point of the ``stn-train`` console script (``main`` without a return value for sys.exit)."""
    main()
