"""Callbacks that draw what a model does: image grids and the latent space, to the loggers that
take pictures (TensorBoard, W&B, MLflow) and as PNG under the run's ``images/``, every
``every_n_epochs`` and at the end of fit. The pictures themselves are ``grids`` and
``figures`` (shared with ``vae-evaluate``)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
from typing_extensions import override

import vae_lightning.views.figures as figures
import vae_lightning.views.grids as grids
from vae_lightning.data import to_unit_float
from vae_lightning.errors import check_choice, check_int
from vae_lightning.evaluation.metrics import embed_images
from vae_lightning.models import eval_mode
from vae_lightning.views.base import Periodic, writers


class Visual(Periodic):
    """Publishes ``_make``'s ``{tag: image}`` after the training epochs that are due and at the
    end of fit. An image is a (C, H, W) grid in [0, 1] or a matplotlib Figure; it goes to
    every logger that takes pictures under ``tag`` (``publish``) and to
    ``<output_dir>/<tag with / as _>_epoch<NNN>.png``.
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
            with eval_mode(pl_module):
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


class Reconstructions(Visual):
    """A fixed set of test images (top row) above their reconstructions decode(embed(x))."""

    def __init__(self, output_dir: str | Path, n: int = 16, **kwargs: Any) -> None:
        super().__init__(output_dir, **kwargs)
        self.n = check_int("n", n, 1)

    @override
    def _make(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, Any]:
        x, y = self._test_examples(trainer, self.n, pl_module.device)
        return {"images/reconstructions": grids.reconstruction_grid(pl_module, x, y)}


class Samples(Visual):
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
        return {f"images/samples_{kind}": grids.sample_grid(pl_module, self.n, self.nrow, g)}


class Interpolations(Visual):
    """Straight lines in latent space between pairs of test images of different classes.

    Each row: the first image, ``steps`` decodings of (1 - t) z_a + t z_b, the second image.
    """

    def __init__(
        self, output_dir: str | Path, n_pairs: int = 8, steps: int = 10, **kwargs: Any
    ) -> None:
        super().__init__(output_dir, **kwargs)
        self.n_pairs, self.steps = check_int("n_pairs", n_pairs, 1), check_int("steps", steps, 2)

    def _pairs(self, labels: torch.Tensor) -> list[tuple[int, int]]:
        return grids.contrasting_pairs(labels, self.n_pairs, self._generator())

    @override
    def _make(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, Any]:
        images, labels = trainer.datamodule.splits["test"]
        pairs = self._pairs(labels[:2000])
        first, second = [i for i, _ in pairs], [j for _, j in pairs]
        a, b = (to_unit_float(images[idx].to(pl_module.device)) for idx in (first, second))
        ya, yb = (labels[idx].to(pl_module.device) for idx in (first, second))
        grid = grids.interpolation_grid(pl_module, a, b, self.steps, (ya, yb))
        return {"images/interpolations": grid}


class ConditionalViews(Visual):
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
            "images/samples_by_class": grids.class_sample_grid(pl_module, self.n_styles, g),
            "images/relabelled": grids.relabel_grid(pl_module, x, y),
        }


class Traversals(Visual):
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
        grid = grids.traversal_grid(pl_module, x, self.steps, self.span, self.max_dims, y)
        return {"images/traversals": grid}


class LatentSpace(Visual):
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
        xy, y, how = figures.latent_2d(
            feats.numpy(), labels.numpy(), self.method, self.tsne_n, self.seed
        )
        title = f"test-set {'mu' if pl_module.variational else 'z'}: {how}"
        if self._final and self.projector_n:  # only at the end: it writes a sprite and a tensor
            n = min(self.projector_n, len(feats))
            for writer in writers(trainer):
                writer.add_embedding(
                    feats[:n],
                    metadata=[classes[int(c)] for c in labels[:n]],
                    label_img=to_unit_float(images[:n]),
                    global_step=trainer.global_step,
                    tag="latent",
                )
        return {"latent/scatter": figures.latent_scatter(xy, y, classes, title)}
