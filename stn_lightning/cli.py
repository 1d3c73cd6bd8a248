"""Command line: LightningCLI around STNModule and any DataModule, with the data's shape linked into the model.

``stn-train fit --config configs/rts_mnist.yaml`` (or ``python train.py ...``) trains; ``validate``, ``test``,
``predict`` and ``export --ckpt_path P --output model.onnx`` (or ``.pt2``, :mod:`stn_lightning.export`) work the
same way; ``--print_config`` shows the full configuration. This module uses LightningCLI's documented hooks only;
what it adds lives in :mod:`stn_lightning.runs`: one ``version_N`` per run, however many start together;
``--ckpt_path last`` and checks of a checkpoint before anything starts (``--ckpt_path`` alone rebuilds the data and
model it was trained with); values that the data sets checked against the configuration; a summary after each
fit; a mistake exits with status 2 and one line on stderr (a non-finite run with 1, SIGTERM with 143), without a
traceback unless ``--debug`` is given (or ``JSONARGPARSE_DEBUG`` is set).
"""

from __future__ import annotations

import os
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from jsonargparse import ArgumentError
from pytorch_lightning.cli import LightningArgumentParser, LightningCLI
from pytorch_lightning.utilities.exceptions import MisconfigurationException, SIGTERMException
from pytorch_lightning.utilities.rank_zero import rank_zero_only

from . import runs
from .callbacks import AttentionVisualizer, PredictionWriter, StallDetector, stall_message
from .checkpointing import NonFiniteError, STNCheckpoint, stop_report
from .module import STNModule

__all__ = ["STNCLI", "STNTrainer", "console", "main"]

LINKED = STNModule.DATA_OPTIONS  # what only the data knows, linked to the model
MODEL_OBJECTS = ("task", "inner")  # model options the CLI stores beside STNModule's hparams
_DEBUG_ENV = "JSONARGPARSE_DEBUG"


def _say(message: str) -> None:
    if getattr(rank_zero_only, "rank", 0) == 0:
        print(message, file=sys.stderr, flush=True)


class STNTrainer(pl.Trainer):
    """Lightning's Trainer with one more entry point, ``export``, which the CLI offers as a subcommand."""

    def export(
        self,
        model: pl.LightningModule,
        datamodule: pl.LightningDataModule | None = None,
        ckpt_path: str | None = None,
        output: str | None = None,
        weights_only: bool | None = None,
    ) -> Path:
        """Export a trained model: ONNX for an output ending in .onnx, a torch.export program for .pt2.

        Args:
            model: the model, built as the checkpoint's hyperparameters (and the configuration) say.
            datamodule: unused; accepted like the other subcommands.
            ckpt_path: the checkpoint whose weights are exported.
            output: the file to write (.onnx or .pt2).
            weights_only: unused (checkpoints are always read weights-only); accepted so that a fit's saved
                config.yaml works as ``export --config``.

        Returns:
            The path written.
        """
        path, fmt = runs.export_checkpoint(model, ckpt_path, output)
        _say(f"exported {ckpt_path} to {output} ({fmt})")
        return path


@dataclass
class _RunState:
    subcommand: str | None = None
    read: tuple[str, dict[str, Any]] | None = None  # the checkpoint read before parsing, to read it once
    checkpoint: dict[str, Any] | None = None  # the checkpoint given, until the model is checked against it
    links: dict[str, Any] | None = None  # linked model options that the configuration gave
    folder: Path | None = None  # the run folder this process claimed (rank 0)


class STNCLI(LightningCLI):
    """LightningCLI with data-to-model links, one folder per run, safe resumption, clear errors, and ``export``."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.stn = _RunState()
        try:
            super().__init__(*args, **kwargs)
        except BaseException:
            trainer, fit = getattr(self, "trainer", None), self.stn.subcommand == "fit"
            if self.stn.folder is not None and not (fit and trainer is not None and trainer.global_step > 0):
                runs.remove_unused_run_folder(self.stn.folder, keep_checkpoints_only=fit)
            raise

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        return {**LightningCLI.subcommands(), "export": {"model", "datamodule"}}

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        for name in LINKED:
            parser.link_arguments(f"data.{name}", f"model.{name}", apply_on="instantiate")
        parser.add_lightning_class_args(STNCheckpoint, "checkpoint")
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
        parser.add_lightning_class_args(PredictionWriter, "predictions")
        parser.add_lightning_class_args(StallDetector, "stall")
        parser.add_argument(
            "--test_after_fit", type=bool, default=False, help="After fit, test the best checkpoint as well."
        )
        parser.add_argument(
            "--images",
            type=str | list[str] | None,
            default=None,
            help="predict: an image file, folder or glob pattern (or a list of them, [a, b]) to predict instead "
            "of the data's predict set; they are prepared the way the data prepares its images.",
        )

    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        from_command_line = args is None
        if args is None or isinstance(args, list):
            argv = list(sys.argv[1:] if args is None else args)
            args, self.stn.read = runs.checkpoint_arguments(argv, list(self.subcommands()), MODEL_OBJECTS)
        with warnings.catch_warnings():
            if from_command_line:  # the list is the command line itself (with what a checkpoint adds)
                warnings.filterwarnings("ignore", message="LightningCLI's args parameter")
            super().parse_arguments(parser, args)
        sub = self.stn.subcommand = self.config.get("subcommand")
        if not sub:
            return
        config, defaults = self.config[sub], runs.defaults_of(self.model_class or STNModule)
        model = config.get("model") or {}
        given = {n: model.get(n) for n in LINKED if model.get(n) is not None}  # a link's target parses as None
        self.stn.links = {n: v for n, v in given.items() if runs.plain(v) != runs.plain(defaults.get(n))}
        self.stn.checkpoint, self.stn.read = runs.resolve_checkpoint(sub, config, self.stn.read, _say), None
        hparams = runs.hyperparameters(self.stn.checkpoint)
        if config.get("data") is None and sub != "export":
            raise ValueError(f"{sub} needs data: --data CLASS, a --config with a data section, or a --ckpt_path")
        for line in runs.overridden_options(hparams, model, defaults, LINKED):
            _say(line)
        if hparams:  # LightningCLI does the same (where it does): the model is built as the checkpoint's
            self.config = parser.parse_object({sub: {"model": hparams}}, self.config)

    def instantiate_trainer(self, **kwargs: Any) -> pl.Trainer:
        sub = self.subcommand
        config, init = (self.config[sub], self.config_init[sub]) if sub else (self.config, self.config_init)
        trainer = init.get("trainer") or {}
        kwargs = {**runs.trainer_additions(config, trainer, MODEL_OBJECTS), **kwargs}
        logger, self.stn.folder = runs.run_logger(sub, config, trainer.get("logger"))
        if logger is not None:
            kwargs.setdefault("logger", logger)
        return super().instantiate_trainer(**kwargs)

    def after_instantiate_classes(self) -> None:
        runs.check_links(self.stn.links or {}, self.model, self.datamodule)
        if self.stn.checkpoint is not None and self.model is not None:
            path = self.config[self.config["subcommand"]].get("ckpt_path")
            checkpoint, self.stn.checkpoint = self.stn.checkpoint, None  # free the memory before the run
            runs.check_checkpoint_fits(self.model, checkpoint, path)

    def before_predict(self) -> None:
        images = self.config["predict"].get("images")
        if images:  # the user's files instead of the data's predict set, prepared like the data's images
            self.datamodule = runs.image_files_data(self.datamodule, images)

    def after_fit(self) -> None:
        validated = any(k.startswith("val/") for k in self.trainer.callback_metrics)
        results = None
        if self.config[self.subcommand].get("test_after_fit"):
            best = getattr(self.trainer.checkpoint_callback, "best_model_path", None)
            results = self.trainer.test(self.model, datamodule=self.datamodule, ckpt_path="best" if best else None)
        log_dir = self.trainer.log_dir  # a collective under DDP: every rank asks
        if self.trainer.is_global_zero:
            print(runs.summary(self.trainer, log_dir, validated, results))


def main(args: list[str] | None = None, run: bool = True) -> STNCLI:
    """Run the CLI on ``args`` (default: sys.argv) and return it.

    Bad input exits with status 2 and a one-line message instead of a traceback, a non-finite run with status 1,
    SIGTERM with 143 after saving ``last.ckpt``. ``--debug`` (or ``JSONARGPARSE_DEBUG=1``) shows the traceback.
    """
    argv = list(sys.argv[1:] if args is None else args)
    if "--debug" in argv:
        argv.remove("--debug")
        os.environ[_DEBUG_ENV] = "true"  # DDP re-launches the command: the other ranks see it too
        if args is None:
            sys.argv = [sys.argv[0], *argv]
    debug = bool(os.environ.get(_DEBUG_ENV))
    # Errors come back as exceptions, printed as one line below; a mistyped option is an error, not an abbreviation.
    raising = {"exit_on_error": False, "allow_abbrev": False}
    try:
        return STNCLI(
            STNModule,
            None,  # any DataModule, optional to the parser: export needs none, a checkpoint can name it
            subclass_mode_data=True,
            trainer_class=STNTrainer,
            args=argv if args is not None else None,
            run=run,
            seed_everything_default=42,
            save_config_callback=runs.AtomicSaveConfig,
            save_config_kwargs={"overwrite": True},
            parser_kwargs={**raising, **{name: dict(raising) for name in STNCLI.subcommands()}},
        )
    except SIGTERMException:  # SIGTERM (143) or a first Ctrl-C (130): last.ckpt is saved at the current step
        message, code = stop_report()
        _say(message)
        raise SystemExit(code) from None
    except (ValueError, FileNotFoundError, MisconfigurationException, ArgumentError, NonFiniteError) as err:
        if debug:
            raise
        print(f"error: {runs.one_line(err, argv)}", file=sys.stderr)
        raise SystemExit(1 if isinstance(err, NonFiniteError) else 2) from None


def console() -> None:
    """Entry point of ``stn-train`` and ``train.py``: :func:`main`, then the process group's end.

    A process that leaves with its Gloo process group alive can abort at exit ("terminate called without an active
    exception", status -6) after a run that succeeded: Gloo's worker threads outlive the interpreter. So after a
    run that returned normally every rank destroys the group (all ranks get there together); after an error it is
    left alone, since destroying it while another rank still communicates could hang.
    """
    cli = main()
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    if stall_message(getattr(cli, "trainer", None)):
        raise SystemExit(1)  # StallDetector stopped the run: it learnt nothing
