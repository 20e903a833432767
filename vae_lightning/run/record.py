"""A run's record, ``metrics.json``: written over the run's life by ``RunRecord`` (on rank zero,
atomically) and read back by anything that reports on runs (``RunRecord.parse`` / ``load`` /
``read``); the one reader and writer of it.
"""

from __future__ import annotations

import errno
import json
import logging
import math
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vae_lightning.errors import RunInterrupted
from vae_lightning.files import atomic_write_json, folder_held

if TYPE_CHECKING:  # imported here without Lightning: vae-report reads records in a second
    import lightning as L

    from vae_lightning.run.history import History

log = logging.getLogger(__name__)

# The durations a record holds, in seconds: fit, the median epoch and the whole run.
TIMING_KEYS = ("time/fit_s", "time/epoch_s_median", "time/total_s")


def json_number(value: Any) -> float | None:
    """A JSON number as float (NaN kept: a diverged run says so), else None (bools too)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value)


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

    @classmethod
    def parse(cls, output_dir: Path) -> RunRecord:
        """The folder's metrics.json as a record to read (nothing is written): ``data`` as
        parsed, ``metrics`` its numbers, and the properties below.

        Raises:
            OSError: the folder has no metrics.json, or it cannot be read.
            ValueError: it is not valid JSON (``JSONDecodeError``) or not UTF-8.
            TypeError: its JSON is not an object.
        """
        record = cls(output_dir)
        data = json.loads(record.path.read_text())
        if not isinstance(data, dict):
            raise TypeError(f"metrics.json holds a {type(data).__name__}, not an object")
        metrics = data.get("metrics")
        record.data = data
        record.metrics = {
            k: x
            for k, v in (metrics if isinstance(metrics, dict) else {}).items()
            if (x := json_number(v)) is not None
        }
        return record

    @classmethod
    def load(cls, output_dir: Path) -> RunRecord | None:
        """``parse``'s record, or None when the folder has no readable metrics.json."""
        try:
            return cls.parse(output_dir)
        except (OSError, ValueError, TypeError):
            return None

    @staticmethod
    def read(output_dir: Path) -> dict[str, Any] | None:
        """The folder's metrics.json, or None when it has none (or an unreadable one)."""
        record = RunRecord.load(output_dir)
        return None if record is None else record.data

    @staticmethod
    def finished(output_dir: Path) -> dict[str, Any] | None:
        """The folder's metrics.json when it records a finished run, else None."""
        record = RunRecord.read(output_dir)
        return record if record is not None and record.get("status") == "ok" else None

    # What a parsed record says, absent or ill-typed values as None or empty.

    @property
    def status(self) -> str:
        """As written ("running", "ok", "failed", "interrupted"), but "killed" for a run that
        says "running" while no process holds its folder (killed with SIGKILL, crashed, its
        node lost: nothing could write that it stopped); "unknown" when it names none."""
        status = self.data.get("status")
        if status == "running" and not folder_held(self.output_dir):
            return "killed"
        return status if isinstance(status, str) else "unknown"

    @property
    def error(self) -> str | None:
        error = self.data.get("error")
        if error is None and self.status == "killed":
            resume = self.data.get("resume") or "resume=true (a sweep) or resume=<this folder>"
            return (f"killed while it ran (metrics.json says running, and no process holds "
                    f"its folder); continue it with: {resume}")  # fmt: skip
        return None if error is None else str(error)

    @property
    def hparams(self) -> dict[str, Any]:
        hparams = self.data.get("hparams")
        return hparams if isinstance(hparams, dict) else {}

    @property
    def epochs(self) -> int | None:
        epochs = self.data.get("epochs")
        return epochs if isinstance(epochs, int) and not isinstance(epochs, bool) else None

    @property
    def timings(self) -> dict[str, float]:
        """The durations (``TIMING_KEYS``) the record holds, in seconds."""
        return {k: x for k in TIMING_KEYS if (x := json_number(self.data.get(k))) is not None}

    def __enter__(self) -> RunRecord:
        from vae_lightning.config import resume_command

        self._t0 = time.perf_counter()
        self.data.setdefault("resume", resume_command(self.output_dir))  # should it be killed
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
        self.data.pop("resume", None)  # a finished run is not continued
        self.data.update(fields, status="ok", metrics=dict(sorted(self.metrics.items())))

    def metric(self, key: str | None) -> float | None:
        return self.metrics.get(key or "")

    def best_checkpoint(self, trainer: L.Trainer) -> str | None:
        """The best checkpoint's path (its score recorded as ``<monitor>_best``), if any."""
        ckpt = trainer.checkpoint_callback
        if ckpt is None:
            return None
        if ckpt.best_model_score is not None:
            self.metrics[f"{ckpt.monitor}_best"] = float(ckpt.best_model_score)
        return getattr(ckpt, "best_model_path", "") or None

    def _write(self) -> None:
        if not _rank_zero():
            return
        clean = {
            k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in self.data.items()
        }
        atomic_write_json(self.path, clean)


def _rank_zero() -> bool:
    """Whether this process is global rank zero: Lightning's rank once it is imported (a
    process that never imported it is no DDP worker)."""
    rank_zero = sys.modules.get("lightning.fabric.utilities.rank_zero")
    return rank_zero is None or getattr(rank_zero.rank_zero_only, "rank", 0) == 0


def key_hparams(model: Any, datamodule: Any, max_epochs: Any, seed: int) -> dict[str, Any]:
    """The hyper-parameters that identify a run (metrics.json, the TensorBoard hparams view)."""
    hp: dict[str, Any] = {
        "model": type(model).__name__,
        "data": datamodule.dataset_name,
        "batch_size": datamodule.batch_size,
        "max_epochs": max_epochs,
        "seed": seed,
    }
    for key, value in model.hparams.items():
        if isinstance(value, (int, float, str, bool)):
            hp[key] = value
    hp.setdefault("beta", getattr(model, "beta", 0.0))
    hp["scheduler"] = (model.hparams.get("scheduler") or {}).get("name", "none")
    return hp


def log_hparams(trainer: L.Trainer, hparams: dict[str, Any], metrics: dict[str, float]) -> None:
    """TensorBoard's hparams view with the real final metrics (Lightning's own call logs -1)."""
    from lightning.pytorch.loggers import TensorBoardLogger

    for tb in (lg for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)):
        tb.log_hyperparams(hparams, {f"hp/{k}": v for k, v in metrics.items()})
