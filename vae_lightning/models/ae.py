"""The plain autoencoder (seed 1's 784-400-20 MLP) and the Gaussian it samples from."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn
from typing_extensions import Unpack

from vae_lightning.models.base import Autoencoder, Common, Knob, Terms, mlp, no_kl_schedule
from vae_lightning.models.losses import mse_per_pixel, recon_bce


class CodeMoments:
    """Running first and second moments of codes z, in float64: what the AE's sampling
    Gaussian is fitted to. ``z`` may carry leading dimensions (..., B, D): a stack of models
    (``training.stack``) keeps one set of moments per model."""

    def __init__(self) -> None:
        self.total: Tensor | None = None  # (..., D)
        self.outer: Tensor | None = None  # (..., D, D)
        self.n: Tensor | None = None  # ()

    def update(self, z: Tensor) -> None:
        z = z.detach().double()  # (..., B, D)
        if self.total is None:
            self.total = torch.zeros(z.shape[:-2] + z.shape[-1:], dtype=z.dtype, device=z.device)
            self.outer = torch.zeros(z.shape[:-2] + (z.shape[-1],) * 2, dtype=z.dtype,
                                     device=z.device)  # fmt: skip
            self.n = torch.zeros((), dtype=z.dtype, device=z.device)
        self.total += z.sum(-2)
        self.outer += z.mT @ z
        self.n += z.size(-2)

    def fit(self) -> tuple[Tensor, Tensor] | None:
        """(mean (..., D), covariance (..., D, D)) of the codes seen, or None with fewer than 2."""
        if self.n is None or self.n.item() <= 1:
            return None
        mean = self.total / self.n
        return mean, self.outer / self.n - mean.unsqueeze(-1) * mean.unsqueeze(-2)

    def state(self) -> list[Tensor] | None:
        return None if self.total is None else [t.cpu() for t in (self.total, self.outer, self.n)]

    @classmethod
    def from_state(cls, state: Sequence[Any], device: torch.device) -> CodeMoments:
        moments = cls()
        kw = {"device": device, "dtype": torch.float64}
        moments.total, moments.outer, moments.n = (torch.as_tensor(t).to(**kw) for t in state)
        return moments


class AE(Autoencoder):
    """A plain (deterministic) autoencoder; seed 1's 784-400-20 MLP by default.

    Its ``sample`` draws z from a Gaussian fitted to the codes of its last training epoch, so
    that its "generation" can be compared fairly with a VAE's.
    """

    sample_kind = "ae_fitted_gaussian"

    def __init__(
        self,
        latent_dim: int = 20,
        hidden_dim: int = 400,
        **common: Unpack[Common],
    ) -> None:
        no_kl_schedule(common.get("kl"), "an AE")
        super().__init__(latent_dim, **common)
        # Gaussian fitted to the training codes (moments accumulated during each training epoch)
        self.register_buffer("code_mean", torch.zeros(latent_dim))
        self.register_buffer("code_cov", torch.eye(latent_dim))
        self._moments: CodeMoments | None = None
        self._resumed: list[Tensor] | None = None

    def build_networks(self) -> tuple[nn.Module, nn.Module]:
        return mlp(self.hparams, out_features=self.hparams.latent_dim)

    def encode(self, x: Tensor, y: Knob = None) -> Tensor:
        return self.encoder(x)  # (B, latent_dim)

    embed = encode

    def terms(self, x: Tensor, beta: Knob = None, y: Knob = None) -> Terms:
        z = self.encoder(x)  # (B, D)
        logits = self.decoder(z)  # (B, C, H, W)
        recon = recon_bce(logits, x).mean()
        with torch.no_grad():
            mse = mse_per_pixel(torch.sigmoid(logits), x).mean()
        out = {"loss": recon, "recon": recon, "mse": mse, "z": z}
        return self.with_feature_term(out, logits, x)

    def observe(self, out: Terms) -> None:
        if self._moments is None:
            self.on_train_epoch_start()
        self._moments.update(out["z"])  # (B, D)

    def on_train_epoch_start(self) -> None:
        resumed, self._resumed = self._resumed, None
        if resumed is not None:  # a run resumed mid-epoch goes on with the epoch's moments
            self._moments = CodeMoments.from_state(resumed, self.code_mean.device)
        else:
            self._moments = CodeMoments()

    # the moments of a partial epoch travel in checkpoints (a run resumed mid-epoch, or a job
    # handed over by the fused launcher, fits its Gaussian to the whole epoch's codes); only
    # while training batches run (in train mode): a checkpoint at validation has none
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        super().on_save_checkpoint(checkpoint)
        state = self._moments.state() if self._moments is not None and self.training else None
        if state is not None:
            checkpoint["vae_lightning"]["code_stats"] = state

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        super().on_load_checkpoint(checkpoint)
        stats = (checkpoint.get("vae_lightning") or {}).get("code_stats")
        self._resumed = [torch.as_tensor(t) for t in stats] if stats else None

    def on_train_epoch_end(self) -> None:
        fitted = self._moments.fit() if self._moments is not None else None
        if fitted is not None:
            self.code_mean.copy_(fitted[0])
            self.code_cov.copy_(fitted[1])
        self._moments = None

    @torch.no_grad()
    def sample(self, n: int, generator: torch.Generator | None = None, y: Knob = None) -> Tensor:
        eye = torch.eye(self.latent_dim, device=self.code_cov.device, dtype=self.code_cov.dtype)
        chol = torch.linalg.cholesky(self.code_cov + 1e-6 * eye)
        eps = torch.randn(n, self.latent_dim, generator=generator, device=self.device)
        return self.decode(self.code_mean + eps @ chol.T)
