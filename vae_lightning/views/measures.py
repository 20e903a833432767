"""Callbacks that measure what a model has learnt while it trains: the KL per latent dimension
and the active units at each validation (``PosteriorCollapse``), and seed 2's latent probes at
the end of fit (``LatentProbe``). The measurements are ``evaluation``'s (shared with
``vae-evaluate``)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info
from typing_extensions import override

import vae_lightning.views.figures as figures
from vae_lightning.data import to_unit_float
from vae_lightning.errors import check_int
from vae_lightning.evaluation.metrics import LatentMoments, active_units, embed_images
from vae_lightning.evaluation.probes import ProbeSettings, fit_probes
from vae_lightning.models.losses import gaussian_kl
from vae_lightning.views.base import ModelCallback, Periodic, writers


class PosteriorCollapse(ModelCallback):
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
            for writer in writers(trainer):
                for d, kl in enumerate(self.kl_per_dim):
                    writer.add_scalar(f"collapse/kl_dim_{d:02d}", kl, trainer.global_step)

    @override
    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.kl_per_dim and trainer.is_global_zero:
            fig = figures.kl_bars(self.kl_per_dim, self.mu_variance, self.threshold)
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


class LatentProbe(Periodic):
    """Seed 2's downstream probe: classifiers on the embeddings (mu for VAEs, z for the AE).

    At the end of fit (and every ``every_n_epochs`` when set), embeds the training split and the
    test set, fits seed 2's RandomForest (100 trees, random_state 42), a logistic regression and
    a kNN, and logs ``probe/rf_acc``, ``probe/logreg_acc``, ``probe/knn_acc`` and the
    RandomForest's confusion matrix (a PNG, and to every logger that takes pictures).
    ``pixels: true`` runs the same probes on raw pixels as a baseline (``probe/pixels_*``).
    ``max_train`` subsamples the training split (seeded) for speed.
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
        self.settings = ProbeSettings(
            n_estimators=check_int("n_estimators", n_estimators, 1),
            random_state=random_state,
            knn_k=check_int("knn_k", knn_k, 1),
            n_jobs=n_jobs,
        )
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
            return fit_probes(train, train_y.numpy(), test, test_y.numpy(), self.settings,
                              num_classes=len(classes))  # fmt: skip

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
        fig = figures.confusion_figure(res.confusion, classes, metrics["probe/rf_acc"])
        self._publish(trainer, "probe/confusion_rf", fig, epochs_done)
        scores = ", ".join(f"{k}={v:.4f}" for k, v in metrics.items())
        rank_zero_info(f"latent probe: {scores} ({result['seconds_total']:.1f} s)")
        return metrics

    def summary(self) -> dict[str, Any]:
        if not self.result:
            return {}
        result = dict(self.result)
        return {"metrics": result.pop("accuracy"), "probe": result}
