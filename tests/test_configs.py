"""Integration: every config composes and instantiates; train(cfg) runs each model."""

import json
import math
from pathlib import Path

import hydra
import pytest
import torch
from hydra.errors import ConfigCompositionException

from vae_lightning.config import CONFIG_DIR
from vae_lightning.errors import ConfigError, DataError
from vae_lightning.models import AE, VAE, ConvVAE
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
    instantiate_all(cfg)


@pytest.mark.parametrize("option", options("trainer"))
def test_every_trainer_composes(compose_cfg, option):
    cfg = compose_cfg(f"trainer={option}")
    assert cfg.trainer._target_ == "lightning.pytorch.Trainer"
    if option != "gpu" or torch.cuda.is_available():
        overrides = {"accelerator": "cpu"} if option == "ddp" else {}
        hydra.utils.instantiate(cfg.trainer, **overrides)


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


def test_unknown_model_name_lists_the_options(compose_cfg):
    with pytest.raises(ConfigCompositionException) as info:
        compose_cfg("model=vea")
    assert "vea" in str(info.value)


@pytest.mark.parametrize("model", ["vae", "ae", "conv_vae", "conv_vae_deep"])
def test_fast_dev_run_of_each_model_through_train(compose_cfg, tmp_path, model):
    cfg = compose_cfg(f"model={model}", "debug=fast")
    value = train(cfg)
    out = Path(cfg.paths.output_dir)
    record = json.loads((out / "metrics.json").read_text())
    assert record["status"] == "ok"
    assert math.isfinite(value) and value == record["metrics"]["val/loss"]
    assert record["metrics"]["test/loss"] > 0
    expected = {"loss", "recon", "mse"} | ({"kl"} if model != "ae" else set())
    for stage in ("train", "val", "test"):
        assert {k.split("/")[1] for k in record["metrics"] if k.startswith(stage)} >= expected
    names = {"vae": "VAE", "ae": "AE", "conv_vae": "ConvVAE", "conv_vae_deep": "ConvVAE"}
    assert record["hparams"]["model"] == names[model]


def test_limit_run_writes_history_and_reloadable_checkpoints(compose_cfg):
    cfg = compose_cfg("debug=limit", "model.latent_dim=3", "model.beta=2")
    train(cfg)
    out = Path(cfg.paths.output_dir)
    lines = (out / "history.csv").read_text().splitlines()
    header = lines[0].split(",")
    assert len(lines) == 3 and header[:2] == ["epoch", "step"]
    assert {"train/loss", "val/loss", "val/kl", "time/epoch_s"} <= set(header)
    record = json.loads((out / "metrics.json").read_text())
    assert record["epochs"] == 2 and record["time/epoch_s_median"] > 0
    assert record["hparams"]["beta"] == 2.0 and record["hparams"]["latent_dim"] == 3
    last = out / "checkpoints" / "last.ckpt"
    best = Path(record["best_checkpoint"])
    assert last.is_file() and best.is_file() and best.parent == last.parent
    model = VAE.load_from_checkpoint(last, weights_only=True)
    assert model.hparams.latent_dim == 3 and model.beta == 2.0
    # the last row of history is the last epoch's metrics, as in metrics.json
    last_row = dict(zip(header, lines[-1].split(","), strict=True))
    assert float(last_row["val/loss"]) == pytest.approx(record["metrics"]["val/loss"])


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("model.latent_dim=0", "model.latent_dim"),
        ("model.latent_dim=abc", "model.latent_dim"),
        ("model.beta=-1", "model.beta"),
        ("model.lr=0", "model.lr"),
        ("data.batch_size=0", "data.batch_size"),
        ("data.binarize=yes", "data.binarize"),
    ],
)
def test_bad_values_stop_before_training_naming_the_key(compose_cfg, override, key):
    cfg = compose_cfg(override)
    with pytest.raises(ConfigError) as info:
        train(cfg)
    assert info.value.key == key
    out = Path(cfg.paths.output_dir)
    assert not (out / "checkpoints").exists()
    assert json.loads((out / "metrics.json").read_text())["status"] == "failed"


def test_missing_data_says_what_to_run(compose_cfg, tmp_path):
    cfg = compose_cfg(f"paths.data_dir={tmp_path / 'empty'}", "debug=fast")
    with pytest.raises(DataError, match="make data"):
        train(cfg)


@pytest.mark.parametrize("model_cls", [VAE, AE, ConvVAE])
def test_model_classes_match_configs(compose_cfg, model_cls):
    name = {VAE: "vae", AE: "ae", ConvVAE: "conv_vae"}[model_cls]
    assert isinstance(hydra.utils.instantiate(compose_cfg(f"model={name}").model), model_cls)


def test_the_deeper_convvae_trains_and_reloads_with_its_batchnorm_statistics(compose_cfg):
    cfg = compose_cfg("model=conv_vae_deep", "debug=limit", "callbacks=minimal")
    train(cfg)
    out = Path(cfg.paths.output_dir)
    record = json.loads((out / "metrics.json").read_text())
    assert record["status"] == "ok" and record["epochs"] == 2
    saved = torch.load(out / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    model = ConvVAE.load_from_checkpoint(out / "checkpoints" / "last.ckpt", weights_only=True)
    assert model.hparams.batchnorm and model.hparams.extra_channels == 256
    stats = [k for k in saved if k.endswith("running_var")]
    assert len(stats) == 7  # every BatchNorm's statistics travel, and were updated in training
    for key in stats:
        assert torch.equal(model.state_dict()[key], saved[key])
        assert not torch.equal(saved[key], torch.ones_like(saved[key])), key
