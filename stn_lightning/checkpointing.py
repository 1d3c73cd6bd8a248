"""Checkpoints that survive: atomic writes, a ``last.ckpt`` that is always the latest state, exact resumption.

* :class:`AtomicCheckpointIO` writes each checkpoint to a temporary file in the target folder, flushes it to disk
  and renames it over the old one, so a kill during a write leaves the previous file intact. It refuses to write
  a model state that holds NaN or inf, so a diverged run never replaces a good checkpoint.
* :class:`STNCheckpoint` is Lightning's ``ModelCheckpoint`` with ``last.ckpt`` refreshed after every epoch and at
  the end of training (Lightning 2.6 refreshes it only when a top-k checkpoint was written, so it often holds
  the first epoch), optionally every N training steps, and on SIGTERM (what SLURM sends before preemption).
* :class:`RNGStateCallback` stores the global random states (torch, CUDA, NumPy, Python) in each checkpoint and
  restores them on resume, so the shuffling and dropout of a resumed run follow the uninterrupted one.
* :func:`find_last_checkpoint` finds the newest ``last.ckpt`` under a log folder (``--ckpt_path last``), and
  :func:`read_checkpoint` / :func:`state_dict_differences` turn bad checkpoint files into clear messages.

Checkpoints are always loaded with ``weights_only=True``: nothing in them is unpickled as an arbitrary object.
"""

from __future__ import annotations

import os
import random
import signal
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from lightning_fabric.plugins.io.torch_io import TorchCheckpointIO
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.utilities.exceptions import SIGTERMException
from torch import Tensor

from .writing import WriteFailed, atomic_write

__all__ = [
    "AtomicCheckpointIO",
    "NonFiniteError",
    "RNGStateCallback",
    "STNCheckpoint",
    "find_last_checkpoint",
    "nonfinite_entries",
    "read_checkpoint",
    "state_dict_differences",
    "stop_report",
]


class NonFiniteError(RuntimeError):
    """A batch, a loss, a gradient or a model state holds NaN or inf."""


def nonfinite_entries(state: Mapping[str, Any]) -> list[str]:
    """Names of the floating-point tensors in ``state`` that hold NaN or inf."""
    return [
        name
        for name, value in state.items()
        if isinstance(value, Tensor) and value.is_floating_point() and not bool(torch.isfinite(value).all())
    ]


class AtomicCheckpointIO(TorchCheckpointIO):
    """``torch.save`` to a temporary file next to the target, flush, fsync, rename; never a non-finite state.

    Remote paths (``s3://`` and the like) go through Lightning's own writer.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        bad = nonfinite_entries(checkpoint.get("state_dict", {}))
        if bad:
            shown = ", ".join(bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
            raise NonFiniteError(f"refusing to write {path}: the model state has NaN or inf in {shown}")
        if "://" in str(path):
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} does not take storage_options")
        with atomic_write(path, "wb") as f:
            torch.save(checkpoint, f)

    def load_checkpoint(self, path: Any, map_location: Any = None, weights_only: bool | None = True) -> dict[str, Any]:
        # Never unpickle arbitrary objects, whatever the caller asks.
        return super().load_checkpoint(path, map_location=map_location, weights_only=True)


class STNCheckpoint(ModelCheckpoint):
    """ModelCheckpoint whose ``last.ckpt`` is always the latest state.

    Top-k checkpoints follow ``monitor`` as in Lightning. ``last.ckpt`` (with ``save_last=True``) is written after
    every training epoch (after its validation when there is one), at the end of training, every
    ``last_every_n_steps`` optimiser steps if set, and when the run receives SIGTERM; fast_dev_run writes nothing.
    Resuming from an epoch-end ``last.ckpt`` reproduces the uninterrupted run; resuming from a step or SIGTERM
    checkpoint continues at that step, with the rest of that epoch's batches in Lightning's order.

    Args:
        last_every_n_steps: also refresh ``last.ckpt`` every this many optimiser steps; None for epochs only.
        **kwargs: ``ModelCheckpoint``'s arguments.
    """

    def __init__(self, *args: Any, last_every_n_steps: int | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if last_every_n_steps is not None and last_every_n_steps < 1:
            raise ValueError(f"expected last_every_n_steps >= 1 or None, got {last_every_n_steps}")
        self.last_every_n_steps = last_every_n_steps
        self._last_written_step = -1
        self._ctrl_c: _CtrlC | None = None

    def _write_last(self, trainer: pl.Trainer) -> None:
        if not self.save_last or getattr(trainer, "fast_dev_run", False) or trainer.sanity_checking:
            return
        if trainer.state.fn != "fit" or self._last_written_step == trainer.global_step:
            return
        # ModelCheckpoint skips its top-k save at a step where it has already saved; this extra write of
        # last.ckpt must not count as that save, or the best checkpoint of this step would be lost.
        saved_at = self._last_global_step_saved
        self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
        self._last_global_step_saved = saved_at

    def _save_last_checkpoint(self, trainer: pl.Trainer, monitor_candidates: dict[str, Tensor]) -> None:
        super()._save_last_checkpoint(trainer, monitor_candidates)
        self._last_written_step = trainer.global_step

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any, **kwargs: Any) -> None:
        super().on_train_batch_end(trainer, pl_module, *args, **kwargs)
        n = self.last_every_n_steps
        self._agree_on_ctrl_c(trainer)
        if n is not None and trainer.global_step % n == 0:
            self._write_last(trainer)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Lightning runs the epoch's validation before this hook, so its metrics are in the checkpoint.
        super().on_train_epoch_end(trainer, pl_module)
        self._write_last(trainer)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_validation_end(trainer, pl_module)
        # At an epoch's end ModelCheckpoint may save its top-k in on_train_epoch_end, which comes next.
        if not self._should_save_on_train_epoch_end(trainer):
            self._write_last(trainer)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._write_last(trainer)

    def _save_checkpoint(self, trainer: pl.Trainer, filepath: str) -> None:
        # Rank 0 writes; a write that fails stops training on every rank (a run that goes on without the checkpoint
        # it meant to write cannot be resumed where it says), with one line naming the file and the reason. Under
        # DDP the other ranks wait in the save's barrier: rank 0 joins it, then tells them what failed.
        failure: tuple[str, str] | None = None
        try:
            super()._save_checkpoint(trainer, filepath)
        except (WriteFailed, NonFiniteError) as err:
            if trainer.world_size == 1:
                raise self._stopping(trainer, err) from None
            trainer.strategy.barrier("Trainer.save_checkpoint")
            failure = (type(err).__name__, getattr(err, "reason", str(err)))
        if trainer.world_size > 1:
            failure = trainer.strategy.broadcast(failure, src=0)
            if failure is not None:
                kind, reason = failure
                made = WriteFailed(filepath, reason) if kind == "WriteFailed" else NonFiniteError(reason)
                raise self._stopping(trainer, made) from None

    @staticmethod
    def _stopping(trainer: pl.Trainer, err: BaseException) -> BaseException:
        if not isinstance(err, WriteFailed):
            return err
        stopped = WriteFailed(
            err.filename,
            f"{err.reason}; training stopped at step {trainer.global_step}, since it cannot go on safely without "
            "its checkpoint (the earlier file is unchanged)",
        )
        stopped.errno = err.errno
        return stopped

    # ------------------------------------------------------------------------------------------------------------
    # stopping on a signal: SIGTERM (Lightning's) and Ctrl-C (SIGINT, here) save last.ckpt at the current step
    # ------------------------------------------------------------------------------------------------------------
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        global _STOP
        _STOP = None
        if stage == "fit":
            self._ctrl_c = _CtrlC(trainer)
            self._ctrl_c.install()

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().teardown(trainer, pl_module, stage)
        if self._ctrl_c is not None:
            self._ctrl_c.uninstall()
            self._ctrl_c = None

    def _agree_on_ctrl_c(self, trainer: pl.Trainer) -> None:
        # Under DDP a Ctrl-C may reach the ranks at different moments (or one rank only, with kill -INT): after
        # each step every rank learns whether any got one, so that all stop after the same step (Lightning's own
        # check after the step raises SIGTERMException on each) and one checkpoint is written.
        ctrl_c = self._ctrl_c
        if ctrl_c is None or trainer.world_size == 1:
            return
        flag = torch.tensor([1.0 if ctrl_c.requested else 0.0], device=trainer.strategy.root_device)
        if float(trainer.strategy.reduce(flag, reduce_op="sum")) > 0:
            ctrl_c.requested = True
            trainer._signal_connector.received_sigterm = True  # Lightning's flag, read after the step

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        # SIGTERM or a first Ctrl-C: save where we are so that `--ckpt_path last` continues. Any other exception (a
        # NaN, a bug, a second Ctrl-C) leaves the checkpoints as they were: the state at the error is not one to
        # continue from.
        if not isinstance(exception, SIGTERMException):
            return
        global _STOP
        ctrl_c = self._ctrl_c
        name = "Ctrl-C" if ctrl_c is not None and ctrl_c.requested else "SIGTERM"
        saved = None
        if self.save_last and not getattr(trainer, "fast_dev_run", False):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
            saved = self.last_model_path
        _STOP = (name, trainer.global_step, saved)


class _CtrlC:
    """SIGINT handler during fit: the first Ctrl-C asks the run to stop after the current step, as SIGTERM does;
    a second one raises KeyboardInterrupt at once (Lightning then stops without a checkpoint)."""

    def __init__(self, trainer: pl.Trainer) -> None:
        self.trainer = trainer
        self.requested = False
        self.previous: Any = None
        self.installed = False

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        self.previous = signal.getsignal(signal.SIGINT)
        signal.signal(signal.SIGINT, self)
        self.installed = True

    def uninstall(self) -> None:
        previous = self.previous if self.previous is not None else signal.default_int_handler
        if self.installed and signal.getsignal(signal.SIGINT) is self:
            signal.signal(signal.SIGINT, previous)
        self.installed = False

    def __call__(self, signum: int, frame: Any) -> None:
        if not self.installed or self.requested:
            self.uninstall()
            raise KeyboardInterrupt
        self.requested = True
        if self.trainer.world_size == 1:
            self.trainer._signal_connector.received_sigterm = True  # Lightning's SIGTERM flag: stop after the step
        if self.trainer.global_rank == 0:
            # os.write: print() is not safe inside a signal handler (it may interrupt another print)
            os.write(2, b"\nCtrl-C: stopping after this step and saving last.ckpt (Ctrl-C again stops at once)\n")


#: How the last run stopped on a signal: (what stopped it, the step, the checkpoint written or None).
_STOP: tuple[str, int, str | None] | None = None


def stop_report() -> tuple[str, int]:
    """The line to print after a run stopped by SIGTERM or Ctrl-C, and the exit status (143 or 130)."""
    name, step, saved = _STOP if _STOP is not None else ("SIGTERM", None, None)
    code = 130 if name == "Ctrl-C" else 143
    at = f" at step {step}" if step is not None else ""
    if saved:
        return f"stopped by {name}{at}; the state is saved in {saved}: continue with --ckpt_path last", code
    return f"stopped by {name}{at}; no last.ckpt was written (checkpoint.save_last is off)", code


# ----------------------------------------------------------------------------------------------------------------
# global random states
# ----------------------------------------------------------------------------------------------------------------
def _rng_states() -> dict[str, Any]:
    # Only tensors, ints and strings, so that weights-only loading reads them back.
    version, state, gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    states: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": {"version": version, "state": torch.tensor(state, dtype=torch.int64), "gauss": gauss},
        "numpy": {
            "name": np_name,
            "keys": torch.from_numpy(np.asarray(np_keys, dtype=np.int64)),
            "pos": int(np_pos),
            "has_gauss": int(np_has_gauss),
            "gauss": float(np_gauss),
        },
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def _set_rng_states(states: Mapping[str, Any]) -> None:
    torch.set_rng_state(states["torch"])
    py = states["python"]
    random.setstate((py["version"], tuple(int(v) for v in py["state"].tolist()), py["gauss"]))
    npy = states["numpy"]
    keys = npy["keys"].numpy().astype(np.uint32)
    np.random.set_state((npy["name"], keys, npy["pos"], npy["has_gauss"], npy["gauss"]))
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


class RNGStateCallback(pl.Callback):
    """Save the global random states of this process in every checkpoint and restore them on resume.

    Lightning restores weights, optimiser, schedulers and loop counters but not the random generators, so a resumed
    run shuffles and drops out differently from the run it continues. Under DDP only rank 0 writes the file, so
    only rank 0's states come back; the other ranks keep their seeded states (DistributedSampler shuffles from
    its seed and the epoch, and the DataModules' distortion generators are seeded per rank and epoch, so neither
    depends on them). On resume it also hands the training loader
    (:class:`~stn_lightning.data.sampling.ResumableLoader`) its saved place in the epoch, which Lightning does not
    deliver when the optimiser estimates the stepping batches.
    """

    key = "rng_states"

    def state_dict(self) -> dict[str, Any]:
        return {}

    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        checkpoint[self.key] = {"rank": trainer.global_rank, "states": _rng_states()}

    def on_load_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        saved = checkpoint.get(self.key)
        if saved is not None and saved.get("rank") == trainer.global_rank:
            _set_rng_states(saved["states"])
        # And the training loader's place in its epoch (stn_lightning.data.sampling.ResumableLoader).
        from .data.sampling import resume_training_loader

        fit_loop = (checkpoint.get("loops") or {}).get("fit_loop") or {}
        loaders = (fit_loop.get("state_dict") or {}).get("combined_loader") or []
        if len(loaders) == 1 and isinstance(loaders[0], dict) and "consumed" in loaders[0]:
            resume_training_loader(trainer, loaders[0])


# ----------------------------------------------------------------------------------------------------------------
# finding and checking checkpoint files
# ----------------------------------------------------------------------------------------------------------------
def find_last_checkpoint(root: str | os.PathLike[str]) -> Path | None:
    """The most recently written ``last*.ckpt`` under ``root`` (e.g. ``lightning_logs``), or None.

    The runs of one log folder are ``root/version_N/checkpoints/``; every folder below ``root`` is searched, so
    other layouts work too.
    """
    root = Path(root)
    if not root.is_dir():
        return None
    candidates = [p for p in root.rglob("last*.ckpt") if p.is_file() and p.stat().st_size > 0]
    return max(candidates, key=lambda p: p.stat().st_mtime_ns, default=None)


def read_checkpoint(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Load a Lightning checkpoint weights-only, or raise ValueError saying what is wrong with the file."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"checkpoint {path} does not exist" + (" (it is a folder)" if path.is_dir() else ""))
    if path.stat().st_size == 0:
        raise ValueError(f"checkpoint {path} is empty (0 bytes)")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises RuntimeError, pickle.UnpicklingError, EOFError, zipfile errors...
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        if "weights_only" in str(err) or "Unsupported global" in str(err):
            reason = "it holds Python objects that weights-only loading refuses to unpickle"
        raise ValueError(f"cannot read checkpoint {path}: {reason} (truncated, or not a checkpoint?)") from None
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise ValueError(f"{path} is not a Lightning checkpoint (no 'state_dict' in it)")
    return checkpoint


def state_dict_differences(expected: Mapping[str, Tensor], found: Mapping[str, Any], limit: int = 5) -> list[str]:
    """What differs between a model's state_dict and a checkpoint's: missing and unexpected keys, other shapes."""
    missing = [k for k in expected if k not in found]
    unexpected = [k for k in found if k not in expected]
    shapes = [
        f"{k}: model {tuple(v.shape)}, checkpoint {tuple(found[k].shape)}"
        for k, v in expected.items()
        if k in found and isinstance(found[k], Tensor) and tuple(found[k].shape) != tuple(v.shape)
    ]

    def listed(title: str, items: list[str]) -> list[str]:
        if not items:
            return []
        more = f" (and {len(items) - limit} more)" if len(items) > limit else ""
        return [f"{title}: {', '.join(items[:limit])}{more}"]

    return (
        listed("shapes differ", shapes)
        + listed("missing in the checkpoint", missing)
        + listed("not in the model", unexpected)
    )
