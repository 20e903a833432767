"""IDX reading and the MNIST / Fashion-MNIST LightningDataModules.

Each split is held once as a uint8 tensor (N, 1, 28, 28); batches are served by slicing it with a
seeded permutation, with no per-sample PIL/ToTensor work and no collation. Conversion to float in
[0, 1] (and dynamic binarization) happens in ``on_after_batch_transfer``, i.e. on the device.
"""

from __future__ import annotations

import gzip
import math
from collections.abc import Iterator, Sequence
from pathlib import Path

import lightning as L
import numpy as np
import torch

from vae_lightning.errors import ConfigError, DataError, check_choice, check_int
from vae_lightning.sources import SPLIT_FILES, ensure_dataset, get_spec

BINARIZE = ("none", "dynamic", "static")


class IDXError(DataError):
    """An IDX file is malformed (wrong magic, truncated, inconsistent)."""


def read_idx(path: str | Path) -> np.ndarray:
    """Read an IDX file (optionally gzipped) of unsigned bytes into a numpy array.

    Raises IDXError naming the file when the magic number, the dimensions or the length are wrong.
    """
    path = Path(path)
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError) as err:
            raise IDXError(f"{path}: corrupted gzip stream ({err})") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise IDXError(f"{path}: not an IDX file (bad magic number {raw[:4].hex() or 'empty'})")
    if raw[2] != 0x08:
        raise IDXError(f"{path}: IDX type 0x{raw[2]:02x} unsupported (only unsigned byte, 0x08)")
    ndim = raw[3]
    if ndim < 1 or len(raw) < 4 + 4 * ndim:
        raise IDXError(f"{path}: truncated header ({len(raw)} bytes for {ndim} dimensions)")
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    expected = 4 + 4 * ndim + math.prod(shape)
    if len(raw) != expected:
        what = "truncated" if len(raw) < expected else "has trailing bytes"
        raise IDXError(
            f"{path}: {what}: {len(raw)} bytes, expected {expected} for shape {shape}. "
            f"Delete it and run `make data`."
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def load_split(raw_dir: Path, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Images (N, 1, H, W) uint8 and labels (N,) int64 of the ``train`` or ``test`` split."""
    images_path = raw_dir / SPLIT_FILES[f"{split}_images"]
    labels_path = raw_dir / SPLIT_FILES[f"{split}_labels"]
    images, labels = read_idx(images_path), read_idx(labels_path)
    if images.ndim != 3:
        raise IDXError(f"{images_path}: expected 3 dimensions (N, H, W), got shape {images.shape}")
    if labels.ndim != 1:
        raise IDXError(f"{labels_path}: expected 1 dimension (N,), got shape {labels.shape}")
    if len(images) != len(labels):
        raise IDXError(
            f"{images_path} holds {len(images)} images but {labels_path} holds {len(labels)} labels"
        )
    x = torch.from_numpy(images.copy()).unsqueeze(1)  # (N, 1, H, W) uint8
    return x, torch.from_numpy(labels.astype(np.int64))


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


class IDXDataModule(L.LightningDataModule):
    """A 28x28 grey-image dataset stored as IDX files; subclasses name the dataset.

    Args:
        data_dir: folder holding ``<Folder>/raw/*-ubyte`` (torchvision's layout).
        batch_size: training batch size.
        eval_batch_size: validation/test batch size (defaults to ``batch_size``).
        val_size: images held out of the official training set for validation (seeded).
        val_on_test: validate on the official test set each epoch instead (the seeds' protocol);
            then all 60k training images are used for training.
        binarize: ``none`` (grey levels in [0, 1]), ``dynamic`` (a fresh Bernoulli draw per batch)
            or ``static`` (one Bernoulli draw per image, fixed by ``seed``).
        seed: seeds the validation split, the shuffling and static binarization.
        download: fetch missing raw files (sources.ensure_dataset) in ``prepare_data``.
        verify: check the md5 of the raw files against the official ones.
        num_workers: must be 0 (accepted for familiarity; batches are sliced from memory).
        image_shape: (C, H, W) of the images; the model configs read it as ``${data.image_shape}``.
        on_device: keep the splits on the accelerator (GPU) and slice batches there.
    """

    dataset_name: str = ""

    def __init__(
        self,
        data_dir: str = "data",
        batch_size: int = 128,
        eval_batch_size: int | None = None,
        val_size: int = 5000,
        val_on_test: bool = False,
        binarize: str = "none",
        seed: int = 0,
        download: bool = True,
        verify: bool = True,
        num_workers: int = 0,
        image_shape: Sequence[int] = (1, 28, 28),
        on_device: bool = False,
    ) -> None:
        super().__init__()
        check_int("batch_size", batch_size, 1)
        if eval_batch_size is not None:
            check_int("eval_batch_size", eval_batch_size, 1)
        check_int("val_size", val_size, 0)
        check_choice("binarize", binarize, BINARIZE)
        if num_workers != 0:
            # The batches are slices of tensors already in memory; workers would only add copies.
            raise ConfigError("num_workers", "must be 0: batches are sliced from memory")
        image_shape = tuple(int(d) for d in image_shape)  # plain ints in the checkpoint
        self.save_hyperparameters()
        self.image_shape = image_shape
        self.spec = get_spec(self.dataset_name)
        self.data_dir = Path(data_dir)
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.val_size, self.val_on_test = val_size, val_on_test
        self.binarize, self.seed = binarize, seed
        self.download, self.verify = download, verify
        self.on_device = bool(on_device)
        self.splits: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self._train_loader: InMemoryBatches | None = None

    @property
    def classes(self) -> tuple[str, ...]:
        return self.spec.classes

    @property
    def raw_dir(self) -> Path:
        return self.spec.raw_dir(self.data_dir)

    def prepare_data(self) -> None:
        sources = ("present", "torchvision", "offline") if self.download else ("present",)
        ensure_dataset(self.dataset_name, self.data_dir, sources=sources, verify=self.verify)

    def setup(self, stage: str | None = None) -> None:
        if self.splits:
            return
        train_x, train_y = load_split(self.raw_dir, "train")
        test_x, test_y = load_split(self.raw_dir, "test")
        if tuple(train_x.shape[1:]) != self.image_shape:
            raise ConfigError(
                "image_shape",
                f"is {list(self.image_shape)} but {self.raw_dir} holds images of shape "
                f"{list(train_x.shape[1:])}",
            )
        if self.binarize == "static":
            # One fixed Bernoulli draw per image, seeded; kept as uint8 0/255.
            g = torch.Generator().manual_seed(self.seed + 1)
            train_x = _bernoulli_uint8(train_x, g)
            test_x = _bernoulli_uint8(test_x, g)
        if self.val_on_test:
            self.splits = {"train": (train_x, train_y), "val": (test_x, test_y)}
        else:
            if self.val_size >= len(train_x):
                raise ConfigError(
                    "val_size", f"must be < {len(train_x)} (the training set), got {self.val_size}"
                )
            perm = torch.randperm(len(train_x), generator=torch.Generator().manual_seed(self.seed))
            tr, va = perm[self.val_size :], perm[: self.val_size]
            self.splits = {"train": (train_x[tr], train_y[tr]), "val": (train_x[va], train_y[va])}
        self.splits["test"] = (test_x, test_y)

    def _loader(self, split: str, shuffle: bool, batch_size: int) -> InMemoryBatches:
        if not self.splits:
            self.setup()
        x, y = self.splits[split]
        trainer = self.trainer
        if self.on_device and trainer is not None and trainer.strategy.root_device.type != "cpu":
            # the whole split lives on the accelerator (MNIST: 47 MB as uint8): batches are
            # sliced there and the per-step host-to-device copy disappears
            device = trainer.strategy.root_device
            x, y = x.to(device), y.to(device)
            self.splits[split] = (x, y)
        rank, world = (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)
        return InMemoryBatches(
            x,
            y,
            batch_size,
            shuffle=shuffle,
            seed=self.seed,
            rank=rank,
            world_size=world,
            even=split == "train",
        )

    def train_dataloader(self) -> InMemoryBatches:
        self._train_loader = self._loader("train", True, self.batch_size)
        return self._train_loader

    def val_dataloader(self) -> InMemoryBatches:
        return self._loader("val", False, self.eval_batch_size)

    def test_dataloader(self) -> InMemoryBatches:
        return self._loader("test", False, self.eval_batch_size)

    def on_after_batch_transfer(self, batch, dataloader_idx: int):
        x, y = batch
        trainer = self.trainer
        if trainer is not None and trainer.training and self._train_loader is not None:
            self._train_loader.mark_consumed()  # this batch goes to a training step now
        x = to_unit_float(x)  # (B, 1, 28, 28) in [0, 1], on the device
        if self.binarize == "dynamic":
            x = torch.bernoulli(x)  # a fresh draw every time, on the device
        return x, y


def to_unit_float(x: torch.Tensor) -> torch.Tensor:
    """uint8 images -> float32 in [0, 1] (as torchvision's ToTensor), on x's device."""
    return x.float().div_(255.0)


def _bernoulli_uint8(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    return (torch.bernoulli(x.float() / 255.0, generator=g) * 255).to(torch.uint8)


class MNISTDataModule(IDXDataModule):
    dataset_name = "mnist"


class FashionMNISTDataModule(IDXDataModule):
    dataset_name = "fashion_mnist"
