"""Figures, as plain functions: the latent space in 2-D, the probe's confusion matrix, the KL per
latent dimension. Made without pyplot (no global state, no display)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch


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
