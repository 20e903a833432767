"""What the views' callbacks share: where they write, the contract they check at ``setup`` (a
callback that needs a VAE on an AE says so, or switches itself off), and when they run.

Each callback writes to the folder it is given (never ``trainer.log_dir``, which is None under
``fast_dev_run``), does its work on global rank zero only, and skips the sanity check.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_info
from typing_extensions import override

from vae_lightning.errors import ConfigError, check_choice, check_int
from vae_lightning.views.publish import publish

ON_UNSUPPORTED = ("skip", "error")


def writers(trainer: L.Trainer) -> list[Any]:
    """The SummaryWriter of each TensorBoard logger (none under fast_dev_run's DummyLogger), for
    what only TensorBoard shows (the projector, the KL per dimension as scalars); pictures go to
    every logger that takes them through ``publish``."""
    return [lg.experiment for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)]


class ModelCallback(L.Callback):
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
        return publish(image, path, tag, trainer.global_step, trainer.loggers)


class Periodic(ModelCallback):
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
