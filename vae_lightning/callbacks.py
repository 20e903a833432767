"""Lightning callbacks: what a researcher looks at while a VAE trains.

- ``Reconstructions``, ``Samples``, ``Interpolations``, ``Traversals``: image grids, to
  TensorBoard and as PNG under the run's ``images/``, every ``every_n_epochs`` and at the end.
- ``LatentProbe``: seed 2's RandomForest, a logistic regression and a kNN on the embeddings.
- ``LatentSpace``: the test set's embeddings in 2-D (and TensorBoard's projector).
- ``PosteriorCollapse``: KL per latent dimension and active units at each validation end.

The pictures and measurements themselves are in ``views.py`` and ``metrics.py`` (shared with
``vae-evaluate``); this module only decides when to make them and where they go. Each callback
writes to the folder it is given (never ``trainer.log_dir``, which is None under
``fast_dev_run``), does its work on global rank zero only, skips the sanity check, and checks
its contract at ``setup`` with a message naming the callback.

Longer than ~450 lines on purpose: seven callbacks that share one base (schedule, contract
checks, publishing) read best side by side; each is short.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_info
from typing_extensions import override

from vae_lightning import views
from vae_lightning.data import to_unit_float
from vae_lightning.errors import ConfigError, check_choice, check_int
from vae_lightning.losses import gaussian_kl
from vae_lightning.metrics import LatentMoments, active_units, embed_images, fit_probes

ON_UNSUPPORTED = ("skip", "error")


def _writers(trainer: L.Trainer) -> list[Any]:
    """The SummaryWriter of each TensorBoard logger (none under fast_dev_run's DummyLogger)."""
    return [lg.experiment for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)]


# --- the contract and the schedule, shared by every callback here -------------------------------


class _ModelCallback(L.Callback):
    """Writes under ``output_dir``; checks at ``setup`` what it needs of the model and data.

    ``needs_methods``: model methods it calls; ``needs_data``: the framework's DataModule (its
    ``splits``, test included); ``needs_variational``: a VAE, else ``on_unsupported`` decides
    between refusing (``error``) and switching itself off (``skip``, ``enabled`` False).
    """

    needs_methods: tuple[str, ...] = ()
    needs_data = True
    needs_variational = False
    needs_conditional = False

    def __init__(self, output_dir: str | Path, on_unsupported: str = "error") -> None:
        self.output_dir = Path(output_dir)
        self.on_unsupported = check_choice("on_unsupported", on_unsupported, ON_UNSUPPORTED)
        self.enabled = True

    @property
    def name(self) -> str:
        return type(self).__name__

    def _refuse(self, message: str) -> None:
        raise ConfigError(f"callbacks.{self.name}", message)

    @override
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        dm = trainer.datamodule
        if self.needs_data and (dm is None or "test" not in getattr(dm, "splits", {})):
            self._refuse("needs the framework's MNIST/Fashion-MNIST DataModule (its test split)")
        model = type(pl_module).__name__
        for method in self.needs_methods:
            if not callable(getattr(pl_module, method, None)):
                self._refuse(f"needs a model with {method}(); {model} has none")
        message = None
        if self.needs_variational and not getattr(pl_module, "variational", False):
            message = (
                f"needs a VAE (a posterior with mu and log-variance); {model} is deterministic"
            )
        elif self.needs_conditional and not getattr(pl_module, "conditional", False):
            message = f"needs a conditional model (model=cvae or conv_cvae); {model} is not one"
        if message is not None:
            if self.on_unsupported == "error":
                self._refuse(message)
            if self.enabled:  # setup runs again for `test`: say it once
                rank_zero_info(f"{self.name}: skipped, {message}")
            self.enabled = False

    def _publish(self, trainer: L.Trainer, tag: str, image: Any, epochs_done: int) -> Path:
        # named by the number of epochs trained: images_reconstructions_epoch002.png
        path = self.output_dir / f"{tag.replace('/', '_')}_epoch{epochs_done:03d}.png"
        return views.publish(image, path, tag, trainer.global_step, _writers(trainer))


class _Periodic(_ModelCallback):
    """Runs ``_run`` when ``_due`` (subclasses pick the hook) and at the end of fit, unless it
    has just run at the same step. ``_run`` returns metrics to log at the end ({} for none)."""

    def __init__(
        self,
        output_dir: str | Path,
        every_n_epochs: int | None,
        seed: int,
        on_unsupported: str = "error",
    ) -> None:
        super().__init__(output_dir, on_unsupported)
        if every_n_epochs is not None:
            check_int("every_n_epochs", every_n_epochs, 1)
        self.every_n_epochs = every_n_epochs
        self.seed = seed
        self._done_at_step: int | None = None
        self._ended = False

    def _due(self, trainer: L.Trainer) -> bool:
        n = self.every_n_epochs
        return (
            not trainer.sanity_checking and n is not None and (trainer.current_epoch + 1) % n == 0
        )

    def _generator(self) -> torch.Generator:
        return torch.Generator().manual_seed(self.seed)

    @override
    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._ended = True
        if self._done_at_step == trainer.global_step:  # just done at the last epoch
            return
        metrics = self._run(trainer, pl_module, epochs_done=trainer.current_epoch, final=True)
        if metrics and trainer.is_global_zero:
            for lg in trainer.loggers:
                lg.log_metrics(metrics, step=trainer.global_step)

    @override
    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # A run resumed from a checkpoint whose training is complete (it was stopped during this
        # end-of-fit work, or its test) skips Lightning's fit loop and with it on_train_end:
        # the end-of-fit work is done here instead.
        if not self._ended:
            self.on_train_end(trainer, pl_module)

    def _run(
        self, trainer: L.Trainer, pl_module: L.LightningModule, epochs_done: int, final: bool
    ) -> dict[str, float]:
        raise NotImplementedError


# --- pictures -----------------------------------------------------------------------------------


class _Visual(_Periodic):
    """Publishes ``_make``'s ``{tag: image}`` after the training epochs that are due and at the
    end of fit. An image is a (C, H, W) grid in [0, 1] or a matplotlib Figure; it goes to
    TensorBoard under ``tag`` and to ``<output_dir>/<tag with / as _>_epoch<NNN>.png``.
    """

    needs_methods = ("embed", "decode", "sample")

    def __init__(
        self,
        output_dir: str | Path,
        every_n_epochs: int | None = 1,
        seed: int = 0,
        on_unsupported: str = "error",
    ) -> None:
        super().__init__(output_dir, every_n_epochs, seed, on_unsupported)
        self._final = False
        self.written: list[Path] = []
        self.seconds = 0.0  # wall time spent, reported in metrics.json under time/callbacks

    @override
    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._due(trainer):
            epochs_done = trainer.current_epoch + 1
            last = trainer.max_epochs is not None and epochs_done >= trainer.max_epochs
            self._run(trainer, pl_module, epochs_done, final=last)

    @override
    def _run(
        self, trainer: L.Trainer, pl_module: L.LightningModule, epochs_done: int, final: bool
    ) -> dict[str, float]:
        if not self.enabled or trainer.sanity_checking:
            return {}
        self._done_at_step, self._final = trainer.global_step, final
        if trainer.is_global_zero:
            t0 = time.perf_counter()
            with views.eval_mode(pl_module):
                outputs = self._make(trainer, pl_module)
            for tag, image in outputs.items():
                self.written.append(self._publish(trainer, tag, image, epochs_done))
            self.seconds += time.perf_counter() - t0
        return {}

    def summary(self) -> dict[str, Any]:
        return {"time/callbacks": {self.name: self.seconds}} if self.enabled else {}

    def _make(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, Any]:
        raise NotImplementedError

    def _test_examples(
        self, trainer: L.Trainer, n: int, device: torch.device | str
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """n test images fixed by ``seed`` (float in [0, 1]) and their labels, on ``device``."""
        images, labels = trainer.datamodule.splits["test"]
        idx = torch.randperm(len(images), generator=self._generator())[:n]
        return to_unit_float(images[idx].to(device)), labels[idx].to(device)


class Reconstructions(_Visual):
    """A fixed set of test images (top row) above their reconstructions decode(embed(x))."""

    def __init__(self, output_dir: str | Path, n: int = 16, **kwargs: Any) -> None:
        super().__init__(output_dir, **kwargs)
        self.n = check_int("n", n, 1)

    @override
    def _make(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, Any]:
        x, y = self._test_examples(trainer, self.n, pl_module.device)
        return {"images/reconstructions": views.reconstruction_grid(pl_module, x, y)}


class Samples(_Visual):
    """Decoded samples from the same fixed noise every time, so epochs can be compared.

    A VAE decodes z ~ N(0, I); the AE decodes z from a Gaussian fitted to its training codes,
    a VQ-VAE code maps from its prior (uniform until vae-prior fits one), and the tag says which
    (``model.sample_kind``: ``images/samples_ae_fitted_gaussian``, ``samples_uniform_codes``).
    """

    def __init__(self, output_dir: str | Path, n: int = 64, nrow: int = 8, **kwargs: Any) -> None:
        super().__init__(output_dir, **kwargs)
        self.n, self.nrow = check_int("n", n, 1), check_int("nrow", nrow, 1)

    @override
    def _make(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, Any]:
        g = torch.Generator(device=pl_module.device).manual_seed(self.seed)
        kind = getattr(pl_module, "sample_kind", "prior")
        return {f"images/samples_{kind}": views.sample_grid(pl_module, self.n, self.nrow, g)}


class Interpolations(_Visual):
    """Straight lines in latent space between pairs of test images of different classes.

    Each row: the first image, ``steps`` decodings of (1 - t) z_a + t z_b, the second image.
    """

    def __init__(
        self, output_dir: str | Path, n_pairs: int = 8, steps: int = 10, **kwargs: Any
    ) -> None:
        super().__init__(output_dir, **kwargs)
        self.n_pairs, self.steps = check_int("n_pairs", n_pairs, 1), check_int("steps", steps, 2)

    def _pairs(self, labels: torch.Tensor) -> list[tuple[int, int]]:
        return views.contrasting_pairs(labels, self.n_pairs, self._generator())

    @override
    def _make(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, Any]:
        images, labels = trainer.datamodule.splits["test"]
        pairs = self._pairs(labels[:2000])
        first, second = [i for i, _ in pairs], [j for _, j in pairs]
        a, b = (to_unit_float(images[idx].to(pl_module.device)) for idx in (first, second))
        ya, yb = (labels[idx].to(pl_module.device) for idx in (first, second))
        grid = views.interpolation_grid(pl_module, a, b, self.steps, (ya, yb))
        return {"images/interpolations": grid}


class ConditionalViews(_Visual):
    """A conditional model's two views: samples by class (one row per class, the same z in each
    column, so a column is one "style" across the classes) and "the same image, every label"
    (``n`` fixed test images, each encoded once under its own label and decoded with each)."""

    needs_conditional = True

    def __init__(
        self, output_dir: str | Path, n: int = 8, n_styles: int = 8, **kwargs: Any
    ) -> None:
        super().__init__(output_dir, **kwargs)
        self.n, self.n_styles = check_int("n", n, 1), check_int("n_styles", n_styles, 1)

    @override
    def _make(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, Any]:
        g = torch.Generator(device=pl_module.device).manual_seed(self.seed)
        x, y = self._test_examples(trainer, self.n, pl_module.device)
        return {
            "images/samples_by_class": views.class_sample_grid(pl_module, self.n_styles, g),
            "images/relabelled": views.relabel_grid(pl_module, x, y),
        }


class Traversals(_Visual):
    """Each latent dimension of a VAE, ordered by its mean KL (largest first), swept over
    mu_d + [-span, span] around the posterior mean of a fixed test image; one row per dimension.
    """

    needs_variational = True

    def __init__(
        self,
        output_dir: str | Path,
        steps: int = 9,
        span: float = 3.0,
        max_dims: int | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(output_dir, **kwargs)
        self.steps, self.span = check_int("steps", steps, 2), float(span)
        self.max_dims = None if max_dims is None else check_int("max_dims", max_dims, 1)

    @override
    def _make(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, Any]:
        x, y = self._test_examples(trainer, 512, pl_module.device)  # the KL order is over x
        grid = views.traversal_grid(pl_module, x, self.steps, self.span, self.max_dims, y)
        return {"images/traversals": grid}


class LatentSpace(_Visual):
    """The test set's embeddings in 2-D coloured by class: the two axes when latent_dim is 2,
    else PCA (``method: pca``) or t-SNE on ``tsne_n`` points (``method: tsne``). At the end of
    fit also TensorBoard's projector for ``projector_n`` test images, with thumbnails.
    """

    def __init__(
        self,
        output_dir: str | Path,
        method: str = "pca",
        tsne_n: int = 2000,
        projector_n: int = 1000,
        **kwargs: Any,
    ) -> None:
        super().__init__(output_dir, **kwargs)
        self.method = check_choice("method", method, ("pca", "tsne"))
        self.tsne_n = check_int("tsne_n", tsne_n, 10)
        self.projector_n = check_int("projector_n", projector_n, 0)

    @override
    def _make(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, Any]:
        images, labels = trainer.datamodule.splits["test"]
        classes = trainer.datamodule.classes
        feats = embed_images(pl_module, images, labels=labels)  # (N, D)
        xy, y, how = views.latent_2d(
            feats.numpy(), labels.numpy(), self.method, self.tsne_n, self.seed
        )
        title = f"test-set {'mu' if pl_module.variational else 'z'}: {how}"
        if self._final and self.projector_n:  # only at the end: it writes a sprite and a tensor
            n = min(self.projector_n, len(feats))
            for writer in _writers(trainer):
                writer.add_embedding(
                    feats[:n],
                    metadata=[classes[int(c)] for c in labels[:n]],
                    label_img=to_unit_float(images[:n]),
                    global_step=trainer.global_step,
                    tag="latent",
                )
        return {"latent/scatter": views.latent_scatter(xy, y, classes, title)}


# --- measurements -------------------------------------------------------------------------------


class PosteriorCollapse(_ModelCallback):
    """KL per latent dimension and active units at each validation end (VAEs).

    Logs ``val/active_units`` (dimensions with Cov_x(E_q[z|x]) > ``threshold``, Burda et al.)
    and, to TensorBoard, ``collapse/kl_dim_<d>`` per dimension; at the end of fit a bar chart
    of KL per dimension. ``summary()`` gives both for metrics.json.
    """

    needs_data = False  # it reads the validation batches as they go by
    needs_variational = True

    def __init__(
        self, output_dir: str | Path, threshold: float = 0.01, on_unsupported: str = "error"
    ) -> None:
        super().__init__(output_dir, on_unsupported)
        self.threshold = float(threshold)
        self._moments: LatentMoments | None = None
        self.kl_per_dim: list[float] = []
        self.mu_variance: list[float] = []
        self.active: int | None = None

    @override
    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._moments = LatentMoments() if self.enabled and not trainer.sanity_checking else None

    @override
    def on_validation_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if self._moments is not None:
            mu, logvar = pl_module.encode(*batch)  # (images, labels): a CVAE's encoder reads both
            self._moments.update(mu, gaussian_kl(mu, logvar))

    @override
    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._moments is None or self._moments.n == 0:
            return
        var = self._moments.mu_variance()
        # the same on every rank would need a reduction; the count from rank zero's shard is
        # logged (on one device it is the whole validation set)
        self.active = active_units(var, self.threshold)
        pl_module.log("val/active_units", float(self.active), rank_zero_only=True)
        self.kl_per_dim = self._moments.kl_per_dim().tolist()
        self.mu_variance = var.tolist()
        self._moments = None
        if trainer.is_global_zero:
            for writer in _writers(trainer):
                for d, kl in enumerate(self.kl_per_dim):
                    writer.add_scalar(f"collapse/kl_dim_{d:02d}", kl, trainer.global_step)

    @override
    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.kl_per_dim and trainer.is_global_zero:
            fig = views.kl_bars(self.kl_per_dim, self.mu_variance, self.threshold)
            self._publish(trainer, "collapse/kl_per_dim", fig, trainer.current_epoch)

    # the last validation's figures travel in checkpoints: a run resumed after its last epoch
    # reports them as the uninterrupted run did
    def state_dict(self) -> dict[str, Any]:
        return {
            "kl_per_dim": self.kl_per_dim,
            "mu_variance": self.mu_variance,
            "active": self.active,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.kl_per_dim = list(state_dict.get("kl_per_dim", []))
        self.mu_variance = list(state_dict.get("mu_variance", []))
        self.active = state_dict.get("active")

    def summary(self) -> dict[str, Any]:
        if not self.kl_per_dim:
            return {}
        collapse = {"kl_per_dim": self.kl_per_dim, "mu_variance": self.mu_variance}
        return {"collapse": {**collapse, "active_units": self.active, "threshold": self.threshold}}


class LatentProbe(_Periodic):
    """Seed 2's downstream probe: classifiers on the embeddings (mu for VAEs, z for the AE).

    At the end of fit (and every ``every_n_epochs`` when set), embeds the training split and the
    test set, fits seed 2's RandomForest (100 trees, random_state 42), a logistic regression and
    a kNN, and logs ``probe/rf_acc``, ``probe/logreg_acc``, ``probe/knn_acc`` and the
    RandomForest's confusion matrix (TensorBoard + PNG). ``pixels: true`` runs the same probes
    on raw pixels as a baseline (``probe/pixels_*``). ``max_train`` subsamples the training
    split (seeded) for speed.
    """

    needs_methods = ("embed",)

    def __init__(
        self,
        output_dir: str | Path,
        every_n_epochs: int | None = None,
        max_train: int | None = None,
        pixels: bool = False,
        n_estimators: int = 100,
        random_state: int = 42,
        knn_k: int = 5,
        n_jobs: int | None = -1,
        seed: int = 0,
    ) -> None:
        super().__init__(output_dir, every_n_epochs, seed)
        self.max_train = None if max_train is None else check_int("max_train", max_train, 10)
        self.pixels = bool(pixels)
        self.kwargs = {
            "n_estimators": check_int("n_estimators", n_estimators, 1),
            "random_state": random_state,
            "knn_k": check_int("knn_k", knn_k, 1),
            "n_jobs": n_jobs,
        }
        self.result: dict[str, Any] = {}

    @override
    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._due(trainer):
            metrics = self._run(trainer, pl_module, trainer.current_epoch + 1, final=False)
            for key, value in metrics.items():
                pl_module.log(key, value, rank_zero_only=True)

    def _train_split(self, trainer: L.Trainer) -> tuple[torch.Tensor, torch.Tensor]:
        """The training split, or ``max_train`` of it chosen by ``seed``."""
        x, y = trainer.datamodule.splits["train"]
        if self.max_train is not None and self.max_train < len(x):
            idx = torch.randperm(len(x), generator=self._generator())[: self.max_train]
            x, y = x[idx], y[idx]
        return x, y

    @override
    def _run(
        self, trainer: L.Trainer, pl_module: L.LightningModule, epochs_done: int, final: bool
    ) -> dict[str, float]:
        self._done_at_step = trainer.global_step
        if not trainer.is_global_zero:
            return {}
        t0 = time.perf_counter()
        train_x, train_y = self._train_split(trainer)
        test_x, test_y = trainer.datamodule.splits["test"]
        classes = trainer.datamodule.classes

        def probe(features) -> Any:  # the same probes on any featurisation of the images
            train, test = features(train_x, train_y), features(test_x, test_y)
            kwargs = {"num_classes": len(classes), **self.kwargs}
            return fit_probes(train, train_y.numpy(), test, test_y.numpy(), **kwargs)

        # a conditional model's encoder reads the labels too
        res = probe(lambda x, y: embed_images(pl_module, x, labels=y).numpy())
        metrics = {f"probe/{k}_acc": v for k, v in res.accuracy.items()}
        result: dict[str, Any] = {
            "features": "mu" if getattr(pl_module, "variational", False) else "z",
            "n_train": res.n_train,
            "n_test": res.n_test,
            "classes": list(classes),
            "confusion_rf": res.confusion.tolist(),
            "seconds": res.seconds,
        }
        if self.pixels:
            pix = probe(lambda x, _: to_unit_float(x).flatten(1).numpy())
            metrics.update({f"probe/pixels_{k}_acc": v for k, v in pix.accuracy.items()})
            result["confusion_rf_pixels"] = pix.confusion.tolist()
        result["epochs_trained"] = epochs_done
        result["seconds_total"] = time.perf_counter() - t0
        self.result = {**result, "accuracy": metrics}
        fig = views.confusion_figure(res.confusion, classes, metrics["probe/rf_acc"])
        self._publish(trainer, "probe/confusion_rf", fig, epochs_done)
        scores = ", ".join(f"{k}={v:.4f}" for k, v in metrics.items())
        rank_zero_info(f"latent probe: {scores} ({result['seconds_total']:.1f} s)")
        return metrics

    def summary(self) -> dict[str, Any]:
        if not self.result:
            return {}
        result = dict(self.result)
        return {"metrics": result.pop("accuracy"), "probe": result}
