"""The Gaussian VAEs (VAE, ConvVAE and its deeper variant): their terms against independent
formulas, the clamp that keeps them finite, seeded samples, and the deeper ConvVAE's layers and
BatchNorm statistics through a run."""

import json
import math
from pathlib import Path

import pytest
import torch
from torch.distributions import Bernoulli, Normal, kl_divergence

from vae_lightning.errors import ConfigError
from vae_lightning.models import VAE, ConvVAE
from vae_lightning.train import train


@pytest.mark.parametrize("model_cls", [VAE, ConvVAE])
def test_vae_terms_match_independent_formulas(model_cls):
    """recon = -log Bernoulli(x | logits) summed over pixels, kl = KL(N(mu, sigma) || N(0, 1))
    summed over dimensions (torch.distributions, not the project's losses), both batch means;
    loss = recon + kl (the negative ELBO, which runs compare), objective = recon + beta * kl."""
    torch.manual_seed(0)
    model = model_cls(beta=4.0)
    x = torch.rand(8, 1, 28, 28)
    torch.manual_seed(1)
    terms = model.terms(x)
    torch.manual_seed(1)  # the same reparameterisation noise
    mu, logvar = model.encode(x)
    sigma = torch.exp(0.5 * logvar)
    z = mu + sigma * torch.randn_like(mu)
    logits = model.decoder(z)
    recon = -Bernoulli(logits=logits, validate_args=False).log_prob(x).flatten(1).sum(1).mean()
    kl = kl_divergence(Normal(mu, sigma), Normal(0.0, 1.0)).sum(1).mean()
    mse = (torch.sigmoid(logits) - x).pow(2).mean()
    assert terms["recon"].item() == pytest.approx(recon.item(), rel=1e-5)
    assert terms["kl"].item() == pytest.approx(kl.item(), rel=1e-5)
    assert terms["loss"].item() == pytest.approx(recon.item() + kl.item(), rel=1e-5)
    assert terms["objective"].item() == pytest.approx(recon.item() + 4.0 * kl.item(), rel=1e-5)
    assert terms["mse"].item() == pytest.approx(mse.item(), rel=1e-5)
    assert set(terms) == {"loss", "objective", "recon", "kl", "mse"}


def test_logvar_is_clamped_so_exp_cannot_overflow():
    model = VAE(latent_dim=2)
    with torch.no_grad():
        model.encoder.net[-1].bias.fill_(1e6)  # mu and logvar huge
    terms = model.terms(torch.rand(2, 1, 28, 28))
    assert all(math.isfinite(v.item()) for v in terms.values())


def test_samples_are_seeded():
    vae = VAE()
    a = vae.sample(4, generator=torch.Generator().manual_seed(3))
    b = vae.sample(4, generator=torch.Generator().manual_seed(3))
    c = vae.sample(4, generator=torch.Generator().manual_seed(4))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_the_deeper_convvae_adds_a_256_channel_layer_batchnorm_and_leaky_relu():
    from vae_lightning.config import compose

    hp = dict(compose(["model=conv_vae_deep"]).model)
    hp = {k: v for k, v in hp.items() if k not in ("_target_", "in_shape")}
    model = ConvVAE(**hp)
    plain = ConvVAE()
    extra = [m for m in model.encoder.conv if isinstance(m, torch.nn.Conv2d)][-1]
    assert (extra.out_channels, extra.kernel_size, extra.stride) == (256, (3, 3), (1, 1))
    assert model.encoder.fc.in_features == 256 * 3 * 3
    assert sum(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules()) == 4 + 3
    assert any(isinstance(m, torch.nn.LeakyReLU) for m in model.modules())
    # seed 2's own model is built exactly as before: the same state_dict keys
    assert "encoder.conv.0.weight" in plain.state_dict() and not any(
        "running_mean" in k for k in plain.state_dict()
    )
    x = torch.rand(6, 1, 28, 28)
    assert model.terms(x)["loss"].isfinite()
    # evaluation uses BatchNorm's running statistics: an image's code does not depend on the
    # other images of its batch (in training it does)
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model.encode(x)[0][:2], model.encode(x[:2])[0])
    model.train()
    with torch.no_grad():
        assert not torch.allclose(model.encode(x)[0][:2], model.encode(x[:2])[0])


@pytest.mark.parametrize(
    ("hp", "message"),
    [
        ({"extra_channels": 0}, "extra_channels must be an integer >= 1"),
        ({"activation": "gelu"}, "activation must be one of relu, leaky_relu"),
        ({"batchnorm": "yes"}, "batchnorm must be true or false"),
    ],
)
def test_bad_deeper_convvae_options_name_the_key(hp, message):
    with pytest.raises(ConfigError, match=message):
        ConvVAE(**hp)


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
