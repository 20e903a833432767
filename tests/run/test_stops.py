"""Stopping safely (run.stops): a real SIGTERM or Ctrl-C stops the run with a checkpoint and
the command that resumes it, at once even inside the end-of-fit probe; a non-finite loss stops
it before the weights that saw it are saved."""

import json
import os
import signal
import subprocess
import sys
import time

import lightning as L
import pytest
import torch

from tests.conftest import REPO_ROOT, RESUME, quiet, run_here
from vae_lightning.train import train


class PoisonAt(L.Callback):
    """Sets the weights to infinity at a given global step: the next loss is not finite."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step:
            with torch.no_grad():
                for p in pl_module.parameters():
                    p.fill_(float("inf"))


@pytest.mark.slow
def test_sigterm_to_a_real_training_process_then_resume(data_dir, tmp_path):
    out = tmp_path / "run"
    args = [
        *RESUME[:-1],
        "trainer.max_epochs=200",
        f"paths.data_dir={data_dir}",
        "data.verify=false",
        "data.download=false",
        "data.val_size=128",
        "trainer.accelerator=cpu",
    ]
    proc = subprocess.Popen(
        [sys.executable, "-m", "vae_lightning.train", *args, f"hydra.run.dir={out}"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.time() + 120
    while time.time() < deadline and not (out / "history.csv").exists():
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, stderr[-2000:]
    assert "Resume with:" in stderr and f"resume={out}" in stderr
    record = json.loads((out / "metrics.json").read_text())
    assert record["status"] == "interrupted"
    done = len((out / "history.csv").read_text().splitlines()) - 1
    assert 1 <= done < 200
    # the resume is checked by what it writes: in this process
    result = run_here("vae-train", *args, "trainer.max_epochs=" + str(done + 2), f"resume={out}")
    assert result.returncode == 0, result.stderr[-2000:]
    record = json.loads((out / "metrics.json").read_text())
    assert record["status"] == "ok" and record["epochs"] == done + 2


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
    result = run_here("vae-train", *quiet(data_dir, "trainer.max_epochs=2", f"hydra.run.dir={out}"))
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads((out / "metrics.json").read_text())


@pytest.mark.parametrize("signame", ["SIGTERM", "SIGINT"])
def test_a_signal_during_the_probe_stops_at_once_and_the_resume_matches(
    data_dir, tmp_path, uninterrupted, signame
):
    out = tmp_path / "cut"
    args = quiet(data_dir, "trainer.max_epochs=2")
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


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(compose_cfg, tmp_path):
    from vae_lightning.run.stops import NonFiniteLossError

    out = tmp_path / "run"
    # the weights turn to inf at step 20 (epoch 1), after epoch 0's good last.ckpt
    blow_up = compose_cfg(
        *RESUME,
        f"paths.output_dir={out}",
        "trainer.max_epochs=3",
        "+callbacks.poison._target_=tests.run.test_stops.PoisonAt",
        "+callbacks.poison.step=20",
    )
    with pytest.raises(
        NonFiniteLossError, match=r"non-finite training loss .* at epoch 1, step 20"
    ) as info:
        train(blow_up)
    last = out / "checkpoints" / "last.ckpt"
    assert str(last) in str(info.value)
    saved = torch.load(last, weights_only=True)  # not overwritten with broken weights
    assert saved["epoch"] == 0 and saved["global_step"] < 20
    assert all(torch.isfinite(t).all() for t in saved["state_dict"].values())
    record = json.loads((out / "metrics.json").read_text())
    assert record["status"] == "failed" and "NonFiniteLossError" in record["error"]


def fake_trainer(step: int, log_every: int = 5):
    from types import SimpleNamespace

    ckpt = SimpleNamespace(last_model_path="/run/checkpoints/last.ckpt", best_model_path="")
    return SimpleNamespace(
        training=True, global_step=step, current_epoch=0, log_every_n_steps=log_every,
        checkpoint_callback=ckpt,
    )  # fmt: skip


def test_non_finite_stop_checks_every_loss_on_the_cpu():
    from vae_lightning.run.stops import NonFiniteLossError, NonFiniteStop

    stop = NonFiniteStop()
    stop.on_before_backward(fake_trainer(3), None, torch.tensor(1.0))
    with pytest.raises(NonFiniteLossError, match=r"\(nan\) at epoch 0, step 4.*last\.ckpt"):
        stop.on_before_backward(fake_trainer(4), None, torch.tensor(float("nan")))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_non_finite_stop_on_a_gpu_flags_on_the_device_and_raises_at_the_next_check():
    from vae_lightning.run.stops import NonFiniteLossError, NonFiniteStop

    stop = NonFiniteStop()
    for step, value in ((5, 1.0), (6, float("inf")), (7, float("nan")), (8, 2.0)):
        stop.on_before_backward(fake_trainer(step), None, torch.tensor(value, device="cuda"))
        stop.on_train_batch_end(fake_trainer(step + 1, log_every=10), None, None, None, 0)
    # no synchronisation yet: checked every log_every_n_steps and before any checkpoint
    with pytest.raises(NonFiniteLossError, match=r"at epoch 0, step 6\."):
        stop.on_save_checkpoint(fake_trainer(9), None, {})
    with pytest.raises(NonFiniteLossError, match=r"step 6\."):
        stop.on_train_batch_end(fake_trainer(10, log_every=10), None, None, None, 0)
