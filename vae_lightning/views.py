"""What a researcher looks at, as plain functions: image grids, figures, and one way to publish
either (a PNG file and, when given writers, TensorBoard). Used by the callbacks during training
and by ``vae-evaluate`` on a checkpoint, so both draw the same pictures.

Grids take float images in [0, 1] on the model's device and return a (3, H, W) CPU tensor;
figures are matplotlib Figures made without pyplot (no global state, no display).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vae_lightning.files import atomic_write
from vae_lightning.losses import gaussian_kl


@contextlib.contextmanager
def eval_mode(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """The model in eval mode without gradients for the block; its mode restored after."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield model
    finally:
        model.train(was_training)


def grid(images: torch.Tensor, nrow: int) -> torch.Tensor:
    """(N, C, H, W) in [0, 1] -> one (3, H', W') image, 2 px white padding."""
    from torchvision.utils import make_grid

    return make_grid(images.float().cpu().clamp(0, 1), nrow=nrow, padding=2, pad_value=1.0)


# --- image grids ----------------------------------------------------------------------------------


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


# --- figures ------------------------------------------------------------------------------------


def latent_2d(
    feats: np.ndarray,
    labels: np.ndarray,
    method: str = "pca",
    max_points: int = 2000,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray, str]:
    """(N, D) embeddings -> (M, 2) points, their labels, and how they were made: the two axes
    when D is 2, else PCA of all points or t-SNE (``method="tsne"``) of ``max_points`` of them
    chosen by ``seed``."""
    if feats.shape[1] == 2:
        return feats, labels, "latent axes"
    if method == "tsne":
        from sklearn.manifold import TSNE

        generator = torch.Generator().manual_seed(seed)
        idx = torch.randperm(len(feats), generator=generator)[:max_points].numpy()
        xy = TSNE(random_state=seed, init="pca").fit_transform(feats[idx])
        return xy, labels[idx], f"t-SNE of {len(idx)} points"
    from sklearn.decomposition import PCA

    pca = PCA(n_components=2, random_state=seed).fit(feats)
    how = f"PCA ({pca.explained_variance_ratio_.sum():.0%} of variance)"
    return pca.transform(feats), labels, how


def latent_scatter(xy: np.ndarray, labels: np.ndarray, classes: Sequence[str], title: str) -> Any:
    """2-D points coloured by class, one legend entry per class."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 5))
    ax = fig.subplots()
    for c, name in enumerate(classes):
        m = labels == c
        ax.scatter(xy[m, 0], xy[m, 1], s=3, alpha=0.6, label=name, color=f"C{c}")
    ax.set_title(title)
    ax.legend(markerscale=4, fontsize=7, loc="best")
    fig.tight_layout()
    return fig


def confusion_figure(confusion: np.ndarray, classes: Sequence[str], accuracy: float) -> Any:
    """The RandomForest probe's confusion matrix (rows: true class)."""
    from matplotlib.figure import Figure
    from sklearn.metrics import ConfusionMatrixDisplay

    fig = Figure(figsize=(7, 6))
    ax = fig.subplots()
    ConfusionMatrixDisplay(confusion, display_labels=list(classes)).plot(
        ax=ax, colorbar=False, xticks_rotation=45, values_format="d"
    )
    n = int(confusion.sum())
    ax.set_title(f"RandomForest on the latent code: accuracy {accuracy:.2%} (n={n})")
    fig.tight_layout()
    return fig


def kl_bars(kl_per_dim: Sequence[float], mu_variance: Sequence[float], threshold: float) -> Any:
    """KL per latent dimension, largest first; inactive dimensions (Var_x mu <= threshold) grey."""
    from matplotlib.figure import Figure

    kl, var = np.asarray(kl_per_dim), np.asarray(mu_variance)
    order = np.argsort(kl)[::-1]
    active = var[order] > threshold
    fig = Figure(figsize=(7, 3))
    ax = fig.subplots()
    ax.bar(range(len(order)), kl[order], color=np.where(active, "C0", "C7"))
    ax.set_xticks(range(len(order)), [str(d) for d in order], fontsize=6)
    ax.set_xlabel("latent dimension (by KL); grey: inactive")
    ax.set_ylabel("KL (nats)")
    ax.set_title(f"KL per dimension, {int(active.sum())} of {len(order)} active")
    fig.tight_layout()
    return fig


# --- publishing ---------------------------------------------------------------------------------


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
