import math

import pytest
import torch

from vae_lightning.errors import ConfigError
from vae_lightning.losses import gaussian_kl, recon_bce
from vae_lightning.models import AE, VAE, ConvVAE


@pytest.mark.parametrize("model_cls", [VAE, ConvVAE])
def test_vae_loss_is_recon_plus_beta_kl(model_cls):
    torch.manual_seed(0)
    model = model_cls(beta=4.0)
    x = torch.rand(8, 1, 28, 28)
    torch.manual_seed(1)
    terms = model.terms(x)
    assert torch.allclose(terms["loss"], terms["recon"] + 4.0 * terms["kl"])
    # the same numbers from the pieces, with the same noise
    torch.manual_seed(1)
    mu, logvar = model.encode(x)
    z = model.reparameterize(mu, logvar)
    expected_recon = recon_bce(model.decoder(z), x).mean()
    assert torch.allclose(terms["recon"], expected_recon)
    assert torch.allclose(terms["kl"], gaussian_kl(mu, logvar).sum(1).mean())
    assert set(terms) == {"loss", "recon", "kl", "mse"}


def test_embed_is_mu_for_vae_and_code_for_ae():
    torch.manual_seed(0)
    x = torch.rand(5, 1, 28, 28)
    vae = VAE(latent_dim=3)
    assert torch.equal(vae.embed(x), vae.encode(x)[0])
    ae = AE(latent_dim=3)
    assert torch.equal(ae.embed(x), ae.encoder(x))
    assert set(ae.terms(x)) == {"loss", "recon", "mse"}


def test_logvar_is_clamped_so_exp_cannot_overflow():
    model = VAE(latent_dim=2)
    with torch.no_grad():
        model.encoder.net[-1].bias.fill_(1e6)  # mu and logvar huge
    terms = model.terms(torch.rand(2, 1, 28, 28))
    assert all(math.isfinite(v.item()) for v in terms.values())


def test_ae_samples_from_gaussian_fitted_to_training_codes():
    torch.manual_seed(0)
    ae = AE(latent_dim=2)
    ae.train()
    ae.on_train_epoch_start()
    x = torch.rand(512, 1, 28, 28)
    ae.terms(x)
    ae.on_train_epoch_end()
    codes = ae.encoder(x).detach()
    assert torch.allclose(ae.code_mean, codes.mean(0), atol=1e-5)
    assert torch.allclose(ae.code_cov, torch.cov(codes.T, correction=0), atol=1e-5)
    g = torch.Generator().manual_seed(0)
    assert ae.sample(16, generator=g).shape == (16, 1, 28, 28)


def test_samples_are_seeded():
    vae = VAE()
    a = vae.sample(4, generator=torch.Generator().manual_seed(3))
    b = vae.sample(4, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)


@pytest.mark.parametrize(
    ("model_cls", "kwargs", "key"),
    [
        (VAE, {"latent_dim": 0}, "latent_dim"),
        (VAE, {"latent_dim": "abc"}, "latent_dim"),
        (VAE, {"beta": -1.0}, "beta"),
        (VAE, {"beta": float("nan")}, "beta"),
        (VAE, {"lr": 0.0}, "lr"),
        (AE, {"hidden_dim": 0}, "hidden_dim"),
        (ConvVAE, {"channels": [32, 64]}, "channels"),
        (ConvVAE, {"in_shape": [1, 28]}, "in_shape"),
    ],
)
def test_bad_values_name_the_key(model_cls, kwargs, key):
    with pytest.raises(ConfigError) as info:
        model_cls(**kwargs)
    assert info.value.key == key
    assert str(info.value).startswith(key)


@pytest.mark.parametrize("model_cls", [VAE, AE, ConvVAE])
def test_checkpoint_round_trip_without_hydra(model_cls, tmp_path):
    import lightning as L

    torch.manual_seed(0)
    model = model_cls(latent_dim=4)
    trainer = L.Trainer(logger=False, enable_checkpointing=False, max_epochs=0)
    trainer.strategy.connect(model)
    path = tmp_path / "m.ckpt"
    trainer.save_checkpoint(path)
    loaded = model_cls.load_from_checkpoint(path, weights_only=True)
    assert loaded.hparams == model.hparams
    x = torch.rand(2, 1, 28, 28)
    assert torch.equal(loaded.embed(x), model.embed(x))
