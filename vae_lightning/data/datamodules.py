"""The MNIST / Fashion-MNIST LightningDataModules.

Each split is held once as a uint8 tensor (N, 1, 28, 28); batches are served by slicing it with a
seeded permutation (``InMemoryBatches``), with no per-sample PIL/ToTensor work and no collation.
Conversion to float in [0, 1] (and dynamic binarization) happens in ``on_after_batch_transfer``,
i.e. on the device.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import lightning as L
import torch

from vae_lightning.data.batches import IndexChunks, InMemoryBatches
from vae_lightning.data.idx import idx_shape, load_split, to_unit_float
from vae_lightning.data.sources import SPLIT_FILES, ensure_dataset, get_spec
from vae_lightning.errors import ConfigError, check_choice, check_int

BINARIZE = ("none", "dynamic", "static")


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
        self._splits: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self._train_loader: InMemoryBatches | IndexChunks | None = None
        # set by a step that takes several optimizer steps per Lightning step (training.fast):
        # the training loader then hands over this many batches' indices at a time, and
        # train_limit is limit_train_batches in batches
        self.batches_per_step = 1
        self.train_limit: int | float = 1.0

    @property
    def classes(self) -> tuple[str, ...]:
        return self.spec.classes

    @property
    def raw_dir(self) -> Path:
        return self.spec.raw_dir(self.data_dir)

    def prepare_data(self) -> None:
        sources = ("present", "torchvision", "offline") if self.download else ("present",)
        ensure_dataset(self.dataset_name, self.data_dir, sources=sources, verify=self.verify)

    @property
    def splits(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """``train``, ``val`` and ``test``: images (N, 1, H, W) uint8 and labels (N,), read on
        first use (a run resumed at its end that draws no pictures and runs no test reads none)."""
        if not self._splits:
            self._splits = self._load()
        return self._splits

    def setup(self, stage: str | None = None) -> None:
        """Check the settings against the training images' header (their count and shape);
        ``splits`` reads the files when first asked for them."""
        if not self._splits:
            self._check(idx_shape(self.raw_dir / SPLIT_FILES["train_images"]))

    def _check(self, shape: tuple[int, ...]) -> None:
        """``shape``: the training images' (N, H, W), against image_shape and val_size. Found
        when the files are read, after the config was instantiated: the errors name the config's
        keys whole (``data.val_size``)."""
        if tuple(shape[1:]) != self.image_shape[1:] or self.image_shape[0] != 1:
            raise ConfigError(
                "data.image_shape",
                f"is {list(self.image_shape)} but {self.raw_dir} holds images of shape "
                f"{[1, *shape[1:]]}",
            )
        if not self.val_on_test and self.val_size >= shape[0]:
            raise ConfigError(
                "data.val_size", f"must be < {shape[0]} (the training set), got {self.val_size}"
            )

    def _load(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        train_x, train_y = load_split(self.raw_dir, "train")
        test_x, test_y = load_split(self.raw_dir, "test")
        self._check((len(train_x), *train_x.shape[2:]))
        if self.binarize == "static":
            # One fixed Bernoulli draw per image, seeded; kept as uint8 0/255.
            g = torch.Generator().manual_seed(self.seed + 1)
            train_x = _bernoulli_uint8(train_x, g)
            test_x = _bernoulli_uint8(test_x, g)
        if self.val_on_test:
            splits = {"train": (train_x, train_y), "val": (test_x, test_y)}
        else:
            perm = torch.randperm(len(train_x), generator=torch.Generator().manual_seed(self.seed))
            tr, va = perm[self.val_size :], perm[: self.val_size]
            splits = {"train": (train_x[tr], train_y[tr]), "val": (train_x[va], train_y[va])}
        return {**splits, "test": (test_x, test_y)}

    def _loader(self, split: str, shuffle: bool, batch_size: int) -> InMemoryBatches:
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

    def train_dataloader(self) -> InMemoryBatches | IndexChunks:
        loader = self._loader("train", True, self.batch_size)
        if self.batches_per_step > 1:
            loader = IndexChunks(loader, self.batches_per_step, self.train_limit)
        self._train_loader = loader
        return loader

    def val_dataloader(self) -> InMemoryBatches:
        return self._loader("val", False, self.eval_batch_size)

    def test_dataloader(self) -> InMemoryBatches:
        return self._loader("test", False, self.eval_batch_size)

    def gather(self, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """A training batch by its images' indices into the split (a chunk's, ``IndexChunks``),
        converted as ``on_after_batch_transfer`` converts a batch; and its labels."""
        images, labels = self.splits["train"]
        x = to_unit_float(images[index])
        if self.binarize == "dynamic":
            x = torch.bernoulli(x)
        return x, labels[index]

    def on_after_batch_transfer(self, batch, dataloader_idx: int):
        trainer = self.trainer
        training = trainer is not None and trainer.training and self._train_loader is not None
        if isinstance(self._train_loader, IndexChunks) and training:
            # a chunk of batches' indices: the step gathers and converts each batch itself
            self._train_loader.mark_consumed(math.ceil(len(batch) / self.batch_size))
            return batch
        x, y = batch
        if training:
            self._train_loader.mark_consumed()  # this batch goes to a training step now
        x = to_unit_float(x)  # (B, 1, 28, 28) in [0, 1], on the device
        if self.binarize == "dynamic":
            x = torch.bernoulli(x)  # a fresh draw every time, on the device
        return x, y


def _bernoulli_uint8(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    return (torch.bernoulli(x.float() / 255.0, generator=g) * 255).to(torch.uint8)


class MNISTDataModule(IDXDataModule):
    dataset_name = "mnist"


class FashionMNISTDataModule(IDXDataModule):
    dataset_name = "fashion_mnist"
