"""The training batches of an Evolved Sampling trainer: dataset ids through the user's collator, and the epoch plan
presented to the Trainer's loop.

The Trainer sizes every epoch by one number, ``len(train_dataloader)``, and steps the optimizer after every
``gradient_accumulation_steps`` micro-batches of that count and after its last one. ES epochs differ in length
(pruned and resumed ones are shorter), so :class:`PlanLoader` reports the longest epoch of the plan and yields the
current epoch's batches only; :class:`EpochBatches` counts what the Trainer's loop has been handed, so that the
micro-batches of each optimizer step end exactly where the Trainer steps (see :meth:`EpochBatches.slots`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

from es_kernels.train.loop import EvolvedTraining

INDEX_KEY = "es_index"  # the batch key that carries dataset ids from the sampler to the selection, never to the model


class WithIndex(Dataset):
    """Each item is the wrapped item's dict plus its dataset id under :data:`INDEX_KEY`."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict[str, Any]:
        item = self.dataset[index]
        if not isinstance(item, dict):
            raise TypeError(f"train_dataset items must be dicts (the Trainer's format), got {type(item).__name__}")
        if INDEX_KEY in item:
            raise ValueError(f"train_dataset items already have a {INDEX_KEY!r} key, which Evolved Sampling uses")
        return {**item, INDEX_KEY: index}


class IndexCollator:
    """Takes the ids out of the features, lets the Trainer's collator (the user's, behind the Trainer's column
    removal) build the batch, and puts them back as a tensor: any collator works and never sees the id."""

    def __init__(self, collator: Callable) -> None:
        self.collator = collator

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        ids = [feature[INDEX_KEY] for feature in features]
        batch = self.collator([{k: v for k, v in feature.items() if k != INDEX_KEY} for feature in features])
        batch[INDEX_KEY] = torch.tensor(ids, dtype=torch.int64)
        return batch


def plan_dataloader(trainer_loader: DataLoader, evolved: EvolvedTraining, batch_size: int, drop_last: bool):
    """The Trainer's training loader with the ES sampler in place of its own and the ids added.

    Built from the loader ``Trainer.get_train_dataloader`` made, so its dataset (columns already removed for a
    ``datasets.Dataset``), collator (``remove_unused_columns`` for other datasets, with any subclass's column rules)
    and worker settings are the Trainer's. It is not passed through ``accelerator.prepare``: the ES sampler shards
    over the ranks itself, and accelerate's ``BatchSamplerShard`` would shard it a second time.
    """
    return DataLoader(
        WithIndex(trainer_loader.dataset),
        batch_size=batch_size,
        sampler=evolved.sampler,
        collate_fn=IndexCollator(trainer_loader.collate_fn),
        drop_last=drop_last,
        num_workers=trainer_loader.num_workers,
        pin_memory=trainer_loader.pin_memory,
        timeout=trainer_loader.timeout,
        worker_init_fn=trainer_loader.worker_init_fn,
        multiprocessing_context=trainer_loader.multiprocessing_context,
        prefetch_factor=trainer_loader.prefetch_factor,
        persistent_workers=trainer_loader.persistent_workers,
    )


class Padding(dict):
    """A micro-batch with no rows: it holds the Trainer's step counter in place (see :meth:`EpochBatches.slots`)
    and trains nothing."""


class EpochBatches:
    """One pass of the Trainer's epoch loop over the current ES epoch; ``handed`` counts the micro-batches (padding
    included) the Trainer has been given in this pass."""

    def __init__(self, batches: Iterator[dict[str, Any]], length: int) -> None:
        self._batches = batches
        self.length = length
        self.handed = 0

    def __iter__(self) -> EpochBatches:
        return self

    def __next__(self) -> dict[str, Any]:
        return next(self._batches)

    def take(self, count: int) -> list[dict[str, Any]]:
        """Up to ``count`` more batches of the epoch (fewer at its end, none after it)."""
        taken = []
        for batch in self._batches:
            taken.append(batch)
            if len(taken) == count:
                break
        return taken

    def slots(self, accumulation: int) -> int:
        """Micro-batches the Trainer takes from here to its next optimizer step: it steps after every
        ``accumulation``-th micro-batch of the pass and after the ``length``-th (its last). A shorter step (the
        partial accumulation at an ES epoch's end) is padded in front with :class:`Padding` up to this count, so
        its last real micro-batch is the one the Trainer steps after (and the one DDP synchronises)."""
        boundary = (self.handed // accumulation + 1) * accumulation
        return min(boundary, self.length) - self.handed


class PlanLoader:
    """What ``get_train_dataloader`` returns: ``len()`` is the plan's longest epoch, by which the Trainer sizes the
    loop of every epoch (its scheduler and ``max_steps`` get the plan's own step count); iteration yields what is
    left of the current ES epoch, which the trainer's epoch callback moves on at each Trainer epoch start."""

    def __init__(self, loader: DataLoader, evolved: EvolvedTraining, length: int) -> None:
        self.loader = loader
        self.dataset = loader.dataset
        self.evolved = evolved
        self.length = length

    def __len__(self) -> int:
        return self.length

    def __iter__(self) -> EpochBatches:
        sampler = self.evolved.sampler
        if sampler.position >= sampler.shard_size(sampler.epoch):  # the last epoch is done: the plan is complete
            return EpochBatches(iter(()), self.length)
        return EpochBatches(iter(self.loader), self.length)
