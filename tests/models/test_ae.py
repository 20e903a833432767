"""The plain autoencoder: its terms and codes, and the Gaussian fitted to its training codes
that it samples from."""

import pytest
import torch
from torch.distributions import Bernoulli

from vae_lightning.models import AE, VAE


def test_ae_terms_are_its_reconstruction_and_its_codes():
    torch.manual_seed(0)
    ae = AE(latent_dim=3)
    x = torch.rand(5, 1, 28, 28)
    terms = ae.terms(x)
    z = ae.encoder(x)
    likelihood = Bernoulli(logits=ae.decoder(z), validate_args=False)
    recon = -likelihood.log_prob(x).flatten(1).sum(1).mean()
    assert terms["loss"].item() == pytest.approx(recon.item(), rel=1e-5)
    assert torch.equal(terms["loss"], terms["recon"])
    assert torch.allclose(terms["z"], z)  # for observe(), which fits the sampling Gaussian
    assert torch.equal(ae.embed(x), z)
    vae = VAE(latent_dim=3)
    assert torch.equal(vae.embed(x), vae.encode(x)[0])


def test_ae_samples_from_gaussian_fitted_to_training_codes():
    torch.manual_seed(0)
    ae = AE(latent_dim=2)
    x = torch.rand(512, 1, 28, 28)
    ae.on_train_epoch_start()
    for batch in x.split(100):  # as the step does, batch by batch
        ae.observe(ae.terms(batch))
    ae.on_train_epoch_end()
    codes = ae.encoder(x).detach()
    assert torch.allclose(ae.code_mean, codes.mean(0), atol=1e-5)
    assert torch.allclose(ae.code_cov, torch.cov(codes.T, correction=0), atol=1e-5)
    g = torch.Generator().manual_seed(0)
    assert ae.sample(16, generator=g).shape == (16, 1, 28, 28)
