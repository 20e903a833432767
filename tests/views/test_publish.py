"""One way to publish a grid or a figure (views.publish): a PNG file, whole or not at all, and
the same image in TensorBoard; a logger that takes no pictures (CSV) is passed over. (W&B and
MLflow, through real runs: tests/views/test_loggers.py.)"""

import numpy as np
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from vae_lightning.views import grids, publish


def test_publish_writes_a_png_and_a_tensorboard_image(tmp_path):
    from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
    from matplotlib.figure import Figure
    from PIL import Image

    fig = Figure(figsize=(2, 1), dpi=100)
    fig.subplots().plot([0, 1], [1, 0])
    grid = grids.grid(torch.rand(6, 1, 28, 28), nrow=3)  # (3, 2 + 2 * 30, 2 + 3 * 30)
    tb = TensorBoardLogger(tmp_path, name="tb", version="")
    loggers = [tb, CSVLogger(tmp_path, name="csv", version="")]
    publish.publish(fig, tmp_path / "fig.png", "t/fig", step=3, loggers=loggers)
    publish.publish(grid, tmp_path / "grid.png", "t/grid", step=4, loggers=loggers)
    tb.experiment.close()
    assert Image.open(tmp_path / "fig.png").size == (200, 100)  # figsize x dpi
    png = torch.from_numpy(np.array(Image.open(tmp_path / "grid.png").convert("RGB")))
    assert torch.equal(png.permute(2, 0, 1), (grid * 255 + 0.5).clamp(0, 255).to(torch.uint8))
    assert not list(tmp_path.glob(".*.part"))  # nothing half-written left beside them
    acc = EventAccumulator(str(tmp_path / "tb"), size_guidance={"images": 0})
    acc.Reload()
    (fig_event,) = acc.Images("t/fig")
    (grid_event,) = acc.Images("t/grid")
    assert (fig_event.step, fig_event.width, fig_event.height) == (3, 200, 100)
    assert (grid_event.step, grid_event.height, grid_event.width) == (4, 62, 92)
