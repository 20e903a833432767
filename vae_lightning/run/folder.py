"""A run folder's rules and where a run starts from, all checked before anything is written.

One writer at a time (a lock on the folder); a finished run (metrics.json ``ok``) is never
changed; a folder holding another run is written only by the command that continues it; a
checkpoint resumes only onto its own data with epochs left to train. ``train.py`` calls these
before ``trainer.fit``; the run's record itself lives in ``run.py``.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from vae_lightning.errors import ConfigError, FolderRefused
from vae_lightning.files import FolderBusy, hold_folder
from vae_lightning.run.record import RunRecord

log = logging.getLogger(__name__)


def _is_folder(resume: Any) -> bool:
    return isinstance(resume, str) and bool(resume) and not resume.endswith(".ckpt")


def _same_folder(a: Any, b: Path) -> bool:
    return Path(str(a)).resolve() == Path(b).resolve()


@contextlib.contextmanager
def claim_folder(output_dir: Path, resume: Any, rank: int = 0) -> Iterator[None]:
    """Hold the run folder for this run, or refuse it with one line, before anything is written.

    Refused: a folder another process is writing (a lock on the folder, held for the block, on
    rank zero); a folder holding a finished run (metrics.json ``ok``), which no command changes
    (``resume=true`` skips it before this); a folder holding another run (a record or
    checkpoints) unless this command continues it (``resume=<that folder>`` or ``resume=true``).
    """
    output_dir = Path(output_dir)
    if rank != 0:  # DDP's other processes: rank zero has claimed the folder for them
        yield
        return
    try:
        with hold_folder(output_dir):
            _check_folder(output_dir, resume)
            yield
    except FolderBusy:
        raise FolderRefused(
            "paths.output_dir",
            f"{output_dir} is being written by another run right now. Wait for it to finish, "
            f"or choose another folder (hydra.run.dir=... or hydra.sweep.dir=...).",
        ) from None


def _check_folder(output_dir: Path, resume: Any) -> None:
    record = RunRecord.read(output_dir)
    status = (record or {}).get("status")
    checkpoints = output_dir / "checkpoints"
    has_ckpt = checkpoints.is_dir() and any(checkpoints.glob("*.ckpt"))
    continues = resume is True or (_is_folder(resume) and _same_folder(resume, output_dir))
    if status == "ok":
        raise FolderRefused(
            "resume" if continues else "paths.output_dir",
            f"{output_dir} holds a finished run (metrics.json: ok), which is kept as it is. To "
            f"train it further, start a new run from its weights: resume={checkpoints}/last.ckpt "
            f"trainer.max_epochs=<more>; to run it again, choose another folder, or delete this "
            f"one first.",
        )
    if (record is not None or has_ckpt) and not continues:
        held = f"a run (metrics.json: {status})" if record is not None else "checkpoints"
        raise FolderRefused(
            "paths.output_dir",
            f"{output_dir} already holds {held}. Continue it with resume={output_dir}, or choose "
            f"another folder (delete this one first to start it again).",
        )


def resume_checkpoint(resume: Any, output_dir: Path) -> str | None:
    """The checkpoint a run starts from, from ``resume``:

    - null or false: none, a fresh run;
    - ``<run folder>``: that folder's ``checkpoints/last.ckpt`` (the run continues there); a run
      stopped before its first checkpoint (its metrics.json says so) starts again there;
    - ``<file>.ckpt``: that checkpoint (the run continues in a new folder);
    - true: this run's own ``last.ckpt`` when there is one, else a fresh start (sweeps).
    """
    if resume is None or resume is False or resume == "":
        return None
    last = newest_last(Path(output_dir))
    if resume is True:
        return None if last is None else str(last)
    path = Path(str(resume))
    if path.suffix == ".ckpt":
        if not path.is_file():
            raise ConfigError("resume", f"points to {path}, which does not exist")
        return str(path)
    last = newest_last(path)
    if last is not None:
        return str(last)
    if RunRecord.read(path) is not None:
        log.info("%s saved no checkpoint before it stopped: starting it again", path)
        return None
    raise ConfigError(
        "resume",
        f"points to {path}, which holds no run (no metrics.json, no checkpoints/last.ckpt). "
        f"Give a run folder, a checkpoint file, or resume=true to continue (or start) this folder.",
    )


def newest_last(folder: Path) -> Path | None:
    """A run folder's newest ``checkpoints/last*.ckpt``: ``last.ckpt``, or a ``last-vN.ckpt``
    written beside it by an earlier version (whose resumed runs left ``last.ckpt`` behind)."""
    found = [p for p in (Path(folder) / "checkpoints").glob("last*.ckpt") if p.is_file()]
    return max(found, key=lambda p: (p.stat().st_mtime_ns, p.name == "last.ckpt"), default=None)


def check_resume(
    checkpoint: dict[str, Any], path: str, datamodule: Any, max_epochs: Any, output_dir: Path
) -> None:
    """Refuse to resume from ``checkpoint`` onto other data, or with nothing left to train.

    A checkpoint whose training is complete is accepted only when it is the folder's own
    (a run stopped at its end-of-fit probe or its test, which the resume finishes).
    """
    saved = (checkpoint.get("vae_lightning") or {}).get("dataset")
    wanted = getattr(datamodule, "dataset_name", None)
    if saved and wanted and saved != wanted:
        raise ConfigError(
            "resume", f"{path} was trained on {saved}, but the configured data is {wanted}"
        )
    saved_shape = (checkpoint.get("datamodule_hyper_parameters") or {}).get("image_shape")
    shape = getattr(datamodule, "image_shape", None)
    if saved_shape and shape and tuple(saved_shape) != tuple(shape):
        raise ConfigError(
            "resume", f"{path} holds images of shape {tuple(saved_shape)}, the data {tuple(shape)}"
        )
    done = checkpoint.get("loops", {}).get("fit_loop", {}).get("epoch_progress", {})
    done = done.get("current", {}).get("processed")
    if isinstance(max_epochs, int) and max_epochs > 0 and isinstance(done, int):
        own = Path(path).resolve().parents[1] == Path(output_dir).resolve()
        if done >= max_epochs and not own:
            raise ConfigError(
                "trainer.max_epochs",
                f"is {max_epochs}, and {path} has already trained {done} epochs: nothing to "
                f"train. Raise trainer.max_epochs, or evaluate it with vae-evaluate ckpt={path}",
            )


def check_writable(output_dir: Path) -> None:
    """The run folder exists (created) and can be written, else one line naming it."""
    from vae_lightning.files import make_writable_folder

    try:
        make_writable_folder(output_dir)
    except OSError as err:
        raise ConfigError(
            "paths.output_dir",
            f"{output_dir} cannot be written ({err.strerror or err}). Choose another folder with "
            f"hydra.run.dir=... or paths.log_dir=...",
        ) from None
