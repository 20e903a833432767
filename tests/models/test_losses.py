"""The loss terms against independent formulas (nats per image)."""

import math

import torch
import torch.nn.functional as F
from torch import nn

from vae_lightning.models.losses import feature_distance, gaussian_kl, mse_per_pixel, recon_bce


def test_kl_of_standard_normal_is_zero():
    mu, logvar = torch.zeros(5, 7), torch.zeros(5, 7)
    assert torch.equal(gaussian_kl(mu, logvar), torch.zeros(5, 7))


def test_kl_matches_monte_carlo_estimate():
    torch.manual_seed(0)
    mu = torch.tensor([[0.5, -1.0, 2.0]])
    logvar = torch.tensor([[0.3, -0.7, 0.0]])
    std = (0.5 * logvar).exp()
    z = mu + std * torch.randn(400_000, 3)
    # E_q[log q(z) - log p(z)], per dimension
    log_q = -0.5 * (math.log(2 * math.pi) + logvar + ((z - mu) / std) ** 2)
    log_p = -0.5 * (math.log(2 * math.pi) + z**2)
    mc = (log_q - log_p).mean(0)
    closed = gaussian_kl(mu, logvar)[0]
    assert torch.allclose(mc, closed, atol=0.01), (mc, closed)
    # and against the textbook formula log(1/sigma) + (sigma^2 + mu^2) / 2 - 1/2
    textbook = -torch.log(std) + (std**2 + mu**2) / 2 - 0.5
    assert torch.allclose(closed, textbook[0], atol=1e-6)


def test_recon_bce_with_logits_matches_bce_on_probabilities():
    torch.manual_seed(0)
    logits = torch.randn(4, 1, 28, 28) * 3
    x = torch.rand(4, 1, 28, 28)
    ours = recon_bce(logits, x)
    assert ours.shape == (4,)
    for i in range(4):
        ref = F.binary_cross_entropy(torch.sigmoid(logits[i]), x[i], reduction="sum")
        assert torch.allclose(ours[i], ref, rtol=1e-4), (ours[i], ref)


def test_recon_bce_is_stable_for_extreme_logits():
    logits = torch.tensor([[1e4, -1e4]])
    x = torch.tensor([[1.0, 0.0]])
    assert recon_bce(logits, x).item() == 0.0
    assert math.isfinite(recon_bce(-logits, x).item())


def test_mse_is_mean_per_pixel():
    x_hat = torch.zeros(2, 1, 2, 2)
    x = torch.tensor([[[[1.0, 0.0], [0.0, 0.0]]], [[[1.0, 1.0], [1.0, 1.0]]]])
    assert torch.allclose(mse_per_pixel(x_hat, x), torch.tensor([0.25, 1.0]))


def test_feature_distance_is_the_squared_feature_distance_with_gradients_to_x_hat_only():
    torch.manual_seed(0)
    features = nn.Linear(6, 3)
    x, x_hat = torch.rand(5, 6, requires_grad=True), torch.rand(5, 6, requires_grad=True)
    d = feature_distance(features, x_hat, x)
    torch.testing.assert_close(d, (features(x_hat) - features(x)).pow(2).sum(1))
    assert torch.equal(feature_distance(features, x.detach(), x.detach()), torch.zeros(5))
    d.sum().backward()
    assert x.grad is None and x_hat.grad.abs().sum() > 0
