"""Multiruns through Hydra's launchers and sweepers: a grid through joblib and submitit, Optuna's
seeded search, the threads and GPUs each job of a parallel sweep gets. (The basic and fused
launchers: tests/sweeps/test_fused_launcher.py; the sweep folder: tests/sweeps/test_folders.py.)"""

from pathlib import Path

import pytest

from tests.conftest import job_records, run_sweep


@pytest.mark.slow
# basic and fused: tests/sweeps/test_fused_launcher.py. submitit starts a process per job (10 s of
# imports each on 2 cores): a 2x1 grid
@pytest.mark.parametrize(("launcher", "betas"), [("joblib", (1, 2)), ("submitit_local", (1,))])
def test_a_grid_sweep_through_each_launcher(data_dir, tmp_path, launcher, betas):
    out = tmp_path / "sweep"
    betas_arg = f"model.beta={','.join(map(str, betas))}"
    run_sweep(data_dir, out, "model.latent_dim=2,4", betas_arg, f"hydra/launcher={launcher}")
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


@pytest.mark.slow
def test_optuna_search_is_seeded_and_minimises_the_metric(data_dir, tmp_path):
    def search(folder):
        run_sweep(
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


@pytest.mark.parametrize(
    ("launcher", "threads", "expected"),
    [
        ({"n_jobs": 2}, None, "half"),  # joblib's 2 jobs at once: the cores divided
        ({"n_jobs": -1}, None, 1),  # a job per core
        ({"n_jobs": 2, "cpus_per_task": 3}, None, 3),  # submitit's cores per task
        ({"n_jobs": 2}, 5, 5),  # threads= wins
    ],
)
def test_a_parallel_launchers_jobs_divide_the_cores(monkeypatch, launcher, threads, expected):
    """What each job of a parallel sweep sets torch's threads to (HydraConfig faked here; the
    sweep through joblib above runs it for real)."""
    from types import SimpleNamespace

    import torch
    from hydra.core.hydra_config import HydraConfig

    from vae_lightning import config

    monkeypatch.setattr(config, "cores", lambda: 8)
    monkeypatch.setattr(HydraConfig, "initialized", staticmethod(lambda: True))
    monkeypatch.setattr(
        HydraConfig, "get", staticmethod(lambda: SimpleNamespace(launcher=launcher))
    )
    before = torch.get_num_threads()
    try:
        config.set_torch_threads(threads)
        assert torch.get_num_threads() == (4 if expected == "half" else expected)
    finally:
        torch.set_num_threads(before)
