"""The models, which hold the maths: AE, VAE, ConvVAE, CVAE, HVAE and VQVAE.

Each is a LightningModule whose typed ``__init__`` is its config schema; its hyper-parameters
are saved with ``save_hyperparameters()``, so ``VAE.load_from_checkpoint(path)`` works without
Hydra. The networks are plain nn.Modules from ``networks.py``.

Every model offers ``encode(x)``, ``decode(z) -> x_hat in [0, 1]``, ``embed(x)`` (the features
a probe uses: mu for a VAE, z for the AE), ``sample(n)`` and ``terms(x)``: the loss terms of a
batch, a pure function of the parameters and the batch (``forward`` is ``terms``, so
``torch.func.functional_call(model, params, (x,))`` computes them). How ``terms`` is driven each
batch is the step's business (``step.py``, ``model.step``); run concerns (the non-finite stop,
exact resume, the run record) are callbacks (``run.py``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import lightning as L
import torch
from torch import Tensor, nn

from vae_lightning.errors import ConfigError, check_choice, check_float, check_int
from vae_lightning.losses import feature_distance, gaussian_kl, mse_per_pixel, recon_bce
from vae_lightning.networks import (
    ACTIVATIONS,
    ConvDecoder,
    ConvEncoder,
    MLPDecoder,
    MLPEncoder,
    PixelCNN,
    TanhMLP,
    VQDecoder,
    VQEncoder,
)
from vae_lightning.schedules import check_kl, check_scheduler, kl_weight, lr_scheduler
from vae_lightning.step import AutomaticStep

# terms' return value, and its optional inputs (see Autoencoder.terms)
Terms = dict[str, Tensor]
Knob = Tensor | None

# exp(0.5 * logvar) and exp(logvar) stay finite in fp16/bf16/fp32 within this range; values
# outside it mean sigma < 3e-7 or > 2e4, which no useful posterior on [0, 1] pixels needs.
LOGVAR_MIN, LOGVAR_MAX = -30.0, 20.0
LOG_2PI = math.log(2 * math.pi)


def _gaussian(out: Tensor) -> tuple[Tensor, Tensor]:
    """A network's output (..., 2D) -> (mu, logvar), logvar clamped as in the VAEs."""
    mu, logvar = out.chunk(2, dim=-1)
    return mu, logvar.clamp(LOGVAR_MIN, LOGVAR_MAX)


def _log_normal(z: Tensor, mu: Tensor, logvar: Tensor) -> Tensor:
    """log N(z; mu, diag(exp(logvar))), summed over the last dimension."""
    return -0.5 * (LOG_2PI + logvar + (z - mu).pow(2) * torch.exp(-logvar)).sum(-1)


def _shape(key: str, value: Sequence[int]) -> tuple[int, ...]:
    try:
        shape = tuple(int(d) for d in value)
    except (TypeError, ValueError):
        raise ConfigError(key, f"must be a list of positive integers, got {value!r}") from None
    if len(shape) != 3 or min(shape) < 1:
        raise ConfigError(key, f"must be (channels, height, width), got {value!r}")
    return shape


def _channels(value: Any, key: str = "channels") -> list[int]:
    """A non-empty list of positive integers (layer widths), or a ConfigError naming ``key``."""
    try:
        channels = [int(c) for c in value]
    except (TypeError, ValueError):
        raise ConfigError(key, f"must be a list of integers, got {value!r}") from None
    if not channels or min(channels) < 1:
        raise ConfigError(key, f"must be a non-empty list of integers >= 1: {channels}")
    return channels


def _conv_networks(
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


def _mlp(hp: Any, out_features: int) -> tuple[nn.Module, nn.Module]:
    """Seed 1's MLP encoder (to ``out_features``) and decoder, from the hyper-parameters."""
    encoder = MLPEncoder(math.prod(hp.in_shape), hp.hidden_dim, out_features)
    return encoder, MLPDecoder(hp.latent_dim, hp.hidden_dim, hp.in_shape)


def _no_kl_schedule(kl: dict[str, Any] | None, model: str) -> None:
    """The kl= group is composed for every model; a model without a Gaussian KL takes only
    kl=constant."""
    if check_kl(kl) is not None:
        raise ConfigError("kl", f"schedules a VAE's KL term, and {model} has none: use kl=constant")


class Autoencoder(L.LightningModule):
    """What AE and the VAEs share: checked hyper-parameters, networks built once, Adam, and the
    hand-over of Lightning's step hooks to ``self.step``.

    Subclasses declare their hyper-parameters in a typed ``__init__`` that passes them all on to
    this one, check their own in ``check_hparams`` and build their networks in
    ``build_networks``.
    """

    variational = False
    conditional = False  # True: encode, decode, terms and sample take the labels ``y``
    sample_kind = "prior"  # what ``sample`` decodes, for the views' names

    def __init__(
        self,
        latent_dim: int,
        lr: float,
        in_shape: Sequence[int],
        fused_adam: bool = True,
        compile: bool = False,
        beta: float = 0.0,
        scheduler: dict[str, Any] | None = None,
        kl: dict[str, Any] | None = None,
        feature_loss_weight: float = 0.0,
    ) -> None:
        super().__init__()
        # collects the subclass's arguments too (its __init__ is on the call stack); an AE has
        # no beta or KL schedule to save
        self.save_hyperparameters(ignore=None if self.variational else ["beta", "kl"])
        self.hparams.update(self.check_hparams(dict(self.hparams)))  # plain, checked values
        self.latent_dim: int = self.hparams.latent_dim
        self.lr: float = self.hparams.lr
        self.beta: float = self.hparams.get("beta", 0.0)
        self.encoder, self.decoder = self.build_networks()
        self.feature_net = self.build_feature_net()
        self.step = AutomaticStep()
        self.terms_fn = self.terms  # torch.compile'd in configure_model when compile=True

    def check_hparams(self, hp: dict[str, Any]) -> dict[str, Any]:
        """Check and normalise the hyper-parameters (a ConfigError names the bad key)."""
        hp["latent_dim"] = check_int("latent_dim", hp["latent_dim"], 1)
        hp["lr"] = check_float("lr", hp["lr"], 0.0, inclusive=False)
        if "hidden_dim" in hp:  # the MLP models
            hp["hidden_dim"] = check_int("hidden_dim", hp["hidden_dim"], 1)
        if "beta" in hp:
            hp["beta"] = check_float("beta", hp["beta"], 0.0)
        hp["in_shape"] = _shape("in_shape", hp["in_shape"])
        hp["fused_adam"], hp["compile"] = bool(hp["fused_adam"]), bool(hp["compile"])
        hp["scheduler"] = check_scheduler(hp.get("scheduler"))
        hp["feature_loss_weight"] = check_float(
            "feature_loss_weight", hp.get("feature_loss_weight", 0.0), 0.0
        )
        if self.variational:
            hp["kl"] = check_kl(hp.get("kl"))
        return hp

    def build_networks(self) -> tuple[nn.Module, nn.Module]:
        raise NotImplementedError

    def build_feature_net(self) -> nn.Module | None:
        """The frozen features of the feature-matching loss (``feature_loss_weight > 0``): the
        architecture of the dataset classifier that FID uses (``fid.FeatureClassifier``). Its
        weights are the cached classifier's (``load_feature_classifier``, called by train.py)
        and travel in the checkpoint, so that a model reloads without the cache; no optimizer
        sees them."""
        if not self.hparams.feature_loss_weight:
            return None
        from vae_lightning.fid import ClassifierFeatures, FeatureClassifier

        if tuple(self.hparams.in_shape) != (1, 28, 28):
            raise ConfigError(
                "feature_loss_weight",
                f"needs 28x28 grey images (the FID classifier's input), not in_shape="
                f"{list(self.hparams.in_shape)}; set it to 0",
            )
        return ClassifierFeatures(FeatureClassifier(), dtype=None).requires_grad_(False)

    def load_feature_classifier(self, classifier: nn.Module) -> None:
        """Use ``classifier``'s weights (a fid.FeatureClassifier) for the feature-matching loss."""
        if self.feature_net is None:
            raise ConfigError("feature_loss_weight", "is 0: this model has no feature loss")
        try:
            self.feature_net.classifier.load_state_dict(classifier.state_dict())
        except RuntimeError as err:
            raise ConfigError(
                "feature_loss_weight",
                f"needs a classifier of 10 classes, the cached one differs ({str(err)[:200]})",
            ) from None

    def with_feature_term(self, out: Terms, logits: Tensor, x: Tensor) -> Terms:
        """``out`` with the feature-matching term (``feature``, nats-free: squared feature
        distance per image) added to its objective times ``feature_loss_weight``; ``loss``
        stays the model's own. Unchanged when the weight is 0."""
        if self.feature_net is None:
            return out
        feature = feature_distance(self.feature_net, torch.sigmoid(logits), x).mean()
        objective = out.get("objective", out["loss"])
        weight = self.hparams.feature_loss_weight
        return {**out, "objective": objective + weight * feature, "feature": feature}

    # --- the maths --------------------------------------------------------------------------
    # ``y``: the images' labels (B,), used by a conditional model only (``conditional``); the
    # others take and ignore it, so that callers pass the labels they have
    def encode(self, x: torch.Tensor, y: Knob = None) -> Any:
        raise NotImplementedError

    def embed(self, x: torch.Tensor, y: Knob = None) -> torch.Tensor:
        raise NotImplementedError

    def logits(self, z: torch.Tensor, y: Knob = None) -> torch.Tensor:
        """(B, latent_dim) -> the decoder's Bernoulli logits (B, C, H, W)."""
        return self.decoder(z)

    def decode(self, z: torch.Tensor, y: Knob = None) -> torch.Tensor:
        """(B, latent_dim) -> images (B, C, H, W) in [0, 1]."""
        return torch.sigmoid(self.logits(z, y))

    def terms(
        self, x: Tensor, noise: Knob = None, mask: Knob = None, beta: Knob = None, y: Knob = None
    ) -> Terms:
        """The loss terms of a batch: 0-dim batch means in nats per image (``loss`` is reported,
        ``objective`` optimised, ``loss`` when there is none), plus any per-image outputs that
        ``observe`` uses.

        The keywords are for the step: ``beta`` a tensor in place of ``self.beta`` (the KL
        schedule's weight, or each job's in a stack); and for a step that drives several models
        as one (``fused.py``): ``noise`` the (B, latent_dim) draw of eps (default: drawn here),
        ``mask`` (latent_dim,) ones for the latent dimensions this model uses (a smaller model
        padded into a larger one: the others are zeroed in z and left out of the KL). Left at
        None, the maths is exactly that of one model with its own ``beta``.
        """
        raise NotImplementedError

    def forward(self, x: torch.Tensor, **knobs: Any) -> dict[str, torch.Tensor]:
        return self.terms(x, **knobs)

    def observe(self, out: dict[str, torch.Tensor]) -> None:
        """Called by the step with each training batch's ``terms``, outside any compiled code."""

    def kl_weight(self) -> float | None:
        """The scheduled KL weight of this training step, or None for a constant ``beta`` (and
        for a model without a KL term)."""
        spec, trainer = self.hparams.get("kl"), self._trainer
        if spec is None or spec["name"] == "constant" or trainer is None:
            return None
        steps = max(1, trainer.num_training_batches)
        total = int(trainer.estimated_stepping_batches)
        return kl_weight(spec, self.beta, trainer.global_step, steps, total)

    @torch.no_grad()
    def sample(
        self, n: int, generator: torch.Generator | None = None, y: Knob = None
    ) -> torch.Tensor:
        raise NotImplementedError

    def configure_optimizers(self) -> Any:
        # fused: one kernel for all parameters instead of a Python loop over them; the same
        # update (to float rounding), and on CPU the single largest saving after the data path
        trained = [p for p in self.parameters() if p.requires_grad]  # not the frozen features
        optimizer = torch.optim.Adam(trained, lr=self.lr, fused=self.hparams.fused_adam or None)
        max_epochs = self.trainer.max_epochs if self._trainer is not None else 1
        scheduler = lr_scheduler(optimizer, self.hparams.get("scheduler"), max_epochs or 1)
        if scheduler is None:
            return optimizer
        return {"optimizer": optimizer, "lr_scheduler": scheduler}

    def configure_model(self) -> None:
        if self.hparams.compile and self.terms_fn == self.terms:
            # the maths, not the networks: compiled submodules would rename the state_dict keys
            # (_orig_mod.) and break checkpoints
            self.terms_fn = torch.compile(self.terms)

    # --- Lightning's hooks, handed to the step ------------------------------------------------
    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return self.step.training_step(self, batch, batch_idx)

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self.step.eval_step(self, batch, "val")

    def test_step(self, batch: Any, batch_idx: int) -> None:
        self.step.eval_step(self, batch, "test")

    def on_validation_epoch_end(self) -> None:
        self.step.log_means(self, "val")

    def on_test_epoch_end(self) -> None:
        self.step.log_means(self, "test")

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        # the class, for evaluate's checks; the step's partial epoch, for an exact resume
        checkpoint["vae_lightning"] = {
            **checkpoint.get("vae_lightning", {}),
            "model_class": type(self).__name__,
            "step": self.step.state_dict(),
        }

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        extra = checkpoint.get("vae_lightning") or {}
        if "epoch_sums" in extra:  # written before the step had a module of its own
            extra = {**extra, "step": {"epoch_means": extra["epoch_sums"]}}
        self.step.load_state_dict(extra.get("step") or {})


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
        lr: float = 1e-3,
        in_shape: Sequence[int] = (1, 28, 28),
        fused_adam: bool = True,
        compile: bool = False,
        scheduler: dict[str, Any] | None = None,
        kl: dict[str, Any] | None = None,
        feature_loss_weight: float = 0.0,
    ) -> None:
        _no_kl_schedule(kl, "an AE")
        super().__init__(
            latent_dim, lr, in_shape, fused_adam, compile, scheduler=scheduler,
            feature_loss_weight=feature_loss_weight,
        )  # fmt: skip
        # Gaussian fitted to the training codes (moments accumulated during each training epoch)
        self.register_buffer("code_mean", torch.zeros(latent_dim))
        self.register_buffer("code_cov", torch.eye(latent_dim))
        self._code_stats: list[torch.Tensor] | None = None
        self._resumed_stats: list[torch.Tensor] | None = None

    def build_networks(self) -> tuple[nn.Module, nn.Module]:
        return _mlp(self.hparams, out_features=self.hparams.latent_dim)

    def encode(self, x: torch.Tensor, y: Knob = None) -> torch.Tensor:
        return self.encoder(x)  # (B, latent_dim)

    embed = encode

    def terms(
        self, x: Tensor, noise: Knob = None, mask: Knob = None, beta: Knob = None, y: Knob = None
    ) -> Terms:
        z = self.encoder(x)  # (B, D)
        if mask is not None:
            z = z * mask
        logits = self.decoder(z)  # (B, C, H, W)
        recon = recon_bce(logits, x).mean()
        with torch.no_grad():
            mse = mse_per_pixel(torch.sigmoid(logits), x).mean()
        out = {"loss": recon, "recon": recon, "mse": mse, "z": z}
        return self.with_feature_term(out, logits, x)

    def observe(self, out: dict[str, torch.Tensor]) -> None:
        z = out["z"].detach().double()  # (B, D)
        if self._code_stats is None:
            self.on_train_epoch_start()
        total, outer, n = self._code_stats
        total += z.sum(0)
        outer += z.T @ z
        n += z.size(0)

    def on_train_epoch_start(self) -> None:
        kw = {"device": self.code_mean.device, "dtype": torch.float64}
        resumed, self._resumed_stats = self._resumed_stats, None
        if resumed is not None:  # a run resumed mid-epoch goes on with the epoch's moments
            self._code_stats = [t.to(**kw) for t in resumed]
            return
        d = self.latent_dim
        self._code_stats = [torch.zeros(d, **kw), torch.zeros(d, d, **kw), torch.zeros((), **kw)]

    # the moments of a partial epoch travel in checkpoints (a run resumed mid-epoch, or a job
    # handed over by the fused launcher, fits its Gaussian to the whole epoch's codes)
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        super().on_save_checkpoint(checkpoint)
        if self._code_stats is not None and self._trainer is not None and self._trainer.training:
            checkpoint["vae_lightning"]["code_stats"] = [t.cpu() for t in self._code_stats]

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        super().on_load_checkpoint(checkpoint)
        stats = (checkpoint.get("vae_lightning") or {}).get("code_stats")
        self._resumed_stats = [torch.as_tensor(t) for t in stats] if stats else None

    def on_train_epoch_end(self) -> None:
        if self._code_stats is None:
            return
        total, outer, n = self._code_stats
        if n.item() > 1:
            mean = total / n
            self.code_mean.copy_(mean)
            self.code_cov.copy_(outer / n - torch.outer(mean, mean))
        self._code_stats = None

    @torch.no_grad()
    def sample(
        self, n: int, generator: torch.Generator | None = None, y: Knob = None
    ) -> torch.Tensor:
        eye = torch.eye(self.latent_dim, device=self.code_cov.device, dtype=self.code_cov.dtype)
        chol = torch.linalg.cholesky(self.code_cov + 1e-6 * eye)
        eps = torch.randn(n, self.latent_dim, generator=generator, device=self.device)
        return self.decode(self.code_mean + eps @ chol.T)


class _GaussianVAE(Autoencoder):
    """A VAE with a diagonal-Gaussian posterior, an N(0, I) prior and a Bernoulli decoder."""

    variational = True

    def encode(self, x: torch.Tensor, y: Knob = None) -> tuple[torch.Tensor, torch.Tensor]:
        """x -> (mu, logvar), each (B, latent_dim); logvar clamped so exp cannot overflow."""
        mu, logvar = self.encoder(x).chunk(2, dim=1)
        return mu, logvar.clamp(LOGVAR_MIN, LOGVAR_MAX)

    def embed(self, x: torch.Tensor, y: Knob = None) -> torch.Tensor:
        return self.encode(x, y)[0]

    @staticmethod
    def reparameterize(
        mu: torch.Tensor, logvar: torch.Tensor, noise: torch.Tensor | None = None
    ) -> torch.Tensor:
        """z = mu + sigma * eps, eps ~ N(0, I) (Kingma & Welling 2014, Sec. 2.4); ``noise``: a
        given eps."""
        eps = torch.randn_like(mu) if noise is None else noise
        return mu + eps * torch.exp(0.5 * logvar)

    def terms(
        self, x: Tensor, noise: Knob = None, mask: Knob = None, beta: Knob = None, y: Knob = None
    ) -> Terms:
        mu, logvar = self.encode(x, y)  # (B, D) each
        if mask is not None:  # unused dimensions: N(0, 1) exactly, so their KL is exactly 0
            mu, logvar = mu * mask, logvar * mask
        z = self.reparameterize(mu, logvar, noise)  # one sample: the single-sample ELBO
        if mask is not None:
            z = z * mask
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
    def sample(
        self, n: int, generator: torch.Generator | None = None, y: Knob = None
    ) -> torch.Tensor:
        z = torch.randn(n, self.latent_dim, generator=generator, device=self.device)
        return self.decode(z, y)


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
        scheduler: dict[str, Any] | None = None,
        kl: dict[str, Any] | None = None,
        feature_loss_weight: float = 0.0,
    ) -> None:
        super().__init__(
            latent_dim, lr, in_shape, fused_adam, compile, beta, scheduler, kl, feature_loss_weight
        )

    def build_networks(self) -> tuple[nn.Module, nn.Module]:
        return _mlp(self.hparams, out_features=2 * self.hparams.latent_dim)  # mu and logvar


class ConvVAE(_GaussianVAE):
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
        lr: float = 5e-4,
        in_shape: Sequence[int] = (1, 28, 28),
        fused_adam: bool = True,
        compile: bool = False,
        scheduler: dict[str, Any] | None = None,
        kl: dict[str, Any] | None = None,
        extra_channels: int | None = None,
        batchnorm: bool = False,
        activation: str = "relu",
        feature_loss_weight: float = 0.0,
    ) -> None:
        super().__init__(
            latent_dim, lr, in_shape, fused_adam, compile, beta, scheduler, kl, feature_loss_weight
        )

    def check_hparams(self, hp: dict[str, Any]) -> dict[str, Any]:
        if hp["extra_channels"] is not None:
            hp["extra_channels"] = check_int("extra_channels", hp["extra_channels"], 1)
        if not isinstance(hp["batchnorm"], bool):
            raise ConfigError("batchnorm", f"must be true or false, got {hp['batchnorm']!r}")
        hp["activation"] = check_choice("activation", hp["activation"], ACTIVATIONS)
        hp["channels"] = _channels(hp["channels"])
        return super().check_hparams(hp)

    def build_networks(self) -> tuple[nn.Module, nn.Module]:
        hp = self.hparams
        deep = {
            "extra_channels": hp.extra_channels, "batchnorm": hp.batchnorm, "act": hp.activation,
        }  # fmt: skip
        return _conv_networks(hp, hp.in_shape[0], 2 * hp.latent_dim, hp.latent_dim, **deep)


class CVAE(_GaussianVAE):
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
        lr: float = 1e-3,
        in_shape: Sequence[int] = (1, 28, 28),
        fused_adam: bool = True,
        compile: bool = False,
        scheduler: dict[str, Any] | None = None,
        kl: dict[str, Any] | None = None,
        feature_loss_weight: float = 0.0,
    ) -> None:
        super().__init__(
            latent_dim, lr, in_shape, fused_adam, compile, beta, scheduler, kl, feature_loss_weight
        )

    def check_hparams(self, hp: dict[str, Any]) -> dict[str, Any]:
        hp["num_classes"] = check_int("num_classes", hp["num_classes"], 2)
        hp["arch"] = check_choice("arch", hp["arch"], ("mlp", "conv"))
        hp["channels"] = _channels(hp["channels"])
        return super().check_hparams(hp)

    def build_networks(self) -> tuple[nn.Module, nn.Module]:
        hp, k = self.hparams, self.hparams.num_classes
        if hp.arch == "mlp":
            encoder = MLPEncoder(math.prod(hp.in_shape) + k, hp.hidden_dim, 2 * hp.latent_dim)
            return encoder, MLPDecoder(hp.latent_dim + k, hp.hidden_dim, hp.in_shape)
        return _conv_networks(hp, hp.in_shape[0] + k, 2 * hp.latent_dim, hp.latent_dim + k)

    def one_hot(self, y: Knob, like: Tensor) -> Tensor:
        """Labels (B,) or class weights (B, num_classes) -> (B, num_classes), ``like``'s dtype."""
        if y is None:
            raise ValueError("a CVAE needs the labels y: encode(x, y), decode(z, y), terms(x, y=y)")
        k = self.hparams.num_classes
        if y.ndim == 2:
            return y.to(like.dtype)
        return torch.nn.functional.one_hot(y.long(), k).to(like.dtype)

    def encode(self, x: torch.Tensor, y: Knob = None) -> tuple[torch.Tensor, torch.Tensor]:
        onehot = self.one_hot(y, x)  # (B, K)
        if self.hparams.arch == "mlp":
            xy = torch.cat([x.flatten(1), onehot], dim=1)  # (B, C*H*W + K)
        else:  # one constant plane per class
            planes = onehot[:, :, None, None].expand(-1, -1, *x.shape[2:])  # (B, K, H, W)
            xy = torch.cat([x, planes], dim=1)  # (B, C + K, H, W)
        mu, logvar = self.encoder(xy).chunk(2, dim=1)
        return mu, logvar.clamp(LOGVAR_MIN, LOGVAR_MAX)

    def logits(self, z: torch.Tensor, y: Knob = None) -> torch.Tensor:
        return self.decoder(torch.cat([z, self.one_hot(y, z)], dim=1))  # (B, D + K) -> logits

    @torch.no_grad()
    def sample(
        self, n: int, generator: torch.Generator | None = None, y: Knob = None
    ) -> torch.Tensor:
        if y is None:  # the classes in turn
            y = torch.arange(n, device=self.device) % self.hparams.num_classes
        return super().sample(n, generator, y)


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
        lr: float = 1e-3,
        in_shape: Sequence[int] = (1, 28, 28),
        fused_adam: bool = True,
        compile: bool = False,
        scheduler: dict[str, Any] | None = None,
        kl: dict[str, Any] | None = None,
        feature_loss_weight: float = 0.0,
    ) -> None:
        super().__init__(
            latent_dim, lr, in_shape, fused_adam, compile, beta, scheduler, kl, feature_loss_weight
        )

    def check_hparams(self, hp: dict[str, Any]) -> dict[str, Any]:
        hp["layers"] = check_int("layers", hp["layers"], 1)
        if hp["layers"] > 2:
            raise ConfigError("layers", f"must be 1 or 2, got {hp['layers']}")
        hp["inner_dim"] = check_int("inner_dim", hp["inner_dim"], 1)
        hp["hidden_dims"] = _channels(hp["hidden_dims"], "hidden_dims")
        if len(hp["hidden_dims"]) < hp["layers"]:
            raise ConfigError(
                "hidden_dims", f"needs one width per layer ({hp['layers']}): {hp['hidden_dims']}"
            )
        hp = super().check_hparams(hp)
        if hp.get("kl") and hp["kl"]["free_bits"] > 0:
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

    def encode(self, x: torch.Tensor, y: Knob = None) -> tuple[torch.Tensor, torch.Tensor]:
        """q(z1|x): (mu, logvar), each (B, z1_dim)."""
        return _gaussian(self.encoder["q1"](x))

    def embed(self, x: torch.Tensor, y: Knob = None) -> torch.Tensor:
        return self.encode(x)[0]

    def logits(self, z: torch.Tensor, y: Knob = None) -> torch.Tensor:
        return self.decoder["px"](z).view(-1, *self.hparams.in_shape)

    def log_weights(
        self, x: Tensor, m: int = 1, generator: torch.Generator | None = None
    ) -> dict[str, Tensor]:
        """``m`` draws from q for each image: log p(x|z1), log p(z) and log q(z|x), each (m, B),
        and the decoder's logits of the first draw."""
        mu1, logvar1 = self.encode(x)  # (B, D1)
        eps = torch.randn((m, *mu1.shape), generator=generator, device=x.device, dtype=x.dtype)
        z1 = mu1 + eps * torch.exp(0.5 * logvar1)  # (m, B, D1)
        log_q = _log_normal(z1, mu1, logvar1)
        if self.hparams.layers == 2:
            mu2, logvar2 = _gaussian(self.encoder["q2"](z1.flatten(0, 1)))  # (m*B, D2)
            eps2 = torch.randn(mu2.shape, generator=generator, device=x.device, dtype=x.dtype)
            z2 = mu2 + eps2 * torch.exp(0.5 * logvar2)
            log_q = log_q + _log_normal(z2, mu2, logvar2).view(m, -1)
            prior = _log_normal(z2, torch.zeros_like(z2), torch.zeros_like(z2)).view(m, -1)
            mu_p, logvar_p = _gaussian(self.decoder["p1"](z2))  # p(z1|z2)
            log_p = prior + _log_normal(z1.flatten(0, 1), mu_p, logvar_p).view(m, -1)
        else:
            log_p = _log_normal(z1, torch.zeros_like(z1), torch.zeros_like(z1))
        logits = self.logits(z1.flatten(0, 1))  # (m*B, C, H, W)
        target = x.unsqueeze(0).expand(m, *x.shape).flatten(0, 1)
        log_px = -recon_bce(logits, target).view(m, -1)
        return {"log_px": log_px, "log_p": log_p, "log_q": log_q, "logits": logits[: len(x)]}

    def terms(
        self, x: Tensor, noise: Knob = None, mask: Knob = None, beta: Knob = None, y: Knob = None
    ) -> Terms:
        if noise is not None or mask is not None:
            raise ValueError("HVAE is not stacked: terms takes no noise or mask")
        w = self.log_weights(x)
        recon = -w["log_px"].mean()
        kl = (w["log_q"] - w["log_p"]).mean()  # one-sample estimate of both layers' KL
        weight = self.beta if beta is None else beta
        with torch.no_grad():
            mse = mse_per_pixel(torch.sigmoid(w["logits"]), x).mean()
        out = {"loss": recon + kl, "objective": recon + weight * kl, "recon": recon, "kl": kl}
        return self.with_feature_term({**out, "mse": mse}, w["logits"], x)

    @torch.no_grad()
    def sample(
        self, n: int, generator: torch.Generator | None = None, y: Knob = None
    ) -> torch.Tensor:
        z = torch.randn(n, self.latent_dim, generator=generator, device=self.device)
        if self.hparams.layers == 2:  # down through p(z1|z2)
            mu, logvar = _gaussian(self.decoder["p1"](z))
            eps = torch.randn(mu.shape, generator=generator, device=self.device)
            z = mu + eps * torch.exp(0.5 * logvar)
        return self.decode(z)


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
        lr: float = 5e-4,
        in_shape: Sequence[int] = (1, 28, 28),
        fused_adam: bool = True,
        compile: bool = False,
        scheduler: dict[str, Any] | None = None,
        kl: dict[str, Any] | None = None,
        feature_loss_weight: float = 0.0,
    ) -> None:
        _no_kl_schedule(kl, "a VQ-VAE")
        super().__init__(
            latent_dim, lr, in_shape, fused_adam, compile, scheduler=scheduler,
            feature_loss_weight=feature_loss_weight,
        )  # fmt: skip
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
        hp["channels"] = _channels(hp["channels"])
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

    def terms(
        self, x: Tensor, noise: Knob = None, mask: Knob = None, beta: Knob = None, y: Knob = None
    ) -> Terms:
        if noise is not None or mask is not None:
            raise ValueError("VQVAE is not stacked: terms takes no noise or mask")
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
