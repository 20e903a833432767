"""vae-prior, the VQ-VAE's second stage: its refusals, and both stages through the real
commands (the VQ-VAE trained, reloaded, its PixelCNN prior fitted and written as prior.ckpt)."""

from __future__ import annotations

import math

import pytest
import torch

from tests.conftest import SMALL, run_here
from vae_lightning.models import VAE, VQVAE


def test_vae_prior_refuses_another_model_and_a_missing_checkpoint(tmp_path):
    ckpt = tmp_path / "vae.ckpt"
    torch.save({"state_dict": VAE().state_dict(), "vae_lightning": {"model_class": "VAE"}}, ckpt)
    done = run_here("vae-prior", f"ckpt={ckpt}")
    assert done.returncode == 2
    assert "ckpt holds a VAE; vae-prior fits the code prior of a VQ-VAE" in done.stderr
    done = run_here("vae-prior")
    assert done.returncode == 2 and "ckpt is required" in done.stderr


@pytest.mark.slow
def test_both_stages_train_and_reload(feature_data_dir, tmp_path):
    out = tmp_path / "run"
    done = run_here("vae-train", f"paths.data_dir={feature_data_dir}",
                    f"hydra.run.dir={out}", *SMALL, "model=vq_vae", "model.codebook_size=32",
                    "trainer.max_epochs=3", "callbacks.latent_probe.max_train=200")  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    lines = (out / "history.csv").read_text().splitlines()
    header, rows = lines[0].split(","), [line.split(",") for line in lines[1:]]
    recon = [float(r[header.index("train/recon")]) for r in rows]
    assert recon[-1] < recon[0]
    for view in ("reconstructions", "samples_uniform_codes", "interpolations"):
        assert (out / "images" / f"images_{view}_epoch003.png").is_file(), view
    last = out / "checkpoints" / "last.ckpt"
    model = VQVAE.load_from_checkpoint(last, map_location="cpu")
    assert model.hparams.codebook_size == 32 and not bool(model.prior_fitted)

    done = run_here("vae-prior", f"ckpt={last}", "epochs=3", "accelerator=cpu")
    assert done.returncode == 0, done.stderr[-2000:]
    fitted = out / "checkpoints" / "prior.ckpt"
    model = VQVAE.load_from_checkpoint(fitted, map_location="cpu")
    assert bool(model.prior_fitted)
    record = torch.load(fitted, weights_only=True)["vae_lightning"]["prior"]
    assert record["prior/val_nll"] < 49 * math.log(32)  # better than the uniform prior
    assert (out / "prior").is_dir()  # its TensorBoard logs
    again = run_here("vae-prior", f"ckpt={last}")
    assert again.returncode == 2 and "overwrite=true" in again.stderr
