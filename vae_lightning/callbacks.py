"""Lightning callbacks: what a researcher looks at while a VAE trains.

- ``Reconstructions``, ``Samples``, ``Interpolations``, ``Traversals``: image grids, to
  TensorBoard and as PNG under the run's ``images/``, every ``every_n_epochs`` and at the end.
- ``LatentProbe``: seed 2's RandomForest, a logistic regression and a kNN on the embeddings.
- ``LatentSpace``: the test set's embeddings in 2-D (and TensorBoard's projector).
- ``PosteriorCollapse``: KL per latent dimension and active units at each validation end.

Each writes to the folder it is given (never ``trainer.log_dir``, which is None under
``fast_dev_run``), does its work on global rank zero only, skips the sanity check, and checks
its contract at ``setup`` with a message naming the callback.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_info

from vae_lightning.data import to_unit_float
from vae_lightning.errors import ConfigError, check_choice, check_int
from vae_lightning.losses import gaussian_kl
from vae_lightning.metrics import LatentMoments, active_units, embed_images, fit_probes

ON_UNSUPPORTED = ("skip", "error")


# --- shared machinery of the visual callbacks ---------------------------------------------------


def _tensorboards(trainer: L.Trainer) -> list[TensorBoardLogger]:
    # fast_dev_run swaps the loggers for a DummyLogger: then there is no TensorBoard to write to
    return [lg for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)]


def _figure_to_array(fig) -> np.ndarray:
    """Render a matplotlib Figure (made without pyplot) to an (H, W, 3) uint8 array."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()


class _Visual(L.Callback):
    """Runs ``_make`` every ``every_n_epochs`` (after the epoch's validation) and at fit end.

    Subclasses return ``{tag: image}`` from ``_make``; an image is a (C, H, W) float tensor in
    [0, 1] or a matplotlib Figure. Each is logged to TensorBoard under ``tag`` and written as
    ``<output_dir>/<tag with / as _>_epoch<NNN>.png``.
    """

    needs_variational = False

    def __init__(
        self,
        output_dir: str | Path,
        every_n_epochs: int | None = 1,
        seed: int = 0,
        on_unsupported: str = "error",
    ) -> None:
        if every_n_epochs is not None:
            check_int("every_n_epochs", every_n_epochs, 1)
        self.output_dir = Path(output_dir)
        self.every_n_epochs = every_n_epochs
        self.seed = seed
        self.on_unsupported = check_choice("on_unsupported", on_unsupported, ON_UNSUPPORTED)
        self.enabled = True
        self._done_at_step: int | None = None
        self._final = False
        self.written: list[Path] = []
        self.seconds = 0.0  # wall time spent, reported in metrics.json under time/callbacks

    @property
    def name(self) -> str:
        return type(self).__name__

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        dm = trainer.datamodule
        if dm is None or not hasattr(dm, "splits") or "test" not in dm.splits:
            raise ConfigError(
                f"callbacks.{self.name}",
                "needs the framework's MNIST/Fashion-MNIST DataModule (its test split)",
            )
        for method in ("embed", "decode", "sample"):
            if not callable(getattr(pl_module, method, None)):
                raise ConfigError(
                    f"callbacks.{self.name}",
                    f"needs a model with {method}(); {type(pl_module).__name__} has none",
                )
        if self.needs_variational and not getattr(pl_module, "variational", False):
            message = (
                f"needs a VAE (a posterior with mu and log-variance); "
                f"{type(pl_module).__name__} is deterministic"
            )
            if self.on_unsupported == "error":
                raise ConfigError(f"callbacks.{self.name}", message)
            rank_zero_info(f"{self.name}: skipped, {message}")
            self.enabled = False

    def _due(self, trainer: L.Trainer) -> bool:
        n = self.every_n_epochs
        return n is not None and (trainer.current_epoch + 1) % n == 0

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._due(trainer):
            last = (
                trainer.max_epochs is not None and trainer.current_epoch + 1 >= trainer.max_epochs
            )
            self._run(trainer, pl_module, epochs_done=trainer.current_epoch + 1, final=last)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._done_at_step != trainer.global_step:  # the end of fit, unless just done
            self._run(trainer, pl_module, epochs_done=trainer.current_epoch, final=True)

    def _run(
        self, trainer: L.Trainer, pl_module: L.LightningModule, epochs_done: int, final: bool
    ) -> None:
        if not self.enabled or trainer.sanity_checking:
            return
        self._done_at_step, self._final, self._epochs_done = trainer.global_step, final, epochs_done
        if not trainer.is_global_zero:
            return
        t0 = time.perf_counter()
        was_training = pl_module.training
        pl_module.eval()
        try:
            with torch.no_grad():
                outputs = self._make(trainer, pl_module)
        finally:
            pl_module.train(was_training)
        for tag, image in outputs.items():
            self._emit(trainer, tag, image)
        self.seconds += time.perf_counter() - t0

    def summary(self) -> dict[str, Any]:
        return {"time/callbacks": {self.name: self.seconds}} if self.enabled else {}

    def _make(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, Any]:
        raise NotImplementedError

    def _emit(self, trainer: L.Trainer, tag: str, image: Any) -> None:
        self.output_dir.mkdir(parents=True, exist_ok=True)
        # named by the number of epochs trained: images_reconstructions_epoch002.png
        path = self.output_dir / f"{tag.replace('/', '_')}_epoch{self._epochs_done:03d}.png"
        if isinstance(image, torch.Tensor):
            from torchvision.utils import save_image

            save_image(image, path)
            for tb in _tensorboards(trainer):
                tb.experiment.add_image(tag, image, global_step=trainer.global_step)
        else:  # a matplotlib Figure
            image.savefig(path, dpi=100)
            array = _figure_to_array(image)
            for tb in _tensorboards(trainer):
                tb.experiment.add_image(tag, array, trainer.global_step, dataformats="HWC")
        self.written.append(path)

    # helpers for subclasses
    def _generator(self) -> torch.Generator:
        return torch.Generator().manual_seed(self.seed)

    def _test_examples(
        self, trainer: L.Trainer, n: int, device
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """n test images fixed by ``seed`` (float in [0, 1], on ``device``) and their labels."""
        images, labels = trainer.datamodule.splits["test"]
        idx = torch.randperm(len(images), generator=self._generator())[:n]
        return to_unit_float(images[idx].to(device)), labels[idx]


def _grid(images: torch.Tensor, nrow: int) -> torch.Tensor:
    from torchvision.utils import make_grid

    return make_grid(images.float().cpu().clamp(0, 1), nrow=nrow, padding=2, pad_value=1.0)


class Reconstructions(_Visual):
    """A fixed set of test images (top row) above their reconstructions decode(embed(x))."""

    def __init__(self, output_dir: str | Path, n: int = 16, **kwargs: Any) -> None:
        super().__init__(output_dir, **kwargs)
        self.n = check_int("n", n, 1)

    def _make(self, trainer, pl_module):
        x, _ = self._test_examples(trainer, self.n, pl_module.device)
        x_hat = pl_module.decode(pl_module.embed(x))  # mu for a VAE: the mean reconstruction
        return {"images/reconstructions": _grid(torch.cat([x, x_hat]), nrow=self.n)}


class Samples(_Visual):
    """Decoded samples from the same fixed noise every time, so epochs can be compared.

    A VAE decodes z ~ N(0, I); the AE decodes z from a Gaussian fitted to its training codes,
    and its tag says so (``images/samples_ae_fitted_gaussian``).
    """

    def __init__(self, output_dir: str | Path, n: int = 64, nrow: int = 8, **kwargs: Any) -> None:
        super().__init__(output_dir, **kwargs)
        self.n, self.nrow = check_int("n", n, 1), check_int("nrow", nrow, 1)

    def _make(self, trainer, pl_module):
        g = torch.Generator(device=pl_module.device).manual_seed(self.seed)
        samples = pl_module.sample(self.n, generator=g)
        kind = "prior" if getattr(pl_module, "variational", False) else "ae_fitted_gaussian"
        return {f"images/samples_{kind}": _grid(samples, nrow=self.nrow)}


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
        order = torch.randperm(len(labels), generator=self._generator()).tolist()
        pairs, used = [], set()
        for i in order:
            if i in used:
                continue
            j = next(
                (j for j in order if j not in used and j != i and labels[j] != labels[i]), None
            )
            if j is None:
                break
            pairs.append((i, j))
            used |= {i, j}
            if len(pairs) == self.n_pairs:
                break
        return pairs

    def _make(self, trainer, pl_module):
        images, labels = trainer.datamodule.splits["test"]
        pairs = self._pairs(labels[:2000])
        a = to_unit_float(images[[i for i, _ in pairs]].to(pl_module.device))
        b = to_unit_float(images[[j for _, j in pairs]].to(pl_module.device))
        za, zb = pl_module.embed(a), pl_module.embed(b)  # (P, D)
        t = torch.linspace(0, 1, self.steps, device=za.device).view(1, -1, 1)  # (1, S, 1)
        z = (1 - t) * za.unsqueeze(1) + t * zb.unsqueeze(1)  # (P, S, D)
        decoded = pl_module.decode(z.flatten(0, 1)).view(len(pairs), self.steps, *a.shape[1:])
        rows = torch.cat([a.unsqueeze(1), decoded, b.unsqueeze(1)], dim=1)  # (P, S + 2, C, H, W)
        return {"images/interpolations": _grid(rows.flatten(0, 1), nrow=self.steps + 2)}


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

    def _make(self, trainer, pl_module):
        x, _ = self._test_examples(trainer, 512, pl_module.device)
        mu, logvar = pl_module.encode(x)
        order = gaussian_kl(mu, logvar).mean(0).argsort(descending=True)  # dims by KL
        if self.max_dims is not None:
            order = order[: self.max_dims]
        base = mu[0]  # (D,) the posterior mean of one fixed test image
        offsets = torch.linspace(-self.span, self.span, self.steps, device=mu.device)
        z = base.repeat(len(order), self.steps, 1)  # (K, S, D)
        for row, d in enumerate(order.tolist()):
            z[row, :, d] = base[d] + offsets
        decoded = pl_module.decode(z.flatten(0, 1))
        return {"images/traversals": _grid(decoded, nrow=self.steps)}


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

    def _make(self, trainer, pl_module):
        from matplotlib.figure import Figure

        images, labels = trainer.datamodule.splits["test"]
        feats = embed_images(pl_module, images)  # (N, D)
        y = labels.numpy()
        if feats.size(1) == 2:
            xy, how = feats.numpy(), "latent axes"
        elif self.method == "tsne":
            from sklearn.manifold import TSNE

            idx = torch.randperm(len(feats), generator=self._generator())[: self.tsne_n].numpy()
            xy = TSNE(random_state=self.seed, init="pca").fit_transform(feats.numpy()[idx])
            y, how = y[idx], f"t-SNE of {len(idx)} points"
        else:
            from sklearn.decomposition import PCA

            pca = PCA(n_components=2, random_state=self.seed).fit(feats.numpy())
            xy = pca.transform(feats.numpy())
            how = f"PCA ({pca.explained_variance_ratio_.sum():.0%} of variance)"
        fig = Figure(figsize=(6, 5))
        ax = fig.subplots()
        classes = trainer.datamodule.classes
        for c in range(len(classes)):
            m = y == c
            ax.scatter(xy[m, 0], xy[m, 1], s=3, alpha=0.6, label=classes[c], color=f"C{c}")
        ax.set_title(f"test-set {'mu' if pl_module.variational else 'z'}: {how}")
        ax.legend(markerscale=4, fontsize=7, loc="best")
        fig.tight_layout()
        out: dict[str, Any] = {"latent/scatter": fig}
        if self._final:  # the projector only at the end: it writes a sprite and a tensor
            self._project(trainer, feats, labels, images, classes)
        return out

    def _project(self, trainer, feats, labels, images, classes) -> None:
        if not self.projector_n:
            return
        n = min(self.projector_n, len(feats))
        for tb in _tensorboards(trainer):
            tb.experiment.add_embedding(
                feats[:n],
                metadata=[classes[int(c)] for c in labels[:n]],
                label_img=to_unit_float(images[:n]),
                global_step=trainer.global_step,
                tag="latent",
            )


class PosteriorCollapse(L.Callback):
    """KL per latent dimension and active units at each validation end (VAEs).

    Logs ``val/active_units`` (dimensions with Cov_x(E_q[z|x]) > ``threshold``, Burda et al.)
    and, to TensorBoard, ``collapse/kl_dim_<d>`` per dimension; at the end of fit a bar chart
    of KL per dimension. ``summary()`` gives both for metrics.json.
    """

    def __init__(
        self, output_dir: str | Path, threshold: float = 0.01, on_unsupported: str = "error"
    ) -> None:
        self.output_dir = Path(output_dir)
        self.threshold = float(threshold)
        self.on_unsupported = check_choice("on_unsupported", on_unsupported, ON_UNSUPPORTED)
        self.enabled = True
        self._moments: LatentMoments | None = None
        self.kl_per_dim: list[float] = []
        self.mu_variance: list[float] = []
        self.active: int | None = None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if not getattr(pl_module, "variational", False):
            message = f"needs a VAE; {type(pl_module).__name__} is deterministic"
            if self.on_unsupported == "error":
                raise ConfigError("callbacks.PosteriorCollapse", message)
            rank_zero_info(f"PosteriorCollapse: skipped, {message}")
            self.enabled = False

    def on_validation_epoch_start(self, trainer, pl_module) -> None:
        self._moments = LatentMoments() if self.enabled and not trainer.sanity_checking else None

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dl_idx=0):
        if self._moments is not None:
            mu, logvar = pl_module.encode(batch[0])
            self._moments.update(mu, gaussian_kl(mu, logvar))

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        if self._moments is None or self._moments.n == 0:
            return
        kl = self._moments.kl_per_dim()
        var = self._moments.mu_variance()
        # the same on every rank would need a reduction; the count from rank zero's shard is
        # logged (on one device it is the whole validation set)
        self.active = active_units(var, self.threshold)
        pl_module.log("val/active_units", float(self.active), rank_zero_only=True)
        self.kl_per_dim = kl.tolist()
        self.mu_variance = var.tolist()
        self._moments = None
        if trainer.is_global_zero:
            for tb in _tensorboards(trainer):
                tb.log_metrics(
                    {f"collapse/kl_dim_{d:02d}": v for d, v in enumerate(self.kl_per_dim)},
                    step=trainer.global_step,
                )

    def on_train_end(self, trainer, pl_module) -> None:
        if not self.kl_per_dim or not trainer.is_global_zero:
            return
        from matplotlib.figure import Figure

        fig = Figure(figsize=(7, 3))
        ax = fig.subplots()
        order = np.argsort(self.kl_per_dim)[::-1]
        active = np.array(self.mu_variance)[order] > self.threshold
        ax.bar(
            range(len(order)), np.array(self.kl_per_dim)[order], color=np.where(active, "C0", "C7")
        )
        ax.set_xticks(range(len(order)), [str(d) for d in order], fontsize=6)
        ax.set_xlabel("latent dimension (by KL); grey: inactive")
        ax.set_ylabel("KL (nats)")
        ax.set_title(f"KL per dimension, {self.active} of {len(order)} active")
        fig.tight_layout()
        self.output_dir.mkdir(parents=True, exist_ok=True)
        fig.savefig(self.output_dir / f"collapse_kl_per_dim_epoch{trainer.current_epoch:03d}.png")
        for tb in _tensorboards(trainer):
            tb.experiment.add_image(
                "collapse/kl_per_dim", _figure_to_array(fig), trainer.global_step, dataformats="HWC"
            )

    def summary(self) -> dict[str, Any]:
        if not self.kl_per_dim:
            return {}
        return {
            "collapse": {
                "kl_per_dim": self.kl_per_dim,
                "mu_variance": self.mu_variance,
                "active_units": self.active,
                "threshold": self.threshold,
            }
        }


class LatentProbe(L.Callback):
    """Seed 2's downstream probe: classifiers on the embeddings (mu for VAEs, z for the AE).

    At the end of fit (and every ``every_n_epochs`` when set), embeds the training split and the
    test set, fits seed 2's RandomForest (100 trees, random_state 42), a logistic regression and
    a kNN, and logs ``probe/rf_acc``, ``probe/logreg_acc``, ``probe/knn_acc`` and the
    RandomForest's confusion matrix (TensorBoard + PNG). ``pixels: true`` runs the same probes
    on raw pixels as a baseline (``probe/pixels_*``). ``max_train`` subsamples the training
    split (seeded) for speed.
    """

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
        self.output_dir = Path(output_dir)
        self.every_n_epochs = (
            None if every_n_epochs is None else check_int("every_n_epochs", every_n_epochs, 1)
        )
        self.max_train = None if max_train is None else check_int("max_train", max_train, 10)
        self.pixels = bool(pixels)
        self.kwargs = {
            "n_estimators": check_int("n_estimators", n_estimators, 1),
            "random_state": random_state,
            "knn_k": check_int("knn_k", knn_k, 1),
            "n_jobs": n_jobs,
        }
        self.seed = seed
        self.result: dict[str, Any] = {}
        self._done_at_step: int | None = None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        dm = trainer.datamodule
        if dm is None or not hasattr(dm, "splits"):
            raise ConfigError(
                "callbacks.LatentProbe", "needs the framework's MNIST/Fashion-MNIST DataModule"
            )
        if not callable(getattr(pl_module, "embed", None)):
            raise ConfigError("callbacks.LatentProbe", f"{type(pl_module).__name__} has no embed()")

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        n = self.every_n_epochs
        if trainer.sanity_checking or n is None or (trainer.current_epoch + 1) % n:
            return
        metrics = self._run(trainer, pl_module, epochs_done=trainer.current_epoch + 1)
        for key, value in metrics.items():
            pl_module.log(key, value, rank_zero_only=True)

    def on_train_end(self, trainer, pl_module) -> None:
        if self._done_at_step == trainer.global_step:  # just done at the last validation
            return
        metrics = self._run(trainer, pl_module, epochs_done=trainer.current_epoch)
        if trainer.is_global_zero:
            for lg in trainer.loggers:
                lg.log_metrics(metrics, step=trainer.global_step)

    def _features(self, pl_module, images: torch.Tensor) -> np.ndarray:
        return embed_images(pl_module, images).numpy()

    def _run(self, trainer, pl_module, epochs_done: int) -> dict[str, float]:
        self._done_at_step = trainer.global_step
        if not trainer.is_global_zero:
            return {}
        t0 = time.perf_counter()
        (train_x, train_y), (test_x, test_y) = (
            trainer.datamodule.splits[s] for s in ("train", "test")
        )
        if self.max_train is not None and self.max_train < len(train_x):
            g = torch.Generator().manual_seed(self.seed)
            idx = torch.randperm(len(train_x), generator=g)[: self.max_train]
            train_x, train_y = train_x[idx], train_y[idx]
        classes = trainer.datamodule.classes
        feats_train, feats_test = (
            self._features(pl_module, train_x),
            self._features(pl_module, test_x),
        )
        res = fit_probes(
            feats_train,
            train_y.numpy(),
            feats_test,
            test_y.numpy(),
            num_classes=len(classes),
            **self.kwargs,
        )
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
            flat = lambda x: to_unit_float(x).flatten(1).numpy()  # noqa: E731
            pix = fit_probes(
                flat(train_x),
                train_y.numpy(),
                flat(test_x),
                test_y.numpy(),
                num_classes=len(classes),
                **self.kwargs,
            )
            metrics.update({f"probe/pixels_{k}_acc": v for k, v in pix.accuracy.items()})
            result["confusion_rf_pixels"] = pix.confusion.tolist()
        result["epochs_trained"] = epochs_done
        result["seconds_total"] = time.perf_counter() - t0
        self.result = {**result, "accuracy": metrics}
        self._emit_confusion(trainer, res.confusion, classes, metrics["probe/rf_acc"], epochs_done)
        rank_zero_info(
            "latent probe: "
            + ", ".join(f"{k}={v:.4f}" for k, v in metrics.items())
            + f" ({result['seconds_total']:.1f} s)"
        )
        return metrics

    def _emit_confusion(
        self, trainer, confusion: np.ndarray, classes, acc: float, epochs_done: int
    ) -> None:
        from matplotlib.figure import Figure
        from sklearn.metrics import ConfusionMatrixDisplay

        fig = Figure(figsize=(7, 6))
        ax = fig.subplots()
        ConfusionMatrixDisplay(confusion, display_labels=list(classes)).plot(
            ax=ax, colorbar=False, xticks_rotation=45, values_format="d"
        )
        ax.set_title(f"RandomForest on the latent code: accuracy {acc:.2%} (n={confusion.sum()})")
        fig.tight_layout()
        self.output_dir.mkdir(parents=True, exist_ok=True)
        fig.savefig(self.output_dir / f"probe_confusion_rf_epoch{epochs_done:03d}.png", dpi=100)
        for tb in _tensorboards(trainer):
            tb.experiment.add_image(
                "probe/confusion_rf", _figure_to_array(fig), trainer.global_step, dataformats="HWC"
            )

    def summary(self) -> dict[str, Any]:
        if not self.result:
            return {}
        result = dict(self.result)
        return {"metrics": result.pop("accuracy"), "probe": result}
