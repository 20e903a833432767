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
