"""The IWAE paper's hierarchical VAE (model=hvae): the maths against closed forms, and the
Burda experiment through the CLI at its rates, reloaded and evaluated. (Its schedule,
scheduler=burda: tests/training/test_schedules.py.)"""

from __future__ import annotations

import json

import pytest
import torch

from tests.conftest import SMALL, run_here
from vae_lightning.errors import ConfigError
from vae_lightning.evaluation.metrics import iwae_bound
from vae_lightning.models import HVAE
from vae_lightning.models.losses import gaussian_kl


def test_one_layer_kl_estimate_averages_to_the_closed_form():
    torch.manual_seed(0)
    model = HVAE(layers=1, latent_dim=5).eval()
    x = torch.bernoulli(torch.rand(3, 1, 28, 28))
    with torch.no_grad():
        w = model.log_weights(x, 20_000, torch.Generator().manual_seed(1))
        mu, logvar = model.encode(x)
    estimate = (w["log_q"] - w["log_p"]).mean(0)  # (B,)
    torch.testing.assert_close(estimate, gaussian_kl(mu, logvar).sum(1), atol=0.05, rtol=0.02)


@pytest.mark.parametrize("layers", [1, 2])
def test_terms_are_the_one_sample_elbo_and_the_iwae_bound_tightens(layers):
    torch.manual_seed(0)
    model = HVAE(layers=layers).eval()
    x = torch.bernoulli(torch.rand(4, 1, 28, 28))
    out = model.terms(x)
    torch.testing.assert_close(out["loss"], out["recon"] + out["kl"])
    with torch.no_grad():
        draws = torch.stack([model.terms(x)["loss"] for _ in range(200)])
        k1 = iwae_bound(model, x, k=1, chunk=1, generator=torch.Generator().manual_seed(0))
        k64 = iwae_bound(model, x, k=64, chunk=16, generator=torch.Generator().manual_seed(0))
    assert float(k64.mean()) < float(draws.mean())  # the IWAE bound is below the ELBO's
    assert float(k64.mean()) < float(k1.mean())
    assert model.sample(6, torch.Generator().manual_seed(0)).shape == (6, 1, 28, 28)


def test_bad_hvae_settings_are_refused_naming_the_key():
    with pytest.raises(ConfigError, match="layers must be 1 or 2, got 3"):
        HVAE(layers=3)
    with pytest.raises(ConfigError, match=r"hidden_dims needs one width per layer \(2\)"):
        HVAE(hidden_dims=[200])
    with pytest.raises(ConfigError, match=r"hidden_dims must be a non-empty list of integers"):
        HVAE(hidden_dims=[200, 0])
    with pytest.raises(ConfigError, match=r"kl\.free_bits needs per-dimension KLs in closed form"):
        HVAE(kl={"name": "constant", "free_bits": 0.5})


@pytest.mark.slow
def test_the_burda_experiment_trains_at_its_rates_reloads_and_evaluates(feature_data_dir, tmp_path):
    out = tmp_path / "run"
    done = run_here("vae-train", f"paths.data_dir={feature_data_dir}",
                    f"hydra.run.dir={out}", *SMALL, "experiment=hvae_burda_mnist",
                    "model.scheduler.stages=2", "trainer.max_epochs=4")  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    lines = (out / "history.csv").read_text().splitlines()
    header, rows = lines[0].split(","), [line.split(",") for line in lines[1:]]
    losses = [float(r[header.index("train/loss")]) for r in rows]
    rates = [float(r[header.index("train/lr")]) for r in rows]
    assert losses[-1] < losses[0]
    assert rates == pytest.approx([1e-3] + [1e-3 * 10 ** (-1 / 7)] * 3, rel=1e-6)
    for view in ("reconstructions", "samples_prior", "traversals", "interpolations"):
        assert (out / "images" / f"images_{view}_epoch004.png").is_file(), view
    model = HVAE.load_from_checkpoint(out / "checkpoints" / "last.ckpt", map_location="cpu")
    assert model.hparams.layers == 2 and model.hparams.scheduler["name"] == "burda"
    done = run_here("vae-evaluate", f"ckpt={out / 'checkpoints' / 'last.ckpt'}", "k=20",
                    "n_fid=100", "classifier_epochs=16", "device=cpu")  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    metrics = json.loads((out / "eval.json").read_text())["metrics"]
    assert metrics["test/nll_iw"] < metrics["test/loss"]
