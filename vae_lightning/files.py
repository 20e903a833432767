"""Writing files that nothing half-written can be mistaken for, and taking turns on a folder.

Every file the framework writes (raw data, checkpoints, metrics.json, history.csv, reports,
cached classifiers) goes through ``atomic_write``: written beside its target under a unique
temporary name, then renamed over it, so a reader, a crash or a full disk never leaves a
truncated file where a good one was.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any


def atomic_write(path: str | Path, write: Callable[[Path], Any], fsync: bool = False) -> None:
    """Call ``write(tmp)`` on a temporary path beside ``path``, then rename it into place.

    ``fsync`` also flushes the data to disk before the rename (for data that took long to get).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".part")
    os.close(fd)
    tmp = Path(name)
    try:
        write(tmp)
        if fsync:
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; keep the usual permissions
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(text, newline=""))


def atomic_write_json(path: str | Path, payload: Any) -> None:
    text = json.dumps(payload, indent=2, sort_keys=True, default=str) + "\n"
    atomic_write_text(path, text)


def make_writable_folder(path: Path) -> None:
    """Create ``path`` (and its parents) and check that a file can be written in it (an unnamed
    temporary file, removed at once: nothing is added). Raises OSError otherwise."""
    path.mkdir(parents=True, exist_ok=True)
    tempfile.TemporaryFile(dir=path).close()


@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """An exclusive flock on ``path`` (created), held for the block: processes take turns."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


class FolderBusy(RuntimeError):
    """Another process holds the folder (``hold_folder``)."""


def lock_folder(path: Path) -> int:
    """An exclusive, non-blocking flock on the folder itself; returns the descriptor that holds
    it (``os.close`` releases it). ``FolderBusy`` when another process holds it.

    The lock is on the directory's own descriptor, so it adds no file (a finished run's folder
    stays byte-for-byte as it was), and the kernel drops it when the process dies, so a killed
    run leaves no stale lock.
    """
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    # a few tries over a quarter of a second: a reader asking whether the folder is held
    # (folder_held) holds it for microseconds, and must not turn a writer away
    for attempt in range(6):
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return fd
        except BlockingIOError:
            if attempt < 5:
                time.sleep(0.05)
    os.close(fd)
    raise FolderBusy(str(path))


def folder_held(path: Path) -> bool:
    """Whether a process holds the folder (``lock_folder``) right now: a run writing it. A run
    whose process is gone (killed, crashed, its node lost) holds nothing: the kernel dropped its
    lock with it."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # and with it the shared lock, if taken


@contextlib.contextmanager
def hold_folder(path: Path) -> Iterator[None]:
    """``lock_folder`` for the block: a second process asking for the same folder gets
    ``FolderBusy`` at once, instead of writing into it beside the first."""
    fd = lock_folder(path)
    try:
        yield
    finally:
        os.close(fd)
