"""A run folder's rules (run.folder), through vae-train: a finished run's folder stays
byte-for-byte as it was whatever the command, resume=true skips it, a folder being written is
refused to a second writer, resume= points to something that exists, and the folder can be
written. Each refusal one line and a non-zero exit."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT, one_line_error, quiet, run_here, snapshot
from vae_lightning.errors import ConfigError
from vae_lightning.train import train


@pytest.fixture(scope="module")
def finished_run(data_dir, tmp_path_factory) -> Path:
    """A finished 2-epoch run (minimal callbacks), trained once for the module."""
    out = tmp_path_factory.mktemp("finished") / "run"
    args = quiet(data_dir, "callbacks=minimal", "trainer.max_epochs=2", f"hydra.run.dir={out}")
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
    one_line_error(run_here("vae-train", *quiet(data_dir, "callbacks=minimal", *args)), *fragments)
    assert snapshot(finished_run) == before


RESUME = ["callbacks=minimal", "data.batch_size=32", "trainer.max_epochs=1", "threads=1"]


def test_resume_true_starts_a_missing_run_and_skips_a_finished_one(compose_cfg, tmp_path):
    out = tmp_path / "run"
    cfg = compose_cfg(*RESUME, f"paths.output_dir={out}", "resume=true")
    first = train(cfg)  # nothing there yet: a fresh start
    assert json.loads((out / "metrics.json").read_text())["status"] == "ok"
    before = snapshot(out)
    assert train(cfg) == first  # finished: skipped, its metric returned (for a sweeper)
    assert snapshot(out) == before


@pytest.mark.parametrize(
    ("resume", "message"),
    [("{tmp}/nothing.ckpt", "resume points to .*nothing.ckpt, which does not exist"),
     ("{tmp}", "holds no run")],
)  # fmt: skip
def test_resume_from_nothing_says_so(compose_cfg, tmp_path, resume, message):
    cfg = compose_cfg("debug=limit", f"resume={resume.format(tmp=tmp_path)}")
    with pytest.raises(ConfigError, match=message):
        train(cfg)


@pytest.mark.parametrize("where", ["file", "no-permission"])
def test_an_output_folder_that_cannot_be_written_is_refused_naming_the_key(
    compose_cfg, tmp_path, where
):
    if where == "file":
        (tmp_path / "taken").write_text("a file, not a folder")
        target = tmp_path / "taken" / "run"
    else:
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        if os.access(locked, os.W_OK):
            pytest.skip("running as a user who can write anywhere (root)")
        target = locked / "run"
    with pytest.raises(ConfigError, match=r"paths\.output_dir .* cannot be written") as info:
        train(compose_cfg(f"paths.output_dir={target}"))
    assert info.value.key == "paths.output_dir" and str(target) in str(info.value)
    assert not target.exists()


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
    first = _start(quiet(data_dir, "callbacks=minimal", "trainer.max_epochs=500",
                         f"hydra.run.dir={out}"))  # fmt: skip
    try:
        _wait_for(out / "history.csv", first)
        for extra in ([f"hydra.run.dir={out}"], [f"resume={out}"]):
            second = run_here("vae-train", *quiet(data_dir, "callbacks=minimal", *extra))
            one_line_error(second, str(out), "being written by another run")
        assert first.poll() is None  # the first goes on undisturbed
    finally:
        first.send_signal(signal.SIGINT)
        first.communicate(timeout=120)
    assert first.returncode == 128 + signal.SIGINT
    record = json.loads((out / "metrics.json").read_text())
    assert record["status"] == "interrupted" and f"resume={out}" in record["resume"]
