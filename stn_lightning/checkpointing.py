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
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from lightning_fabric.plugins.io.torch_io import TorchCheckpointIO
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.utilities.exceptions import SIGTERMException
from pytorch_lightning.utilities.rank_zero import rank_zero_info
from torch import Tensor

__all__ = [
    "AtomicCheckpointIO",
    "NonFiniteError",
    "RNGStateCallback",
    "STNCheckpoint",
    "find_last_checkpoint",
    "nonfinite_entries",
    "read_checkpoint",
    "state_dict_differences",
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


def _fsync_folder(folder: str) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # some filesystems do not open folders
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


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
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(tmp, 0o666 & ~umask)  # mkstemp's 0600 would make checkpoints private to the user
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        _fsync_folder(str(target.parent))

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

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        # SIGTERM: save where we are so that `--ckpt_path last` continues. Any other exception (a NaN, a bug)
        # leaves the checkpoints as they were: the state at the error is not one to continue from.
        if isinstance(exception, SIGTERMException) and self.save_last and not getattr(trainer, "fast_dev_run", False):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
            rank_zero_info(f"SIGTERM: saved {self.last_model_path} at step {trainer.global_step}")


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
