"""The Gaussian VAEs: a diagonal-Gaussian posterior, an N(0, I) prior and a Bernoulli decoder.
``VAE`` is seed 1's MLP, ``ConvVAE`` seed 2's convolutional one (and its deeper variant)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn
from typing_extensions import Unpack

from vae_lightning.errors import ConfigError, check_choice, check_int
from vae_lightning.models.base import (
    LOGVAR_MAX,
    LOGVAR_MIN,
    Autoencoder,
    Common,
    Knob,
    Terms,
    check_widths,
    mlp,
)
from vae_lightning.models.losses import gaussian_kl, mse_per_pixel, recon_bce
from vae_lightning.models.networks import ACTIVATIONS, ConvDecoder, ConvEncoder


def conv_networks(
    hp: Any, in_channels: int, out_features: int, decoder_in: int, **deep: Any
) -> tuple[nn.Module, nn.Module]:
    """Seed 2's convolutional encoder and decoder, checked to decode the images' size."""
    (c, h, w), channels = hp.in_shape, hp.channels
    encoder = ConvEncoder(in_channels, channels, out_features, in_size=h, **deep)
    decoder = ConvDecoder(decoder_in, channels, c, start_size=encoder.out_spatial, **deep)
    if h != w or decoder.out_size != h:
        raise ConfigError(
            "channels",
            f"{len(channels)} stride-2 layers on {h}x{w} images decode to "
            f"{decoder.out_size}x{decoder.out_size}; use 3 layers for 28x28 images",
        )
    return encoder, decoder


class GaussianVAE(Autoencoder):
    """A VAE with a diagonal-Gaussian posterior, an N(0, I) prior and a Bernoulli decoder."""

    variational = True

    def encode(self, x: Tensor, y: Knob = None) -> tuple[Tensor, Tensor]:
        """x -> (mu, logvar), each (B, latent_dim); logvar clamped so exp cannot overflow."""
        mu, logvar = self.encoder(x).chunk(2, dim=1)
        return mu, logvar.clamp(LOGVAR_MIN, LOGVAR_MAX)

    def embed(self, x: Tensor, y: Knob = None) -> Tensor:
        return self.encode(x, y)[0]

    @staticmethod
    def reparameterize(mu: Tensor, logvar: Tensor, eps: Tensor | None = None) -> Tensor:
        """z = mu + sigma * eps, eps ~ N(0, I) (Kingma & Welling 2014, Sec. 2.4); ``eps``: a
        given draw."""
        eps = torch.randn_like(mu) if eps is None else eps
        return mu + eps * torch.exp(0.5 * logvar)

    def terms(self, x: Tensor, beta: Knob = None, y: Knob = None, eps: Knob = None) -> Terms:
        """``eps``: the reparameterisation's draw (B, latent_dim), drawn here by default; a
        stack of models gives each its own (``training.stack``)."""
        mu, logvar = self.encode(x, y)  # (B, D) each
        z = self.reparameterize(mu, logvar, eps)  # one sample: the single-sample ELBO
        logits = self.logits(z, y)  # (B, C, H, W)
        recon = recon_bce(logits, x).mean()
        kl_per_dim = gaussian_kl(mu, logvar)  # (B, D)
        kl = kl_per_dim.sum(1).mean()
        free_bits = (self.hparams.get("kl") or {}).get("free_bits", 0.0)
        if free_bits > 0:  # Kingma et al. 2016: no KL pressure on a dimension below the floor
            kl_objective = kl_per_dim.mean(0).clamp(min=free_bits).sum()
        else:
            kl_objective = kl
        weight = self.beta if beta is None else beta
        with torch.no_grad():
            mse = mse_per_pixel(torch.sigmoid(logits), x).mean()
        # loss: the negative ELBO (beta = 1), which runs compare; objective: what is optimised
        objective = recon + weight * kl_objective
        out = {"loss": recon + kl, "objective": objective, "recon": recon, "kl": kl, "mse": mse}
        return self.with_feature_term(out, logits, x)

    @torch.no_grad()
    def sample(self, n: int, generator: torch.Generator | None = None, y: Knob = None) -> Tensor:
        z = torch.randn(n, self.latent_dim, generator=generator, device=self.device)
        return self.decode(z, y)


class VAE(GaussianVAE):
    """Seed 1's MLP VAE: 784-400-(mu, logvar of 20) and 20-400-784."""

    def __init__(
        self,
        latent_dim: int = 20,
        hidden_dim: int = 400,
        beta: float = 1.0,
        **common: Unpack[Common],
    ) -> None:
        super().__init__(latent_dim, beta, **common)

    def build_networks(self) -> tuple[nn.Module, nn.Module]:
        return mlp(self.hparams, out_features=2 * self.hparams.latent_dim)  # mu and logvar


class ConvVAE(GaussianVAE):
    """Seed 2's convolutional VAE: Conv 32/64/128 (k4 s2 p1), flatten 1152, latent 32.

    Seed 2's proposed deeper model (``model=conv_vae_deep``): ``extra_channels=256`` (a k3 s1
    convolution at 3x3, mirrored in the decoder), ``batchnorm=true``, ``activation=leaky_relu``.
    BatchNorm uses batch statistics in training and its running statistics in evaluation
    (validation, test, the callbacks' views and vae-evaluate all run in eval mode)."""

    def __init__(
        self,
        latent_dim: int = 32,
        channels: Sequence[int] = (32, 64, 128),
        beta: float = 1.0,
        extra_channels: int | None = None,
        batchnorm: bool = False,
        activation: str = "relu",
        **common: Unpack[Common],
    ) -> None:
        super().__init__(latent_dim, beta, **{"lr": 5e-4, **common})

    def check_hparams(self, hp: dict[str, Any]) -> dict[str, Any]:
        if hp["extra_channels"] is not None:
            hp["extra_channels"] = check_int("extra_channels", hp["extra_channels"], 1)
        if not isinstance(hp["batchnorm"], bool):
            raise ConfigError("batchnorm", f"must be true or false, got {hp['batchnorm']!r}")
        hp["activation"] = check_choice("activation", hp["activation"], ACTIVATIONS)
        hp["channels"] = check_widths(hp["channels"])
        return super().check_hparams(hp)

    def build_networks(self) -> tuple[nn.Module, nn.Module]:
        hp = self.hparams
        deep = {
            "extra_channels": hp.extra_channels, "batchnorm": hp.batchnorm, "act": hp.activation,
        }  # fmt: skip
        return conv_networks(hp, hp.in_shape[0], 2 * hp.latent_dim, hp.latent_dim, **deep)
