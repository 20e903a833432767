"""Sweeps: multiruns through each launcher, failing jobs, resume, DDP, folder uniqueness."""

import json
from pathlib import Path

import pytest

from tests.conftest import run_cli, run_multirun, start_together

SMALL = [
    "data.verify=false",
    "data.download=false",
    "data.val_size=128",
    "trainer.accelerator=cpu",
    "callbacks.latent_probe.max_train=200",
]


def job_records(sweep_dir: Path) -> dict[str, dict]:
    return {p.parent.name: json.loads(p.read_text()) for p in sweep_dir.glob("*/metrics.json")}


def sweep(data_dir: Path, sweep_dir: Path, *args: str, status: int = 0):
    """A multirun of debug=fast jobs (``run_multirun``: in this process under the basic
    launcher)."""
    result = run_multirun(
        "debug=fast",
        f"paths.data_dir={data_dir}",
        f"hydra.sweep.dir={sweep_dir}",
        *SMALL,
        *args,
    )
    assert result.returncode == status, result.stderr[-3000:]
    return result


@pytest.mark.slow
# basic and fused: tests/test_fused_launcher.py. submitit starts a process per job (10 s of
# imports each on 2 cores): a 2x1 grid
@pytest.mark.parametrize(("launcher", "betas"), [("joblib", (1, 2)), ("submitit_local", (1,))])
def test_a_grid_sweep_through_each_launcher(data_dir, tmp_path, launcher, betas):
    out = tmp_path / "sweep"
    sweep(data_dir, out, "model.latent_dim=2,4", f"model.beta={','.join(map(str, betas))}",
          f"hydra/launcher={launcher}")  # fmt: skip
    records = job_records(out)
    n = 2 * len(betas)
    assert len(records) == n
    assert all(r["status"] == "ok" for r in records.values())
    grid = {(r["hparams"]["latent_dim"], r["hparams"]["beta"]) for r in records.values()}
    assert grid == {(d, float(b)) for d in (2, 4) for b in betas}
    # the sweep's report: one table row per job
    report = (out / "REPORT.md").read_text()
    assert f"{n} runs: {n} ok" in report
    assert sum(line.startswith("| `") for line in report.splitlines()) == n
    assert (out / "summary.csv").read_text().count("\n") == n + 1
    assert (out / "heatmap_test_loss.png").is_file()
    if launcher == "joblib":  # 2 parallel jobs on this machine's cores: threads divided
        logs = "".join(p.read_text() for p in out.glob("*/train.log"))
        assert "torch threads:" in logs


def test_a_failing_job_is_recorded_and_the_others_run(data_dir, tmp_path):
    out = tmp_path / "sweep"
    result = sweep(data_dir, out, "model.latent_dim=0,3", status=1)  # a job failed
    assert "error: 1 of 2 jobs of this sweep failed" in result.stderr
    records = job_records(out)
    assert len(records) == 2
    failed = [r for name, r in records.items() if "latent_dim=0" in name]
    ok = [r for name, r in records.items() if "latent_dim=3" in name]
    assert failed[0]["status"] == "failed"
    assert "model.latent_dim must be an integer >= 1, got 0" in failed[0]["error"]
    assert ok[0]["status"] == "ok"
    jobs = [json.loads(x) for x in (out / "jobs.jsonl").read_text().splitlines()]
    assert sorted(j["status"] for j in jobs) == ["failed", "ok"]
    assert "2 runs: 1 ok" in (out / "REPORT.md").read_text()  # the report is still written


def test_a_resumed_sweep_reruns_only_unfinished_jobs(data_dir, tmp_path):
    out = tmp_path / "sweep"
    sweep(data_dir, out, "model.latent_dim=2,3,4")
    records = job_records(out)
    assert len(records) == 3
    finished = {p: p.stat().st_mtime_ns for p in out.glob("*/metrics.json")}
    # one job "killed": its record says running
    (victim,) = [
        p for p in finished if "latent_dim=3" in (p.parent / ".hydra/overrides.yaml").read_text()
    ]
    victim.write_text(json.dumps({"status": "running"}))
    sweep(data_dir, out, "model.latent_dim=2,3,4", "resume=true")
    for path, mtime in finished.items():
        if path == victim:
            assert json.loads(path.read_text())["status"] == "ok"  # rerun
        else:
            assert path.stat().st_mtime_ns == mtime  # untouched
    assert len(job_records(out)) == 3  # the same folders, no new ones


def test_two_sweeps_started_together_get_their_own_folders(data_dir, tmp_path):
    start_together(
        "-m", "debug=fast", "model.latent_dim=2,3", f"paths.data_dir={data_dir}",
        f"paths.log_dir={tmp_path}", *SMALL,
    )  # fmt: skip
    sweeps = sorted((tmp_path / "debug" / "multiruns").iterdir())
    assert len(sweeps) == 2
    assert all(len(job_records(s)) == 2 for s in sweeps)


@pytest.mark.slow
def test_a_multirun_of_ddp_jobs_logs_exact_means_over_uneven_shards(data_dir, tmp_path):
    """Each job of a multirun on two gloo processes, the default callbacks. 131 validation
    images on 2 ranks (66 + 65, in batches of 32, 32, 2 and 32, 32, 1): the logged val/loss is
    the mean over the 131 images, not a mean of the ranks' or batches' means. The AE is
    deterministic, so the checkpoint's val loss can be recomputed in one process. (With 129
    images, rank 0 has 3 batches and rank 1 two, and the logged mean covers only the first two
    batches of each rank: Lightning's DDP evaluation stops at the shorter shard.)"""
    import torch
    from omegaconf import OmegaConf

    from vae_lightning.data import MNISTDataModule
    from vae_lightning.models import AE
    from vae_lightning.models.losses import recon_bce

    out = tmp_path / "sweep"
    result = run_cli(
        "-m", "trainer=ddp", "trainer.devices=2", "model=ae", "model.latent_dim=2,3",
        "debug=limit", "trainer.limit_train_batches=null", "trainer.limit_val_batches=1.0",
        f"paths.data_dir={data_dir}", f"hydra.sweep.dir={out}", *SMALL,
        # after SMALL, whose val_size=128 would win (Hydra keeps the last of a key's overrides)
        "data.batch_size=64", "data.val_size=131", "data.eval_batch_size=32",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    dm = MNISTDataModule(data_dir=str(data_dir), verify=False, val_size=131)
    dm.setup()
    x = dm.splits["val"][0].float() / 255
    jobs = sorted(p.parent for p in out.glob("*/metrics.json"))
    assert len(jobs) == 2
    # the second process, started for the first job, stays in its group for the next ones
    log = (jobs[0] / "train.log").read_text()
    assert "GLOBAL_RANK: 0, MEMBER: 1/2" in log and "GLOBAL_RANK: 1, MEMBER: 2/2" in log
    for job in jobs:
        record = json.loads((job / "metrics.json").read_text())
        assert record["status"] == "ok"
        assert OmegaConf.load(job / ".hydra" / "config.yaml").data.val_size == 131
        # 509 training images, 2 ranks of 255 or fewer, batch 64: 4 steps an epoch, 2 epochs
        assert [
            int(line.split(",")[1]) for line in (job / "history.csv").read_text().splitlines()[1:]
        ] == [4, 8]
        assert "[rank: 1] Seed set" in (job / "train.log").read_text()  # both ran every job

        logged = record["metrics"]["val/loss"]
        model = AE.load_from_checkpoint(job / "checkpoints" / "last.ckpt", weights_only=True)
        with torch.no_grad():
            per_image = recon_bce(model.eval().decoder(model.encoder(x)), x).double()  # (131,)
        exact = per_image.mean().item()
        ranks = (per_image[0::2].mean() + per_image[1::2].mean()).item() / 2  # a mean of means
        batches = [per_image[r::2][i : i + 32].mean() for r in (0, 1) for i in (0, 32, 64)]
        wrong = [ranks, torch.stack(batches).mean().item()]
        # the images' losses are alike here (a spread of a few nats): the wrong means differ
        # from the exact one by 1e-4 of it or less, the logged one by rounding (1e-7 of it)
        gap = min(abs(w - exact) for w in wrong)
        assert gap > 1e-7 * exact
        assert abs(logged - exact) < gap / 4, (job.name, logged, exact, wrong)


@pytest.mark.slow
def test_optuna_search_is_seeded_and_minimises_the_metric(data_dir, tmp_path):
    def search(folder):
        sweep(
            data_dir,
            folder,
            "hparams_search=optuna",
            "hydra.sweeper.n_trials=3",
            "hydra.sweeper.sampler.n_startup_trials=2",
            "~callbacks.latent_probe",
        )
        return sorted(
            (r["hparams"]["latent_dim"], round(r["hparams"]["beta"], 6), r["metrics"]["val/loss"])
            for r in job_records(folder).values()
        )

    first, second = search(tmp_path / "a"), search(tmp_path / "b")
    assert len(first) == 3
    assert [t[:2] for t in first] == [t[:2] for t in second]  # the same trials for the same seed
    best = yaml_best(tmp_path / "a" / "optimization_results.yaml")
    assert best == pytest.approx(min(t[2] for t in first))


def yaml_best(path: Path) -> float:
    import yaml

    return float(yaml.safe_load(path.read_text())["best_value"])


@pytest.mark.parametrize(
    ("devices", "accelerator", "job", "n_gpus", "expected"),
    [
        (1, "auto", 0, 4, [0]),
        (1, "gpu", 5, 4, [1]),  # job 5 of a sweep on 4 GPUs: the second GPU
        (1, "cuda", 7, 2, [1]),
        (1, "auto", 3, 1, 1),  # one GPU: nothing to spread
        (1, "auto", None, 4, 1),  # not a multirun
        (1, "cpu", 3, 4, 1),  # on the CPU
        ([2], "gpu", 3, 4, [2]),  # pinned by the user
        (2, "auto", 3, 4, 2),  # DDP jobs: every process must agree on its devices
        ("auto", "auto", 3, 4, "auto"),
    ],
)
def test_a_multirun_spreads_single_device_jobs_over_every_gpu(
    devices, accelerator, job, n_gpus, expected
):
    from vae_lightning.config import job_devices

    assert job_devices(devices, accelerator, job, n_gpus) == expected


def test_each_job_of_a_parallel_sweep_records_its_own_gpu(compose_cfg, monkeypatch):
    """What a joblib sweep on a 4-GPU machine does for its jobs 0-7 (the GPUs faked here; on
    a real one Lightning then trains each job on trainer.devices)."""
    from types import SimpleNamespace

    import torch
    from hydra.core.hydra_config import HydraConfig

    from vae_lightning import config

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.setattr(config, "in_multirun", lambda: True)
    assigned = []
    for job in range(8):
        monkeypatch.setattr(HydraConfig, "get", lambda job=job: SimpleNamespace(
            job=SimpleNamespace(num=job)))  # fmt: skip
        cfg = compose_cfg("trainer.accelerator=auto", "spread_gpus=true")  # small runs: cpu
        config.spread_over_gpus(cfg)
        assigned.append(cfg.trainer.devices)
    assert assigned == [[0], [1], [2], [3], [0], [1], [2], [3]]
    cfg = compose_cfg("trainer.accelerator=auto")  # off by default: Lightning's GPU 0
    config.spread_over_gpus(cfg)
    assert cfg.trainer.devices == 1
