"""The Hydra callback around every run and sweep (``hydra/default.yaml``): folders that can be
written, one sweep per sweep folder, and a sweep's report and exit status when it ends."""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from vae_lightning.config import ddp_child
from vae_lightning.files import FolderBusy, lock_folder, make_writable_folder

log = logging.getLogger(__name__)


class RunFolders(Callback):
    """Hydra callback for the run and sweep folders, around what Hydra does itself.

    - Before a run or a sweep: its folder can be created, else one line (Hydra would fail
      with a traceback while creating it).
    - A sweep folder is held (a lock) while the sweep runs: a second sweep into it is refused
      with one line before it writes anything.
    - Each job appends its outcome to the sweep's ``jobs.jsonl`` (``record_job``); when the
      multirun ends, REPORT.md, summary.csv and the plots are written (report.py), and the
      exit status is 1 when any job of this multirun failed.
    """

    def __init__(self) -> None:
        self._lock: int | None = None  # a descriptor: the callback is pickled to joblib's workers
        self._ledger_start = 0

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        _make_folder(config.hydra.run.dir, "hydra.run.dir")

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        if ddp_child():
            return
        sweep_dir = _make_folder(config.hydra.sweep.dir, "hydra.sweep.dir")
        try:
            self._lock = lock_folder(sweep_dir)
        except FolderBusy:
            _exit_with(
                f"error: hydra.sweep.dir {sweep_dir} is being written by another sweep right "
                f"now. Wait for it to finish, or choose another folder.",
                2,
            )
        ledger = sweep_dir / "jobs.jsonl"
        self._ledger_start = ledger.stat().st_size if ledger.is_file() else 0

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        from vae_lightning.studies.report import write_report

        if ddp_child():
            return
        sweep_dir = Path(config.hydra.sweep.dir)
        try:
            log.info("sweep report: %s", write_report(sweep_dir))
        except FileNotFoundError as err:  # e.g. every job was skipped before writing anything
            log.warning("no sweep report: %s", err)
        finally:
            if self._lock is not None:
                os.close(self._lock)
                self._lock = None
        jobs = _read_jobs(sweep_dir / "jobs.jsonl", self._ledger_start)
        failed = [j for j in jobs if j.get("status") not in ("ok", "skipped")]
        if failed:
            first = failed[0]
            _exit_with(
                f"error: {len(failed)} of {len(jobs)} jobs of this sweep failed (each one's "
                f"metrics.json or train.log says why); the first, {first.get('dir')}: "
                f"{first.get('error')}",
                1,
            )


def _make_folder(folder: Any, key: str) -> Path:
    path = Path(str(folder))
    try:
        make_writable_folder(path)
    except OSError as err:
        _exit_with(
            f"error: {key} {path} cannot be created ({err.strerror or err}). Choose another "
            f"folder with {key}=... or paths.log_dir=...",
            2,
        )
    return path


def _exit_with(line: str, status: int) -> None:
    """One line on stderr and the exit status; a SystemExit passes through Hydra's callback
    and error handlers, which would otherwise print a traceback."""
    sys.stderr.write(line + "\n")
    raise SystemExit(status)


def _read_jobs(ledger: Path, start: int) -> list[dict[str, Any]]:
    if not ledger.is_file():
        return []
    with open(ledger) as f:
        f.seek(start)
        return [json.loads(line) for line in f if line.strip()]
