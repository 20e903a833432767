"""Loss terms as pure functions, one definition each.

Scale ("nats per image"): the reconstruction term is summed over the pixels of an image and the
KL over the latent dimensions; callers average over the batch. ``loss = recon + kl`` (the
negative ELBO) is reported, ``recon + beta * kl`` optimised.
Never mix a mean-reduced reconstruction with a summed KL: it silently rescales beta.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F


def recon_bce(logits: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Bernoulli negative log-likelihood -log p(x|z), summed over pixels: (B, ...) -> (B,).

    Computed from logits with ``binary_cross_entropy_with_logits`` (stable, autocast-safe);
    equal to ``F.binary_cross_entropy(sigmoid(logits), x, reduction="sum")`` per image.
    """
    per_pixel = F.binary_cross_entropy_with_logits(logits, x, reduction="none")
    return per_pixel.flatten(1).sum(1)


def gaussian_kl(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mu, exp(logvar)) || N(0, I)) per latent dimension: (B, D) -> (B, D).

    Closed form from Kingma & Welling (2014), Auto-Encoding Variational Bayes, Appendix B:
    -KL = 1/2 * sum_j (1 + log sigma_j^2 - mu_j^2 - sigma_j^2). Sum over dim 1 for nats per image.
    """
    return -0.5 * (1 + logvar - mu.pow(2) - logvar.exp())


def mse_per_pixel(x_hat: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Mean squared error per pixel, per image: (B, ...) -> (B,), x_hat in [0, 1]."""
    return (x_hat - x).pow(2).flatten(1).mean(1)


def feature_distance(
    features: Callable[[torch.Tensor], torch.Tensor], x_hat: torch.Tensor, x: torch.Tensor
) -> torch.Tensor:
    """Feature matching: the squared distance between ``features`` of a reconstruction and of its
    image, summed over the features: (B, ...) -> (B,). Gradients reach ``x_hat`` only.

    A perceptual loss (Johnson et al. 2016; Larsen et al. 2016 use a discriminator's features)
    with a frozen classifier of the dataset as ``features`` (models.py: feature_loss_weight)."""
    with torch.no_grad():
        target = features(x)
    return (features(x_hat) - target).pow(2).sum(1)
