"""InMemoryBatches (data.batches): a seeded order that changes every epoch, and shards across
processes that partition the evaluation splits and train alike."""

import pytest
import torch

from tests.conftest import mnist_module
from vae_lightning.data import InMemoryBatches


def test_shuffling_is_seeded_and_changes_per_epoch(data_dir):
    def labels(seed, epoch):
        loader = mnist_module(data_dir, seed=seed).train_dataloader()
        loader.batch_sampler.set_epoch(epoch)
        return torch.cat([y for _, y in loader])

    assert torch.equal(labels(0, 0), labels(0, 0))
    assert not torch.equal(labels(0, 0), labels(0, 1))
    assert not torch.equal(labels(0, 0), labels(1, 0))
    assert sorted(labels(0, 0).tolist()) == sorted(labels(0, 1).tolist())  # a permutation
    val = [y for _, y in mnist_module(data_dir).val_dataloader()]
    assert torch.equal(
        torch.cat(val), torch.cat([y for _, y in mnist_module(data_dir).val_dataloader()])
    )


@pytest.mark.parametrize("n", [10, 11, 13])
def test_ddp_shards_are_disjoint_and_train_shards_equal_in_length(n):
    images, labels = torch.arange(n).view(n, 1, 1, 1), torch.arange(n)

    def shard(rank, shuffle, even):
        loader = InMemoryBatches(
            images, labels, 3, shuffle, seed=0, rank=rank, world_size=3, even=even
        )
        loader.set_epoch(1)
        return [y.tolist() for _, y in loader], len(loader)

    # evaluation: an exact partition of the split, nothing counted twice
    parts = [shard(r, shuffle=False, even=False) for r in range(3)]
    seen = sorted(i for batches, _ in parts for b in batches for i in b)
    assert seen == list(range(n))
    # training: every rank the same number of batches and images, the union covers the split
    parts = [shard(r, shuffle=True, even=True) for r in range(3)]
    assert len({length for _, length in parts}) == 1
    assert len({sum(len(b) for b in batches) for batches, _ in parts}) == 1
    union = [i for batches, _ in parts for b in batches for i in b]
    assert set(union) == set(range(n)) and len(union) - n == (-n) % 3  # padding only
