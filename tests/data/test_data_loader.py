"""TokenLoader: deterministic per-epoch shuffles, disjoint ranks, exact resume with and without workers."""

import itertools

import numpy as np
import pytest
import torch

from lunaris.data import ShardDataset, TokenLoader, sequential_batches
from lunaris.errors import DataError


@pytest.fixture
def dataset(tmp_path):
    # 2 shards, 24 samples of length 4 (97 tokens): the token at position p is p, so x[:, 0] // 4 is the index.
    stream = np.arange(97, dtype=np.uint16)
    np.save(tmp_path / "shard_0.npy", stream[:50])
    np.save(tmp_path / "shard_1.npy", stream[50:])
    return ShardDataset(tmp_path, 4)


def sample_ids(x):
    return (x[:, 0] // 4).tolist()


def take(loader, n):
    return [(x.clone(), y.clone()) for x, y in itertools.islice(iter(loader), n)]


def test_batches_are_windows_and_cover_each_epoch_once(dataset):
    loader = TokenLoader(dataset, 4, seed=3)
    assert loader.batches_per_epoch == 6
    batches = take(loader, 12)
    for x, y in batches:
        assert x.shape == y.shape == (4, 4) and x.dtype == y.dtype == torch.int64
        assert torch.equal(y[:, :-1], x[:, 1:])
    epoch0 = sum((sample_ids(x) for x, _ in batches[:6]), [])
    epoch1 = sum((sample_ids(x) for x, _ in batches[6:]), [])
    assert sorted(epoch0) == sorted(epoch1) == list(range(24))
    assert epoch0 != epoch1, "each epoch must be reshuffled"
    assert loader.epoch == 1


def test_shuffle_is_deterministic_from_seed(dataset):
    a = [sample_ids(x) for x, _ in take(TokenLoader(dataset, 4, seed=3), 8)]
    b = [sample_ids(x) for x, _ in take(TokenLoader(dataset, 4, seed=3), 8)]
    c = [sample_ids(x) for x, _ in take(TokenLoader(dataset, 4, seed=4), 8)]
    assert a == b and a != c


def test_ranks_disjoint_and_together_complete(dataset):
    per_rank = []
    for rank in range(2):
        loader = TokenLoader(dataset, 3, rank=rank, world_size=2, seed=7)
        assert loader.batches_per_epoch == 4
        per_rank.append(sum((sample_ids(x) for x, _ in take(loader, 4)), []))
    assert not set(per_rank[0]) & set(per_rank[1])
    assert sorted(per_rank[0] + per_rank[1]) == list(range(24))


def test_ragged_tail_dropped_equally_for_all_ranks(dataset):
    # 24 samples, global batch 2 x 5 = 10: 2 batches per rank per epoch, 4 samples left out of each epoch.
    loaders = [TokenLoader(dataset, 5, rank=r, world_size=2, seed=1) for r in range(2)]
    assert [loader.batches_per_epoch for loader in loaders] == [2, 2]
    seen = [sum((sample_ids(x) for x, _ in take(loader, 2)), []) for loader in loaders]
    assert len(set(seen[0] + seen[1])) == 20


@pytest.mark.parametrize("num_workers", [0, 2])
def test_resume_yields_identical_batches(dataset, num_workers):
    kwargs = dict(seed=11, num_workers=num_workers, prefetch_factor=2, persistent_workers=num_workers > 0)
    reference = take(TokenLoader(dataset, 4, **kwargs), 15)  # 2.5 epochs
    for stop in (4, 6, 9):  # mid-epoch, exactly at an epoch end, in the second epoch
        first = TokenLoader(dataset, 4, **kwargs)
        it = iter(first)
        for _ in range(stop):
            next(it)  # workers have prefetched further; the state counts only handed-over batches
        state = first.state_dict()
        assert all(isinstance(v, int) for v in state.values())
        del it
        resumed = TokenLoader(dataset, 4, **kwargs)
        resumed.load_state_dict(state)
        rest = take(resumed, 15 - stop)
        for (x, y), (rx, ry) in zip(reference[stop:], rest):
            assert torch.equal(x, rx) and torch.equal(y, ry)


def test_resume_after_global_batch_change_keeps_consumed_samples(dataset):
    old = TokenLoader(dataset, 4, seed=2)
    consumed = sum((sample_ids(x) for x, _ in take(old, 2)), [])  # 8 samples
    new = TokenLoader(dataset, 2, seed=2)
    with pytest.warns(UserWarning, match="global batch"):
        new.load_state_dict(old.state_dict())
    rest = sum((sample_ids(x) for x, _ in take(new, 8)), [])  # the remaining 16 of the epoch
    assert sorted(consumed + rest) == list(range(24))


def test_too_little_data_for_one_batch(dataset):
    with pytest.raises(DataError, match="fewer than one global batch"):
        TokenLoader(dataset, 13, world_size=2)


def test_sequential_batches_cover_everything_once(dataset):
    ids = []
    for rank in range(2):
        for x, _ in sequential_batches(dataset, 5, rank=rank, world_size=2):
            ids += sample_ids(x)
    assert sorted(ids) == list(range(24))
