"""The image grids as plain functions (views.grids): a conditional model's two views."""

from __future__ import annotations

import pytest
import torch

from vae_lightning.models import CVAE
from vae_lightning.views import grids


@pytest.fixture(params=["mlp", "conv"])
def cvae(request) -> CVAE:
    torch.manual_seed(0)
    return CVAE(arch=request.param, latent_dim=6).eval()


def test_the_class_grid_shares_z_along_columns_and_the_relabel_grid_decodes_every_label(cvae):
    grid = grids.class_sample_grid(cvae, 3, torch.Generator().manual_seed(1))
    z = torch.randn(3, 6, generator=torch.Generator().manual_seed(1))
    expected = cvae.decode(z.repeat(10, 1), torch.arange(10).repeat_interleave(3))
    torch.testing.assert_close(grid, grids.grid(expected, nrow=3))
    x, y = torch.rand(2, 1, 28, 28), torch.tensor([4, 7])
    mu = cvae.embed(x, y)
    rows = [torch.cat([x[i : i + 1], cvae.decode(mu[i].repeat(10, 1), torch.arange(10))])
            for i in range(2)]  # fmt: skip
    torch.testing.assert_close(grids.relabel_grid(cvae, x, y), grids.grid(torch.cat(rows), nrow=11))
