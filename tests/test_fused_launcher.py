"""hydra/launcher=fused: a sweep's jobs trained as one stack, each job still its own run."""

from __future__ import annotations

import csv
import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf, open_dict

from tests.conftest import REPO_ROOT, run_here, run_multirun, small_overrides
from vae_lightning.config import compose
from vae_lightning.sweeps.fused import group_key, why_not_fused
from vae_lightning.sweeps.stacked import train_group
from vae_lightning.train import train

# a small, fast grid on the synthetic data: 8 training batches of 64 per epoch
GRID = [
    "data.verify=false", "data.download=false", "data.val_size=128", "data.batch_size=64",
    "trainer.accelerator=cpu", "trainer.enable_model_summary=false", "trainer.max_epochs=2",
    "model.hidden_dim=32", "callbacks.latent_probe.max_train=200", "callbacks=default",
    "trainer.log_every_n_steps=4", "model.latent_dim=2,4", "model.beta=4",
]  # fmt: skip
# the fused launcher's grid: GRID's 2 jobs and 2 more, as one stack in the launcher's process
FUSED = ["hydra/launcher=fused", "model.beta=1,4"]


def history(folder: Path) -> list[dict[str, float]]:
    with open(folder / "history.csv") as f:
        rows = list(csv.DictReader(f))
    return [{k: float(v) if v else math.nan for k, v in row.items()} for row in rows]


def records(sweep_dir: Path) -> dict[str, dict]:
    """Each job's metrics.json by its overrides (the folder name without the job number)."""
    return {p.parent.name.split("_", 1)[1]: json.loads(p.read_text())
            for p in sweep_dir.glob("*/metrics.json")}  # fmt: skip


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
    result = sweep(data_dir, out["fused"], *FUSED)
    out["log"] = result.stdout + result.stderr
    return out


# --- the launcher, through the CLI --------------------------------------------------------------


@pytest.mark.slow
def test_a_fused_sweep_trains_one_stack_and_each_job_is_the_job_trained_alone(sweeps):
    assert "fused launcher: 4 jobs; stacks of 4; 0 alone" in sweeps["log"]
    assert sweeps["log"].count("stack 1 of 1: trained in") == 1
    basic, fused = records(sweeps["basic"]), records(sweeps["fused"])
    assert set(basic) < set(fused) and len(basic) == 2 and len(fused) == 4
    assert {r["status"] for r in fused.values()} == {"ok"}
    for name in basic:
        assert fused[name]["fused"]["jobs"] == 4  # the group it trained in, and its timings
        assert fused[name]["time/fit_s"] >= fused[name]["fused"]["fit_share_s"] > 0
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


def signal_at_step(monkeypatch, n: int) -> None:
    """The stack's ``n``-th step sends this process SIGTERM (as a scheduler would)."""
    from vae_lightning.training.stack import Stack

    step, calls = Stack.training_step, []

    def signalling(self, batch, batch_idx):
        calls.append(1)
        if len(calls) == n:
            os.kill(os.getpid(), signal.SIGTERM)
        return step(self, batch, batch_idx)

    monkeypatch.setattr(Stack, "training_step", signalling)


def test_a_stack_stopped_by_sigterm_resumes_job_by_job_as_if_never_stopped(
    data_dir, tmp_path, monkeypatch
):
    from vae_lightning.errors import RunInterrupted

    def cfg(folder: Path, beta: int):
        composed = compose([*small_overrides(data_dir, folder), "model.hidden_dim=32",
                            f"model.beta={beta}", "trainer.max_epochs=3", "logger=none",
                            "callbacks=minimal"])  # fmt: skip
        return OmegaConf.create(OmegaConf.to_container(composed, resolve=True))

    for beta in (1, 4):
        train(cfg(tmp_path / f"alone{beta}", beta))
    signal_at_step(monkeypatch, 12)  # epoch 1 (8 batches per epoch)
    stacked = [cfg(tmp_path / f"stack{beta}", beta) for beta in (1, 4)]
    with pytest.raises(RunInterrupted):
        train_group(stacked, [Path(c.paths.output_dir) for c in stacked])
    monkeypatch.undo()
    for c, beta in zip(stacked, (1, 4), strict=True):
        last = torch.load(Path(c.paths.output_dir, "checkpoints", "last.ckpt"), weights_only=False)
        assert (last["epoch"], last["global_step"]) == (1, 12)  # where the stack stopped
        with open_dict(c):
            c.resume = True
        train(c)
        assert_same_run(tmp_path / f"alone{beta}", tmp_path / f"stack{beta}")


# --- grouping and the stack's checkpoints, in-process ------------------------------------------


def test_jobs_group_by_everything_but_beta_latent_dim_and_seed():
    def key(*overrides: str) -> str:
        return group_key(compose(["data.verify=false", *overrides]))

    assert key("model.beta=1", "seed=0") == key("model.beta=4", "model.latent_dim=5", "seed=3")
    assert key("model.hidden_dim=32") != key("model.hidden_dim=64")
    assert key("model.lr=1e-3") != key("model.lr=1e-4")
    assert key("model=ae") != key("model=vae")


@pytest.mark.parametrize(
    ("overrides", "reason"),
    [
        ([], None),
        (["model=ae"], None),
        (["model=conv_vae"], None),
        (["scheduler=cosine"], "scheduler=cosine"),
        (["kl=warmup"], "kl=warmup"),
        (["model=conv_vae_deep"], "batchnorm"),
        (["trainer=ddp"], "trainer."),
        (["trainer.precision=bf16-mixed"], "trainer.precision"),
        (["callbacks.model_checkpoint.save_top_k=3"], "callbacks.model_checkpoint"),
    ],
)
def test_what_cannot_be_stacked_runs_alone_with_the_reason(overrides, reason, tmp_path):
    cfg = compose(["data.verify=false", f"paths.output_dir={tmp_path}", *overrides])
    got = why_not_fused(OmegaConf.create(OmegaConf.to_container(cfg, resolve=True)))
    assert got is None if reason is None else reason in got


def test_on_a_gpu_machine_the_stack_waits_for_hydra_launcher_gpu(monkeypatch, tmp_path):
    """The stack has not run on a GPU yet: where it would, its jobs run alone unless asked."""
    cfg = compose(["data.verify=false", f"paths.output_dir={tmp_path}"])
    cfg = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    assert "hydra.launcher.gpu=true" in why_not_fused(cfg)
    assert why_not_fused(cfg, gpu=True) is None
    with open_dict(cfg):
        cfg.trainer.accelerator = "cpu"
    assert why_not_fused(cfg) is None
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    cfg.trainer.accelerator = "cuda"
    assert "no CUDA GPU is here" in why_not_fused(cfg, gpu=True)


MODELS = {
    "vae": ["model=vae", "model.hidden_dim=32"],
    "ae": ["model=ae", "model.hidden_dim=32"],
    "conv_vae": ["model=conv_vae", "model.channels=[4,8,8]"],
}


@pytest.mark.parametrize("kind", list(MODELS))
def test_a_job_trained_in_a_stack_is_the_job_trained_alone(kind, data_dir, tmp_path):
    """Through train() itself: each job alone, and the same jobs stacked then handed over."""
    jobs = [("model.latent_dim=2", "seed=0"), ("model.latent_dim=5", "seed=1")]
    if kind != "ae":
        jobs = [(*j, f"model.beta={b}") for j, b in zip(jobs, (1, 4), strict=True)]

    def cfg(job: tuple[str, ...], folder: Path):
        composed = compose([*small_overrides(data_dir, folder), *MODELS[kind], *job,
                            "trainer.max_epochs=2", "logger=none", "callbacks=minimal",
                            "data.binarize=dynamic"])  # fmt: skip
        return OmegaConf.create(OmegaConf.to_container(composed, resolve=True))

    for n, job in enumerate(jobs):
        train(cfg(job, tmp_path / f"alone{n}"))
    stacked = [cfg(job, tmp_path / f"stack{n}") for n, job in enumerate(jobs)]
    assert train_group(stacked, [Path(c.paths.output_dir) for c in stacked]) == []
    for n, c in enumerate(stacked):
        with open_dict(c):
            c.resume = True
        train(c)
        assert_same_run(tmp_path / f"alone{n}", tmp_path / f"stack{n}")
    if kind == "ae":  # its sampling Gaussian: fitted to the same codes
        from vae_lightning.models import AE

        a, b = (AE.load_from_checkpoint(tmp_path / f"{w}0/checkpoints/last.ckpt")
                for w in ("alone", "stack"))  # fmt: skip
        assert torch.allclose(a.code_cov, b.code_cov, rtol=1e-3, atol=1e-4)


def test_a_job_whose_loss_turns_non_finite_leaves_the_stack_and_the_others_go_on(
    data_dir, tmp_path, monkeypatch
):
    """Job 1's weights are poisoned after its 3rd step: the stack drops it at the next one (it
    then goes on alone from its last good checkpoint, where a real NaN recurs and fails it as
    a job alone fails); job 0 trains on exactly as it trains alone."""
    from vae_lightning.training.stack import Stack

    calls = []

    def poisoned(self, outputs, batch, batch_idx):  # after the step's backward and Adam
        calls.append(list(self.alive))
        if len(calls) == 3:
            with torch.no_grad():
                self.stacked()[0]["decoder.net.0.weight"][1].fill_(math.nan)

    def cfg(folder: Path, beta: int):
        composed = compose([*small_overrides(data_dir, folder), "model.hidden_dim=32",
                            f"model.beta={beta}", "trainer.max_epochs=2", "logger=none",
                            "callbacks=minimal"])  # fmt: skip
        return OmegaConf.create(OmegaConf.to_container(composed, resolve=True))

    train(cfg(tmp_path / "alone", 1))
    monkeypatch.setattr(Stack, "on_train_batch_end", poisoned, raising=False)
    stacked = [cfg(tmp_path / "stack0", 1), cfg(tmp_path / "stack1", 4)]
    assert train_group(stacked, [tmp_path / "stack0", tmp_path / "stack1"]) == [1]
    assert calls[:3] == [[True, True]] * 3 and calls[3:] == [[True, False]] * (len(calls) - 3)
    assert not (tmp_path / "stack1" / "checkpoints").exists()  # dropped before its first one
    with open_dict(stacked[0]):
        stacked[0].resume = True
    train(stacked[0])
    assert_same_run(tmp_path / "alone", tmp_path / "stack0")


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
