"""Loaders over :class:`~scenarios.base.ExperienceData` views, sharded by rank.

Training batches are *global* batches of ``data.batch_size`` drawn from one seeded permutation that every rank
computes identically; rank r takes elements r, r + world, ... of each global batch. So N ranks together see exactly
the batches one process would, and DDP's gradient average equals the single-process gradient (without BatchNorm).
The last incomplete global batch is dropped so every rank takes the same number of steps.
Evaluation shards the samples without padding: no sample is counted twice.

Tensor-backed sources are gathered a whole batch at a time (one indexing op, no per-item collate) by
:class:`TensorBatches`; file-backed ones go through a ``DataLoader`` with workers.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset

from scenarios.base import ExperienceData


class RankBatchSampler:
    """Yields this rank's share of each global batch as a list of positions into the view (``tensors=True``: as a
    tensor, for the batch gather, which indexes with it directly)."""

    def __init__(self, n: int, global_batch: int, rank: int = 0, world: int = 1, shuffle: bool = True,
                 seed: int = 0, drop_last: bool = True, tensors: bool = False) -> None:
        if global_batch % world:
            raise ValueError(f"batch size {global_batch} is not divisible by the {world} ranks")
        self.n, self.batch, self.rank, self.world, self.tensors = n, global_batch, rank, world, tensors
        self.shuffle, self.seed, self.drop_last, self.epoch = shuffle, seed, drop_last, 0
        self.start = 0  # batches of the next epoch to skip (a resume inside an epoch); used once

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _tail(self) -> int:
        """Samples in the last, partial batch that is kept (``drop_last=False``): a multiple of the world size, so
        every rank takes the same number of steps (up to ``world - 1`` samples are still dropped under DDP), and
        at least two per rank (a training batch of one breaks BatchNorm; the official loaders would crash there)."""
        share = 0 if self.drop_last else (self.n % self.batch) // self.world
        return share * self.world if share >= 2 else 0

    def __len__(self) -> int:
        return self.n // self.batch + (1 if self._tail() else 0)

    def __iter__(self):
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 1000003 + self.epoch)
            order = torch.randperm(self.n, generator=g)
        else:
            order = torch.arange(self.n)
        full = self.n // self.batch
        start, self.start = self.start, 0
        for b in range(start, len(self)):  # the permutation depends on (seed, epoch) only: skipping is exact
            chunk = order[b * self.batch:(b + 1) * self.batch] if b < full else order[b * self.batch:][:self._tail()]
            mine = chunk[self.rank::self.world]
            yield mine if self.tensors else mine.tolist()


class TrainLoader(DataLoader):
    """A training ``DataLoader`` that Lightning treats as resumable (its ``_Stateful`` protocol).

    The state is where the next epoch starts: ``{"epoch": e, "start": b}``. Lightning loads it before the loader's
    first ``iter()`` of a restarted fit (:mod:`cl.checkpointing`); the first ``b`` batches of epoch ``e``'s
    permutation are then skipped without being loaded. ``state_dict`` cannot know how far training got (Lightning
    prefetches batches ahead of the step), so the step checkpoint writes the position itself.
    """

    def __init__(self, *args: Any, rank_sampler: RankBatchSampler, **kwargs: Any) -> None:
        self.rank_sampler = rank_sampler
        super().__init__(*args, **kwargs)

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.rank_sampler.epoch, "start": self.rank_sampler.start}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.rank_sampler.set_epoch(int(state["epoch"]))
        self.rank_sampler.start = int(state["start"])


class TensorBatches(TrainLoader):
    """Batches of a tensor-backed source, one gather each, without ``DataLoader``'s per-batch machinery (index
    fetcher, collate walk, profiler record: ~20 us a batch, ~2% of a small MLP's step on one CPU core;
    benchmarks/README.md, "Engine overhead").

    Still a ``DataLoader`` to Lightning and to the RNG: ``len`` and the ``sampler`` (whose ``set_epoch`` Lightning
    calls) are the loader's, ``iter()`` draws the base seed a ``DataLoader`` iterator draws from the global generator
    (so the RNG stream, and every result, are those of the plain ``DataLoader``), and for training the
    ``_Stateful`` pair of :class:`TrainLoader` lets a resume inside an epoch skip the batches already trained.
    """

    def __init__(self, view: _BatchView, sampler: Any) -> None:
        super().__init__(view, sampler=sampler, batch_size=None, num_workers=0, rank_sampler=sampler)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:  # type: ignore[override]
        torch.empty((), dtype=torch.int64).random_(generator=self.generator)
        return self._batches()

    def _batches(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        view = self.dataset
        for positions in self.sampler:
            yield view[positions]


class _BatchView(Dataset):
    """``view[list_of_positions]`` -> (images, labels) in one gather (tensor sources)."""

    def __init__(self, data: ExperienceData) -> None:
        self.data = data
        self.indices = torch.as_tensor(np.asarray(data.indices), dtype=torch.long)
        self.targets = torch.as_tensor(np.asarray(data.targets), dtype=torch.long)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, positions: torch.Tensor | list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        pos = torch.as_tensor(positions, dtype=torch.long)
        return self.data.source.batch(self.indices[pos]), self.targets[pos]


class _ItemView(Dataset):
    """Per-item access for file-backed sources (decoded in DataLoader workers)."""

    def __init__(self, data: ExperienceData) -> None:
        self.data = data

    def __len__(self) -> int:
        return len(self.data.indices)

    def __getitem__(self, pos: int) -> tuple[torch.Tensor, int]:
        return self.data.source[int(self.data.indices[pos])], int(self.data.targets[pos])


class _EvalSampler:
    """Positions rank::world, chunked into batches; no padding, no duplicates."""

    def __init__(self, n: int, batch: int, rank: int, world: int) -> None:
        self.pos = list(range(rank, n, world))
        self.batch = batch

    def __len__(self) -> int:
        return (len(self.pos) + self.batch - 1) // self.batch

    def __iter__(self):
        for i in range(0, len(self.pos), self.batch):
            yield self.pos[i:i + self.batch]


def default_workers() -> int:
    """DataLoader workers per rank when ``data.num_workers`` is null: the CPUs this process may use, shared by the
    ranks on this node (``LOCAL_WORLD_SIZE``), at most 8; 0 on a machine with one CPU per rank."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cpus = os.cpu_count() or 1
    per_rank = cpus // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1))
    return min(8, per_rank) if per_rank > 1 else 0


def make_loader(data: ExperienceData, batch_size: int, *, train: bool, rank: int = 0, world: int = 1,
                seed: int = 0, shuffle: bool | None = None, drop_last: bool | None = None,
                num_workers: int | None = None) -> DataLoader | TensorBatches:
    """A loader of raw (untransformed) batches: for training (global batches, sharded) or evaluation (sharded).

    Tensor-backed sources gather whole batches in the main process (no workers: one indexing op is faster than
    any IPC). File-backed sources decode and augment per image in ``num_workers`` worker processes (null: see
    :func:`default_workers`), persistent across the epochs of one fit, pinned for a GPU.
    """
    n = len(data)
    batched = hasattr(data.source, "batch")
    if train:
        drop = True if drop_last is None else drop_last
        if drop and n < batch_size:  # a tiny experience still trains: shrink the global batch to what exists
            batch_size = max(world, (n // world) * world)
        sampler: Any = RankBatchSampler(n, batch_size, rank, world, shuffle=True if shuffle is None else shuffle,
                                        seed=seed, drop_last=drop, tensors=batched)
    else:
        sampler = _EvalSampler(n, batch_size, rank, world)
    if batched:
        return TensorBatches(_BatchView(data), sampler)
    cls: Any = DataLoader
    extra: dict[str, Any] = {}
    if train:
        cls, extra = TrainLoader, {"rank_sampler": sampler}
    workers = default_workers() if num_workers is None else int(num_workers)
    return cls(_ItemView(data), batch_sampler=sampler, num_workers=workers,
               persistent_workers=workers > 0, pin_memory=torch.cuda.is_available(), **extra)


class ExperienceDataModule(pl.LightningDataModule):
    """The training data of one phase as a ``LightningDataModule`` (Lightning's sampler replacement is off)."""

    def __init__(self, data: ExperienceData, batch_size: int, rank: int, world: int, seed: int,
                 num_workers: int | None = None, drop_last: bool = True) -> None:
        super().__init__()
        self.data, self.batch_size, self.rank, self.world, self.seed = data, batch_size, rank, world, seed
        self.num_workers, self.drop_last = num_workers, drop_last

    def train_dataloader(self) -> DataLoader | TensorBatches:
        return make_loader(self.data, self.batch_size, train=True, rank=self.rank, world=self.world,
                           seed=self.seed, num_workers=self.num_workers, drop_last=self.drop_last)


class ConcatSource:
    """Several sources behind one index space (source k's item i is at ``offsets[k] + i``)."""

    def __init__(self, sources: list[Any]) -> None:
        self.sources = sources
        self.offsets = np.cumsum([0] + [len(src) for src in sources])
        self.targets = np.concatenate([np.asarray(src.targets) for src in sources])
        if all(hasattr(src, "batch") for src in sources):
            self.batch = self._batch

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def _locate(self, i: int) -> tuple[int, int]:
        k = int(np.searchsorted(self.offsets, i, side="right") - 1)
        return k, i - int(self.offsets[k])

    def __getitem__(self, i: int) -> torch.Tensor:
        k, j = self._locate(int(i))
        return self.sources[k][j]

    def _batch(self, indices: torch.Tensor) -> torch.Tensor:
        idx = indices.numpy()
        which = np.searchsorted(self.offsets, idx, side="right") - 1
        out: torch.Tensor | None = None
        for k in np.unique(which):
            sel = np.flatnonzero(which == k)
            part = self.sources[k].batch(torch.as_tensor(idx[sel] - self.offsets[k]))
            if out is None:
                out = part.new_empty((len(idx), *part.shape[1:]))
            out[torch.as_tensor(sel)] = part
        assert out is not None
        return out


def concat(parts: list[ExperienceData]) -> ExperienceData:
    """Union of views (the ``joint`` baseline); views over different sources go through a :class:`ConcatSource`."""
    sources: list[Any] = []
    for p in parts:
        if not any(p.source is s for s in sources):
            sources.append(p.source)
    targets = np.concatenate([p.targets for p in parts])
    if len(sources) == 1:
        return ExperienceData(sources[0], np.concatenate([p.indices for p in parts]), targets)
    cat = ConcatSource(sources)
    offset = {id(s): int(cat.offsets[k]) for k, s in enumerate(sources)}
    return ExperienceData(cat, np.concatenate([p.indices + offset[id(p.source)] for p in parts]), targets)
