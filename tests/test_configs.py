"""Integration: every config composes and instantiates (the trainer's as a SLURM job too);
train(cfg) runs each model and each experiment; composing and importing pay only for what a run
uses."""

import json
import math
import subprocess
import sys
from pathlib import Path

import hydra
import pytest
import torch

from tests.conftest import REPO_ROOT
from vae_lightning.config import CONFIG_DIR
from vae_lightning.train import train

EXPERIMENTS = sorted(p.stem for p in (CONFIG_DIR / "experiment").glob("*.yaml"))


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONFIG_DIR / group).glob("*.yaml"))


def instantiate_all(cfg):
    datamodule = hydra.utils.instantiate(cfg.data)
    model = hydra.utils.instantiate(cfg.model)
    callbacks = [hydra.utils.instantiate(c) for c in (cfg.callbacks or {}).values()]
    loggers = [hydra.utils.instantiate(c) for c in (cfg.logger or {}).values()]
    return datamodule, model, callbacks, loggers


def test_seed_experiments_are_present():
    assert {"seed1_vae_mnist", "seed1_ae_mnist", "seed2_convvae_fashion"} <= set(EXPERIMENTS)


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiment_composes_and_instantiates(compose_cfg, experiment):
    cfg = compose_cfg(f"experiment={experiment}")
    datamodule, model, callbacks, loggers = instantiate_all(cfg)
    assert cfg.task_name == experiment
    assert model.hparams.in_shape == (1, 28, 28)
    assert datamodule.batch_size == cfg.data.batch_size
    trainer = hydra.utils.instantiate(cfg.trainer, callbacks=callbacks, logger=loggers)
    assert trainer.max_epochs == cfg.trainer.max_epochs


def test_seed_experiments_carry_the_seeds_settings(compose_cfg):
    s1 = compose_cfg("experiment=seed1_vae_mnist", small=False)
    assert (s1.model.latent_dim, s1.model.hidden_dim, s1.model.lr) == (20, 400, 1e-3)
    assert (s1.data.batch_size, s1.trainer.max_epochs, s1.data.val_on_test) == (128, 20, True)
    ae = compose_cfg("experiment=seed1_ae_mnist", small=False)
    assert ae.model._target_.endswith(".AE") and ae.model.latent_dim == 20
    s2 = compose_cfg("experiment=seed2_convvae_fashion", small=False)
    assert s2.data._target_.endswith("FashionMNISTDataModule")
    assert (s2.model.latent_dim, list(s2.model.channels), s2.model.lr) == (32, [32, 64, 128], 5e-4)
    assert (s2.data.batch_size, s2.trainer.max_epochs) == (128, 100)


@pytest.mark.parametrize(
    ("group", "option"),
    [(g, o) for g in ("data", "model", "logger", "callbacks", "debug") for o in options(g)],
)
def test_every_group_option_composes_and_instantiates(compose_cfg, group, option):
    cfg = compose_cfg(f"{group}={option}")
    datamodule, model, callbacks, loggers = instantiate_all(cfg)
    # each config's _target_ is what was built, and the data's shape reached the model
    assert type(datamodule).__name__ == cfg.data._target_.rsplit(".", 1)[1]
    assert type(model).__name__ == cfg.model._target_.rsplit(".", 1)[1]
    assert tuple(model.hparams.in_shape) == tuple(datamodule.image_shape)
    wanted = [c for c in (cfg.callbacks or {}).values() if c is not None]
    assert [type(c).__name__ for c in callbacks if c is not None] == [
        c._target_.rsplit(".", 1)[1] for c in wanted
    ]
    assert len([x for x in loggers if x is not None]) == len(
        [c for c in (cfg.logger or {}).values() if c is not None]
    )


@pytest.mark.parametrize("option", options("trainer"))
def test_every_trainer_composes(compose_cfg, option):
    cfg = compose_cfg(f"trainer={option}")
    assert cfg.trainer._target_ == "lightning.pytorch.Trainer"
    if option != "gpu" or torch.cuda.is_available():
        overrides = {"accelerator": "cpu"} if option == "ddp" else {}
        trainer = hydra.utils.instantiate(cfg.trainer, **overrides)
        assert trainer.max_epochs == cfg.trainer.max_epochs


def test_default_trainer_uses_a_gpu_when_there_is_one(compose_cfg):
    from lightning.pytorch.accelerators import CPUAccelerator, CUDAAccelerator

    assert compose_cfg(small=False).trainer.accelerator == "auto"
    cfg = compose_cfg("trainer.accelerator=auto")  # the small test settings ask for the CPU
    trainer = hydra.utils.instantiate(cfg.trainer, logger=False)
    wanted = CUDAAccelerator if torch.cuda.is_available() else CPUAccelerator
    assert isinstance(trainer.accelerator, wanted)
    assert cfg.model._target_.endswith(".VAE") and cfg.data._target_.endswith(".MNISTDataModule")


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiment_trains_one_batch(compose_cfg, experiment):
    """A fast run of every experiment config through train() (fast_dev_run: one batch each)."""
    cfg = compose_cfg(f"experiment={experiment}", "debug=fast", "callbacks=minimal")
    train(cfg)
    record = json.loads((Path(cfg.paths.output_dir) / "metrics.json").read_text())
    assert record["status"] == "ok"
    assert record["hparams"]["model"] == cfg.model._target_.rsplit(".", 1)[1]
    assert math.isfinite(record["metrics"]["test/loss"])


def test_the_slurm_launcher_config_composes_on_the_plugins_defaults():
    from hydra.core.global_hydra import GlobalHydra

    from vae_lightning.config import compose

    cfg = compose(["hydra/launcher=slurm", "hydra.launcher.partition=gpu"], return_hydra=True)
    GlobalHydra.instance().clear()
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("submitit_launcher.SlurmLauncher")
    assert (launcher.timeout_min, launcher.max_num_timeout, launcher.cpus_per_task) == (120, 3, 4)
    assert launcher.partition == "gpu" and launcher.signal_delay_s == 120  # the plugin's default


# every model on MNIST, and on Fashion-MNIST the models whose own tests train on it
FAST_RUNS = [(m, "mnist") for m in options("model")] + [
    (m, "fashion_mnist") for m in ("conv_cvae", "hvae", "vq_vae")
]


@pytest.mark.parametrize(("model", "data"), FAST_RUNS)
def test_fast_dev_run_of_each_model_through_train(compose_cfg, model, data):
    cfg = compose_cfg(f"model={model}", f"data={data}", "debug=fast")
    value = train(cfg)
    out = Path(cfg.paths.output_dir)
    record = json.loads((out / "metrics.json").read_text())
    assert record["status"] == "ok"
    assert math.isfinite(value) and value == record["metrics"]["val/loss"]
    assert record["metrics"]["test/loss"] > 0
    expected = {"loss", "recon", "mse"} | ({"kl"} if model != "ae" else set())
    for stage in ("train", "val", "test"):
        assert {k.split("/")[1] for k in record["metrics"] if k.startswith(stage)} >= expected
    assert record["hparams"]["model"] == cfg.model._target_.rsplit(".", 1)[1]
    assert record["hparams"]["data"] == data
    if model == "vq_vae":  # the share of the codebook the test set uses
        assert 0 < record["metrics"]["test/usage"] <= 1


def test_slurm_runs_of_the_trainer_config_get_auto_requeue(monkeypatch):
    from lightning.pytorch.plugins.environments import SLURMEnvironment

    for key, value in {
        "SLURM_NTASKS": "1",
        "SLURM_JOB_ID": "123",
        "SLURM_JOB_NAME": "vae",
        "SLURM_PROCID": "0",
        "SLURM_LOCALID": "0",
        "SLURM_NODEID": "0",
        "SLURM_NTASKS_PER_NODE": "1",
        "SLURM_NODELIST": "node1",
    }.items():
        monkeypatch.setenv(key, value)
    from vae_lightning.config import compose

    cfg = compose(["trainer.accelerator=cpu", "paths.output_dir=unused"])
    trainer = hydra.utils.instantiate(cfg.trainer, logger=False)  # the project's trainer config
    env = trainer._accelerator_connector.cluster_environment
    assert isinstance(env, SLURMEnvironment) and env.auto_requeue


def test_composing_and_importing_does_not_pay_for_what_a_run_does_not_use():
    """Start-up: the project's own modules import scikit-learn, the report and the callbacks only
    where they are used (probes, the end of a sweep, a run), whatever the dependencies import:
    what Lightning and torchmetrics bring in is imported first and not counted."""
    code = (
        "import sys\n"
        "import lightning, torchmetrics, matplotlib\n"
        "before = set(sys.modules)\n"
        "from vae_lightning.config import compose\n"
        "import vae_lightning.train\n"
        "compose([])\n"
        "print(sorted(m for m in ('vae_lightning.studies.report', 'vae_lightning.views.images',\n"
        "    'vae_lightning.models', 'vae_lightning.data') if m in sys.modules))\n"
        "import vae_lightning.models, vae_lightning.data.datamodules, vae_lightning.views.images\n"
        "import vae_lightning.run.record, vae_lightning.run.checkpoints\n"
        "import vae_lightning.training.step\n"
        "new = set(sys.modules) - before\n"
        "print(sorted({m.split('.')[0] for m in new if m.startswith(('sklearn', 'scipy'))}"
        " | {m for m in new if m == 'vae_lightning.studies.report'}))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO_ROOT
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.split("\n")[:2] == ["[]", "[]"]
