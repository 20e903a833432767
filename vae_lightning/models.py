"""LightningModules: AE, VAE and ConvVAE.

Each module owns its loss, its one shared step (stage as a parameter) and its optimizer; the
networks are plain nn.Modules from ``networks.py``. Hyper-parameters are typed primitives saved
with ``save_hyperparameters()``, so ``VAE.load_from_checkpoint(path)`` works without Hydra.

Every model offers ``encode(x)``, ``decode(z) -> x_hat in [0, 1]``, ``embed(x)`` (the features a
probe uses: mu for a VAE, z for the AE) and ``sample(n)``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import lightning as L
import torch

from vae_lightning.errors import ConfigError, check_float, check_int
from vae_lightning.losses import gaussian_kl, mse_per_pixel, recon_bce
from vae_lightning.networks import ConvDecoder, ConvEncoder, MLPDecoder, MLPEncoder

# exp(0.5 * logvar) and exp(logvar) stay finite in fp16/bf16/fp32 within this range; values
# outside it mean sigma < 3e-7 or > 2e4, which no useful posterior on [0, 1] pixels needs.
LOGVAR_MIN, LOGVAR_MAX = -30.0, 20.0


def _shape(key: str, value: Sequence[int]) -> tuple[int, ...]:
    try:
        shape = tuple(int(d) for d in value)
    except (TypeError, ValueError):
        raise ConfigError(key, f"must be a list of positive integers, got {value!r}") from None
    if len(shape) != 3 or min(shape) < 1:
        raise ConfigError(key, f"must be (channels, height, width), got {value!r}")
    return shape


class Autoencoder(L.LightningModule):
    """What AE and the VAEs share: validation of common values, the step, logging, Adam."""

    variational = False

    def __init__(
        self,
        latent_dim: int,
        lr: float,
        beta: float = 0.0,
        fused_adam: bool = True,
        compile: bool = False,
    ) -> None:
        super().__init__()
        self.latent_dim = check_int("latent_dim", latent_dim, 1)
        self.lr = check_float("lr", lr, 0.0, inclusive=False)
        self.beta = check_float("beta", beta, 0.0)
        self.fused_adam, self.compile_terms = bool(fused_adam), bool(compile)
        self._terms_fn = self.terms  # torch.compile'd in configure_model when compile=True
        self.encoder: torch.nn.Module
        self.decoder: torch.nn.Module
        # stage -> (sums of the terms over the epoch's images (K,), image count, term names)
        self._epoch_sums: dict[str, tuple[torch.Tensor, int, tuple[str, ...]]] = {}
        self._rng_to_restore: torch.Tensor | None = None
        # step of the first non-finite training loss, kept on the device (-1: none yet)
        self._first_bad_step: torch.Tensor | None = None

    # --- the contract -------------------------------------------------------------------------
    def encode(self, x: torch.Tensor):
        raise NotImplementedError

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def sample(self, n: int) -> torch.Tensor:
        raise NotImplementedError

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """(B, latent_dim) -> images (B, C, H, W) in [0, 1]."""
        return torch.sigmoid(self.decoder(z))

    def terms(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Batch means of the loss terms in nats per image; ``loss`` is what is optimised."""
        raise NotImplementedError

    # --- Lightning ----------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.terms(x)["loss"]

    def _shared_step(
        self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int, stage: str
    ) -> torch.Tensor:
        x, _ = batch  # (B, C, H, W) float in [0, 1], converted on the device by the DataModule
        terms = self._terms_fn(x)
        if stage == "train":
            self._check_finite(terms["loss"])
        self._accumulate(stage, terms, x.size(0))
        if stage == "train" and self._trainer is not None:
            if (self.global_step + 1) % self.trainer.log_every_n_steps == 0:
                # the steps at which Lightning writes step metrics to the loggers
                self.log("train/loss_step", terms["loss"], prog_bar=True, on_step=True)
            if batch_idx == self.trainer.num_training_batches - 1:
                # Log here rather than in on_train_epoch_end: callbacks' on_train_epoch_end
                # (History) run before the module's, and would miss the epoch's train metrics.
                self._log_epoch_means("train")
        return terms["loss"]

    # Epoch means are accumulated here, on the device, instead of with self.log(on_epoch=True)
    # per step: Lightning's self.log walks its result object on every call (~0.1 ms per key on
    # CPU), which made a third of an MLP epoch. One stacked add per step costs microseconds.
    def _accumulate(self, stage: str, terms: dict[str, torch.Tensor], n: int) -> None:
        values = torch.stack([v.detach() for v in terms.values()]) * n  # (K,) sums
        if stage in self._epoch_sums:
            sums, count, keys = self._epoch_sums[stage]
            if sums.device != values.device:  # restored from a checkpoint onto the CPU
                sums = sums.to(values.device)
            self._epoch_sums[stage] = (sums + values, count + n, keys)
        else:
            self._epoch_sums[stage] = (values, n, tuple(terms))

    def _log_epoch_means(self, stage: str) -> None:
        if stage not in self._epoch_sums:
            return
        sums, count, keys = self._epoch_sums.pop(stage)
        # exact means across processes: reduce sums and counts, then divide (no-op on 1 device)
        sums = self.trainer.strategy.reduce(sums, reduce_op="sum")
        count = self.trainer.strategy.reduce(
            torch.tensor(float(count), device=sums.device), reduce_op="sum"
        )
        means = sums / count
        self.log_dict(
            {f"{stage}/{k}": means[i] for i, k in enumerate(keys)}, on_step=False, on_epoch=True
        )

    # --- non-finite losses ---------------------------------------------------------------------
    def _check_finite(self, loss: torch.Tensor) -> None:
        """Stop on a NaN/inf loss before it reaches the weights (CPU), or within
        ``log_every_n_steps`` and always before a checkpoint is written (accelerators, where a
        check every step would cost a host synchronisation)."""
        if loss.device.type == "cpu":
            if not torch.isfinite(loss):
                self._raise_non_finite(self.global_step, loss)
            return
        step = torch.full((), self.global_step, device=loss.device)
        bad = ~torch.isfinite(loss)
        if self._first_bad_step is None:
            self._first_bad_step = torch.full((), -1, device=loss.device)
        self._first_bad_step = torch.where(
            bad & (self._first_bad_step < 0), step, self._first_bad_step
        )
        if (self.global_step + 1) % self.trainer.log_every_n_steps == 0:
            self._raise_if_flagged()

    def _raise_if_flagged(self) -> None:
        if self._first_bad_step is not None and (step := int(self._first_bad_step.item())) >= 0:
            self._raise_non_finite(step, None)

    def _raise_non_finite(self, step: int, loss: torch.Tensor | None) -> None:
        ckpt = self._trainer.checkpoint_callback if self._trainer is not None else None
        last_good = (
            (getattr(ckpt, "last_model_path", "") or getattr(ckpt, "best_model_path", ""))
            if ckpt
            else ""
        )
        value = f" ({loss.item()})" if loss is not None else ""
        raise NonFiniteLossError(
            f"non-finite training loss{value} at epoch {self.current_epoch}, step {step}. "
            f"Last good checkpoint: {last_good or 'none yet'} (not overwritten). Lower model.lr "
            f"or check the data; resume from the checkpoint with ckpt_path=<it>."
        )

    # --- checkpoints: what an exact resume needs beyond the weights ------------------------------
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        self._raise_if_flagged()  # never write weights that saw a non-finite loss
        checkpoint["vae_lightning"] = {
            "model_class": type(self).__name__,
            # the reparameterisation noise continues exactly where it stopped
            "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "epoch_sums": {
                stage: {"sums": sums, "count": count, "keys": list(keys)}
                for stage, (sums, count, keys) in self._epoch_sums.items()
                if stage == "train"
            },
        }

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        extra = checkpoint.get("vae_lightning") or {}
        if "torch_rng" in extra:
            # applied at the first training batch: the sanity check would consume noise first
            self._rng_to_restore = extra["torch_rng"]
            self._cuda_rng_to_restore = extra.get("cuda_rng") or []
        for stage, acc in (extra.get("epoch_sums") or {}).items():
            self._epoch_sums[stage] = (acc["sums"], int(acc["count"]), tuple(acc["keys"]))

    def on_train_batch_start(self, batch, batch_idx: int) -> None:
        if self._rng_to_restore is not None:
            torch.set_rng_state(self._rng_to_restore.cpu())
            if self._cuda_rng_to_restore and torch.cuda.is_available():
                torch.cuda.set_rng_state_all(self._cuda_rng_to_restore)
            self._rng_to_restore = None

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        return self._shared_step(batch, batch_idx, "train")

    def validation_step(self, batch, batch_idx: int) -> None:
        self._shared_step(batch, batch_idx, "val")

    def test_step(self, batch, batch_idx: int) -> None:
        self._shared_step(batch, batch_idx, "test")

    def on_train_epoch_start(self) -> None:
        # (not called when Lightning resumes in the middle of an epoch: the sums restored by
        # on_load_checkpoint then carry on)
        self._epoch_sums.pop("train", None)

    def on_validation_epoch_start(self) -> None:
        self._epoch_sums.pop("val", None)

    def on_validation_epoch_end(self) -> None:
        self._log_epoch_means("val")

    def on_test_epoch_start(self) -> None:
        self._epoch_sums.pop("test", None)

    def on_test_epoch_end(self) -> None:
        self._log_epoch_means("test")

    def configure_model(self) -> None:
        if self.compile_terms and self._terms_fn == self.terms:
            # the loss computation, not the networks: compiled submodules would rename the
            # state_dict keys (_orig_mod.) and break checkpoints
            self._terms_fn = torch.compile(self.terms)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        # fused: one kernel for all parameters instead of a Python loop over them; the same
        # update (to float rounding), and on CPU the single largest saving after the data path
        return torch.optim.Adam(self.parameters(), lr=self.lr, fused=self.fused_adam or None)


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or infinite; the message names the epoch, step and the last
    good checkpoint."""


class AE(Autoencoder):
    """A plain (deterministic) autoencoder; seed 1's 784-400-20 MLP by default.

    Its ``sample`` draws z from a Gaussian fitted to the codes of its last training epoch, so
    that its "generation" can be compared fairly with a VAE's.
    """

    def __init__(
        self,
        latent_dim: int = 20,
        hidden_dim: int = 400,
        lr: float = 1e-3,
        in_shape: Sequence[int] = (1, 28, 28),
        fused_adam: bool = True,
        compile: bool = False,
    ) -> None:
        super().__init__(latent_dim=latent_dim, lr=lr, fused_adam=fused_adam, compile=compile)
        check_int("hidden_dim", hidden_dim, 1)
        in_shape = _shape("in_shape", in_shape)
        self.save_hyperparameters()
        self.encoder = MLPEncoder(math.prod(in_shape), hidden_dim, latent_dim)
        self.decoder = MLPDecoder(latent_dim, hidden_dim, in_shape)
        # Gaussian fitted to the training codes (moments accumulated during each training epoch).
        self.register_buffer("code_mean", torch.zeros(latent_dim))
        self.register_buffer("code_cov", torch.eye(latent_dim))
        self._code_stats: list[torch.Tensor] | None = None

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder(x)  # (B, latent_dim)

    embed = encode

    def terms(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        z = self.encoder(x)  # (B, D)
        logits = self.decoder(z)  # (B, C, H, W)
        recon = recon_bce(logits, x).mean()
        with torch.no_grad():
            mse = mse_per_pixel(torch.sigmoid(logits), x).mean()
            if self.training and self._code_stats is not None:
                zd = z.detach().double()
                self._code_stats[0] += zd.sum(0)
                self._code_stats[1] += zd.T @ zd
                self._code_stats[2] += zd.size(0)
        return {"loss": recon, "recon": recon, "mse": mse}

    def on_train_epoch_start(self) -> None:
        super().on_train_epoch_start()
        d = self.latent_dim
        kw = {"device": self.device, "dtype": torch.float64}
        self._code_stats = [torch.zeros(d, **kw), torch.zeros(d, d, **kw), torch.zeros((), **kw)]

    def on_train_epoch_end(self) -> None:
        total, outer, n = self._code_stats
        if n.item() > 1:
            mean = total / n
            self.code_mean.copy_(mean)
            self.code_cov.copy_(outer / n - torch.outer(mean, mean))
        self._code_stats = None

    @torch.no_grad()
    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        eye = torch.eye(self.latent_dim, device=self.code_cov.device, dtype=self.code_cov.dtype)
        chol = torch.linalg.cholesky(self.code_cov + 1e-6 * eye)
        eps = torch.randn(n, self.latent_dim, generator=generator, device=self.device)
        return self.decode(self.code_mean + eps @ chol.T)


class _GaussianVAE(Autoencoder):
    """A VAE with a diagonal-Gaussian posterior, an N(0, I) prior and a Bernoulli decoder."""

    variational = True

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x -> (mu, logvar), each (B, latent_dim); logvar clamped so exp cannot overflow."""
        mu, logvar = self.encoder(x).chunk(2, dim=1)
        return mu, logvar.clamp(LOGVAR_MIN, LOGVAR_MAX)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.encode(x)[0]

    @staticmethod
    def reparameterize(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
        """z = mu + sigma * eps, eps ~ N(0, I) (Kingma & Welling 2014, Sec. 2.4)."""
        return mu + torch.randn_like(mu) * torch.exp(0.5 * logvar)

    def terms(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        mu, logvar = self.encode(x)
        z = self.reparameterize(mu, logvar)  # one sample: the single-sample ELBO, in every stage
        logits = self.decoder(z)
        recon = recon_bce(logits, x).mean()
        kl = gaussian_kl(mu, logvar).sum(1).mean()
        with torch.no_grad():
            mse = mse_per_pixel(torch.sigmoid(logits), x).mean()
        return {"loss": recon + self.beta * kl, "recon": recon, "kl": kl, "mse": mse}

    @torch.no_grad()
    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        z = torch.randn(n, self.latent_dim, generator=generator, device=self.device)
        return self.decode(z)


class VAE(_GaussianVAE):
    """Seed 1's MLP VAE: 784-400-(mu, logvar of 20) and 20-400-784."""

    def __init__(
        self,
        latent_dim: int = 20,
        hidden_dim: int = 400,
        beta: float = 1.0,
        lr: float = 1e-3,
        in_shape: Sequence[int] = (1, 28, 28),
        fused_adam: bool = True,
        compile: bool = False,
    ) -> None:
        super().__init__(latent_dim, lr, beta, fused_adam, compile)
        check_int("hidden_dim", hidden_dim, 1)
        in_shape = _shape("in_shape", in_shape)
        self.save_hyperparameters()
        self.encoder = MLPEncoder(math.prod(in_shape), hidden_dim, 2 * latent_dim)
        self.decoder = MLPDecoder(latent_dim, hidden_dim, in_shape)


class ConvVAE(_GaussianVAE):
    """Seed 2's convolutional VAE: Conv 32/64/128 (k4 s2 p1), flatten 1152, latent 32."""

    def __init__(
        self,
        latent_dim: int = 32,
        channels: Sequence[int] = (32, 64, 128),
        beta: float = 1.0,
        lr: float = 5e-4,
        in_shape: Sequence[int] = (1, 28, 28),
        fused_adam: bool = True,
        compile: bool = False,
    ) -> None:
        super().__init__(latent_dim, lr, beta, fused_adam, compile)
        in_shape = _shape("in_shape", in_shape)
        try:
            channels = [int(c) for c in channels]
        except (TypeError, ValueError):
            raise ConfigError("channels", f"must be a list of integers, got {channels!r}") from None
        if not channels or min(channels) < 1:
            raise ConfigError("channels", f"must be a non-empty list of integers >= 1: {channels}")
        self.save_hyperparameters()
        c, h, w = in_shape
        self.encoder = ConvEncoder(c, channels, 2 * latent_dim, in_size=h)
        self.decoder = ConvDecoder(latent_dim, channels, c, start_size=self.encoder.out_spatial)
        if h != w or self.decoder.out_size != h:
            raise ConfigError(
                "channels",
                f"{len(channels)} stride-2 layers on {h}x{w} images decode to "
                f"{self.decoder.out_size}x{self.decoder.out_size}; use 3 layers for 28x28 images",
            )
