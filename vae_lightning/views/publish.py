"""One way to publish a grid or a figure: a PNG file and the same picture to every logger that
takes pictures (TensorBoard, Weights & Biases, MLflow; the others, CSV among them, take none)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from vae_lightning.files import atomic_write


def publish(
    image: torch.Tensor | Any,
    path: str | Path,
    tag: str | None = None,
    step: int = 0,
    loggers: Sequence[Any] = (),
) -> Path:
    """Write a grid (a (C, H, W) tensor in [0, 1]) or a matplotlib Figure to ``path`` as PNG,
    and send it to each Lightning logger in ``loggers`` under ``tag`` at ``step``."""
    path = Path(path)
    if isinstance(image, torch.Tensor):
        from torchvision.utils import save_image

        atomic_write(path, lambda tmp: save_image(image, tmp, format="png"))
    else:
        atomic_write(path, lambda tmp: image.savefig(tmp, format="png", dpi=100))
    for logger in loggers:
        send(logger, image, path, tag or path.stem, step)
    return path


def send(logger: Any, image: torch.Tensor | Any, png: Path, tag: str, step: int) -> None:
    """``image`` (its PNG written at ``png``) to one logger, as that logger takes pictures.

    TensorBoard gets the grid or the figure itself (its IMAGES tab, as before); W&B and MLflow
    get the PNG file, so that what they hold is the picture in ``images/``, pixel for pixel.
    """
    from lightning.pytorch.loggers import MLFlowLogger, TensorBoardLogger, WandbLogger

    if isinstance(logger, TensorBoardLogger):
        writer = logger.experiment
        if isinstance(image, torch.Tensor):
            writer.add_image(tag, image, global_step=step)
        else:
            writer.add_figure(tag, image, global_step=step, close=False)
    elif isinstance(logger, WandbLogger):
        logger.log_image(tag, [str(png)], step=step)  # W&B copies the file into its media/
    elif isinstance(logger, MLFlowLogger):
        from PIL import Image

        # an image series in the run's artifacts (images/<tag>+step+<step>+...png), by step
        with Image.open(png) as picture:
            logger.experiment.log_image(logger.run_id, picture, key=tag, step=step)
