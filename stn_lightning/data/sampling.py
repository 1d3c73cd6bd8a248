"""The DataModules' loaders; under DDP every validation, test and prediction sample on exactly one rank.

Lightning's default for a distributed run is torch's DistributedSampler, which pads the dataset with repeated
samples until every rank has the same count: with 3 ranks the 1,000 test digits become 1,002, and the reported
accuracy counts two of them twice (Lightning warns about it during ``trainer.test``). The evaluation loaders of
this package's DataModules give Lightning a sampler that splits the indices without padding instead (ranks may
differ by one sample, and so by at most one batch). That is safe here because nothing in evaluation waits on the
other ranks per batch: the metrics (torchmetrics) and the epoch-level logged values are reduced once, at the end
of the epoch, and DDP syncs buffers only on the first forward after training.
"""

from __future__ import annotations

from typing import Any

from pytorch_lightning.overrides.distributed import UnrepeatedDistributedSampler
from torch.utils.data import DataLoader, Dataset, Sampler

__all__ = ["evaluation_sampler", "make_loader"]


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
    return DataLoader(
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
    )


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
