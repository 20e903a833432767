"""The training CLI used as a careless or hostile user would: every misuse gives one line and a
non-zero exit, a finished run's folder stays byte-for-byte as it was, a folder being written is
refused to a second writer, signals stop the run at any point, and a sweep's exit status says
whether its jobs failed. Through the real CLI: its entry point in this process where the command
stops early (``run_here``), a process of its own for runs, signals and concurrent writers."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT, SMALL, run_here

QUIET = [*SMALL, "logger=none"]


def small(data_dir: Path, *extra: str) -> list[str]:
    return [f"paths.data_dir={data_dir}", *QUIET, *extra]


def snapshot(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` with its md5: what "byte-for-byte unchanged" compares."""
    return {
        str(p.relative_to(folder)): hashlib.md5(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def one_line_error(result: subprocess.CompletedProcess, *fragments: str) -> str:
    """The run failed with exactly one ``error:`` line naming ``fragments``, and no traceback."""
    assert result.returncode != 0, result.stdout[-2000:]
    assert "Traceback" not in result.stderr + result.stdout, result.stderr[-3000:]
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, result.stderr[-3000:]
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def finished_run(data_dir, tmp_path_factory) -> Path:
    """A finished 2-epoch run (minimal callbacks), trained once for the module."""
    out = tmp_path_factory.mktemp("finished") / "run"
    args = small(data_dir, "callbacks=minimal", "trainer.max_epochs=2", f"hydra.run.dir={out}")
    result = run_here("vae-train", *args)
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads((out / "metrics.json").read_text())["status"] == "ok"
    return out


@pytest.mark.parametrize(
    ("extra", "fragments"),
    [
        (["resume={run}", "model.latent_dim=0"], ["resume", "finished run", "last.ckpt"]),
        (["resume={run}", "trainer.max_epochs=2"], ["finished run", "trainer.max_epochs=<more>"]),
        (["hydra.run.dir={run}", "trainer.max_epochs=2"], ["paths.output_dir", "finished run"]),
        (["resume={run}/checkpoints/last.ckpt", "trainer.max_epochs=2"], ["nothing to train"]),
        (["resume={run}/checkpoints/last.ckpt", "model=ae"], ["holds a VAE", "AE"]),
        (
            ["resume={run}/checkpoints/last.ckpt", "data=fashion_mnist", "trainer.max_epochs=3"],
            ["trained on mnist", "fashion_mnist"],
        ),
    ],
)
def test_a_finished_run_is_never_changed(finished_run, data_dir, extra, fragments):
    before = snapshot(finished_run)
    args = [arg.format(run=finished_run) for arg in extra]
    one_line_error(run_here("vae-train", *small(data_dir, "callbacks=minimal", *args)), *fragments)
    assert snapshot(finished_run) == before


def test_resume_true_skips_a_finished_run_without_touching_it(finished_run, data_dir):
    before = snapshot(finished_run)
    result = run_here("vae-train", *small(data_dir, "callbacks=minimal", "trainer.max_epochs=2",
                      f"hydra.run.dir={finished_run}", "resume=true"))  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert snapshot(finished_run) == before


@pytest.mark.parametrize(
    ("extra", "fragments"),
    [
        (["trainer.max_epochs=0"], ["trainer.max_epochs", ">= 1", "got 0"]),
        (["trainer.log_every_n_steps=0"], ["trainer.log_every_n_steps"]),
        (["trainer.limit_train_batches=0"], ["trainer.limit_train_batches"]),
        (["seed=abc"], ["seed", "'abc'"]),
        (["threads=many"], ["threads", "'many'"]),
        (["data.val_size=100000"], ["val_size", "must be <"]),
        (
            ["scheduler=cosine", "model.scheduler.warmup_epochs=-1"],
            ["model.scheduler.warmup_epochs", ">= 0"],
        ),
        (["kl=cyclical", "model.kl.cycles=0"], ["model.kl.cycles", ">= 1"]),
        (["model.feature_loss_weight=-1"], ["model.feature_loss_weight", ">= 0"]),
        (["model.lr=1e12", "trainer.max_epochs=1"], ["non-finite training loss", "model.lr"]),
    ],
)
def test_user_errors_are_one_line(data_dir, tmp_path, extra, fragments):
    out = tmp_path / "run"
    args = small(data_dir, "callbacks=minimal", f"hydra.run.dir={out}", *extra)
    one_line_error(run_here("vae-train", *args), *fragments)
    assert not (out / "checkpoints" / "last.ckpt").exists()


@pytest.mark.parametrize("where", ["file", "no-permission"])
def test_an_output_folder_that_cannot_be_created_is_one_line(data_dir, tmp_path, where):
    if where == "file":
        blocker = tmp_path / "a_file"
        blocker.write_text("in the way")
        target = blocker / "run"
    else:
        if os.geteuid() == 0:
            pytest.skip("root may write anywhere")
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        target = locked / "run"
    line = one_line_error(run_here("vae-train", *small(data_dir, f"hydra.run.dir={target}")),
                          "hydra.run.dir")  # fmt: skip
    assert str(target) in line


def _start(args: list[str]) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "vae_lightning.train", *args],
        cwd=REPO_ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )


def _wait_for(path: Path, proc: subprocess.Popen, seconds: float = 120) -> None:
    deadline = time.time() + seconds
    while not path.exists():
        assert proc.poll() is None, proc.stderr.read()[-3000:]
        assert time.time() < deadline, f"{path} did not appear"
        time.sleep(0.05)


def test_a_second_writer_of_a_folder_is_refused(data_dir, tmp_path):
    out = tmp_path / "run"
    first = _start(small(data_dir, "callbacks=minimal", "trainer.max_epochs=500",
                         f"hydra.run.dir={out}"))  # fmt: skip
    try:
        _wait_for(out / "history.csv", first)
        for extra in ([f"hydra.run.dir={out}"], [f"resume={out}"]):
            second = run_here("vae-train", *small(data_dir, "callbacks=minimal", *extra))
            one_line_error(second, str(out), "being written by another run")
        assert first.poll() is None  # the first goes on undisturbed
    finally:
        first.send_signal(signal.SIGINT)
        first.communicate(timeout=120)
    assert first.returncode == 128 + signal.SIGINT
    record = json.loads((out / "metrics.json").read_text())
    assert record["status"] == "interrupted" and f"resume={out}" in record["resume"]


# A run whose end-of-fit latent probe receives the signal: the probe is made to signal its own
# process and then sleep for a minute, which the stop must not wait for.
PROBE_SIGNALLER = """
import os, signal, sys, time
import vae_lightning.views.measures as callbacks
original = callbacks.fit_probes
def signalling(*args, **kwargs):
    if os.environ.get("SIGNAL_IN_PROBE"):
        os.kill(os.getpid(), getattr(signal, os.environ["SIGNAL_IN_PROBE"]))
        time.sleep(60)
    return original(*args, **kwargs)
callbacks.fit_probes = signalling
from vae_lightning.train import main
sys.argv[0] = "vae_lightning.train"
main()
"""


def _run_probed(args: list[str], signame: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "SIGNAL_IN_PROBE": signame}
    return subprocess.run(
        [sys.executable, "-c", PROBE_SIGNALLER, *args],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip


@pytest.fixture(scope="module")
def uninterrupted(data_dir, tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("probe") / "whole"
    result = run_here("vae-train", *small(data_dir, "trainer.max_epochs=2", f"hydra.run.dir={out}"))
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads((out / "metrics.json").read_text())


@pytest.mark.parametrize("signame", ["SIGTERM", "SIGINT"])
def test_a_signal_during_the_probe_stops_at_once_and_the_resume_matches(
    data_dir, tmp_path, uninterrupted, signame
):
    out = tmp_path / "cut"
    args = small(data_dir, "trainer.max_epochs=2")
    t0 = time.perf_counter()
    cut = _run_probed([*args, f"hydra.run.dir={out}"], signame)
    assert cut.returncode == 128 + getattr(signal, signame), cut.stderr[-3000:]
    assert time.perf_counter() - t0 < 55  # the probe's 60 s sleep was not waited for
    assert "Resume with:" in cut.stderr and f"resume={out}" in cut.stderr
    record = json.loads((out / "metrics.json").read_text())
    assert record["status"] == "interrupted"

    resumed = run_here("vae-train", *args, f"resume={out}")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    record = json.loads((out / "metrics.json").read_text())
    assert record["status"] == "ok" and record["epochs"] == 2
    assert record["metrics"] == uninterrupted["metrics"]
    assert record["collapse"] == uninterrupted["collapse"]


def test_a_second_sweep_into_a_sweep_folder_in_use_is_refused(tmp_path):
    from omegaconf import OmegaConf

    from vae_lightning.files import hold_folder
    from vae_lightning.sweeps.folders import RunFolders

    sweep = tmp_path / "sweep"
    sweep.mkdir()
    cfg = OmegaConf.create({"hydra": {"sweep": {"dir": str(sweep)}}})
    with hold_folder(sweep):  # another sweep holds it
        with pytest.raises(SystemExit) as info:
            RunFolders().on_multirun_start(cfg)
    assert info.value.code == 2
    assert list(sweep.iterdir()) == []  # nothing written
