"""Image grids of what a model does, as plain functions: reconstructions, samples,
interpolations, traversals, and a conditional model's views. Used by the callbacks during
training and by ``vae-evaluate`` on a checkpoint, so both draw the same pictures.

Grids take float images in [0, 1] on the model's device and return a (3, H, W) CPU tensor.
"""

from __future__ import annotations

from typing import Any

import torch

from vae_lightning.models import eval_mode
from vae_lightning.models.losses import gaussian_kl


def grid(images: torch.Tensor, nrow: int) -> torch.Tensor:
    """(N, C, H, W) in [0, 1] -> one (3, H', W') image, 2 px white padding."""
    from torchvision.utils import make_grid

    return make_grid(images.float().cpu().clamp(0, 1), nrow=nrow, padding=2, pad_value=1.0)


def contrasting_pairs(
    labels: torch.Tensor, n_pairs: int, generator: torch.Generator
) -> list[tuple[int, int]]:
    """Up to ``n_pairs`` disjoint index pairs (i, j) with different labels, in the generator's
    random order: the ends of ``interpolation_grid``'s rows."""
    order = torch.randperm(len(labels), generator=generator).tolist()
    pairs, used = [], set()
    for i in order:
        if i in used:
            continue
        j = next((j for j in order if j not in used and j != i and labels[j] != labels[i]), None)
        if j is None:
            break
        pairs.append((i, j))
        used |= {i, j}
        if len(pairs) == n_pairs:
            break
    return pairs


def reconstruction_grid(model: Any, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
    """Images (top row) above their reconstructions ``decode(embed(x))`` (mu for a VAE: the
    mean reconstruction); ``y`` the labels a conditional model needs."""
    with eval_mode(model):
        x_hat = model.decode(model.embed(x, y), y)
    return grid(torch.cat([x, x_hat]), nrow=len(x))


def sample_grid(model: Any, n: int, nrow: int, generator: torch.Generator) -> torch.Tensor:
    """``model.sample(n)`` from the generator's noise: the same noise gives the same grid."""
    with eval_mode(model):
        return grid(model.sample(n, generator=generator), nrow=nrow)


def interpolation_grid(
    model: Any,
    a: torch.Tensor,
    b: torch.Tensor,
    steps: int,
    labels: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """One row per pair (a_i, b_i): a_i, ``steps`` decodings of (1 - t) z_a + t z_b, b_i. A
    conditional model gets ``labels`` (y_a, y_b) and decodes with (1 - t) y_a + t y_b."""
    ya, yb = labels if labels is not None else (None, None)
    with eval_mode(model):
        za, zb = model.embed(a, ya), model.embed(b, yb)  # (P, D)
        t = torch.linspace(0, 1, steps, device=za.device).view(1, -1, 1)  # (1, S, 1)
        z = (1 - t) * za.unsqueeze(1) + t * zb.unsqueeze(1)  # (P, S, D)
        y = None
        if model.conditional:  # the one-hot labels interpolated alongside z: (P * S, K)
            ha, hb = model.one_hot(ya, za).unsqueeze(1), model.one_hot(yb, zb).unsqueeze(1)
            y = ((1 - t) * ha + t * hb).flatten(0, 1)
        decoded = model.decode(z.flatten(0, 1), y).view(len(a), steps, *a.shape[1:])
    rows = torch.cat([a.unsqueeze(1), decoded, b.unsqueeze(1)], dim=1)  # (P, S + 2, C, H, W)
    return grid(rows.flatten(0, 1), nrow=steps + 2)


def traversal_grid(
    model: Any,
    x: torch.Tensor,
    steps: int,
    span: float,
    max_dims: int | None = None,
    y: torch.Tensor | None = None,
) -> torch.Tensor:
    """Each latent dimension of a VAE, ordered by its mean KL over ``x`` (largest first), swept
    over mu_d + [-span, span] around the posterior mean of ``x[0]``; one row per dimension (a
    conditional model decodes them all with ``x[0]``'s label)."""
    with eval_mode(model):
        mu, logvar = model.encode(x, y)
        order = gaussian_kl(mu, logvar).mean(0).argsort(descending=True)  # dims by KL
        if max_dims is not None:
            order = order[:max_dims]
        base = mu[0]  # (D,) the posterior mean of one fixed test image
        offsets = torch.linspace(-span, span, steps, device=mu.device)
        z = base.repeat(len(order), steps, 1)  # (K, S, D)
        for row, d in enumerate(order.tolist()):
            z[row, :, d] = base[d] + offsets
        z = z.flatten(0, 1)
        decoded = model.decode(z, None if y is None else y[:1].expand(len(z)))
    return grid(decoded, nrow=steps)


def class_sample_grid(model: Any, n_styles: int, generator: torch.Generator) -> torch.Tensor:
    """A conditional model's samples: one row per class, the same z in each column, so that a
    column shows one "style" across the classes."""
    with eval_mode(model):
        k = model.hparams.num_classes
        z = torch.randn(n_styles, model.latent_dim, generator=generator, device=model.device)
        y = torch.arange(k, device=z.device).repeat_interleave(n_styles)  # (K * S,)
        decoded = model.decode(z.repeat(k, 1), y)
    return grid(decoded, nrow=n_styles)


def relabel_grid(model: Any, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """A conditional model's "same image, every label": one row per image (its posterior mean
    under its own label), the image first, then its decoding with each label in turn."""
    with eval_mode(model):
        k = model.hparams.num_classes
        mu = model.embed(x, y)  # (N, D)
        labels = torch.arange(k, device=mu.device).repeat(len(x))  # (N * K,)
        decoded = model.decode(mu.repeat_interleave(k, dim=0), labels)
    rows = torch.cat([x.unsqueeze(1), decoded.view(len(x), k, *x.shape[1:])], dim=1)
    return grid(rows.flatten(0, 1), nrow=k + 1)
