"""The conditional VAE: the label enters the encoder and the decoder (Sohn et al. 2015)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn
from typing_extensions import Unpack

from vae_lightning.errors import check_choice, check_int
from vae_lightning.models.base import LOGVAR_MAX, LOGVAR_MIN, Common, Knob, check_widths
from vae_lightning.models.gaussian import GaussianVAE, conv_networks
from vae_lightning.models.networks import MLPDecoder, MLPEncoder


class CVAE(GaussianVAE):
    """A conditional VAE (Sohn et al. 2015): the label y conditions the encoder q(z | x, y) and
    the decoder p(x | z, y); the prior stays N(0, I). ``arch="mlp"`` is seed 1's 784-400-20 MLP
    (the encoder reads the flattened image and the one-hot label, the decoder z and the
    one-hot label); ``arch="conv"`` is seed 2's ConvVAE (the label enters the encoder as
    ``num_classes`` constant one-hot image planes, the decoder as z's one-hot companion).

    Every method takes the labels ``y`` (B,) as class indices, or (B, num_classes) class
    weights (a soft label, e.g. interpolated between two classes); ``sample(n)`` without
    labels draws the classes in turn (0, 1, ..., num_classes - 1, 0, ...)."""

    conditional = True

    def __init__(
        self,
        latent_dim: int = 20,
        num_classes: int = 10,
        arch: str = "mlp",
        hidden_dim: int = 400,
        channels: Sequence[int] = (32, 64, 128),
        beta: float = 1.0,
        **common: Unpack[Common],
    ) -> None:
        super().__init__(latent_dim, beta, **common)

    def check_hparams(self, hp: dict[str, Any]) -> dict[str, Any]:
        hp["num_classes"] = check_int("num_classes", hp["num_classes"], 2)
        hp["arch"] = check_choice("arch", hp["arch"], ("mlp", "conv"))
        hp["channels"] = check_widths(hp["channels"])
        return super().check_hparams(hp)

    def build_networks(self) -> tuple[nn.Module, nn.Module]:
        hp, k = self.hparams, self.hparams.num_classes
        if hp.arch == "mlp":
            encoder = MLPEncoder(math.prod(hp.in_shape) + k, hp.hidden_dim, 2 * hp.latent_dim)
            return encoder, MLPDecoder(hp.latent_dim + k, hp.hidden_dim, hp.in_shape)
        return conv_networks(hp, hp.in_shape[0] + k, 2 * hp.latent_dim, hp.latent_dim + k)

    def one_hot(self, y: Knob, like: Tensor) -> Tensor:
        """Labels (B,) or class weights (B, num_classes) -> (B, num_classes), ``like``'s dtype."""
        if y is None:
            raise ValueError("a CVAE needs the labels y: encode(x, y), decode(z, y), terms(x, y=y)")
        k = self.hparams.num_classes
        if y.ndim == 2:
            return y.to(like.dtype)
        return torch.nn.functional.one_hot(y.long(), k).to(like.dtype)

    def encode(self, x: Tensor, y: Knob = None) -> tuple[Tensor, Tensor]:
        onehot = self.one_hot(y, x)  # (B, K)
        if self.hparams.arch == "mlp":
            xy = torch.cat([x.flatten(1), onehot], dim=1)  # (B, C*H*W + K)
        else:  # one constant plane per class
            planes = onehot[:, :, None, None].expand(-1, -1, *x.shape[2:])  # (B, K, H, W)
            xy = torch.cat([x, planes], dim=1)  # (B, C + K, H, W)
        mu, logvar = self.encoder(xy).chunk(2, dim=1)
        return mu, logvar.clamp(LOGVAR_MIN, LOGVAR_MAX)

    def logits(self, z: Tensor, y: Knob = None) -> Tensor:
        return self.decoder(torch.cat([z, self.one_hot(y, z)], dim=1))  # (B, D + K) -> logits

    @torch.no_grad()
    def sample(self, n: int, generator: torch.Generator | None = None, y: Knob = None) -> Tensor:
        if y is None:  # the classes in turn
            y = torch.arange(n, device=self.device) % self.hparams.num_classes
        return super().sample(n, generator, y)
