"""One way to publish a grid or a figure: a PNG file and, when given writers, TensorBoard."""

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
    writers: Sequence[Any] = (),
) -> Path:
    """Write a grid (a (C, H, W) tensor in [0, 1]) or a matplotlib Figure to ``path`` as PNG,
    and to each TensorBoard ``SummaryWriter`` in ``writers`` under ``tag`` at ``step``."""
    path = Path(path)
    if isinstance(image, torch.Tensor):
        from torchvision.utils import save_image

        atomic_write(path, lambda tmp: save_image(image, tmp, format="png"))
        for writer in writers:
            writer.add_image(tag, image, global_step=step)
    else:
        atomic_write(path, lambda tmp: image.savefig(tmp, format="png", dpi=100))
        for writer in writers:
            writer.add_figure(tag, image, global_step=step, close=False)
    return path
