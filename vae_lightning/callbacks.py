"""Lightning callbacks of the framework.

``History`` writes the run folder's ``history.csv`` (one row per epoch) and measures epoch times;
``train.py`` always attaches it, since ``report.py`` and ``metrics.json`` rely on it.
"""

from __future__ import annotations

import csv
import math
import statistics
import time
from pathlib import Path

import lightning as L
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_only


class History(L.Callback):
    """Per-epoch metrics (every epoch-level value in ``trainer.callback_metrics``) and timings.

    ``time/epoch_s`` is the wall time of the training batches of an epoch (validation excluded),
    ``time/val_s`` that of its validation. Written to ``path`` after every epoch, so a killed run
    keeps the epochs it finished.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.rows: list[dict[str, float]] = []
        self._t0 = self._t_val = 0.0
        self._train_s = self._val_s = math.nan

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._t0, self._train_s, self._val_s = time.perf_counter(), math.nan, math.nan

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
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".csv.part")
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=columns)
            writer.writeheader()
            writer.writerows(self.rows)
        tmp.replace(self.path)
