"""Command line: LightningCLI around STNModule and any DataModule, with the data's shape linked into the model.

``stn-train fit --config configs/rts_mnist.yaml`` (or ``python train.py ...``) trains; ``validate``, ``test``
and ``predict`` work the same way, ``--print_config`` shows the full configuration. ``export --ckpt_path P
--output model.onnx`` (or ``model.pt2``) writes a trained model for inference (:mod:`stn_lightning.export`); it
is a method of :class:`STNTrainer`, as the Trainer's own subcommands are. On top of LightningCLI:

* ``--ckpt_path last`` resumes the newest ``last.ckpt`` of the log folder (every run gets a new ``version_N``);
  a checkpoint file is checked before anything starts (empty, truncated, not a checkpoint, another model);
  when its hyperparameters override options given on the command line or in YAML, each one is named;
* checkpoints are written atomically, ``last.ckpt`` is always the latest state, and the global random states
  travel with it (:mod:`stn_lightning.checkpointing`), so a resumed run continues the uninterrupted one;
* a value that the data sets (``model.num_classes`` and the other links) and that the configuration sets to
  something else is an error instead of being dropped;
* a mistake exits with status 2 and one line on stderr (a non-finite run with status 1, SIGTERM with 143),
  without a traceback unless ``--debug`` is given (or ``JSONARGPARSE_DEBUG`` is set); a run that fails before
  its first optimiser step leaves no ``version_N`` folder behind.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
import warnings
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from jsonargparse import namespace_to_dict
from lightning_fabric.plugins.io.checkpoint_io import CheckpointIO
from pytorch_lightning.cli import LightningArgumentParser, LightningCLI
from pytorch_lightning.utilities.exceptions import MisconfigurationException, SIGTERMException
from pytorch_lightning.utilities.rank_zero import rank_zero_only

from .callbacks import AttentionVisualizer, PredictionWriter, StallDetector, stall_message
from .checkpointing import (
    AtomicCheckpointIO,
    NonFiniteError,
    RNGStateCallback,
    STNCheckpoint,
    find_last_checkpoint,
    read_checkpoint,
    state_dict_differences,
    stop_report,
)
from .data.files import ImageFilesDataModule
from .module import STNModule

__all__ = ["STNCLI", "STNTrainer", "console", "main"]

# What only the data knows, read from the instantiated DataModule and passed to the model.
_LINKED = ("num_classes", "in_chans", "image_size", "background")
_DEBUG_ENV = "JSONARGPARSE_DEBUG"
_DATA_KEY = "stn_data_config"  # the data's configuration in a checkpoint (see _RunConfigCallback)
_MODEL_KEY = "stn_model_config"  # the model's options that its saved hyperparameters leave out
_MODEL_OBJECTS = ("transform", "localizer", "task", "inner")  # those options: objects, which STNModule does not save


def _say(message: str) -> None:
    if getattr(rank_zero_only, "rank", 0) == 0:
        print(message, file=sys.stderr, flush=True)


def _plain(value: Any) -> Any:
    # Tuples from __init__ arguments and lists from YAML compare equal.
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


class STNTrainer(pl.Trainer):
    """Lightning's Trainer with one more entry point, ``export``, which the CLI offers as a subcommand."""

    def export(
        self,
        model: pl.LightningModule,
        datamodule: pl.LightningDataModule | None = None,
        ckpt_path: str | None = None,
        output: str | None = None,
    ) -> Path:
        """Export a trained model: ONNX for an output ending in .onnx, a torch.export program for .pt2.

        Args:
            model: the model, built as the checkpoint's hyperparameters (and the configuration) say.
            datamodule: unused; accepted like the other subcommands.
            ckpt_path: the checkpoint whose weights are exported.
            output: the file to write (.onnx or .pt2).

        Returns:
            The path written.
        """
        from .export import export_file

        if not ckpt_path or not output:
            raise ValueError("export needs --ckpt_path (a checkpoint) and --output (a .onnx or .pt2 file)")
        model.load_state_dict(read_checkpoint(ckpt_path)["state_dict"])
        fmt = export_file(model, output)
        _say(f"exported {ckpt_path} to {output} ({fmt})")
        return Path(output)


class STNCLI(LightningCLI):
    """LightningCLI with data-to-model links, safe checkpointing and resumption, clear errors, and ``export``."""

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        return {**LightningCLI.subcommands(), "export": {"model", "datamodule"}}

    def setup_parser(
        self, add_subcommands: bool, main_kwargs: dict[str, Any], subparser_kwargs: dict[str, Any]
    ) -> None:
        super().setup_parser(add_subcommands, main_kwargs, subparser_kwargs)
        if add_subcommands:
            self._data_optional(self._subcommand_parsers["export"])

    @staticmethod
    def _data_optional(parser: LightningArgumentParser) -> None:
        # export needs no data: the checkpoint's hyperparameters give the input's shape. jsonargparse has no public
        # way to make a group optional after it was added: it marks both the action and the parser.
        for action in parser._actions:
            if action.dest == "data":
                action.required = False
        getattr(parser, "_extra_required_keys", set()).discard("data")

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        for name in _LINKED:
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
            "--test_after_fit",
            type=bool,
            default=False,
            help="After fit, test the best checkpoint and print a summary.",
        )
        parser.add_argument(
            "--images",
            type=str | list[str] | None,
            default=None,
            help="predict: an image file, folder or glob pattern (or a list of them, [a, b]) to predict instead "
            "of the data's predict set; they are prepared the way the data prepares its images.",
        )

    # ------------------------------------------------------------------------------------------------------------
    # parsing: linked values, checkpoints
    # ------------------------------------------------------------------------------------------------------------
    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        from_command_line = args is None
        if args is None or isinstance(args, list):
            args, self._read = _options_from_checkpoint(list(sys.argv[1:] if args is None else args))
        with warnings.catch_warnings():
            if from_command_line:
                # The list is the command line itself (with what a checkpoint adds), not a second set of
                # arguments next to it, which is what LightningCLI warns about.
                warnings.filterwarnings("ignore", message="LightningCLI's args parameter")
            super().parse_arguments(parser, args)
        self._given_links: dict[str, Any] = {}
        self._checkpoint: dict[str, Any] | None = None
        sub = self.config.get("subcommand")
        if not sub:
            return
        defaults = self._parser(sub).get_defaults().get("model", {})
        model = self.config[sub].get("model", {})
        for name in _LINKED:
            given, default = model.get(name), defaults.get(name)
            if _plain(given) != _plain(default):
                self._given_links[name] = given

    def _log_root(self, config: Any) -> Path:
        # Where the runs of this configuration go: <default_root_dir>/<logger name>/version_N (Lightning's layout).
        trainer = config.get("trainer", {})
        root = Path(trainer.get("default_root_dir") or os.getcwd())
        logger = trainer.get("logger")
        if logger is False:
            return root
        init = (logger.get("init_args", {}) if isinstance(logger, dict) else getattr(logger, "init_args", None)) or {}
        save_dir = init.get("save_dir") if hasattr(init, "get") else None
        name = init.get("name", "lightning_logs") if hasattr(init, "get") else "lightning_logs"
        return Path(save_dir or root) / (name or "")

    def _parse_ckpt_path(self) -> None:
        sub = self.config.get("subcommand")
        if not sub:
            return
        config = self.config[sub]
        ckpt_path = config.get("ckpt_path")
        if sub == "export":
            _check_export_arguments(ckpt_path, config.get("output"))
        if not ckpt_path or ckpt_path in ("best", "hpc") or str(ckpt_path).startswith("registry"):
            return
        if ckpt_path == "last":
            root = self._log_root(config)
            found = find_last_checkpoint(root)
            if found is None:
                if sub == "fit":
                    _say(f"--ckpt_path last: no last.ckpt under {root}; starting a new run")
                    config["ckpt_path"] = None
                    return
                raise ValueError(f"--ckpt_path last: no last.ckpt under {root}")
            config["ckpt_path"] = ckpt_path = str(found)
        read = getattr(self, "_read", None)
        checkpoint = read[1] if read is not None and read[0] == ckpt_path else read_checkpoint(ckpt_path)
        self._read = None
        self._checkpoint = checkpoint
        what = "resuming" if sub == "fit" else "using"
        _say(f"{what} {ckpt_path} (epoch {checkpoint.get('epoch')}, global step {checkpoint.get('global_step')})")
        hparams = {k: v for k, v in checkpoint.get("hyper_parameters", {}).items() if not k.startswith("_")}
        defaults = self._parser(sub).get_defaults().get("model", {})
        model = config.get("model", {})
        for key, value in hparams.items():
            given = model.get(key) if hasattr(model, "get") else None
            if key in _LINKED or _plain(given) == _plain(defaults.get(key)) or _plain(given) == _plain(value):
                continue
            _say(f"model.{key}: the checkpoint's value {value!r} replaces the given {given!r}")
        super()._parse_ckpt_path()

    # ------------------------------------------------------------------------------------------------------------
    # instantiation
    # ------------------------------------------------------------------------------------------------------------
    def _instantiate_trainer(self, config: dict[str, Any], callbacks: list[pl.Callback]) -> pl.Trainer:
        callbacks = [*callbacks, RNGStateCallback()]
        config_now = self.config[self.subcommand] if self.subcommand else {}
        data, model = config_now.get("data"), config_now.get("model") or {}
        objects = {k: _plain_config(model.get(k)) for k in _MODEL_OBJECTS if model.get(k) is not None}
        callbacks.append(_RunConfigCallback(None if data is None else _plain_config(data), objects))
        plugins = config.get("plugins")
        plugins = [] if plugins is None else list(plugins) if isinstance(plugins, (list, tuple)) else [plugins]
        if not any(isinstance(p, CheckpointIO) for p in plugins):
            plugins.append(AtomicCheckpointIO())
        config["plugins"] = plugins
        return super()._instantiate_trainer(config, callbacks)

    def after_instantiate_classes(self) -> None:
        for name, given in self._given_links.items():
            actual = getattr(self.datamodule, name, None)
            if actual is not None and _plain(given) != _plain(actual):
                raise ValueError(
                    f"model.{name} is {given!r} in the configuration, but the data sets it "
                    f"({type(self.datamodule).__name__}.{name} = {actual!r}); remove model.{name}, or change the data"
                )
        # Lightning logs the model's and the data's hyperparameters together and stops on a name they share
        # with different values (e.g. the image-folder data's normalisation backbone): say so before the run.
        model_hp = dict(getattr(self.model, "hparams", {}))
        data_hp = dict(getattr(self.datamodule, "hparams", {}))
        clashes = [k for k in model_hp.keys() & data_hp.keys() if _plain(model_hp[k]) != _plain(data_hp[k])]
        if clashes:
            detail = ", ".join(f"model.{k} = {model_hp[k]!r} but data.{k} = {data_hp[k]!r}" for k in sorted(clashes))
            raise ValueError(f"{detail}; give both the same value")
        if self._checkpoint is not None and self.model is not None:
            self._check_checkpoint_fits(self._checkpoint)
            self._checkpoint = None  # free the memory before the run

    def _check_checkpoint_fits(self, checkpoint: dict[str, Any]) -> None:
        differences = state_dict_differences(self.model.state_dict(), checkpoint["state_dict"])
        if not differences:
            return
        hparams = checkpoint.get("hyper_parameters", {})
        mine = dict(getattr(self.model, "hparams", {}))
        changed = [
            f"{k}: checkpoint {hparams[k]!r}, now {mine[k]!r}"
            for k in hparams
            if k in mine and _plain(hparams[k]) != _plain(mine[k])
        ]
        path = self.config[self.config["subcommand"]].get("ckpt_path")
        detail = "; ".join(differences + (["hyperparameters that differ: " + ", ".join(changed)] if changed else []))
        if any("transformer.head" in d for d in differences):  # what a checkpoint's hyperparameters cannot say
            detail += "; the transformation family (model.transform) is not the checkpoint's: give the run's --config"
        raise ValueError(f"checkpoint {path} was made by a different model: {detail}")

    # ------------------------------------------------------------------------------------------------------------
    # running
    # ------------------------------------------------------------------------------------------------------------
    def _run_subcommand(self, subcommand: str) -> None:
        try:
            super()._run_subcommand(subcommand)
        except BaseException:
            self._remove_empty_run_folder()
            raise

    def _remove_empty_run_folder(self) -> None:
        # A run that failed before its first optimiser step leaves nothing worth keeping: no empty version_N.
        trainer = getattr(self, "trainer", None)
        if trainer is None or trainer.global_step > 0 or trainer.global_rank != 0 or self.subcommand != "fit":
            return
        logger = trainer.logger
        log_dir = getattr(logger, "log_dir", None) if logger is not None else None
        if not log_dir or not Path(log_dir).is_dir() or any(Path(log_dir).rglob("*.ckpt")):
            return
        shutil.rmtree(log_dir, ignore_errors=True)
        with contextlib.suppress(OSError):  # and lightning_logs/ if this run had made it (rmdir: only if empty)
            Path(log_dir).parent.rmdir()

    def before_predict(self) -> None:
        images = self.config["predict"].get("images")
        if not images:
            return
        images = [images] if isinstance(images, str) else list(images)
        make = getattr(self.datamodule, "image_transform", None)
        if make is None:
            raise ValueError(f"--images: {type(self.datamodule).__name__} has no image_transform() to prepare files")
        batch_size = int(getattr(self.datamodule, "batch_size", 64))
        names = getattr(self.datamodule, "class_names", None)
        self.datamodule = ImageFilesDataModule(images, make(), batch_size=batch_size, class_names=names)

    def after_fit(self) -> None:
        if not self.config[self.subcommand].get("test_after_fit"):
            return
        checkpoint = self.trainer.checkpoint_callback
        ckpt = "best" if isinstance(checkpoint, STNCheckpoint) and checkpoint.best_model_path else None
        results = self.trainer.test(self.model, datamodule=self.datamodule, ckpt_path=ckpt)
        log_dir = self.trainer.log_dir  # a collective under DDP: every rank asks
        if self.trainer.is_global_zero:
            _summary(self.trainer, results, log_dir)


def _option(argv: list[str], name: str) -> str | None:
    for i, arg in enumerate(argv):
        if arg == name and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith(name + "="):
            return arg.split("=", 1)[1]
    return None


def _options_from_checkpoint(argv: list[str]) -> tuple[list[str], tuple[str, dict[str, Any]] | None]:
    """Without ``--config``, ``--ckpt_path`` alone names the data and the transformation family: the checkpoint
    stored them (``--data``, ``--model.transform`` and ``--model.localizer``, each unless given whole; options
    inside them, ``--data.init_args.batch_size`` and the like, apply on top).

    Returns the arguments (with what the checkpoint gave added) and the (path, checkpoint) it read, for
    :meth:`STNCLI._parse_ckpt_path` to use instead of reading the file again. This runs before the configuration
    is parsed, so ``last`` is looked up in ``<default_root_dir>/lightning_logs`` only.
    """
    if _option(argv, "--config") is not None or _option(argv, "-c") is not None:
        return argv, None
    path = _option(argv, "--ckpt_path")
    if path == "last":
        root = _option(argv, "--trainer.default_root_dir") or os.getcwd()
        found = find_last_checkpoint(Path(root) / "lightning_logs")
        path = str(found) if found is not None else None
    if path is None or not Path(path).is_file():
        return argv, None
    try:
        checkpoint = read_checkpoint(path)
    except ValueError:
        return argv, None  # _parse_ckpt_path reports what is wrong with the file
    extra: list[str] = []
    data = checkpoint.get(_DATA_KEY)
    if isinstance(data, dict) and _option(argv, "--data") is None:
        extra += ["--data", json.dumps(data)]
    objects = checkpoint.get(_MODEL_KEY)
    for name, value in (objects if isinstance(objects, dict) else {}).items():
        if name in _MODEL_OBJECTS and _option(argv, f"--model.{name}") is None:
            extra += [f"--model.{name}", json.dumps(value)]
    # Right after the subcommand, so that options given on the command line (--data.init_args.batch_size ...) apply
    # on top of the checkpoint's.
    at = next((i + 1 for i, a in enumerate(argv) if not a.startswith("-")), 0)
    return [*argv[:at], *extra, *argv[at:]], (path, checkpoint)


def _plain_config(value: Any) -> Any:
    """A parsed option (a jsonargparse Namespace, or plain data) as plain data that JSON can hold."""
    return namespace_to_dict(value) if hasattr(value, "as_dict") else value


class _RunConfigCallback(pl.Callback):
    """Stores the data's configuration and the model's object options (the transformation family, the
    localiser; class paths and arguments, plain data) in every checkpoint, so that ``predict``, ``test`` and
    ``export`` with ``--ckpt_path`` alone rebuild the model and the data it was trained with."""

    def __init__(self, data: dict[str, Any] | None, objects: dict[str, Any]) -> None:
        self.data, self.objects = data, objects

    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        if self.data is not None:
            checkpoint[_DATA_KEY] = self.data
        if self.objects:
            checkpoint[_MODEL_KEY] = self.objects


def _check_export_arguments(ckpt_path: str | None, output: str | None) -> None:
    # Before anything is built: both paths given, a known output format, its exporter installed.
    from .export import check_exporter, format_of

    if not ckpt_path or ckpt_path in ("best", "hpc") or str(ckpt_path).startswith("registry"):
        raise ValueError(f"export needs --ckpt_path: a checkpoint file, or last (got {ckpt_path!r})")
    if not output:
        raise ValueError("export needs --output: a .onnx or .pt2 file")
    check_exporter(format_of(output))


def _summary(trainer: pl.Trainer, results: list[Any], log_dir: str | None) -> None:
    acc = results[0].get("test/acc") if results else None
    pictures = next((cb.last_path for cb in trainer.callbacks if isinstance(cb, AttentionVisualizer)), None)  # type: ignore[attr-defined]
    lines = [
        f"test accuracy: {acc:.4f}" if acc is not None else "test accuracy: n/a",
        f"logs:          {log_dir}",
        f"pictures:      {pictures.parent if pictures else 'none (no transformer or no validation run)'}",
        *([f"stalled:       {stall_message(trainer)}"] if stall_message(trainer) else []),
    ]
    print("\n".join(["", *lines, ""]))


def _one_line(err: BaseException) -> str:
    text = str(err).strip()
    # An error raised in a DataLoader worker comes back with the worker's traceback in its message: keep the end.
    if "Original Traceback" in text:
        last = text.splitlines()[-1]
        text = last.split(": ", 1)[1] if ": " in last else last
    # A class that refused its arguments, as jsonargparse reports it: the class's own errors, not the union's.
    if "Does not validate against any of the" in text:
        reasons = [line.strip()[2:] for line in text.splitlines() if line.strip().startswith("- ")]
        reasons = [r for r in reasons if not r.startswith("Expected a <class 'NoneType'>")]
        text = "; ".join(reasons) or text
    return text or type(err).__name__


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
    try:
        return STNCLI(
            STNModule,
            pl.LightningDataModule,
            subclass_mode_data=True,
            trainer_class=STNTrainer,
            args=argv if args is not None else None,
            run=run,
            seed_everything_default=42,
            save_config_kwargs={"overwrite": True},
        )
    except SIGTERMException:  # SIGTERM (143) or a first Ctrl-C (130): last.ckpt is saved at the current step
        message, code = stop_report()
        _say(message)
        raise SystemExit(code) from None
    except (ValueError, FileNotFoundError, MisconfigurationException) as err:
        if debug:
            raise
        print(f"error: {_one_line(err)}", file=sys.stderr)
        raise SystemExit(2) from None
    except NonFiniteError as err:
        if debug:
            raise
        print(f"error: {_one_line(err)}", file=sys.stderr)
        raise SystemExit(1) from None


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
