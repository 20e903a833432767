"""The IWAE paper's VAE with one or two stochastic layers (Burda et al. 2015)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn
from typing_extensions import Unpack

from vae_lightning.errors import ConfigError, check_int
from vae_lightning.models.base import (
    Autoencoder,
    Common,
    Knob,
    Terms,
    check_widths,
    gaussian,
    log_normal,
)
from vae_lightning.models.losses import mse_per_pixel, recon_bce
from vae_lightning.models.networks import TanhMLP


class HVAE(Autoencoder):
    """The IWAE paper's VAE with one or two stochastic layers (Burda et al. 2015, Sec. 5).

    Two layers (the default): q(z1|x) 784-200-200-(100), q(z2|z1) 100-100-100-(50),
    p(z1|z2) 50-100-100-(100), p(x|z1) 100-200-200-784 (Bernoulli logits), tanh, diagonal
    Gaussians, prior N(0, I) on z2. One layer (``layers=1``): q(z|x) 784-200-200-(50),
    p(x|z) 50-200-200-784. ``latent_dim`` is the top layer's size, ``inner_dim`` z1's.

    The KL of a two-layer model has no closed form: ``kl`` is the one-sample estimate
    log q(z1|x) + log q(z2|z1) - log p(z1|z2) - log p(z2), so ``loss = recon + kl`` is the
    one-sample negative ELBO, as for the other VAEs. ``log_weights`` gives the importance
    weights of the IWAE bound (vae-evaluate's test/nll_iw). The views and probes work in z1,
    the layer the decoder reads: ``encode`` is q(z1|x), ``decode`` p(x|z1); ``sample`` draws
    the top layer from the prior and goes down.
    """

    variational = True

    def __init__(
        self,
        latent_dim: int = 50,
        layers: int = 2,
        inner_dim: int = 100,
        hidden_dims: Sequence[int] = (200, 100),
        beta: float = 1.0,
        **common: Unpack[Common],
    ) -> None:
        super().__init__(latent_dim, beta, **common)

    def check_hparams(self, hp: dict[str, Any]) -> dict[str, Any]:
        hp["layers"] = check_int("layers", hp["layers"], 1)
        if hp["layers"] > 2:
            raise ConfigError("layers", f"must be 1 or 2, got {hp['layers']}")
        hp["inner_dim"] = check_int("inner_dim", hp["inner_dim"], 1)
        hp["hidden_dims"] = check_widths(hp["hidden_dims"], "hidden_dims")
        if len(hp["hidden_dims"]) < hp["layers"]:
            raise ConfigError(
                "hidden_dims", f"needs one width per layer ({hp['layers']}): {hp['hidden_dims']}"
            )
        hp = super().check_hparams(hp)
        free_bits = (hp.get("kl") or {}).get("free_bits", 0.0)
        if isinstance(free_bits, (int, float)) and free_bits > 0:
            raise ConfigError(
                "kl.free_bits", "needs per-dimension KLs in closed form; HVAE's is estimated"
            )
        return hp

    @property
    def z1_dim(self) -> int:
        """The size of the layer the decoder reads."""
        return self.hparams.inner_dim if self.hparams.layers == 2 else self.latent_dim

    def build_networks(self) -> tuple[nn.Module, nn.Module]:
        hp = self.hparams
        pixels, (h1, *rest) = math.prod(hp.in_shape), hp.hidden_dims
        encoder, decoder = nn.ModuleDict(), nn.ModuleDict()
        encoder["q1"] = TanhMLP(pixels, h1, 2 * self.z1_dim)
        decoder["px"] = TanhMLP(self.z1_dim, h1, pixels)
        if hp.layers == 2:
            encoder["q2"] = TanhMLP(self.z1_dim, rest[0], 2 * hp.latent_dim)
            decoder["p1"] = TanhMLP(hp.latent_dim, rest[0], 2 * self.z1_dim)
        return encoder, decoder

    def encode(self, x: Tensor, y: Knob = None) -> tuple[Tensor, Tensor]:
        """q(z1|x): (mu, logvar), each (B, z1_dim)."""
        return gaussian(self.encoder["q1"](x))

    def embed(self, x: Tensor, y: Knob = None) -> Tensor:
        return self.encode(x)[0]

    def logits(self, z: Tensor, y: Knob = None) -> Tensor:
        return self.decoder["px"](z).view(-1, *self.hparams.in_shape)

    def log_weights(
        self, x: Tensor, m: int = 1, generator: torch.Generator | None = None
    ) -> dict[str, Tensor]:
        """``m`` draws from q for each image: log p(x|z1), log p(z) and log q(z|x), each (m, B),
        and the decoder's logits of the first draw."""
        mu1, logvar1 = self.encode(x)  # (B, D1)
        eps = torch.randn((m, *mu1.shape), generator=generator, device=x.device, dtype=x.dtype)
        z1 = mu1 + eps * torch.exp(0.5 * logvar1)  # (m, B, D1)
        log_q = log_normal(z1, mu1, logvar1)
        if self.hparams.layers == 2:
            mu2, logvar2 = gaussian(self.encoder["q2"](z1.flatten(0, 1)))  # (m*B, D2)
            eps2 = torch.randn(mu2.shape, generator=generator, device=x.device, dtype=x.dtype)
            z2 = mu2 + eps2 * torch.exp(0.5 * logvar2)
            log_q = log_q + log_normal(z2, mu2, logvar2).view(m, -1)
            prior = log_normal(z2, torch.zeros_like(z2), torch.zeros_like(z2)).view(m, -1)
            mu_p, logvar_p = gaussian(self.decoder["p1"](z2))  # p(z1|z2)
            log_p = prior + log_normal(z1.flatten(0, 1), mu_p, logvar_p).view(m, -1)
        else:
            log_p = log_normal(z1, torch.zeros_like(z1), torch.zeros_like(z1))
        logits = self.logits(z1.flatten(0, 1))  # (m*B, C, H, W)
        target = x.unsqueeze(0).expand(m, *x.shape).flatten(0, 1)
        log_px = -recon_bce(logits, target).view(m, -1)
        return {"log_px": log_px, "log_p": log_p, "log_q": log_q, "logits": logits[: len(x)]}

    def terms(self, x: Tensor, beta: Knob = None, y: Knob = None) -> Terms:
        w = self.log_weights(x)
        recon = -w["log_px"].mean()
        kl = (w["log_q"] - w["log_p"]).mean()  # one-sample estimate of both layers' KL
        weight = self.beta if beta is None else beta
        with torch.no_grad():
            mse = mse_per_pixel(torch.sigmoid(w["logits"]), x).mean()
        out = {"loss": recon + kl, "objective": recon + weight * kl, "recon": recon, "kl": kl}
        return self.with_feature_term({**out, "mse": mse}, w["logits"], x)

    @torch.no_grad()
    def sample(self, n: int, generator: torch.Generator | None = None, y: Knob = None) -> Tensor:
        z = torch.randn(n, self.latent_dim, generator=generator, device=self.device)
        if self.hparams.layers == 2:  # down through p(z1|z2)
            mu, logvar = gaussian(self.decoder["p1"](z))
            eps = torch.randn(mu.shape, generator=generator, device=self.device)
            z = mu + eps * torch.exp(0.5 * logvar)
        return self.decode(z)
