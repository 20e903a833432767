"""The VQ-VAE: a 7x7 map of codes from a learned codebook, and the PixelCNN prior over it."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn
from typing_extensions import Unpack

from vae_lightning.errors import ConfigError, check_float, check_int
from vae_lightning.models.base import Autoencoder, Common, Knob, Terms, check_widths, no_kl_schedule
from vae_lightning.models.losses import mse_per_pixel, recon_bce
from vae_lightning.models.networks import PixelCNN, VQDecoder, VQEncoder


class VQVAE(Autoencoder):
    """A VQ-VAE (van den Oord et al. 2017): a convolutional encoder to a 7x7 map of
    ``latent_dim``-vectors, each replaced by its nearest of ``codebook_size`` code vectors, and a
    Bernoulli decoder of the quantised map. The codebook follows the encoder by exponential
    moving averages (decay ``ema_decay``) and a code whose average use falls below
    ``dead_code_threshold`` vectors per batch is restarted at a vector of the batch: the
    quantiser is ``vector_quantize_pytorch.VectorQuantize``. The encoder is pulled towards its
    codes by the commitment term ``commitment_weight * ||z_e - sg[e]||^2`` (summed per image).

    The prior over the 7x7 code map is uniform until the second stage (``vae-prior``) fits the
    autoregressive ``prior`` (networks.PixelCNN) to the training set's codes; ``prior_fitted``
    says which. ``kl`` is -log p(z*) under the current prior for the code map z* the encoder
    picks, and ``loss = recon + kl`` is a bound on -log p(x) for the model p(z) p(x | z): the
    posterior is a point mass, so log p(x) >= log p(z*) + log p(x | z*) (the uniform prior's
    ``kl`` is the constant 49 log K of the paper). ``sample`` draws codes from the prior.

    ``encode``/``embed`` give the quantised map flattened (B, latent_dim * 49), what the probes
    and interpolations use; ``decode`` quantises any such vector before decoding it.
    """

    def __init__(
        self,
        latent_dim: int = 16,
        codebook_size: int = 128,
        channels: Sequence[int] = (32, 64),
        commitment_weight: float = 0.25,
        ema_decay: float = 0.99,
        dead_code_threshold: float = 2.0,
        prior_channels: int = 64,
        prior_layers: int = 4,
        **common: Unpack[Common],
    ) -> None:
        no_kl_schedule(common.get("kl"), "a VQ-VAE")
        super().__init__(latent_dim, **{"lr": 5e-4, **common})
        from vector_quantize_pytorch import VectorQuantize  # imports einx: only when used

        hp = self.hparams
        self.quantizer = VectorQuantize(
            dim=latent_dim,
            codebook_size=hp.codebook_size,
            decay=hp.ema_decay,
            threshold_ema_dead_code=hp.dead_code_threshold,
            commitment_weight=0.0,  # computed in terms, per image, in train and eval alike
            accept_image_fmap=True,
            rotation_trick=False,  # the paper's straight-through gradient
        )
        self.prior = PixelCNN(hp.codebook_size, hp.prior_channels, hp.prior_layers)
        self.prior.requires_grad_(False)  # trained by vae-prior only (prior.py)
        self.register_buffer("prior_fitted", torch.tensor(False))

    def check_hparams(self, hp: dict[str, Any]) -> dict[str, Any]:
        hp["codebook_size"] = check_int("codebook_size", hp["codebook_size"], 2)
        hp["channels"] = check_widths(hp["channels"])
        hp["commitment_weight"] = check_float("commitment_weight", hp["commitment_weight"], 0.0)
        hp["ema_decay"] = check_float("ema_decay", hp["ema_decay"], 0.0, inclusive=False)
        if hp["ema_decay"] >= 1:
            raise ConfigError(
                "ema_decay", f"must be below 1 (0.99 is usual), got {hp['ema_decay']}"
            )
        hp["dead_code_threshold"] = check_float(
            "dead_code_threshold", hp["dead_code_threshold"], 0.0
        )
        hp["prior_channels"] = check_int("prior_channels", hp["prior_channels"], 1)
        hp["prior_layers"] = check_int("prior_layers", hp["prior_layers"], 0)
        return super().check_hparams(hp)

    def build_networks(self) -> tuple[nn.Module, nn.Module]:
        hp = self.hparams
        (c, h, w), scale = hp.in_shape, 2 ** len(hp.channels)
        if h != w or h % scale:
            raise ConfigError(
                "channels",
                f"{len(hp.channels)} stride-2 layers need images whose side divides by {scale}, "
                f"not {h}x{w}; use 2 layers for 28x28 images (a 7x7 code map)",
            )
        self.code_shape = (h // scale, w // scale)
        return VQEncoder(c, hp.channels, hp.latent_dim), VQDecoder(hp.latent_dim, hp.channels, c)

    # --- the codes ------------------------------------------------------------------------
    @property
    def sample_kind(self) -> str:  # type: ignore[override]
        return "code_prior" if bool(self.prior_fitted) else "uniform_codes"

    @property
    def codebook(self) -> Tensor:
        """The code vectors (K, latent_dim)."""
        return self.quantizer.codebook

    def codes(self, x: Tensor) -> Tensor:
        """The encoder's code map: indices (B, 7, 7) of the nearest code vectors."""
        return self.nearest(self.encoder(x))

    def nearest(self, z_e: Tensor) -> Tensor:
        """(B, D, h, w) vectors -> (B, h, w) indices of their nearest code vectors (no update of
        the codebook, unlike the quantiser's forward in training)."""
        flat = z_e.permute(0, 2, 3, 1).flatten(0, 2)  # (B*h*w, D)
        index = torch.cdist(flat.float(), self.codebook.float()).argmin(1)
        return index.view(z_e.size(0), *z_e.shape[2:])

    def lookup(self, index: Tensor) -> Tensor:
        """Indices (B, h, w) -> the quantised map (B, D, h, w)."""
        return self.codebook[index].permute(0, 3, 1, 2)

    def code_nll(self, index: Tensor) -> Tensor:
        """-log p(z) of code maps (B, h, w) under the current prior, in nats: (B,)."""
        if not bool(self.prior_fitted):  # uniform: log K per position
            nll = index[0].numel() * math.log(self.hparams.codebook_size)
            return torch.full((index.size(0),), nll, device=index.device)
        logits = self.prior(index)  # (B, K, h, w)
        nll = torch.nn.functional.cross_entropy(logits.float(), index, reduction="none")
        return nll.flatten(1).sum(1)

    # --- the maths --------------------------------------------------------------------------
    def encode(self, x: Tensor, y: Knob = None) -> Tensor:
        return self.lookup(self.codes(x)).flatten(1)  # (B, D * h * w)

    embed = encode

    def logits(self, z: Tensor, y: Knob = None) -> Tensor:
        z_e = z.view(z.size(0), self.latent_dim, *self.code_shape)
        return self.decoder(self.lookup(self.nearest(z_e)))

    def terms(self, x: Tensor, beta: Knob = None, y: Knob = None) -> Terms:
        z_e = self.encoder(x)  # (B, D, 7, 7)
        # training: straight-through z_q, and the codebook's EMA update and dead-code restarts
        z_q, index, _ = self.quantizer(z_e)  # (B, D, 7, 7), (B, 7, 7)
        logits = self.decoder(z_q)
        recon = recon_bce(logits, x).mean()
        commitment = (z_e - z_q.detach()).pow(2).flatten(1).sum(1).mean()
        with torch.no_grad():
            kl = self.code_nll(index).mean()
            counts = torch.bincount(index.flatten(), minlength=self.hparams.codebook_size)
            p = counts.float() / counts.sum()
            perplexity = torch.exp(-(p * torch.log(p.clamp_min(1e-12))).sum())
            usage = (counts > 0).float().mean()
            mse = mse_per_pixel(torch.sigmoid(logits), x).mean()
        out = {
            "loss": recon + kl,  # a bound on -log p(x) (see the class)
            "objective": recon + self.hparams.commitment_weight * commitment,
            "recon": recon, "kl": kl, "commitment": commitment, "mse": mse,
            "perplexity": perplexity, "usage": usage,
        }  # fmt: skip
        return self.with_feature_term(out, logits, x)

    @torch.no_grad()
    def sample_codes(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """n code maps (n, h, w) from the prior: ancestral sampling in raster order, one
        position per pass of the PixelCNN; uniform before the prior is fitted."""
        k, (h, w) = self.hparams.codebook_size, self.code_shape
        if not bool(self.prior_fitted):
            return torch.randint(k, (n, h, w), generator=generator, device=self.device)
        index = torch.zeros(n, h, w, dtype=torch.long, device=self.device)
        for i in range(h):
            for j in range(w):
                probs = torch.softmax(self.prior(index)[:, :, i, j].float(), dim=1)  # (n, K)
                index[:, i, j] = torch.multinomial(probs, 1, generator=generator).squeeze(1)
        return index

    @torch.no_grad()
    def sample(self, n: int, generator: torch.Generator | None = None, y: Knob = None) -> Tensor:
        return torch.sigmoid(self.decoder(self.lookup(self.sample_codes(n, generator))))
