"""What vae-evaluate evaluates (evaluation.subject): a checkpoint checked against its run
folder's config before anything is loaded or written, of which only the data settings are used
and no target is ever instantiated. On run folders written by earlier code (fixtures/pre_floors)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from tests.conftest import FIXTURES
from vae_lightning.errors import ConfigError
from vae_lightning.evaluate import evaluate

PRE_FLOORS = FIXTURES / "pre_floors"
FAST = {"device": "cpu", "batch_size": 64, "n_fid": 0, "k": 1}


@pytest.fixture
def vae_run(tmp_path) -> Path:
    """A VAE's run folder (latent 3, hidden 4): its config and its last.ckpt."""
    run = tmp_path / "vae"
    shutil.copytree(PRE_FLOORS / "vae", run)
    return run


def refused(ckpt: Path) -> ConfigError:
    """evaluate() refuses ``ckpt`` naming the key ckpt, and writes nothing."""
    run = ckpt.parent.parent
    with pytest.raises(ConfigError) as info:
        evaluate(ckpt, **FAST)
    assert not (run / "eval.json").exists() and not (run / "eval").exists()
    return info.value


def test_refuses_a_checkpoint_of_another_model_class(vae_run):
    foreign = vae_run / "checkpoints" / "from_ae.ckpt"
    shutil.copy(PRE_FLOORS / "ae" / "checkpoints" / "last.ckpt", foreign)
    err = refused(foreign)
    assert err.key == "ckpt"
    assert str(err) == (
        f"ckpt {foreign} holds a AE but its run config {vae_run / '.hydra' / 'config.yaml'} says "
        "model._target_=vae_lightning.models.VAE: the checkpoint does not belong to this run folder"
    )


def test_refuses_hyper_parameters_that_disagree_with_the_run_config(vae_run):
    checkpoint = torch.load(vae_run / "checkpoints" / "last.ckpt", weights_only=True)
    checkpoint["hyper_parameters"]["latent_dim"] = 8
    wrong = vae_run / "checkpoints" / "wrong_hparams.ckpt"
    torch.save(checkpoint, wrong)
    err = refused(wrong)
    assert err.key == "ckpt" and "latent_dim: config 3 vs checkpoint 8" in str(err)


def test_never_instantiates_targets_from_the_run_config(vae_run, tmp_path):
    cfg_path = vae_run / ".hydra" / "config.yaml"
    cfg = OmegaConf.load(cfg_path)
    marker = tmp_path / "pwned"
    cfg.data._target_ = "pathlib.Path.touch"
    cfg.data.self = str(marker)
    OmegaConf.save(cfg, cfg_path)
    with pytest.raises(ConfigError, match=r"data._target_ .* evaluate takes only"):
        evaluate(vae_run / "checkpoints" / "last.ckpt", **FAST)
    assert not marker.exists()
