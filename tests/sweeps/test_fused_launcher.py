"""hydra/launcher=fused: a sweep's jobs trained as one stack, each job still its own run."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from tests.conftest import (
    REPO_ROOT,
    assert_same_run,
    history,
    last_files,
    run_cli,
    run_here,
    run_multirun,
)  # fmt: skip

# a small, fast grid on the synthetic data: 8 training batches of 64 per epoch
GRID = [
    "data.verify=false", "data.download=false", "data.val_size=128", "data.batch_size=64",
    "trainer.accelerator=cpu", "trainer.enable_model_summary=false", "trainer.max_epochs=2",
    "model.hidden_dim=32", "callbacks.latent_probe.max_train=200", "callbacks=default",
    "trainer.log_every_n_steps=4", "model.latent_dim=2,4", "model.beta=4",
]  # fmt: skip
# the fused launcher's grid: GRID's 2 jobs and 2 more, as one stack in the launcher's process
FUSED = ["hydra/launcher=fused", "model.beta=1,4"]


def records(sweep_dir: Path) -> dict[str, dict]:
    """Each job's metrics.json by its overrides (the folder name without the job number)."""
    return {p.parent.name.split("_", 1)[1]: json.loads(p.read_text())
            for p in sweep_dir.glob("*/metrics.json")}  # fmt: skip


def sweep(data_dir: Path, out: Path, *args: str, status: int = 0) -> subprocess.CompletedProcess:
    result = run_multirun(f"paths.data_dir={data_dir}", f"hydra.sweep.dir={out}", *GRID, *args)
    assert result.returncode == status, result.stderr[-3000:]
    return result


@pytest.fixture(scope="module")
def sweeps(data_dir, tmp_path_factory) -> dict[str, Path]:
    """GRID (2 jobs: latent_dim 2 and 4 at beta 4) through the basic launcher, and GRID with
    beta 1 too (4 jobs) through the fused launcher, as one stack."""
    root = tmp_path_factory.mktemp("fused")
    out = {"basic": root / "basic", "fused": root / "fused"}
    sweep(data_dir, out["basic"])
    sweep(data_dir, out["fused"], *FUSED)
    return out


@pytest.mark.slow
def test_a_fused_sweep_trains_one_stack_and_each_job_is_the_job_trained_alone(sweeps):
    basic, fused = records(sweeps["basic"]), records(sweeps["fused"])
    assert set(basic) < set(fused) and len(basic) == 2 and len(fused) == 4
    assert {r["status"] for r in fused.values()} == {"ok"}
    for record in fused.values():  # all 4 in one stack, none alone: the group each trained in
        assert record["fused"]["jobs"] == 4
        assert record["time/fit_s"] >= record["fused"]["fit_share_s"] > 0
    assert "fused" not in next(iter(basic.values()))
    for name in basic:
        (a,) = sweeps["basic"].glob(f"*_{name}")
        (b,) = sweeps["fused"].glob(f"*_{name}")
        # the same batches, initialisation, noise and Adam state: float rounding only (a
        # padded, batched matmul sums in another order), through the test and the probes
        assert_same_run(a, b)


@pytest.mark.slow
def test_each_fused_job_folder_is_a_complete_run(sweeps):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from vae_lightning.models import VAE

    out = sweeps["fused"]
    for sweep_dir, n in ((sweeps["basic"], 2), (out, 4)):  # the report: a table row per job
        report = (sweep_dir / "REPORT.md").read_text()
        assert f"{n} runs: {n} ok" in report
        assert sum(line.startswith("| `") for line in report.splitlines()) == n
        assert (sweep_dir / "summary.csv").read_text().count("\n") == n + 1
        assert (sweep_dir / "heatmap_test_loss.png").is_file()
    assert [json.loads(line)["status"] for line in open(out / "jobs.jsonl")] == ["ok"] * 4
    for folder in (p for p in out.iterdir() if (p / "metrics.json").is_file()):
        record = json.loads((folder / "metrics.json").read_text())
        config = OmegaConf.load(folder / ".hydra" / "config.yaml")
        assert config.resume is True  # finished by train(), continuing the stack's checkpoint
        assert len(history(folder)) == 2 and record["epochs"] == 2
        events = EventAccumulator(str(folder / "tensorboard"))
        events.Reload()
        steps = [e.step for e in events.Scalars("val/loss")]
        assert len(steps) == 2  # the stack's epoch and the job's own last one
        assert {"train/loss_step", "collapse/kl_dim_00"} <= set(events.Tags()["scalars"])
        assert (folder / "images" / "images_samples_prior_epoch002.png").is_file()
        assert "probe/rf_acc" in record["metrics"]
        # the checkpoints load as the job's own model, of its own latent size
        model = VAE.load_from_checkpoint(folder / "checkpoints" / "last.ckpt")
        assert model.latent_dim == record["hparams"]["latent_dim"]
        assert Path(record["best_checkpoint"]).is_file()


@pytest.mark.slow
def test_a_fused_jobs_checkpoint_evaluates_to_its_recorded_test_loss(sweeps):
    record = next(r for r in records(sweeps["fused"]).values()
                  if r["hparams"]["latent_dim"] == 4)  # fmt: skip
    folder = Path(record["output_dir"])
    data_dir = OmegaConf.load(folder / ".hydra" / "config.yaml").paths.data_dir
    result = run_here("vae-evaluate", f"ckpt='{record['best_checkpoint']}'",
                      f"data_dir={data_dir}", "k=1", "n_fid=0", "verify=false")  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    evaluated = json.loads((folder / "eval.json").read_text())
    assert evaluated["metrics"]["test/loss"] == pytest.approx(
        record["metrics"]["test/loss"], rel=0.01
    )  # one draw of the ELBO's noise apart


@pytest.mark.slow
def test_sigterm_stops_a_fused_sweep_and_its_resume_command_finishes_it(data_dir, tmp_path, sweeps):
    """The signal stops the stack: every job is interrupted, and the resume command finishes
    each (here alone, from what its folder holds)."""
    out = tmp_path / "sweep"
    args = ["-m", f"paths.data_dir={data_dir}", f"hydra.sweep.dir={out}", *GRID, *FUSED]
    proc = subprocess.Popen([sys.executable, "-m", "vae_lightning.train", *args], cwd=REPO_ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    for line in proc.stdout:  # the stack is about to start (the handler is in place)
        if "stack 1 of 1: 4 jobs" in line:
            proc.send_signal(signal.SIGTERM)
            break
    stderr = proc.communicate(timeout=120)[1]
    assert proc.returncode == 143, stderr[-2000:]
    command = stderr.split("Resume the sweep with:\n", 1)[1].splitlines()[0].strip()
    assert "resume=true" in command and f"hydra.sweep.dir={out}" in command
    assert {r["status"] for r in records(out).values()} == {"interrupted"}
    assert len(records(out)) == 4
    resumed = run_here("vae-train", *command.split()[3:])  # "python -m vae_lightning.train"
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "4 runs: 4 ok" in (out / "REPORT.md").read_text()
    for twin in (p for p in sweeps["basic"].iterdir() if (p / "metrics.json").is_file()):
        (folder,) = out.glob(f"*_{twin.name.split('_', 1)[1]}")
        assert_same_run(twin, folder)


def test_a_bad_stack_size_is_one_line_before_anything_runs(capsys):
    """(Through the CLI the same line, exit status 2 and no traceback: Hydra instantiates the
    launcher before any job, and lets SystemExit through.)"""
    from hydra_plugins.vae_lightning_fused.fused_launcher import FusedLauncher

    bad = [({"max_group": v}, "max_group must be a number of jobs >= 1") for v in (0, -1, True)]
    bad += [({"gpu": "yes"}, "gpu must be true or false")]
    for kwargs, message in bad:
        with pytest.raises(SystemExit) as info:
            FusedLauncher(**kwargs)
        assert info.value.code == 2
        err = capsys.readouterr().err
        assert err.startswith(f"error: hydra.launcher.{message}") and err.count("\n") == 1
    assert FusedLauncher(max_group=3).max_group == 3


def processes_naming(text: str) -> list[int]:
    """The pids of the processes whose command line holds ``text``."""
    pids = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if text in cmdline.read_bytes().decode(errors="replace"):
                pids.append(int(cmdline.parent.name))
        except OSError:  # gone meanwhile
            continue
    return pids


@pytest.mark.slow
def test_a_fused_sweep_killed_leaves_no_writer_and_its_folders_say_killed(data_dir, tmp_path):
    """kill -9 of a fused sweep while its stack trains: no process of it goes on writing, every
    job folder says it was killed (a record "running" that no process holds), the report lists
    them with the command that continues them, and resume=true finishes every job from its
    newest last.ckpt."""
    out = tmp_path / "sweep"
    dropped = ("callbacks", "callbacks.latent_probe.max_train", "trainer.max_epochs",
               "model.latent_dim")  # fmt: skip
    grid = [a for a in GRID if a.split("=")[0] not in dropped]
    args = [
        "-m",
        f"paths.data_dir={data_dir}",
        f"hydra.sweep.dir={out}",
        *grid,
        *FUSED,
        "callbacks=minimal",
        "logger=none",
        "trainer.max_epochs=4",
        "model.latent_dim=2",
    ]
    proc = subprocess.Popen([sys.executable, "-m", "vae_lightning.train", *args], cwd=REPO_ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    deadline = time.monotonic() + 120
    while not any(len(p.read_text().splitlines()) > 1 for p in out.glob("*/history.csv")):
        assert proc.poll() is None and time.monotonic() < deadline  # the stack's first epoch
        time.sleep(0.02)
    proc.kill()
    assert proc.wait(timeout=30) == -signal.SIGKILL
    time.sleep(0.5)
    assert processes_naming(str(out)) == []  # nothing of the sweep runs on
    folders = sorted(p.parent for p in out.glob("*/metrics.json"))
    assert len(folders) == 2
    from vae_lightning.run.record import RunRecord

    for folder in folders:
        record = RunRecord.parse(folder)
        assert record.data["status"] == "running" and record.status == "killed"
        assert "resume=true" in record.error and f"hydra.sweep.dir={out}" in record.error
    assert run_here("vae-report", f"dir={out}").returncode == 0
    report = (out / "REPORT.md").read_text()
    assert "2 runs: 0 ok, 0 failed, 2 killed." in report and "killed while it ran" in report
    resumed = run_cli(*args, "resume=true")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert {r["status"] for r in records(out).values()} == {"ok"}
    for folder in folders:
        assert last_files(folder) == {"last.ckpt": (3, 32)}
