"""The DataModules (data.datamodules): batches sliced as uint8 and converted on the device, the
splits, Lightning's reshuffling, binarization, each dataset's folder, checked values, the real
files, and on_device."""

import pytest
import torch

from tests.conftest import mnist_module, N_TEST, N_TRAIN
from vae_lightning.data import FashionMNISTDataModule, MNISTDataModule
from vae_lightning.data.sources import ensure_dataset
from vae_lightning.errors import ConfigError

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def test_batches_shape_dtype_range_and_transfer(data_dir):
    module = mnist_module(data_dir)
    x, y = next(iter(module.train_dataloader()))
    assert x.dtype == torch.uint8 and x.shape == (32, 1, 28, 28)  # sliced, not converted
    assert y.dtype == torch.int64 and y.shape == (32,)
    xf, _ = module.on_after_batch_transfer((x, y), 0)
    assert xf.dtype == torch.float32 and 0 <= xf.min() and xf.max() <= 1
    assert torch.allclose(xf * 255, x.float())


def test_split_sizes_and_validation_disjoint_from_train(data_dir):
    module = mnist_module(data_dir, val_size=100)
    (tx, _), (vx, _), (sx, _) = (module.splits[s] for s in ("train", "val", "test"))
    assert (len(tx), len(vx), len(sx)) == (N_TRAIN - 100, 100, N_TEST)
    train_rows = {bytes(r) for r in tx.flatten(1).numpy()}
    assert not any(bytes(r) in train_rows for r in vx.flatten(1).numpy())
    assert len(module.train_dataloader()) == -(-(N_TRAIN - 100) // 32)
    assert sum(len(b[0]) for b in module.train_dataloader()) == N_TRAIN - 100


def test_lightning_reshuffles_the_training_set_every_epoch(data_dir):
    """Through a real Trainer: Lightning itself must tell the loader the epoch (it once did
    not, and every epoch saw the first epoch's order)."""
    import lightning as L

    from vae_lightning.models import VAE
    from vae_lightning.training import AutomaticStep

    seen: list[list[int]] = []

    class FirstBatch(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if batch_idx == 0:
                seen.append(batch[1].tolist())

    trainer = L.Trainer(
        max_epochs=3, limit_train_batches=1, limit_val_batches=0, callbacks=[FirstBatch()],
        logger=False, enable_progress_bar=False, enable_checkpointing=False,
        enable_model_summary=False,
    )  # fmt: skip
    model = AutomaticStep().bind(VAE(latent_dim=2, hidden_dim=8))
    trainer.fit(model, datamodule=mnist_module(data_dir, batch_size=32))
    assert len(seen) == 3 and seen[0] != seen[1] and seen[1] != seen[2]
    expected = []
    for epoch in range(3):  # the order is (seed, epoch)'s, as a resumed run recomputes it
        loader = mnist_module(data_dir, batch_size=32).train_dataloader()
        loader.set_epoch(epoch)
        expected.append(next(iter(loader))[1].tolist())
    assert seen == expected


def test_val_on_test_uses_all_training_images(data_dir):
    module = mnist_module(data_dir, val_on_test=True)
    assert len(module.splits["train"][0]) == N_TRAIN
    assert torch.equal(module.splits["val"][0], module.splits["test"][0])


@pytest.mark.parametrize("mode", ["dynamic", "static"])
def test_binarization(data_dir, mode):
    module = mnist_module(data_dir, binarize=mode)
    x, y = next(iter(module.val_dataloader()))
    a, _ = module.on_after_batch_transfer((x, y), 0)
    b, _ = module.on_after_batch_transfer((x, y), 0)
    assert set(a.unique().tolist()) <= {0.0, 1.0}
    assert torch.equal(a, b) == (mode == "static")


def test_fashion_module_reads_its_own_folder(data_dir):
    module = FashionMNISTDataModule(data_dir=str(data_dir), verify=False, val_size=100)
    module.setup()
    assert module.classes[0] == "T-shirt/top"
    assert not torch.equal(module.splits["test"][0], mnist_module(data_dir).splits["test"][0])


@pytest.mark.parametrize(
    ("kwargs", "key"),
    [
        ({"batch_size": 0}, "batch_size"),
        ({"val_size": -1}, "val_size"),
        ({"binarize": "maybe"}, "binarize"),
        ({"num_workers": 4}, "num_workers"),
    ],
)
def test_bad_datamodule_values(kwargs, key):
    with pytest.raises(ConfigError) as info:
        MNISTDataModule(**kwargs)
    assert info.value.key == key


def test_val_size_larger_than_train_is_refused(data_dir):
    with pytest.raises(ConfigError, match="val_size"):
        mnist_module(data_dir, val_size=N_TRAIN)


@pytest.mark.realdata
def test_real_data_is_official(real_data_dir):
    for name, module_cls in (("mnist", MNISTDataModule), ("fashion_mnist", FashionMNISTDataModule)):
        ensure_dataset(name, real_data_dir, sources=("present",), verify=True)
        module = module_cls(data_dir=str(real_data_dir))
        module.setup()
        assert len(module.splits["train"][0]) == 55_000
        assert len(module.splits["test"][0]) == 10_000
        assert module.splits["test"][1].bincount().tolist() == (
            [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
            if name == "mnist"
            else [1000] * 10
        )


def loader_device(data_dir, accelerator: str) -> str:
    """The device of the first training batch of a DataModule with on_device=true."""
    import lightning as L

    from vae_lightning.data import MNISTDataModule

    dm = MNISTDataModule(data_dir=str(data_dir), verify=False, val_size=100, on_device=True)
    dm.trainer = L.Trainer(accelerator=accelerator, devices=1, logger=False)
    images, _ = next(iter(dm.train_dataloader()))
    assert dm.splits["train"][0].device == images.device  # the whole split, not one batch
    return images.device.type


def test_on_device_is_a_no_op_on_the_cpu(data_dir):
    assert loader_device(data_dir, "cpu") == "cpu"


@needs_cuda
@pytest.mark.gpu
def test_on_device_keeps_the_splits_on_the_gpu(data_dir):
    assert loader_device(data_dir, "gpu") == "cuda"
