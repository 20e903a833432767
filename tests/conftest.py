"""Shared fixtures: small synthetic IDX datasets and the composed Hydra config."""

from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import json
import logging
import math
import os
import subprocess
import sys
from collections.abc import Callable
from importlib.metadata import entry_points
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import DictConfig

from vae_lightning.config import compose, cores
from vae_lightning.data import MNISTDataModule
from vae_lightning.data.sources import DATASETS, idx_bytes

N_TRAIN, N_TEST = 640, 256
# the clone the tests run in (an installed wheel's root is another: tests/test_packaging.py)
REPO_ROOT = Path(__file__).resolve().parents[1]
# the checkpoints and run folders written by earlier versions of the code (fixtures/*/README.md)
FIXTURES = Path(__file__).parent / "fixtures"


def pytest_configure(config: pytest.Config) -> None:
    """Under pytest-xdist each worker, and every process it starts, gets its share of the cores
    as torch (OpenMP) threads. More threads than cores spin against each other: two 2-thread
    trainings at once on this project's 2-core CI machine took 11x as long as two 1-thread
    ones (61 s against 5.4 s; 3.4 s for one 2-thread training alone)."""
    workers = os.environ.get("PYTEST_XDIST_WORKER_COUNT")
    if workers:
        threads = max(1, cores() // int(workers))
        os.environ["OMP_NUM_THREADS"] = str(threads)  # the processes the tests start
        torch.set_num_threads(threads)


def synthetic_images(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Images whose class is visible: a bright horizontal band at a class-dependent height."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 10, size=n).astype(np.uint8)
    images = rng.integers(0, 40, size=(n, 28, 28)).astype(np.uint8)
    for i, y in enumerate(labels):
        images[i, 2 + 2 * y : 5 + 2 * y, 4:24] = 230
    return images, labels


def write_synthetic(root: Path, n_train: int = N_TRAIN, n_test: int = N_TEST) -> Path:
    for k, spec in enumerate(DATASETS.values()):
        raw = spec.raw_dir(root)
        raw.mkdir(parents=True, exist_ok=True)
        for split, n, seed in (("train", n_train, 1 + k), ("t10k", n_test, 100 + k)):
            images, labels = synthetic_images(n, seed)
            (raw / f"{split}-images-idx3-ubyte").write_bytes(idx_bytes(images))
            (raw / f"{split}-labels-idx1-ubyte").write_bytes(idx_bytes(labels))
    return root


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A data folder with synthetic MNIST and Fashion-MNIST (verify=false: not the official md5)."""
    return write_synthetic(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="session")
def feature_data_dir(
    tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest
) -> Path:
    """Synthetic data whose default Fashion-MNIST and MNIST classifiers are cached, for the
    feature-matching loss (16 epochs: 0.99 and 0.94 test accuracy on these images, above the
    0.8 floor; vae-evaluate's default 4 stay below it here).

    Made once per test session and shared by pytest-xdist's workers (a minute of training
    each on 2 cores otherwise): the first worker builds it under a file lock in the session's
    folder, the others wait and read it. The tests that use it only read it (a classifier of
    another seed would be cached beside, under its own name)."""
    from filelock import FileLock

    from vae_lightning.evaluate import prepare_classifiers

    worker = getattr(request.config, "workerinput", None)  # set in an xdist worker only
    if worker is None:
        root = tmp_path_factory.mktemp("feature_data")
    else:  # <session>/popen-gw<N>/ is each worker's base: the session's folder is its parent
        root = tmp_path_factory.getbasetemp().parent / "feature_data"
    with FileLock(f"{root}.lock"):
        if not (root / "ready").is_file():
            write_synthetic(root)
            prepare_classifiers(root, classifier_epochs=16, verify=False, device="cpu")
            (root / "ready").touch()
    return root


@pytest.fixture(scope="session")
def real_data_dir() -> Path:
    """The repository's data/ when `make data` has filled it; otherwise the test is skipped."""
    root = REPO_ROOT / "data"
    for spec in DATASETS.values():
        if not all((spec.raw_dir(root) / name).is_file() for name in spec.md5):
            pytest.skip(f"real {spec.name} not in {root} (run `make data`)")
    return root


# a small, quiet run on the synthetic data (verify=false: not the official md5)
SMALL = [
    "data.verify=false",
    "data.download=false",
    "data.val_size=128",
    "data.batch_size=64",
    "trainer.accelerator=cpu",
    "trainer.enable_model_summary=false",
]


def small_overrides(data_dir: Path, output_dir: Path) -> list[str]:
    return [f"paths.data_dir={data_dir}", f"paths.output_dir={output_dir}", *SMALL]


def quiet(data_dir: Path, *extra: str) -> list[str]:
    """vae-train's arguments for a small run on ``data_dir`` without loggers, then ``extra``."""
    return [f"paths.data_dir={data_dir}", *SMALL, "logger=none", *extra]


# a run of 16 steps an epoch (512 training images in batches of 32), checkpointed every epoch
RESUME = [
    "callbacks=minimal",
    "data.batch_size=32",
    "trainer.max_epochs=4",
    "trainer.log_every_n_steps=5",
    "threads=1",
]


def mnist_module(data_dir: Path, **kwargs) -> MNISTDataModule:
    """An MNISTDataModule of the synthetic data, prepared and set up for fit."""
    kwargs.setdefault("verify", False)
    kwargs.setdefault("download", False)
    kwargs.setdefault("val_size", 100)
    kwargs.setdefault("batch_size", 32)
    module = MNISTDataModule(data_dir=str(data_dir), **kwargs)
    module.prepare_data()
    module.setup("fit")
    return module


@pytest.fixture
def compose_cfg(data_dir: Path, tmp_path: Path) -> Callable[..., DictConfig]:
    """Compose conf/train.yaml with overrides, pointed at synthetic data and tmp_path."""

    def _compose(*overrides: str, small: bool = True) -> DictConfig:
        extra = small_overrides(data_dir, tmp_path / "run") if small else []
        return compose([*extra, *overrides])

    return _compose


def run_cli(*args: str, cwd: Path = REPO_ROOT, timeout: int = 300) -> subprocess.CompletedProcess:
    """The real entry point in a subprocess."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run(
        [sys.executable, "-m", "vae_lightning.train", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def run_tool(tool: str, *args: str, timeout: int = 120) -> subprocess.CompletedProcess:
    """A console script of this environment (vae-data, vae-bench, ...) in a subprocess."""
    script = Path(sys.executable).with_name(tool)
    return subprocess.run(
        [str(script), *args], capture_output=True, text=True, timeout=timeout, cwd=REPO_ROOT
    )


def run_here(tool: str, *args: str) -> subprocess.CompletedProcess:
    """A console script (``vae-train``, ``vae-evaluate``, ...) called in this process as its
    script calls it: its entry point from the package's metadata, ``sys.argv`` set, its exit
    status, stdout and stderr returned as ``run_cli``/``run_tool`` return them.

    The same code and the same output, without starting a Python that imports torch and
    Lightning again (8 to 10 s a process on this project's 2-core CI machine). For refusals
    and checks, for runs whose test is what they write, and for multiruns through the basic
    launcher (it runs the jobs in its caller's process). What tests a process itself (signals,
    concurrent writers, launchers that start processes, DDP, the CLI's own start) keeps one of
    its own (``run_cli``, ``run_tool``). The root logger's handlers (Hydra replaces them) are
    put back afterwards."""
    (script,) = entry_points(group="console_scripts", name=tool)
    main = script.load()
    root = logging.getLogger()
    handlers, level, argv = root.handlers[:], root.level, sys.argv
    out, err = io.StringIO(), io.StringIO()
    sys.argv = [tool, *args]
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = main()
            except SystemExit as exit_:
                code = exit_.code
    finally:
        sys.argv = argv
        for handler in root.handlers:
            if handler not in handlers:
                handler.close()
        root.handlers[:] = handlers
        root.setLevel(level)
    if not isinstance(code, int):  # sys.exit("message") or sys.exit(None)
        if code is not None:
            err.write(f"{code}\n")
        code = 0 if code is None else 1
    return subprocess.CompletedProcess([tool, *args], code, out.getvalue(), err.getvalue())


def run_multirun(*args: str) -> subprocess.CompletedProcess:
    """``vae-train -m *args``: in this process under the basic launcher (it runs its jobs in
    its caller's process), in a process of its own under any other (``hydra/launcher=...``),
    as a user starts it."""
    if any(a.startswith("hydra/launcher=") for a in args):
        return run_cli("-m", *args)
    return run_here("vae-train", "-m", *args)


def start_together(*args: str, n: int = 2) -> None:
    """Start ``n`` identical CLI processes at once and check they all succeed."""
    cmd = [sys.executable, "-m", "vae_lightning.train", *args]
    procs = [
        subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE) for _ in range(n)
    ]
    for p in procs:
        assert p.wait(timeout=300) == 0, p.stderr.read().decode()[-2000:]


def snapshot(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` with its md5: what "byte-for-byte unchanged" compares."""
    return {
        str(p.relative_to(folder)): hashlib.md5(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def one_line_error(result: subprocess.CompletedProcess, *fragments: str) -> str:
    """The command failed with exactly one ``error:`` line naming ``fragments``, and no
    traceback; the line is returned without its ``error: `` prefix."""
    assert result.returncode != 0, result.stdout[-2000:]
    assert "Traceback" not in result.stderr + result.stdout, result.stderr[-3000:]
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, result.stderr[-3000:]
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0][len("error: ") :]


class RunsCode:
    """Unpickling it would run a shell command that creates ``marker``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def history(folder: Path) -> list[dict[str, float]]:
    """A run folder's history.csv, a dict of floats per epoch (an empty cell is nan)."""
    with open(folder / "history.csv") as f:
        rows = list(csv.DictReader(f))
    return [{k: float(v) if v else math.nan for k, v in row.items()} for row in rows]


def last_files(out: Path) -> dict[str, tuple[int, int]]:
    """The run's last*.ckpt files, each with the (epoch, global step) it holds."""
    found = {}
    for path in sorted((out / "checkpoints").glob("last*.ckpt")):
        ckpt = torch.load(path, weights_only=True, map_location="cpu")
        found[path.name] = (ckpt["epoch"], ckpt["global_step"])
    return found


def assert_same_run(a: Path, b: Path, rel: float = 1e-4) -> None:
    """Two run folders recorded the same training: every history value and final metric."""
    ha, hb = history(a), history(b)
    assert len(ha) == len(hb)
    for ra, rb in zip(ha, hb, strict=True):
        metrics = [k for k in ra if "/" in k and not k.startswith("time/")]
        assert set(metrics) == {k for k in rb if "/" in k and not k.startswith("time/")}
        for k in metrics:
            assert rb[k] == pytest.approx(ra[k], rel=rel, abs=1e-5), (a.name, ra["epoch"], k)
    ma = json.loads((a / "metrics.json").read_text())["metrics"]
    mb = json.loads((b / "metrics.json").read_text())["metrics"]
    assert set(ma) == set(mb)
    for k, v in ma.items():
        assert mb[k] == pytest.approx(v, rel=rel, abs=1e-4), (a.name, k)


# a sweep's jobs on the synthetic data (debug=fast unless a test says otherwise)
SWEEP = [
    "data.verify=false",
    "data.download=false",
    "data.val_size=128",
    "trainer.accelerator=cpu",
    "callbacks.latent_probe.max_train=200",
]


def job_records(sweep_dir: Path) -> dict[str, dict]:
    """Each job's metrics.json by its folder's name."""
    return {p.parent.name: json.loads(p.read_text()) for p in sweep_dir.glob("*/metrics.json")}


def run_sweep(data_dir: Path, sweep_dir: Path, *args: str, status: int = 0):
    """A multirun of debug=fast jobs (``run_multirun``: in this process under the basic
    launcher), which must exit with ``status``."""
    result = run_multirun(
        "debug=fast", f"paths.data_dir={data_dir}", f"hydra.sweep.dir={sweep_dir}", *SWEEP, *args
    )
    assert result.returncode == status, result.stderr[-3000:]
    return result
