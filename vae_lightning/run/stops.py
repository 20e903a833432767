"""Stopping a run safely: on a signal (with a checkpoint it resumes from exactly) and on a
loss that is not finite (before the weights that saw it are saved)."""

from __future__ import annotations

import signal
import threading
from pathlib import Path
from typing import Any

import lightning as L
import torch

from vae_lightning.errors import NonFiniteLossError, RunInterrupted


class StopOnSignal(L.Callback):
    """SIGTERM (a scheduler's preemption) or SIGINT (Ctrl-C), at any point of a run, stops it
    within moments with ``RunInterrupted``, leaving a checkpoint it resumes from exactly.

    Installed for the whole run (``with StopOnSignal(...)`` in train.py), not only for fit:

    - inside the fit loop the signal waits for the end of the current training batch (never
      in the middle of an optimizer step), or of fit when it came during the last validation;
      then a resumable checkpoint is saved to ``path``: the loop and loader position, the
      partial epoch means and the RNG state (``ExactResume``, ``InMemoryBatches.state_dict``);
    - anywhere else (setting up, the end-of-fit probe and images, the test) it stops at once:
      nothing there is worth saving, and the resume reruns it from the last checkpoint.

    Replaces Python's KeyboardInterrupt, which could strike in the middle of an optimizer step,
    and Lightning's own SIGTERM handling, which stops without saving. Must come before the
    callbacks whose ``on_train_end`` does long work (the probe), so it stops them too.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.received: int | None = None
        self._previous: dict[int, Any] = {}
        self._in_fit = False
        self._trainer: L.Trainer | None = None

    def __enter__(self) -> StopOnSignal:
        if threading.current_thread() is threading.main_thread():  # where handlers can go
            for signum in (signal.SIGTERM, signal.SIGINT):
                self._previous[signum] = signal.getsignal(signum)
                signal.signal(signum, self._handler)
        return self

    def _reinstall(self) -> None:
        # Lightning's own SIGTERM handler (registered when fit starts) would stop the loops
        # mid-validation without a checkpoint: during fit, this one alone answers
        if self._previous and threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGTERM, signal.SIGINT):
                signal.signal(signum, self._handler)

    def __exit__(self, *exc: Any) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    def _handler(self, signum: int, frame: Any) -> None:
        self.received = signum
        if not self._in_fit:
            self._stop(save=False)

    def _stop(self, save: bool) -> None:
        trainer = self._trainer
        if save and trainer is not None:
            trainer.save_checkpoint(self.path, weights_only=False)
        epoch, step = (trainer.current_epoch, trainer.global_step) if trainer else (0, 0)
        checkpoint = self.path if self.path.is_file() else None
        raise RunInterrupted(self.received or signal.SIGTERM, checkpoint, epoch, step)

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._trainer = trainer

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.received is not None:
            self._stop(save=False)
        self._reinstall()
        self._in_fit = True

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        if self.received is not None:
            self._stop(save=True)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._in_fit = False
        if self.received is not None:  # came during the last validation: fit is complete
            self._stop(save=True)

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        self._in_fit = False


class NonFiniteStop(L.Callback):
    """Stop on a NaN/inf training loss.

    On a CPU the loss is checked before every backward, so a bad loss never reaches the weights.
    On an accelerator a check every step would cost a host synchronisation: the first bad step
    is kept on the device and checked every ``log_every_n_steps`` and before any checkpoint is
    written, so weights that saw a non-finite loss are never saved.
    """

    def __init__(self) -> None:
        self._first_bad_step: torch.Tensor | None = None  # on the device; -1: none yet

    def on_before_backward(self, trainer, pl_module, loss: torch.Tensor) -> None:
        if not trainer.training:
            return
        if loss.device.type == "cpu":
            if not torch.isfinite(loss):
                self._raise(trainer, trainer.global_step, loss)
            return
        step = torch.full((), trainer.global_step, device=loss.device)
        if self._first_bad_step is None:
            self._first_bad_step = torch.full((), -1, device=loss.device)
        bad = ~torch.isfinite(loss) & (self._first_bad_step < 0)
        self._first_bad_step = torch.where(bad, step, self._first_bad_step)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        if trainer.global_step % trainer.log_every_n_steps == 0:
            self._raise_if_flagged(trainer)

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        self._raise_if_flagged(trainer)  # never write weights that saw a non-finite loss

    def _raise_if_flagged(self, trainer: L.Trainer) -> None:
        if self._first_bad_step is not None and (step := int(self._first_bad_step.item())) >= 0:
            self._raise(trainer, step, None)

    @staticmethod
    def _raise(trainer: L.Trainer, step: int, loss: torch.Tensor | None) -> None:
        raise NonFiniteLossError.of(trainer, step, None if loss is None else loss.item())
