"""A run's loggers, closed when the run ends. Lightning finalizes each logger after ``fit`` and
``test`` but leaves a W&B run open until the process exits; the jobs of a multirun may share
one process (the basic and fused launchers), so each run finishes its own W&B runs here.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any


@contextlib.contextmanager
def finished_at_end(loggers: Sequence[Any]) -> Iterator[None]:
    """Finish the W&B run of each of ``loggers`` that opened one when the block ends: exit code
    0 when it ended normally, 1 when it raised (a failure or an interruption)."""
    failed = True
    try:
        yield
        failed = False
    finally:
        finish(loggers, exit_code=1 if failed else 0)


def finish(loggers: Sequence[Any], exit_code: int = 0) -> None:
    """Finish the W&B runs that ``loggers`` opened (the others need nothing)."""
    from lightning.pytorch.loggers import WandbLogger

    for logger in loggers:
        # its run, if it opened one (``experiment`` would open one only to finish it)
        run = getattr(logger, "_experiment", None) if isinstance(logger, WandbLogger) else None
        if run is not None:
            run.finish(exit_code=exit_code)
