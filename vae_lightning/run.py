"""The run: its record (``metrics.json``), its history (``history.csv``), and the callbacks that
keep it safe (stop on a signal, stop on a non-finite loss, exact resume). Which folder a run may
write and which checkpoint it starts from: ``run_folder.py``.

``train.py`` wires these around ``trainer.fit``; none of them touches the maths.
"""

from __future__ import annotations

import csv
import errno
import json
import logging
import math
import signal
import statistics
import threading
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_only

from vae_lightning.errors import RunError, RunInterrupted
from vae_lightning.files import atomic_write, atomic_write_json

log = logging.getLogger(__name__)


# --- the record ---------------------------------------------------------------------------------


class RunRecord:
    """A run folder's ``metrics.json`` over the run's life, written atomically on rank zero.

    Used as a context manager around the run: ``running`` on entry; on exit ``ok`` (after
    ``finish``), ``failed`` (with the error) or ``interrupted`` (with the command that resumes
    it), always with the timings. Holds the status, the final metrics, the key
    hyper-parameters (``hparams``) and what callbacks contribute (their ``summary()``).
    """

    def __init__(self, output_dir: Path) -> None:
        self.output_dir = Path(output_dir)
        self.path = self.output_dir / "metrics.json"
        self.data: dict[str, Any] = {"status": "running", "output_dir": str(self.output_dir)}
        self.metrics: dict[str, float] = {}
        self.history: History | None = None
        self._t0 = time.perf_counter()

    @staticmethod
    def read(output_dir: Path) -> dict[str, Any] | None:
        """The folder's metrics.json, or None when it has none (or an unreadable one)."""
        try:
            record = json.loads((Path(output_dir) / "metrics.json").read_text())
        except (OSError, ValueError):
            return None
        return record if isinstance(record, dict) else None

    @staticmethod
    def finished(output_dir: Path) -> dict[str, Any] | None:
        """The folder's metrics.json when it records a finished run, else None."""
        record = RunRecord.read(output_dir)
        return record if record is not None and record.get("status") == "ok" else None

    def __enter__(self) -> RunRecord:
        self._t0 = time.perf_counter()
        self._write()
        return self

    def __exit__(self, kind: type | None, err: BaseException | None, tb: Any) -> bool:
        if isinstance(err, RunInterrupted):
            from vae_lightning.config import resume_command

            self.data.update(
                status="interrupted",
                error=f"RunInterrupted: {err}",
                resume=resume_command(self.output_dir),
            )
        elif err is not None:
            self.data.update(status="failed", error=self._describe(err))
        self.data["time/total_s"] = time.perf_counter() - self._t0
        if self.history is not None:
            self.data["time/epoch_s_median"] = self.history.median_epoch_s()
            self.data["time/epoch_s"] = self.history.epoch_times
            self.data["time/first_step_unix"] = self.history.first_step_unix
        self._write()
        return False

    @classmethod
    def failed_to_start(cls, output_dir: Path, err: BaseException) -> None:
        """Record a run that failed before it started (a bad value found while building it)."""
        record = cls(output_dir)
        record.data.update(status="failed", error=record._describe(err))
        record._write()

    def _describe(self, err: BaseException) -> str:
        if isinstance(err, OSError) and err.errno == errno.ENOSPC:
            from vae_lightning.config import resume_command

            saved = (self.output_dir / "checkpoints" / "last.ckpt").is_file()
            kept = "earlier checkpoints are intact" if saved else "no checkpoint was saved yet"
            then = "resume" if saved else "start it again in this folder"
            message = (
                f"disk full while writing ({err}); {kept}. Free space, then {then}: "
                f"{resume_command(self.output_dir)}"
            )
            log.error("%s", message)
            return message
        return f"{type(err).__name__}: {err}"

    def add_metrics(self, metrics: dict[str, Any]) -> None:
        """Epoch-level ``stage/name`` values (``trainer.callback_metrics``) as floats."""
        epoch_level = (
            k for k in sorted(metrics)
            if "/" in k and not k.endswith("_step") and not k.startswith("time/")
        )  # fmt: skip
        self.metrics.update({k: float(metrics[k]) for k in epoch_level})

    def add_summaries(self, callbacks: list[L.Callback]) -> None:
        """What callbacks measured at the end of fit (probe, collapse, their timings)."""
        for cb in callbacks:
            summary = dict(cb.summary()) if callable(getattr(cb, "summary", None)) else {}
            self.metrics.update(summary.pop("metrics", {}))
            for key, value in summary.items():
                if isinstance(value, dict) and isinstance(self.data.get(key), dict):
                    self.data[key].update(value)
                else:
                    self.data[key] = value

    def finish(self, **fields: Any) -> None:
        self.data.update(fields, status="ok", metrics=dict(sorted(self.metrics.items())))

    def metric(self, key: str | None) -> float | None:
        return self.metrics.get(key or "")

    @rank_zero_only
    def _write(self) -> None:
        clean = {
            k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in self.data.items()
        }
        atomic_write_json(self.path, clean)


def log_hparams(trainer: L.Trainer, hparams: dict[str, Any], metrics: dict[str, float]) -> None:
    """TensorBoard's hparams view with the real final metrics (Lightning's own call logs -1)."""
    for tb in (lg for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)):
        tb.log_hyperparams(hparams, {f"hp/{k}": v for k, v in metrics.items()})


# --- history.csv --------------------------------------------------------------------------------


class History(L.Callback):
    """Per-epoch metrics (every epoch-level value in ``trainer.callback_metrics``) and timings.

    ``time/epoch_s`` is the wall time of the training batches of an epoch (validation excluded),
    ``time/val_s`` that of its validation. Written to ``path`` after every epoch, so a killed run
    keeps the epochs it finished. The run's one CSV of metrics.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.rows: list[dict[str, float]] = []
        self.first_step_unix: float | None = None
        self._t0 = self._t_val = 0.0
        self._train_s = self._val_s = math.nan
        self._carried = 0.0  # training seconds of this epoch spent before a resume
        self._fitting = True

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        # Lightning restores callbacks after setup, for a test from a checkpoint as well: only
        # a fit takes its rows from a checkpoint (the test of the best checkpoint would
        # otherwise put the history back to that epoch)
        self._fitting = stage == "fit"

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._t0, self._train_s, self._val_s = time.perf_counter(), math.nan, math.nan
        self._t0 -= self._carried
        self._carried = 0.0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        if self.first_step_unix is None:  # for the start-up time: process start to first step
            self.first_step_unix = time.time()

    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or trainer.state.fn != TrainerFn.FITTING:
            return
        self._t_val = time.perf_counter()
        if math.isnan(self._train_s):
            self._train_s = self._t_val - self._t0

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.sanity_checking and trainer.state.fn == TrainerFn.FITTING:
            self._val_s = time.perf_counter() - self._t_val

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if math.isnan(self._train_s):  # no validation this epoch
            self._train_s = time.perf_counter() - self._t0
        row: dict[str, float] = {"epoch": trainer.current_epoch, "step": trainer.global_step}
        for key, value in sorted(trainer.callback_metrics.items()):
            if "/" in key and not key.endswith("_step"):  # epoch-level stage/name metrics
                row[key] = float(value)
        row["time/epoch_s"] = self._train_s
        row["time/val_s"] = self._val_s
        self.rows.append(row)
        self._write()

    # rows travel in checkpoints, so a resumed run's history.csv keeps the earlier epochs; so
    # does the training time of an epoch saved part-way (epoch_s), which the resumed epoch adds
    def state_dict(self) -> dict[str, Any]:
        in_epoch = self._t0 and math.isnan(self._train_s)
        return {"rows": self.rows, "epoch_s": time.perf_counter() - self._t0 if in_epoch else 0.0}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if not self._fitting:
            return
        self.rows = [dict(row) for row in state_dict.get("rows", [])]
        self._carried = float(state_dict.get("epoch_s", 0.0))
        # a run resumed part-way through an epoch may not start that epoch again
        self._t0 = time.perf_counter() - self._carried

    def final_metrics(self) -> dict[str, float]:
        """The last epoch's metrics (no timings): what a run resumed after its last epoch
        reports for training and validation, as the uninterrupted run did."""
        last = self.rows[-1] if self.rows else {}
        return {k: v for k, v in last.items() if "/" in k and not k.startswith("time/")}

    @property
    def epoch_times(self) -> list[float]:
        return [r["time/epoch_s"] for r in self.rows]

    def median_epoch_s(self) -> float:
        return statistics.median(self.epoch_times) if self.rows else math.nan

    @rank_zero_only
    def _write(self) -> None:
        columns: list[str] = []
        for row in self.rows:
            columns += [k for k in row if k not in columns]

        def write(tmp: Path) -> None:
            with open(tmp, "w", newline="") as f:
                writer = csv.DictWriter(f, fieldnames=columns)
                writer.writeheader()
                writer.writerows(self.rows)

        atomic_write(self.path, write)


# --- stopping safely ----------------------------------------------------------------------------


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


class NonFiniteLossError(RunError):
    """The training loss became NaN or infinite; the message names the epoch, step and the last
    good checkpoint."""


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
        ckpt = trainer.checkpoint_callback
        last_good = ckpt and (
            getattr(ckpt, "last_model_path", "") or getattr(ckpt, "best_model_path", "")
        )
        value = f" ({loss.item()})" if loss is not None else ""
        raise NonFiniteLossError(
            f"non-finite training loss{value} at epoch {trainer.current_epoch}, step {step}. "
            f"Last good checkpoint: {last_good or 'none yet'} (not overwritten). Lower model.lr "
            f"or check the data; continue from the checkpoint with resume=<it>."
        )


class ExactResume(L.Callback):
    """The global RNG state travels in checkpoints, so the noise of a resumed run (the
    reparameterisation's, ``binarize=dynamic``'s) continues exactly where it stopped. Applied
    when training starts: after the sanity check (whose draws Lightning undoes), before the
    first batch is fetched and binarized. Also records the dataset (``vae_lightning.dataset``),
    which ``check_resume`` compares with the configured one."""

    def __init__(self) -> None:
        self._pending: dict[str, Any] | None = None

    def state_dict(self) -> dict[str, Any]:
        cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []
        return {"torch_rng": torch.get_rng_state(), "cuda_rng": cuda}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._pending = dict(state_dict)

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        dataset = getattr(trainer.datamodule, "dataset_name", None)
        if dataset:
            checkpoint.setdefault("vae_lightning", {})["dataset"] = dataset

    def on_load_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        legacy = checkpoint.get("vae_lightning") or {}  # written before this callback existed
        if "torch_rng" in legacy:
            self._pending = {"torch_rng": legacy["torch_rng"], "cuda_rng": legacy.get("cuda_rng")}

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._pending is None:
            return
        torch.set_rng_state(self._pending["torch_rng"].cpu())
        if self._pending.get("cuda_rng") and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(self._pending["cuda_rng"])
        self._pending = None
