"""``history.csv``: every epoch's metrics and timings, written after each epoch."""

from __future__ import annotations

import csv
import math
import statistics
import time
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_only

from vae_lightning.files import atomic_write


class History(L.Callback):
    """Per-epoch metrics (every epoch-level value in ``trainer.callback_metrics``) and timings.

    ``time/epoch_s`` is the wall time of the training batches of an epoch (validation excluded),
    ``time/val_s`` that of its validation. Written to ``path`` after every epoch, so a killed run
    keeps the epochs it finished. The run's one CSV of metrics.

    For one job of a stack trained as one module (``sweeps.stacked``): ``prefix`` selects the
    job's metrics (``job3/val/loss`` is its ``val/loss``), and ``share`` is the job's share of
    the stack's wall time.
    """

    def __init__(self, path: str | Path, prefix: str = "", share: float = 1.0) -> None:
        self.path = Path(path)
        self.prefix, self.share = prefix, share
        self.rows: list[dict[str, float]] = []
        self.first_step_unix: float | None = None
        self._t0 = self._t_val = 0.0
        self._train_s = self._val_s = math.nan
        self._carried = 0.0  # training seconds of this epoch spent before a resume
        self._fitting = True

    @property
    def state_key(self) -> str:
        # a run's checkpoints name it History; a stack holds one per job
        return f"History[{self.prefix}]" if self.prefix else "History"

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
            if not key.startswith(self.prefix):
                continue
            key = key[len(self.prefix) :]
            if "/" in key and not key.endswith("_step"):  # epoch-level stage/name metrics
                row[key] = float(value)
        row["time/epoch_s"] = self._train_s * self.share
        row["time/val_s"] = self._val_s * self.share
        self.rows.append(row)
        self._write()

    # rows travel in checkpoints, so a resumed run's history.csv keeps the earlier epochs; so
    # does the training time of an epoch saved part-way (epoch_s), which the resumed epoch adds
    def state_dict(self) -> dict[str, Any]:
        in_epoch = self._t0 and math.isnan(self._train_s)
        epoch_s = (time.perf_counter() - self._t0) * self.share if in_epoch else 0.0
        return {"rows": self.rows, "epoch_s": epoch_s}

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
