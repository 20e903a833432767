"""The kinds of user error, and the value checks that constructors share.

Each carries a message that names the problem and what to do; the entry points print them as
one line instead of a traceback (``USER_ERRORS``). Anything else is a bug, and gets one.
"""

from __future__ import annotations

import contextlib
import math
import signal
import threading
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any


class DataError(RuntimeError):
    """Raw data is missing, corrupted, or could not be obtained; the message says what to do."""


class RunError(RuntimeError):
    """The run cannot go on for a reason the user can act on (a diverging loss, nothing to
    train); the message says what happened and what to do."""


class NonFiniteLossError(RunError):
    """The training loss became NaN or infinite; the message names the epoch, step and the last
    good checkpoint (raised by the run's NonFiniteStop and by steps that check it themselves)."""

    @classmethod
    def of(cls, trainer: Any, step: int, value: float | None = None) -> NonFiniteLossError:
        """The error at global ``step`` of ``trainer``'s fit (``value``: the loss, if known)."""
        ckpt = trainer.checkpoint_callback
        last_good = ckpt and (
            getattr(ckpt, "last_model_path", "") or getattr(ckpt, "best_model_path", "")
        )
        shown = f" ({value})" if value is not None else ""
        return cls(
            f"non-finite training loss{shown} at epoch {trainer.current_epoch}, step {step}. "
            f"Last good checkpoint: {last_good or 'none yet'} (not overwritten). Lower model.lr "
            f"or check the data; continue from the checkpoint with resume=<it>."
        )


class ConfigError(ValueError):
    """A configuration value is invalid; ``key`` names it (relative to its config group)."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(f"{key} {message}")
        self.key, self.message = key, message


class FolderRefused(ConfigError):
    """The run folder may not be written by this command; nothing was written into it."""


USER_ERRORS = (ConfigError, DataError, RunError)


class RunInterrupted(BaseException):
    """The run stopped on SIGTERM/SIGINT; ``checkpoint`` is where it resumes from (None: it had
    saved none, and starts again).

    A BaseException, like KeyboardInterrupt, so that a multirun stops as a whole instead of
    recording the job as failed and starting the next one.
    """

    def __init__(self, signum: int, checkpoint: Path | None, epoch: int, step: int) -> None:
        self.signum, self.checkpoint, self.epoch, self.step = signum, checkpoint, epoch, step
        name = signal.Signals(signum).name
        saved = f"resumes from {checkpoint}" if checkpoint else "no checkpoint saved yet"
        super().__init__(f"{name} at epoch {epoch}, step {step}; {saved}")


class Interrupted(BaseException):
    """A tool stopped by SIGTERM/SIGINT (``raise_on_signals``): what it finished is kept (every
    file is written whole or not at all), the rest is done again when it is rerun."""

    def __init__(self, signum: int) -> None:
        self.signum = signum
        super().__init__(f"{signal.Signals(signum).name} received")


@contextlib.contextmanager
def raise_on_signals() -> Iterator[None]:
    """SIGTERM (a scheduler's stop) and SIGINT (Ctrl-C) raise ``Interrupted`` in the main thread
    for the block, so that a tool stopped by one exits with 128 + the signal's number, as a
    shell reports a process killed by it, instead of 0 (Lightning's own SIGTERM handler stops
    a fit quietly and lets the tool carry on) or a KeyboardInterrupt traceback. Training in
    the block (``train()``) installs its own handler, which saves a checkpoint first, and puts
    this one back afterwards."""
    if threading.current_thread() is not threading.main_thread():  # where handlers can go
        yield
        return

    def handler(signum: int, frame: Any) -> None:
        raise Interrupted(signum)

    previous = {
        signum: signal.signal(signum, handler) for signum in (signal.SIGTERM, signal.SIGINT)
    }
    try:
        yield
    finally:
        for signum, old in previous.items():
            signal.signal(signum, old)


def check_int(key: str, value: object, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(key, f"must be an integer >= {minimum}, got {value!r}")
    return value


def check_float(key: str, value: object, minimum: float, inclusive: bool = True) -> float:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if ok:
        ok = value >= minimum if inclusive else value > minimum
    if not ok:
        bound = f">= {minimum}" if inclusive else f"> {minimum}"
        raise ConfigError(key, f"must be a finite number {bound}, got {value!r}")
    return float(value)


def check_names(key: str, value: object, allowed: Iterable[str]) -> list[str]:
    """A non-empty list of names (or one name) among ``allowed``: a study's runs."""
    allowed = list(allowed)
    names = [value] if isinstance(value, str) else list(value or [])  # type: ignore[call-overload]
    unknown = [n for n in names if n not in allowed]
    if unknown or not names:
        raise ConfigError(
            key,
            f"names unknown run(s) {', '.join(map(str, unknown)) or '(none given)'}; "
            f"choose among {', '.join(allowed)}",
        )
    return names


def check_choice(key: str, value: object, allowed: tuple[str, ...]) -> str:
    if value not in allowed:
        raise ConfigError(key, f"must be one of {', '.join(allowed)}, got {value!r}")
    return value  # type: ignore[return-value]


def check_path(key: str, value: object, kind: str, hint: str, must_exist: bool = False) -> Path:
    """``value`` as an absolute path that is, or can become, a ``kind`` ("file" or "folder").

    Raises ConfigError naming ``key``, ending with ``hint`` (what to do), when ``value`` is not a
    path, is the other kind, lies below a file, or (``must_exist``) does not exist. Nothing is
    created.
    """
    if not isinstance(value, (str, Path)) or not str(value):
        raise ConfigError(key, f"must be the path of a {kind}, got {value!r}: {hint}")
    path = Path(value).expanduser().resolve()
    if path.exists():
        if kind == "folder" and not path.is_dir():
            raise ConfigError(key, f"{path} is a file, not a folder: {hint}")
        if kind == "file" and path.is_dir():
            raise ConfigError(key, f"{path} is a folder, not a file: {hint}")
        return path
    if must_exist:
        raise ConfigError(key, f"{path} does not exist: {hint}")
    ancestor = next(p for p in path.parents if p.exists())
    if not ancestor.is_dir():
        raise ConfigError(key, f"{path} lies below {ancestor}, which is a file: {hint}")
    return path
