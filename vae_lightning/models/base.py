"""What every model shares: ``Autoencoder``, the LightningModule whose subclasses hold the maths,
and the small helpers the families use (checked shapes and widths, Gaussian log-densities).

A model computes ``terms(x, beta=None, y=None)``: the loss terms of a batch as 0-dim batch means
in nats per image, a pure function of the parameters and the batch (``forward`` is ``terms``, so
``torch.func.functional_call(model, params, (x,))`` computes them). ``beta`` is the KL weight
of this step, given by whoever drives the maths (the KL schedule is the step's, not the
model's); the model never reads the trainer.

How ``terms`` is driven each batch (one optimizer step per batch, several in a CUDA graph, a
sweep's models stacked) is the business of a *step* (``vae_lightning.training``), attached as
``model.step`` by whoever trains the model (``train.py``; ``training.AutomaticStep()`` in a
notebook). Lightning's hooks are handed to it; the model itself holds no training loop.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, Protocol, TypedDict

import lightning as L
import torch
from torch import Tensor, nn

from vae_lightning.errors import ConfigError, check_float, check_int
from vae_lightning.models.losses import feature_distance
from vae_lightning.models.networks import MLPDecoder, MLPEncoder

# terms' return value, and its optional inputs (see Autoencoder.terms)
Terms = dict[str, Tensor]
Knob = Tensor | None

# exp(0.5 * logvar) and exp(logvar) stay finite in fp16/bf16/fp32 within this range; values
# outside it mean sigma < 3e-7 or > 2e4, which no useful posterior on [0, 1] pixels needs.
LOGVAR_MIN, LOGVAR_MAX = -30.0, 20.0
LOG_2PI = math.log(2 * math.pi)


class Common(TypedDict, total=False):
    """The keys every model takes besides its own, with ``Autoencoder.__init__``'s defaults
    (a family may change one: the convolutional models' ``lr`` is 5e-4). The training settings
    travel with a model's config and checkpoint and are the step's to apply: ``lr``,
    ``fused_adam`` (Adam's fused kernel), ``compile`` (torch.compile of ``terms``),
    ``scheduler`` and ``kl`` (the learning rate's and the KL weight's schedules, checked when
    a step is attached); ``in_shape`` is the images' (C, H, W); ``feature_loss_weight`` adds
    the feature-matching term to the objective."""

    lr: float
    in_shape: Sequence[int]
    fused_adam: bool
    compile: bool
    scheduler: dict[str, Any] | None
    kl: dict[str, Any] | None
    feature_loss_weight: float


class Step(Protocol):
    """What a model hands Lightning's hooks to (``vae_lightning.training`` has the steps)."""

    automatic_optimization: bool

    def configure(self, model: Autoencoder) -> None: ...
    def configure_optimizers(self, model: Autoencoder) -> Any: ...
    def training_step(self, model: Autoencoder, batch: Any, batch_idx: int) -> Tensor | None: ...
    def eval_step(self, model: Autoencoder, batch: Any, stage: str) -> None: ...
    def log_means(self, model: Autoencoder, stage: str) -> None: ...
    def state_dict(self) -> dict[str, Any]: ...
    def load_state_dict(self, state: dict[str, Any]) -> None: ...


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """The model in eval mode without gradients for the block; its mode restored after."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield model
    finally:
        model.train(was_training)


def gaussian(out: Tensor) -> tuple[Tensor, Tensor]:
    """A network's output (..., 2D) -> (mu, logvar), logvar clamped as in the VAEs."""
    mu, logvar = out.chunk(2, dim=-1)
    return mu, logvar.clamp(LOGVAR_MIN, LOGVAR_MAX)


def log_normal(z: Tensor, mu: Tensor, logvar: Tensor) -> Tensor:
    """log N(z; mu, diag(exp(logvar))), summed over the last dimension."""
    return -0.5 * (LOG_2PI + logvar + (z - mu).pow(2) * torch.exp(-logvar)).sum(-1)


def check_shape(key: str, value: Sequence[int]) -> tuple[int, ...]:
    try:
        shape = tuple(int(d) for d in value)
    except (TypeError, ValueError):
        raise ConfigError(key, f"must be a list of positive integers, got {value!r}") from None
    if len(shape) != 3 or min(shape) < 1:
        raise ConfigError(key, f"must be (channels, height, width), got {value!r}")
    return shape


def check_widths(value: Any, key: str = "channels") -> list[int]:
    """A non-empty list of positive integers (layer widths), or a ConfigError naming ``key``."""
    try:
        channels = [int(c) for c in value]
    except (TypeError, ValueError):
        raise ConfigError(key, f"must be a list of integers, got {value!r}") from None
    if not channels or min(channels) < 1:
        raise ConfigError(key, f"must be a non-empty list of integers >= 1: {channels}")
    return channels


def mlp(hp: Any, out_features: int) -> tuple[nn.Module, nn.Module]:
    """Seed 1's MLP encoder (to ``out_features``) and decoder, from the hyper-parameters."""
    encoder = MLPEncoder(math.prod(hp.in_shape), hp.hidden_dim, out_features)
    return encoder, MLPDecoder(hp.latent_dim, hp.hidden_dim, hp.in_shape)


def plain(spec: Any) -> Any:
    """A config mapping (a DictConfig too) as plain dicts and lists, so checkpoints hold only
    plain containers (``weights_only=True`` loading)."""
    if isinstance(spec, Mapping):
        return {str(k): plain(v) for k, v in spec.items()}
    if isinstance(spec, (list, tuple)):
        return [plain(v) for v in spec]
    return spec


def no_kl_schedule(kl: Any, model: str) -> None:
    """The kl= group is composed for every model; a model without a Gaussian KL takes only
    kl=constant without free bits."""
    spec = plain(kl) or {}
    if spec.get("name", "constant") != "constant" or spec.get("free_bits", 0.0):
        raise ConfigError("kl", f"schedules a VAE's KL term, and {model} has none: use kl=constant")


class Autoencoder(L.LightningModule):
    """What AE and the VAEs share: checked hyper-parameters, networks built once, the optional
    feature-matching term, and the hand-over of Lightning's hooks to ``self.step``.

    Subclasses declare their own hyper-parameters in a typed ``__init__`` and take the ones
    every model shares as ``**common: Unpack[Common]``, pass them all on to this one, check
    their own in ``check_hparams`` and build their networks in ``build_networks``.
    """

    variational = False
    conditional = False  # True: encode, decode, terms and sample take the labels ``y``
    sample_kind = "prior"  # what ``sample`` decodes, for the views' names

    def __init__(
        self,
        latent_dim: int,
        beta: float = 0.0,
        lr: float = 1e-3,
        in_shape: Sequence[int] = (1, 28, 28),
        fused_adam: bool = True,
        compile: bool = False,
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
        self.step: Step | None = None  # attached by whoever trains the model
        self.terms_fn = self.terms  # what the step runs (torch.compile'd with compile=true)

    def check_hparams(self, hp: dict[str, Any]) -> dict[str, Any]:
        """Check and normalise the hyper-parameters (a ConfigError names the bad key). The
        schedules (``scheduler``, ``kl``) are the step's to check, when it is attached."""
        hp["latent_dim"] = check_int("latent_dim", hp["latent_dim"], 1)
        hp["lr"] = check_float("lr", hp["lr"], 0.0, inclusive=False)
        if "hidden_dim" in hp:  # the MLP models
            hp["hidden_dim"] = check_int("hidden_dim", hp["hidden_dim"], 1)
        if "beta" in hp:
            hp["beta"] = check_float("beta", hp["beta"], 0.0)
        hp["in_shape"] = check_shape("in_shape", hp["in_shape"])
        hp["fused_adam"], hp["compile"] = bool(hp["fused_adam"]), bool(hp["compile"])
        hp["scheduler"] = plain(hp.get("scheduler"))
        hp["feature_loss_weight"] = check_float(
            "feature_loss_weight", hp.get("feature_loss_weight", 0.0), 0.0
        )
        if self.variational:
            hp["kl"] = plain(hp.get("kl"))
        return hp

    def build_networks(self) -> tuple[nn.Module, nn.Module]:
        raise NotImplementedError

    def build_feature_net(self) -> nn.Module | None:
        """The frozen features of the feature-matching loss (``feature_loss_weight > 0``): the
        architecture of the dataset classifier that FID uses (``networks.FeatureClassifier``).
        Its weights are the cached classifier's (``load_feature_classifier``, called by
        train.py) and travel in the checkpoint, so that a model reloads without the cache; no
        optimizer sees them."""
        if not self.hparams.feature_loss_weight:
            return None
        from vae_lightning.models.networks import ClassifierFeatures, FeatureClassifier

        if tuple(self.hparams.in_shape) != (1, 28, 28):
            raise ConfigError(
                "feature_loss_weight",
                f"needs 28x28 grey images (the FID classifier's input), not in_shape="
                f"{list(self.hparams.in_shape)}; set it to 0",
            )
        return ClassifierFeatures(FeatureClassifier(), dtype=None).requires_grad_(False)

    def load_feature_classifier(self, classifier: nn.Module) -> None:
        """Use ``classifier``'s weights (a FeatureClassifier) for the feature-matching loss."""
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
    def encode(self, x: Tensor, y: Knob = None) -> Any:
        raise NotImplementedError

    def embed(self, x: Tensor, y: Knob = None) -> Tensor:
        raise NotImplementedError

    def logits(self, z: Tensor, y: Knob = None) -> Tensor:
        """(B, latent_dim) -> the decoder's Bernoulli logits (B, C, H, W)."""
        return self.decoder(z)

    def decode(self, z: Tensor, y: Knob = None) -> Tensor:
        """(B, latent_dim) -> images (B, C, H, W) in [0, 1]."""
        return torch.sigmoid(self.logits(z, y))

    def terms(self, x: Tensor, beta: Knob = None, y: Knob = None) -> Terms:
        """The loss terms of a batch: 0-dim batch means in nats per image (``loss`` is reported,
        ``objective`` optimised, ``loss`` when there is none), plus any per-image outputs that
        ``observe`` uses. ``beta``: the KL weight of this step, a tensor (default: the model's
        own ``beta``; the step gives the KL schedule's weight, a stack each job's)."""
        raise NotImplementedError

    def forward(self, x: Tensor, **knobs: Any) -> Terms:
        return self.terms(x, **knobs)

    def observe(self, out: Terms) -> None:
        """Called by the step with each training batch's ``terms``, outside any compiled code."""

    @torch.no_grad()
    def sample(self, n: int, generator: torch.Generator | None = None, y: Knob = None) -> Tensor:
        raise NotImplementedError

    # --- Lightning's hooks, handed to the step ------------------------------------------------
    def _driver(self) -> Step:
        if self.step is None:
            raise RuntimeError(
                f"this {type(self).__name__} has no step to train or evaluate it with: attach "
                f"one first, e.g. model.step = vae_lightning.training.AutomaticStep() "
                f"(vae-train does)"
            )
        return self.step

    @property
    def automatic_optimization(self) -> bool:  # type: ignore[override]
        return getattr(self.step, "automatic_optimization", True)

    @automatic_optimization.setter
    def automatic_optimization(self, value: bool) -> None:
        if value != self.automatic_optimization:
            raise AttributeError("the step decides the optimization (model.step)")

    def configure_optimizers(self) -> Any:
        return self._driver().configure_optimizers(self)

    def configure_model(self) -> None:
        if self.step is not None:  # a model only loaded or saved needs none
            self.step.configure(self)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor | None:
        return self._driver().training_step(self, batch, batch_idx)

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self._driver().eval_step(self, batch, "val")

    def test_step(self, batch: Any, batch_idx: int) -> None:
        self._driver().eval_step(self, batch, "test")

    def on_validation_epoch_end(self) -> None:
        self._driver().log_means(self, "val")

    def on_test_epoch_end(self) -> None:
        self._driver().log_means(self, "test")

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        # the class, for evaluate's checks; the step's partial epoch, for an exact resume
        checkpoint["vae_lightning"] = {
            **checkpoint.get("vae_lightning", {}),
            "model_class": type(self).__name__,
            "step": self.step.state_dict() if self.step is not None else {},
        }

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        extra = checkpoint.get("vae_lightning") or {}
        if "epoch_sums" in extra:  # written before the step had a module of its own
            extra = {**extra, "step": {"epoch_means": extra["epoch_sums"]}}
        if self.step is not None:
            self.step.load_state_dict(extra.get("step") or {})
