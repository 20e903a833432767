"""Batches sliced out of a split held in memory, in a seeded order, sharded across processes."""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch


class InMemoryBatches:
    """Batches of an in-memory split, sliced by a seeded permutation, sharded across processes.

    Lightning calls ``sampler.set_epoch(epoch)`` at the start of every training epoch on any
    loader whose ``sampler`` (or ``batch_sampler.sampler``) has one, so the order depends only on
    (seed, epoch): a new order each epoch, and a resumed run sees the same batches as an
    uninterrupted one.
    Under DDP (``world_size > 1``) each rank takes a disjoint stride of the permutation; for
    training (``even=True``) the permutation is padded with its own first indices, as
    DistributedSampler does, so that every rank has the same number of batches; for evaluation
    shards stay exact (no image counted twice) and may differ by one batch.
    Written here rather than using a DataLoader because slicing whole batches out of one tensor
    avoids per-sample indexing and collation, which dominate the cost for models this small.
    """

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        batch_size: int,
        shuffle: bool,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        even: bool = False,
    ) -> None:
        self.images, self.labels = images, labels
        self.batch_size, self.shuffle, self.seed = batch_size, shuffle, seed
        self.rank, self.world_size, self.even = rank, world_size, even
        self.epoch = 0
        # where Lightning's _set_sampler_epoch looks for set_epoch (loader.sampler and
        # loader.batch_sampler.sampler; batch_sampler itself is not asked)
        self.sampler = self.batch_sampler = self
        self.consumed = 0  # batches of this epoch that reached a training step
        self._skip = 0  # batches to skip at the next iteration (resuming mid-epoch)

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self._skip = 0
        self.epoch = epoch

    # Lightning saves these in checkpoints of loaders that have them and restores them before
    # iterating, so a run resumed mid-epoch continues with the very next batch. ``consumed``
    # counts batches handed to training steps (mark_consumed), not batches fetched: Lightning
    # prefetches one batch ahead.
    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "consumed": self.consumed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch = int(state["epoch"])
        done = int(state["consumed"])
        self._skip = done if done < len(self) else 0  # a finished epoch resumes with the next
        self.consumed = self._skip

    def mark_consumed(self) -> None:
        self.consumed += 1

    def _indices(self) -> torch.Tensor | None:
        """This rank's indices in order, or None for the whole split in its stored order."""
        n = len(self.images)
        if not self.shuffle and self.world_size == 1:
            return None
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
            order = torch.randperm(n, generator=g)  # on the CPU: the same order on any device
        else:
            order = torch.arange(n)
        order = order.to(self.images.device)
        if self.world_size > 1:
            if self.even and n % self.world_size:
                pad = self.world_size - n % self.world_size
                order = torch.cat([order, order[:pad]])
            order = order[self.rank :: self.world_size]
        return order

    def _shard_size(self) -> int:
        n, w = len(self.images), self.world_size
        if w == 1:
            return n
        return math.ceil(n / w) if self.even else len(range(self.rank, n, w))

    def __len__(self) -> int:
        return math.ceil(self._shard_size() / self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        start, self._skip = self._skip, 0
        self.consumed = start
        order = self._indices()
        for i in range(start, len(self)):
            if order is None:
                sl = slice(i * self.batch_size, (i + 1) * self.batch_size)
                yield self.images[sl], self.labels[sl]
            else:
                idx = order[i * self.batch_size : (i + 1) * self.batch_size]
                yield self.images[idx], self.labels[idx]


class IndexChunks:
    """The training batches of an ``InMemoryBatches``, handed over ``k`` at a time as the flat
    indices of their images into the split (on the split's device): the last chunk of an epoch
    may hold fewer batches, and its last batch fewer images. For a step that takes ``k``
    optimizer steps per Lightning step (``training.fast``), which gathers each batch itself.

    ``limit``: the batches of an epoch, as Lightning's ``limit_train_batches`` counts them (a
    number of batches, or a fraction); Lightning counts chunks. The position Lightning saves
    (``consumed``) counts batches, so a run resumed at a chunk boundary continues with the next.
    """

    def __init__(self, batches: InMemoryBatches, k: int, limit: int | float = 1.0) -> None:
        self.batches, self.k = batches, k
        n = len(batches)
        if isinstance(limit, bool) or not isinstance(limit, (int, float)):
            limit = 1.0
        self.n_batches = min(n, limit) if isinstance(limit, int) else int(n * float(limit))
        self.sampler = self.batch_sampler = self  # where Lightning looks for set_epoch

    def set_epoch(self, epoch: int) -> None:
        self.batches.set_epoch(epoch)

    def state_dict(self) -> dict[str, int]:
        return self.batches.state_dict()

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.batches.load_state_dict(state)

    def mark_consumed(self, n: int) -> None:
        self.batches.consumed += n

    def __len__(self) -> int:
        return math.ceil(self.n_batches / self.k)

    def __iter__(self) -> Iterator[torch.Tensor]:
        b = self.batches
        start, b._skip = b._skip, 0
        b.consumed = start
        order = b._indices()
        if order is None:
            order = torch.arange(len(b.images), device=b.images.device)
        size = b.batch_size
        for first in range(start, self.n_batches, self.k):
            last = min(first + self.k, self.n_batches)
            yield order[first * size : last * size]
