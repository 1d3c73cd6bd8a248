"""What the command line does around a run, as plain functions: run folders, checkpoints, messages.

:mod:`stn_lightning.cli` calls these from LightningCLI's documented hooks. Each run that writes files claims its own
``<root>/version_N`` with an exclusive ``mkdir`` (runs started together in one root get one folder each); ``--ckpt_path
last`` finds the newest ``last.ckpt`` below the root; a checkpoint stores the data's configuration and the model's
object options, so ``--ckpt_path`` alone rebuilds what it was trained with.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import inspect
import json
import os
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import yaml
from lightning_fabric.plugins.io.checkpoint_io import CheckpointIO
from pytorch_lightning.cli import SaveConfigCallback
from pytorch_lightning.loggers import CSVLogger, Logger, TensorBoardLogger
from pytorch_lightning.utilities.rank_zero import rank_zero_only

from .callbacks import AttentionVisualizer, stall_message
from .checkpointing import (
    AtomicCheckpointIO,
    RNGStateCallback,
    find_last_checkpoint,
    read_checkpoint,
    state_dict_differences,
)
from .data.files import ImageFilesDataModule
from .writing import atomic_path

__all__ = [
    "AtomicSaveConfig",
    "DATA_KEY",
    "MODEL_KEY",
    "RUN_FOLDER_ENV",
    "RunConfigCallback",
    "check_checkpoint_fits",
    "check_export_arguments",
    "check_links",
    "checkpoint_arguments",
    "claim_run_folder",
    "defaults_of",
    "export_checkpoint",
    "find_last",
    "hyperparameters",
    "image_files_data",
    "log_root",
    "one_line",
    "overridden_options",
    "peek",
    "plain",
    "remove_unused_run_folder",
    "resolve_checkpoint",
    "run_logger",
    "summary",
    "trainer_additions",
]

DATA_KEY = "stn_data_config"  # the data's configuration in a checkpoint (see RunConfigCallback)
MODEL_KEY = "stn_model_config"  # the model's options that its saved hyperparameters leave out
RUN_FOLDER_ENV = "STN_RUN_FOLDER"  # rank 0's run folder, for the DDP ranks it launches
_BOOKKEEPING = ("config.yaml", "hparams.yaml", "events.out.tfevents", "metrics.csv")  # what every run writes


def plain(value: Any) -> Any:
    """A parsed option (jsonargparse Namespace, tuple) as plain data that JSON can hold and ``==`` compares."""
    if hasattr(value, "as_dict"):
        value = value.as_dict()
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    return value


# ----------------------------------------------------------------------------------------------------------------
# run folders
# ----------------------------------------------------------------------------------------------------------------
def log_root(trainer: Any) -> Path:
    """Where the runs of a trainer configuration go: ``<save_dir or default_root_dir>/<logger name>``."""
    trainer = plain(trainer) or {}
    root = Path(trainer.get("default_root_dir") or os.getcwd())
    logger = trainer.get("logger")
    if logger is False:
        return root
    init = (logger.get("init_args") if isinstance(logger, dict) else None) or {}
    name = init.get("name", "lightning_logs")
    return Path(init.get("save_dir") or root) / (name or "")


def claim_run_folder(root: str | os.PathLike[str]) -> int:
    """Create ``root/version_N`` with an exclusive mkdir and return N: one folder per caller, however many race.

    The listing only says where to start; the folder is this caller's only if its own mkdir created it.
    """
    root = Path(root)
    taken = [p.name.removeprefix("version_") for p in root.glob("version_*")] if root.is_dir() else []
    n = max((int(t) for t in taken if t.isdigit()), default=-1) + 1
    while True:
        try:
            (root / f"version_{n}").mkdir()
            return n
        except FileExistsError:
            n += 1
        except FileNotFoundError:  # the root does not exist yet (or a failed run just removed it)
            root.mkdir(parents=True, exist_ok=True)


def remove_unused_run_folder(folder: Path, keep_checkpoints_only: bool) -> None:
    """Remove a failed run's folder when it holds nothing worth keeping, and its root when that is left empty.

    A fit keeps its folder when it holds a checkpoint (``keep_checkpoints_only``); other runs when it holds any file
    besides the configuration, hyperparameters and events that every run writes (a prediction file, a picture).
    """
    if not folder.is_dir():
        return
    files = [p for p in folder.rglob("*") if p.is_file()]
    if keep_checkpoints_only:
        if any(p.suffix == ".ckpt" for p in files):
            return
    elif any(not p.name.startswith(_BOOKKEEPING) for p in files):
        return
    shutil.rmtree(folder, ignore_errors=True)
    with contextlib.suppress(OSError):  # rmdir: only if no other run is in it
        folder.parent.rmdir()


def run_logger(subcommand: str | None, config: Any, configured: Any) -> tuple[Logger | bool | None, Path | None]:
    """The logger of a run and the folder it claimed: a TensorBoard or CSV logger (the default, or the configured
    one) on a ``version_N`` of its own, claimed by rank 0 and inherited by the ranks it launches (through
    ``STN_RUN_FOLDER``); False for a run that writes nothing there (export, predict to a given file); None to keep
    the configured logger (none, another kind, an explicit version, fast_dev_run, ranks that torchrun started)."""
    rank_zero = getattr(rank_zero_only, "rank", 0) == 0
    if rank_zero:
        os.environ.pop(RUN_FOLDER_ENV, None)  # set below, for this run only
    if subcommand == "export" or (subcommand == "predict" and (config.get("predictions") or {}).get("output")):
        return False, None
    trainer = plain(config.get("trainer")) or {}
    kinds = (TensorBoardLogger, CSVLogger)
    init = (trainer["logger"].get("init_args") or {}) if isinstance(trainer.get("logger"), dict) else {}
    own = configured is None or configured is True or isinstance(configured, kinds)
    if trainer.get("fast_dev_run") or not own or init.get("version") is not None:
        return None, None
    root, folder = log_root(trainer), None
    if rank_zero:
        folder = root / f"version_{claim_run_folder(root)}"
        os.environ[RUN_FOLDER_ENV] = str(folder)
    elif RUN_FOLDER_ENV not in os.environ:
        return None, None  # Lightning broadcasts rank 0's folder where it matters
    version = int(Path(os.environ[RUN_FOLDER_ENV]).name.removeprefix("version_"))
    if isinstance(configured, kinds):
        return type(configured)(**{**init, "version": version}), folder
    tensorboard = importlib.util.find_spec("tensorboard") or importlib.util.find_spec("tensorboardX")
    kind = TensorBoardLogger if tensorboard else CSVLogger  # what Lightning's default logger would be
    return kind(save_dir=root.parent, name=root.name, version=version), folder


# ----------------------------------------------------------------------------------------------------------------
# checkpoints
# ----------------------------------------------------------------------------------------------------------------
def find_last(root: Path, subcommand: str) -> Path | None:
    """``--ckpt_path last``: the newest ``last*.ckpt`` below ``root``; None for a fit that finds none."""
    found = find_last_checkpoint(root)
    if found is not None:
        return found
    looked = f"no last.ckpt under {root} (searched every folder below it for last*.ckpt"
    if subcommand == "fit":
        return None
    raise ValueError(f"--ckpt_path last: {looked}; give --trainer.default_root_dir of the run, or a checkpoint file)")


def resolve_checkpoint(
    subcommand: str, config: Any, read: tuple[str, dict[str, Any]] | None, say: Callable[[str], None]
) -> dict[str, Any] | None:
    """Check ``--ckpt_path`` (``last`` resolved in place) and return the checkpoint, or None when none is given.

    ``read`` is a (path, checkpoint) already read, used instead of reading the file again.
    """
    ckpt_path = config.get("ckpt_path")
    if subcommand == "export":
        check_export_arguments(ckpt_path, config.get("output"))
    if not ckpt_path or ckpt_path in ("best", "hpc") or str(ckpt_path).startswith("registry"):
        return None
    if ckpt_path == "last":
        root = log_root(config.get("trainer"))
        found = find_last(root, subcommand)
        if found is None:
            say(f"--ckpt_path last: no last.ckpt under {root} (searched every folder below it); starting a new run")
            config["ckpt_path"] = None
            return None
        config["ckpt_path"] = ckpt_path = str(found)
    checkpoint = read[1] if read is not None and read[0] == ckpt_path else read_checkpoint(ckpt_path)
    what = "resuming" if subcommand == "fit" else "using"
    say(f"{what} {ckpt_path} (epoch {checkpoint.get('epoch')}, global step {checkpoint.get('global_step')})")
    return checkpoint


def hyperparameters(checkpoint: dict[str, Any] | None) -> dict[str, Any]:
    """The model's hyperparameters that a checkpoint stored (none of Lightning's own ``_`` entries)."""
    stored = (checkpoint or {}).get("hyper_parameters", {})
    return {k: v for k, v in stored.items() if not k.startswith("_")}


def defaults_of(cls: Any) -> dict[str, Any]:
    """The defaults of a class's constructor arguments."""
    return {k: p.default for k, p in inspect.signature(cls).parameters.items()}


def check_export_arguments(ckpt_path: str | None, output: str | None) -> None:
    """Before anything is built: both paths given, a known output format, its exporter installed."""
    from .export import check_exporter, format_of

    if not ckpt_path or ckpt_path in ("best", "hpc") or str(ckpt_path).startswith("registry"):
        raise ValueError(f"export needs --ckpt_path: a checkpoint file, or last (got {ckpt_path!r})")
    if not output:
        raise ValueError("export needs --output: a .onnx or .pt2 file")
    check_exporter(format_of(output))


def export_checkpoint(model: pl.LightningModule, ckpt_path: str | None, output: str | None) -> tuple[Path, str]:
    """Load the checkpoint's weights into ``model`` and export it to ``output``; return the path and the format."""
    from .export import export_file

    if not ckpt_path or not output:
        raise ValueError("export needs --ckpt_path (a checkpoint) and --output (a .onnx or .pt2 file)")
    model.load_state_dict(read_checkpoint(ckpt_path)["state_dict"])
    return Path(output), export_file(model, output)


def check_links(given: dict[str, Any], model: Any, data: Any) -> None:
    """Raise ValueError when the configuration gave a linked model option that the data sets otherwise, or when the
    model's and the data's hyperparameters share a name with different values (Lightning stops on it later)."""
    for name, value in given.items():
        actual = getattr(data, name, None)
        if actual is not None and plain(value) != plain(actual):
            raise ValueError(
                f"model.{name} is {value!r} in the configuration, but the data sets it "
                f"({type(data).__name__}.{name} = {actual!r}); remove model.{name}, or change the data"
            )
    model_hp, data_hp = dict(getattr(model, "hparams", {})), dict(getattr(data, "hparams", {}))
    clashes = [k for k in model_hp.keys() & data_hp.keys() if plain(model_hp[k]) != plain(data_hp[k])]
    if clashes:
        detail = ", ".join(f"model.{k} = {model_hp[k]!r} but data.{k} = {data_hp[k]!r}" for k in sorted(clashes))
        raise ValueError(f"{detail}; give both the same value")


def check_checkpoint_fits(model: pl.LightningModule, checkpoint: dict[str, Any], path: str | None) -> None:
    """Raise ValueError naming what differs when the checkpoint's weights do not fit the model built."""
    differences = state_dict_differences(model.state_dict(), checkpoint["state_dict"])
    if not differences:
        return
    hparams, mine = checkpoint.get("hyper_parameters", {}), dict(getattr(model, "hparams", {}))
    changed = [
        f"{k}: checkpoint {hparams[k]!r}, now {mine[k]!r}"
        for k in hparams
        if k in mine and plain(hparams[k]) != plain(mine[k])
    ]
    detail = "; ".join(differences + (["hyperparameters that differ: " + ", ".join(changed)] if changed else []))
    if any("transformer.head" in d for d in differences):  # what a checkpoint's hyperparameters cannot say
        detail += "; the transformer (model.transformer) is not the one the checkpoint's hyperparameters describe"
    raise ValueError(f"checkpoint {path} was made by a different model: {detail}")


def peek(argv: Sequence[str], objects: Sequence[str] = ()) -> dict[str, Any]:
    """The few options needed before LightningCLI parses: ``config`` (a list), ``--ckpt_path``,
    ``--trainer.default_root_dir``, ``--data`` and ``--model.<object>``, as given (None if not); the rest is left."""
    parser = _Peek(add_help=False, allow_abbrev=False)
    parser.add_argument("-c", "--config", action="append", default=[])
    for option in ("--ckpt_path", "--trainer.default_root_dir", "--data", *(f"--model.{o}" for o in objects)):
        parser.add_argument(option, dest=option)
    try:
        return vars(parser.parse_known_args(list(argv))[0])
    except ValueError:  # a malformed command line: LightningCLI's parser says what is wrong with it
        return vars(parser.parse_known_args([])[0])


class _Peek(argparse.ArgumentParser):
    def error(self, message: str) -> Any:  # argparse's documented hook: raise instead of printing usage and exiting
        raise ValueError(message)


def checkpoint_arguments(
    argv: Sequence[str], subcommands: Sequence[str], objects: Sequence[str]
) -> tuple[list[str], tuple[str, dict[str, Any]] | None]:
    """Without ``--config``, ``--ckpt_path`` alone names the data and the model's object options: the checkpoint
    stored them (``--data``, ``--model.task``, ``--model.inner``, each unless given whole; options inside them, like
    ``--data.init_args.batch_size``, apply on top).

    Returns the arguments with the checkpoint's added right after the subcommand, and the (path, checkpoint) read.
    ``last`` is looked up in ``<default_root_dir>/lightning_logs`` (the logger's options are not parsed yet).
    """
    given = peek(argv, objects)
    path, at = given["--ckpt_path"], next((i + 1 for i, a in enumerate(argv) if a in subcommands), None)
    if given["config"] or path is None or at is None:
        return list(argv), None
    if path == "last":
        found = find_last_checkpoint(Path(given["--trainer.default_root_dir"] or os.getcwd()) / "lightning_logs")
        path = None if found is None else str(found)
    if path is None or not Path(path).is_file():
        return list(argv), None
    try:
        checkpoint = read_checkpoint(path)
    except ValueError:
        return list(argv), None  # the CLI reports what is wrong with the file once the arguments are parsed
    extra: list[str] = []
    stored = {"data": checkpoint.get(DATA_KEY)}
    stored.update({f"model.{k}": v for k, v in (checkpoint.get(MODEL_KEY) or {}).items() if k in objects})
    for key, value in stored.items():
        if isinstance(value, dict) and given[f"--{key}"] is None:
            extra += [f"--{key}", json.dumps(value)]
    return [*argv[:at], *extra, *argv[at:]], (path, checkpoint)


def overridden_options(hparams: dict[str, Any], given: Any, defaults: Any, linked: Sequence[str]) -> list[str]:
    """A line for each model option given (not its default) that a checkpoint's hyperparameter replaces."""
    lines = []
    for key, value in hparams.items():
        mine = given.get(key) if hasattr(given, "get") else None
        if key in linked or plain(mine) in (plain(defaults.get(key)), plain(value)):
            continue
        lines.append(f"model.{key}: the checkpoint's value {value!r} replaces the given {mine!r}")
    return lines


class RunConfigCallback(pl.Callback):
    """Stores the data's configuration and the model's object options (the task, the inner transformers; class
    paths and arguments, plain data) in every checkpoint, so that ``predict``, ``test`` and ``export`` with
    ``--ckpt_path`` alone rebuild the model and the data it was trained with."""

    def __init__(self, data: dict[str, Any] | None, objects: dict[str, Any]) -> None:
        self.data, self.objects = data, objects

    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        if self.data is not None:
            checkpoint[DATA_KEY] = self.data
        if self.objects:
            checkpoint[MODEL_KEY] = self.objects


def trainer_additions(config: Any, trainer: Any, objects: Sequence[str]) -> dict[str, Any]:
    """The Trainer's callbacks and plugins from the configuration, with what every run has: the random states and
    the run's configuration in each checkpoint, atomic checkpoint writes (unless a CheckpointIO is configured).

    Args:
        config: the subcommand's parsed configuration (its model's ``objects`` options and data are stored).
        trainer: the subcommand's instantiated trainer configuration.
        objects: the names of the model's object options.
    """
    model = config.get("model") or {}
    stored = {k: plain(model.get(k)) for k in objects if model.get(k) is not None}
    callbacks = trainer.get("callbacks") or []
    callbacks = list(callbacks) if isinstance(callbacks, (list, tuple)) else [callbacks]
    callbacks += [RNGStateCallback(), RunConfigCallback(plain(config.get("data")), stored)]
    plugins = trainer.get("plugins")
    plugins = [] if plugins is None else list(plugins) if isinstance(plugins, (list, tuple)) else [plugins]
    if not any(isinstance(p, CheckpointIO) for p in plugins):
        plugins.append(AtomicCheckpointIO())
    return {"callbacks": callbacks, "plugins": plugins}


def image_files_data(data: pl.LightningDataModule, images: str | list[str]) -> pl.LightningDataModule:
    """``predict --images``: the files, folders or patterns as a DataModule that prepares them the way ``data``
    prepares its images (its ``image_transform()``), with its batch size and class names."""
    make = getattr(data, "image_transform", None)
    if make is None:
        raise ValueError(f"--images: {type(data).__name__} has no image_transform() to prepare files")
    images = [images] if isinstance(images, str) else list(images)
    names = getattr(data, "class_names", None)
    return ImageFilesDataModule(images, make(), batch_size=int(getattr(data, "batch_size", 64)), class_names=names)


# ----------------------------------------------------------------------------------------------------------------
# messages
# ----------------------------------------------------------------------------------------------------------------
def summary(trainer: pl.Trainer, log_dir: str | None, validated: bool, results: list[Any] | None = None) -> str:
    """What a fit left behind: test accuracy (after --test_after_fit), logs, best checkpoint, pictures, and a note
    when the run ended before its first validation (``validated`` false), which writes the last two."""
    pictures = next((cb.last_path for cb in trainer.callbacks if isinstance(cb, AttentionVisualizer)), None)  # type: ignore[attr-defined]
    checkpoint = trainer.checkpoint_callback
    best = getattr(checkpoint, "best_model_path", "") or None
    lines = []
    if results is not None:
        acc = results[0].get("test/acc") if results else None
        lines.append(f"test accuracy: {acc:.4f}" if acc is not None else "test accuracy: n/a")
    lines += [
        f"logs:          {log_dir or 'none'}",
        f"best:          {best or 'none'}",
        f"pictures:      {pictures.parent if pictures else 'none'}",
    ]
    if not validated:
        lines.append(
            f"note:          the run ended after {trainer.global_step} steps, before its first validation: no best "
            "checkpoint and no pictures (validate more often with --trainer.val_check_interval)"
        )
    if stall_message(trainer):
        lines.append(f"stalled:       {stall_message(trainer)}")
    return "\n".join(["", *lines, ""])


def one_line(err: BaseException, argv: Sequence[str] = ()) -> str:
    """An error as one line: a worker's or jsonargparse's message reduced to what matters, naming where the key's
    value came from (the command line ``argv`` or its last config file that sets it) or the YAML mistake."""
    configs, text = peek(argv)["config"], str(err).strip()
    # An error raised in a DataLoader worker comes back with the worker's traceback in its message: keep the end.
    if "Original Traceback" in text:
        last = text.splitlines()[-1]
        text = last.split(": ", 1)[1] if ": " in last else last
    if "<unicode string>" in text or text.startswith("Problems parsing config"):
        for path in configs:
            try:
                yaml.safe_load(Path(path).read_text())
            except yaml.MarkedYAMLError as bad:
                mark = bad.problem_mark
                where = f", line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
                return f"{path}{where}: {bad.problem or bad.context}"
            except (OSError, yaml.YAMLError):
                continue
    # A class that refused its arguments, as jsonargparse reports it: the class's own errors, not the union's.
    key = None
    if text.startswith('Parser key "'):
        key = text.split('"', 2)[1]
    if "Does not validate against any of the" in text:
        reasons = [line.strip()[2:] for line in text.splitlines() if line.strip().startswith("- ")]
        reasons = [r for r in reasons if not r.startswith("Expected a <class 'NoneType'>")]
        text = "; ".join(reasons) or text
    elif key is not None:
        text = " ".join(line.strip() for line in text.splitlines()[1:])
    if key is not None:
        given = [i for i, a in enumerate(argv) if a == f"--{key}" or a.startswith(f"--{key}=")]
        value = argv[given[-1]].partition("=")[2] or "".join(argv[given[-1] + 1 : given[-1] + 2]) if given else ""
        text = f"{key}: {text}" + (f" (given as {value!r})" if given else _file_of(key, configs))
    return " ".join(text.split()) or type(err).__name__


def _file_of(key: str, configs: Sequence[str]) -> str:
    # " (in FILE)" for the last config file that sets the dotted key (the one that wins), else "".
    found = ""
    for path in configs:
        with contextlib.suppress(OSError, yaml.YAMLError):
            node: Any = yaml.safe_load(Path(path).read_text())
            for part in key.split("."):
                node = node[part] if isinstance(node, dict) and part in node else KeyError
            if node is not KeyError:
                found = f" (in {path}, which gives {node!r})"
    return found


class AtomicSaveConfig(SaveConfigCallback):
    """Lightning's config.yaml in the run folder, written whole or not at all, except for a predict that has no
    run folder."""

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "predict" and not trainer.loggers:
            return
        # trainer.log_dir is a collective under DDP: every rank asks, as often as the others.
        log_dir = None if self.already_saved else trainer.log_dir
        if not trainer.is_global_zero or log_dir is None:
            super().setup(trainer, pl_module, stage)  # the ranks that write nothing still take part
            return
        final = self.config_filename
        with atomic_path(Path(log_dir) / final) as partial:  # Lightning writes it, under a temporary name
            self.config_filename = partial.name
            try:
                super().setup(trainer, pl_module, stage)
            finally:
                self.config_filename = final
