"""The DataModules' loaders; under DDP every validation, test and prediction sample on exactly one rank.

Lightning's default for a distributed run is torch's DistributedSampler, which pads the dataset with repeated
samples until every rank has the same count: with 3 ranks the 1,000 test digits become 1,002, and the reported
accuracy counts two of them twice (Lightning warns about it during ``trainer.test``). The evaluation loaders of
this package's DataModules give Lightning a sampler that splits the indices without padding instead (ranks may
differ by one sample, and so by at most one batch). That is safe here because nothing in evaluation waits on the
other ranks per batch: the metrics (torchmetrics) and the epoch-level logged values are reduced once, at the end
of the epoch, and DDP syncs buffers only on the first forward after training.

The training loader is a :class:`ResumableLoader`: a checkpoint saved mid-epoch (a step checkpoint, SIGTERM,
Ctrl-C) holds the seed of the epoch's order and how many of its batches were trained on, so a resumed run trains on
exactly the rest of that epoch, in the same order, as the uninterrupted run would have.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterator
from typing import Any

import torch
from pytorch_lightning.overrides.distributed import UnrepeatedDistributedSampler
from torch.utils.data import DataLoader, Dataset, Sampler

__all__ = ["ResumableLoader", "SplitLoaders", "evaluation_sampler", "make_loader", "resume_training_loader"]

# Loader states read from a checkpoint, by trainer, for the trainer's next training iterator (resume_training_loader).
_RESUME: weakref.WeakKeyDictionary[Any, dict[str, Any]] = weakref.WeakKeyDictionary()


def resume_training_loader(trainer: Any, state: dict[str, Any]) -> None:
    """Give the next training iterator of ``trainer``'s :class:`ResumableLoader` this saved state.

    Lightning hands a resumable loader its state only when it builds the loader after restoring the loops; a
    module whose optimiser asks for ``trainer.estimated_stepping_batches`` makes Lightning build the loader, and its
    first iterator, earlier, before the checkpoint's loops are read, and the state never arrives. The checkpoint
    callbacks pass it here when they are restored, which comes before either.
    """
    _RESUME[trainer] = state


def make_loader(dataset: Dataset | None, trainer: Any, batch_size: int, num_workers: int, shuffle: bool) -> DataLoader:
    """A DataModule's loader: shuffled and without the last short batch for training, in order for evaluation.

    Args:
        dataset: the stage's dataset; None means setup() has not run for that stage.
        trainer: the DataModule's trainer, or None (pins memory when it runs on a GPU).
        batch_size: images per batch.
        num_workers: loader processes (kept alive between epochs when there are any).
        shuffle: True for the training loader.
    """
    if dataset is None:
        raise RuntimeError("call setup() with the matching stage before asking for a DataLoader")
    loader = ResumableLoader if shuffle else DataLoader
    extra = {"trainer": trainer} if shuffle else {}
    return loader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        # Under DDP each evaluation sample on one rank only, without DistributedSampler's padding.
        sampler=None if shuffle else evaluation_sampler(dataset, trainer),
        num_workers=num_workers,
        pin_memory=trainer is not None and trainer.strategy.root_device.type == "cuda",
        persistent_workers=num_workers > 0,
        # A last training batch of one image would make batch statistics (the transformers' feature norm,
        # BatchNorm in the backbone) undefined; shuffling spreads the dropped remainder over epochs.
        drop_last=shuffle and len(dataset) > batch_size,  # type: ignore[arg-type]
        **extra,
    )


class SplitLoaders:
    """The four loaders of a DataModule that keeps its splits in ``train_set``, ``val_set`` and ``test_set`` (set by
    its ``setup``) and its loader options in ``batch_size`` and ``num_workers``; prediction reads the test set.
    Put it before LightningDataModule in the bases, so that its loaders are the ones Lightning calls."""

    train_set: Dataset | None
    val_set: Dataset | None
    test_set: Dataset | None
    batch_size: int
    num_workers: int
    trainer: Any

    def _loader(self, dataset: Dataset | None, shuffle: bool) -> DataLoader:
        return make_loader(dataset, self.trainer, self.batch_size, self.num_workers, shuffle)

    def train_dataloader(self) -> DataLoader:
        """The training set, shuffled, resumable mid-epoch."""
        return self._loader(self.train_set, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        """The validation set, in order."""
        return self._loader(self.val_set, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        """The test set, in order."""
        return self._loader(self.test_set, shuffle=False)

    def predict_dataloader(self) -> DataLoader:
        """The test set, in order."""
        return self._loader(self.test_set, shuffle=False)


def evaluation_sampler(dataset: Dataset, trainer: Any) -> Sampler | None:
    """This rank's share of ``dataset``, each sample on one rank only, in order; None outside a distributed run.

    Args:
        dataset: a map-style dataset with ``__len__``.
        trainer: the DataModule's trainer, or None.

    Returns:
        None (the DataLoader's own sequential sampler) without a trainer, with one process, or when the user
        turned Lightning's distributed sampler off (``use_distributed_sampler=False``: the user shards the data).
    """
    if trainer is None:
        return None
    kwargs = trainer.distributed_sampler_kwargs  # None unless the strategy runs several processes
    # Trainer(use_distributed_sampler=...) has no public getter; without the attribute Lightning's default holds.
    wanted = getattr(getattr(trainer, "_accelerator_connector", None), "use_distributed_sampler", True)
    if not kwargs or kwargs.get("num_replicas", 1) <= 1 or not wanted:
        return None
    return UnrepeatedDistributedSampler(dataset, shuffle=False, **kwargs)


class _Skipping:
    """A batch sampler without its first ``skip`` batches; its length is still the whole epoch's (Lightning counts
    the batches trained before the checkpoint as fetched)."""

    def __init__(self, base: Any, skip: int) -> None:
        self.base, self.skip = base, skip

    def __len__(self) -> int:
        return len(self.base)

    def __iter__(self) -> Iterator[Any]:
        batches = iter(self.base)
        for _ in range(self.skip):  # indices only: the skipped images are not read
            next(batches, None)
        yield from batches


class ResumableLoader(DataLoader):
    """A training DataLoader that Lightning can resume mid-epoch (it has ``state_dict`` / ``load_state_dict``).

    Each epoch's order comes from a seed drawn from torch's global generator when the epoch's iterator is made (as
    DataLoader's own shuffling does); the state saved with a checkpoint is that seed and the number of batches the
    epoch has trained on (Lightning's count). Resumed from a mid-epoch checkpoint, the next iterator uses the saved
    seed and leaves out those batches, so the run goes on with exactly the rest of the epoch; at an epoch's end
    nothing is left out and the next epoch draws its seed as the uninterrupted run does (the global random states
    travel in the checkpoint too, :class:`~stn_lightning.checkpointing.RNGStateCallback`). Under DDP Lightning's
    DistributedSampler orders each epoch from the run's seed and the epoch; the batches trained are left out the
    same way.

    Args:
        *args: DataLoader's arguments.
        trainer: the trainer whose progress says how many batches of the epoch were trained on, or None.
        **kwargs: DataLoader's arguments; ``generator`` defaults to a generator of the loader's own.
    """

    def __init__(self, *args: Any, trainer: Any = None, **kwargs: Any) -> None:
        if kwargs.get("generator") is None:
            kwargs["generator"] = torch.Generator()
        super().__init__(*args, **kwargs)
        self.trainer = trainer
        self._seed: int | None = None
        self._skip = 0
        self._pending: tuple[int, int] | None = None

    def __iter__(self) -> Any:
        saved = _RESUME.pop(self.trainer, None) if self.trainer is not None else None
        if saved is not None and self._pending is None:
            self.load_state_dict(saved)
        pending, self._pending = self._pending, None
        if pending is not None:
            self._seed, self._skip = pending
        else:
            self._seed, self._skip = int(torch.empty((), dtype=torch.int64).random_().item()), 0
        assert self.generator is not None
        self.generator.manual_seed(self._seed)
        return super().__iter__()

    @property
    def _index_sampler(self) -> Any:  # DataLoader's source of batch indices for each new iterator
        base = super()._index_sampler
        return _Skipping(base, self._skip) if self._skip else base

    def state_dict(self) -> dict[str, Any]:
        """The epoch's seed, the batches it has trained on and the epoch's length in batches (Lightning saves it)."""
        trainer = self.trainer
        progress = getattr(getattr(getattr(trainer, "fit_loop", None), "epoch_loop", None), "batch_progress", None)
        consumed = int(progress.current.ready) if progress is not None else 0
        batches = getattr(trainer, "num_training_batches", None)
        total = int(batches) if isinstance(batches, int) else len(self)
        return {"seed": self._seed, "consumed": consumed, "batches": total}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Resume mid-epoch: the next iterator repeats the saved epoch's order without the batches trained on."""
        seed, consumed, total = state_dict.get("seed"), state_dict.get("consumed", 0), state_dict.get("batches", 0)
        self._pending = (int(seed), int(consumed)) if seed is not None and 0 < consumed < total else None
