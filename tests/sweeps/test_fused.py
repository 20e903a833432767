"""Which jobs of a sweep can train as one stack (sweeps.fused): grouped by everything but beta,
latent_dim and seed; what cannot be stacked runs alone, with the reason."""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf, open_dict

from vae_lightning.config import compose
from vae_lightning.sweeps.fused import group_key, why_not_fused


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
        (["model=cvae"], "model vae_lightning.models.CVAE"),
        (["model.feature_loss_weight=0.5"], "feature_loss_weight"),
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
