"""Deterministic, resumable batching of a ShardDataset over ranks and epochs.

Epoch e uses one permutation of all samples, drawn from (seed, e) only. Global batch k of the epoch
is the permutation's slice `[k*B*W, (k+1)*B*W)` for batch size B and world size W; rank r takes its
part `[r*B, (r+1)*B)`. So ranks are disjoint, every rank gets the same number of batches, and the
fewer than B*W samples left at the end of a permutation are skipped in that epoch (a different set
each epoch). The position (epoch, batches consumed) is all a checkpoint needs: after
`load_state_dict` the loader yields exactly the batches an uninterrupted one would have, with or
without worker processes (a torch DataLoader runs underneath; the sampler simply starts at the
first batch not yet consumed).
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from lunaris.data.shards import ShardDataset
from lunaris.errors import DataError


def epoch_permutation(num_samples: int, seed: int, epoch: int) -> np.ndarray:
    """The sample order of one epoch: a permutation of range(num_samples) determined by (seed, epoch)."""
    rng = np.random.default_rng([seed % 2**64, epoch])
    order = np.arange(num_samples, dtype=np.int32 if num_samples < 2**31 else np.int64)  # int32 halves memory
    rng.shuffle(order)
    return order


class EpochBatchSampler(Sampler):
    """Yields this rank's lists of sample indices for one epoch, from batch `start_batch` on."""

    def __init__(self, num_samples: int, batch_size: int, rank: int, world_size: int, seed: int, shuffle: bool = True):
        self.num_samples, self.batch_size = num_samples, batch_size
        self.rank, self.world_size, self.seed, self.shuffle = rank, world_size, seed, shuffle
        self.epoch, self.start_batch = 0, 0
        self._cached = (None, None)  # (epoch, order): the permutation is reused across resumes of an epoch

    @property
    def batches_per_epoch(self) -> int:
        return self.num_samples // (self.batch_size * self.world_size)

    def set_position(self, epoch: int, start_batch: int) -> None:
        self.epoch, self.start_batch = epoch, start_batch

    def order(self, epoch: int) -> np.ndarray:
        if not self.shuffle:
            return np.arange(self.num_samples)
        if self._cached[0] != epoch:
            self._cached = (epoch, epoch_permutation(self.num_samples, self.seed, epoch))
        return self._cached[1]

    def __iter__(self) -> Iterator[list]:
        order = self.order(self.epoch)
        global_batch = self.batch_size * self.world_size
        for k in range(self.start_batch, self.batches_per_epoch):
            begin = k * global_batch + self.rank * self.batch_size
            yield order[begin:begin + self.batch_size].tolist()

    def __len__(self) -> int:
        return max(0, self.batches_per_epoch - self.start_batch)


class _Batches(Dataset):
    """Maps a list of sample indices to one collated batch, so workers build whole batches in one call."""

    def __init__(self, dataset: ShardDataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, indices: list) -> tuple:
        return self.dataset.get_batch(indices)


class TokenLoader:
    """Endless iterator of (x, y) int64 batches of shape (batch_size, seq_len), epoch after epoch ((x, y, mask) for
    data with a loss mask: ShardDataset.get_batch).

    Deterministic from `seed`: epoch e's order depends only on (seed, e); rank `rank` of `world_size`
    gets a disjoint, equal-size share. `state_dict()` records the epoch and the number of batches
    handed to the consumer in it (not those prefetched by workers); `load_state_dict()` (before
    `iter()`) makes iteration continue with exactly the next batch. `num_workers`, `pin_memory`,
    `persistent_workers` and `prefetch_factor` are passed to the torch DataLoader underneath
    (pin_memory only when CUDA is available; the other two only with workers).
    """

    def __init__(self, dataset: ShardDataset, batch_size: int, *, rank: int = 0, world_size: int = 1, seed: int = 0,
                 num_workers: int = 0, pin_memory: bool = False, persistent_workers: bool = False,
                 prefetch_factor: int = 2, shuffle: bool = True):
        if not isinstance(batch_size, int) or batch_size <= 0:
            raise DataError(f"batch_size must be a positive integer, got {batch_size!r}.")
        if not 0 <= rank < world_size:
            raise DataError(f"rank {rank} is outside world_size {world_size}.")
        self.dataset = dataset
        self.batch_size, self.rank, self.world_size, self.seed = batch_size, rank, world_size, seed
        self.sampler = EpochBatchSampler(len(dataset), batch_size, rank, world_size, seed, shuffle)
        if self.sampler.batches_per_epoch == 0:
            raise DataError(f"{dataset.data_dir} holds {len(dataset):,} samples of seq_len {dataset.seq_len}, fewer "
                            f"than one global batch (batch_size {batch_size} x world size {world_size} = "
                            f"{batch_size * world_size}). Lower batch_size or seq_len, or prepare more data.")
        self.epoch, self.batch_in_epoch = 0, 0
        workers = num_workers > 0
        self._loader = DataLoader(
            _Batches(dataset), batch_size=None, sampler=self.sampler, num_workers=num_workers,
            pin_memory=bool(pin_memory and torch.cuda.is_available()),
            persistent_workers=bool(persistent_workers and workers),
            prefetch_factor=prefetch_factor if workers else None)

    @property
    def batches_per_epoch(self) -> int:
        """Batches each rank gets per epoch."""
        return self.sampler.batches_per_epoch

    def __len__(self) -> int:
        return self.batches_per_epoch

    def __iter__(self) -> Iterator[tuple]:
        while True:
            self.sampler.set_position(self.epoch, self.batch_in_epoch)
            for batch in self._loader:
                self.batch_in_epoch += 1  # counted when handed over, so a checkpoint taken now includes it
                yield batch
            self.epoch, self.batch_in_epoch = self.epoch + 1, 0

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch, "batch_size": self.batch_size,
                "world_size": self.world_size, "num_samples": len(self.dataset), "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        """Continue from a saved position. A changed global batch size keeps the samples consumed so far
        (rounded down to whole new batches); changed data or seed keeps the position but warns."""
        epoch, batch = int(state["epoch"]), int(state["batch_in_epoch"])
        old_global = int(state.get("batch_size", self.batch_size)) * int(state.get("world_size", self.world_size))
        new_global = self.batch_size * self.world_size
        if old_global != new_global:
            warnings.warn(f"data loader resumed with a global batch of {new_global} samples instead of "
                          f"{old_global}: continuing after the {batch * old_global} samples already consumed in "
                          f"epoch {epoch}", stacklevel=2)
            batch = batch * old_global // new_global
        if int(state.get("num_samples", len(self.dataset))) != len(self.dataset) or \
                int(state.get("seed", self.seed)) != self.seed:
            warnings.warn("data loader resumed on different data or with a different seed: the sample order "
                          "differs from the interrupted run", stacklevel=2)
        if batch >= self.batches_per_epoch:
            epoch, batch = epoch + 1, 0
        self.epoch, self.batch_in_epoch = epoch, batch


def sequential_batches(dataset: ShardDataset, batch_size: int, *, rank: int = 0, world_size: int = 1,
                       max_batches: int | None = None) -> Iterator[tuple]:
    """Every sample once, in order, for evaluation: rank r takes batches r, r+W, r+2W, ...; the last may be short."""
    starts = range(rank * batch_size, len(dataset), batch_size * world_size)
    for n, start in enumerate(starts):
        if max_batches is not None and n >= max_batches:
            return
        yield dataset.get_batch(range(start, min(start + batch_size, len(dataset))))
