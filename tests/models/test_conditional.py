"""The conditional VAE (model=cvae, model=conv_cvae): its maths, a real CLI run on both
datasets with its two views, its checkpoint reloaded without Hydra, and vae-evaluate's
gen/cond_acc. (Its views' grids: tests/views/test_grids.py; a fast run of every model:
tests/test_configs.py.)"""

from __future__ import annotations

import json

import pytest
import torch

from tests.conftest import SMALL, run_here
from vae_lightning.errors import ConfigError
from vae_lightning.models import CVAE


@pytest.fixture(params=["mlp", "conv"])
def cvae(request) -> CVAE:
    torch.manual_seed(0)
    return CVAE(arch=request.param, latent_dim=6).eval()


def test_the_label_conditions_the_encoder_and_the_decoder(cvae):
    x, z = torch.rand(4, 1, 28, 28), torch.randn(4, 6)
    y0, y1 = torch.zeros(4, dtype=torch.long), torch.ones(4, dtype=torch.long)
    assert not torch.allclose(cvae.encode(x, y0)[0], cvae.encode(x, y1)[0])
    assert not torch.allclose(cvae.decode(z, y0), cvae.decode(z, y1))
    # a one-hot class-weight row is the same label; halfway between two is a third input
    onehot = torch.nn.functional.one_hot(y1, 10).float()
    torch.testing.assert_close(cvae.decode(z, onehot), cvae.decode(z, y1))
    # the terms: the ELBO of q(z|x,y) and p(x|z,y) with the given noise
    noise = torch.randn(4, 6)
    out = cvae.terms(x, y=y1, eps=noise)
    mu, logvar = cvae.encode(x, y1)
    x_hat = cvae.decode(cvae.reparameterize(mu, logvar, noise), y1)
    recon = torch.nn.functional.binary_cross_entropy(x_hat, x, reduction="none").flatten(1)
    torch.testing.assert_close(out["recon"], recon.sum(1).mean(), rtol=1e-4, atol=1e-3)


def test_labels_are_required_and_sampling_draws_the_classes_in_turn(cvae):
    with pytest.raises(ValueError, match=r"a CVAE needs the labels y"):
        cvae.terms(torch.rand(2, 1, 28, 28))
    a = cvae.sample(12, generator=torch.Generator().manual_seed(3))
    z = torch.randn(12, 6, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(a, cvae.decode(z, torch.arange(12) % 10))


def test_bad_cvae_settings_are_refused_naming_the_key():
    with pytest.raises(ConfigError, match="arch must be one of mlp, conv"):
        CVAE(arch="transformer")
    with pytest.raises(ConfigError, match="num_classes must be an integer >= 2"):
        CVAE(num_classes=1)


@pytest.mark.slow
@pytest.mark.parametrize(("model", "data"), [("cvae", "mnist"), ("conv_cvae", "fashion_mnist")])
def test_a_cvae_trains_writes_its_views_reloads_and_evaluates(
    feature_data_dir, tmp_path, model, data
):
    out = tmp_path / "run"
    done = run_here("vae-train", f"paths.data_dir={feature_data_dir}",
                    f"hydra.run.dir={out}", *SMALL, f"model={model}", f"data={data}",
                    "trainer.max_epochs=3")  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    history = (out / "history.csv").read_text().splitlines()
    header = history[0].split(",")
    losses = [float(r.split(",")[header.index("train/loss")]) for r in history[1:]]
    assert losses[-1] < losses[0]
    for view in ("samples_by_class", "relabelled", "reconstructions", "interpolations"):
        assert (out / "images" / f"images_{view}_epoch003.png").is_file(), view
    model_ = CVAE.load_from_checkpoint(out / "checkpoints" / "last.ckpt", map_location="cpu")
    assert model_.hparams.arch == ("mlp" if model == "cvae" else "conv")
    done = run_here("vae-evaluate", f"ckpt={out / 'checkpoints' / 'last.ckpt'}", "k=4",
                    "n_fid=100", "classifier_epochs=16", "probes=true", "device=cpu")  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    evaluation = json.loads((out / "eval.json").read_text())
    metrics = evaluation["metrics"]
    assert 0.0 <= metrics["gen/cond_acc"] <= 1.0
    assert metrics["test/nll_iw"] <= metrics["test/loss"] + 1.0
    assert {"samples_by_class", "relabelled"} <= set(evaluation["images"])
