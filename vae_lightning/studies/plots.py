"""vae-report's plots, each a small function of the runs' data (runs.py), written as PNGs:

- ``heatmap_<metric>.png``: a metric over latent_dim × beta, one panel per model and dataset
  that was swept (``HEATMAP_METRICS``); a cell of several runs (seeds) shows their mean, with
  the sample standard deviation and n beneath;
- ``rate_distortion.png``: each VAE run's rate (test/kl) against its distortion (test/recon);
- ``val_curves.png``: the validation loss per epoch of every ok run.

Each is written only when there is data for it (``write_plots``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from vae_lightning.files import atomic_write
from vae_lightning.studies.markdown import format_cell
from vae_lightning.studies.runs import ReportedRun, metric_grid, swept_groups

HEATMAP_METRICS = {
    "test/loss": "test loss (nats per image)",
    "test/recon": "test reconstruction term (nats per image)",
    "test/kl": "test KL term, the rate (nats per image)",
    "test/mse": "test mean squared error per pixel",
    "probe/rf_acc": "RandomForest probe accuracy on the latent code",
    "val/active_units": "active latent units at the last validation",
}


def _save(fig: Figure, path: Path) -> Path:
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    return path


def _label(run: ReportedRun, with_group: bool) -> str:
    beta = "?" if run.beta is None else f"{run.beta:g}"
    label = f"z={run.latent_dim if run.latent_dim is not None else '?'} β={beta}"
    return f"{run.model} {run.dataset} {label}" if with_group else label


def _cell_text(metric: str, mean: float, std: float, n: int) -> str:
    """A heatmap cell: the value of one run; the mean of several, ± their std and n beneath."""
    text = format_cell(metric, float(mean))
    if n > 1:
        text += f"\n± {format_cell(metric, float(std))} (n={n})"
    return text


def _plot_heatmap(
    groups: dict[tuple[str, str], list[ReportedRun]], metric: str, out: Path
) -> Path | None:
    panels = []
    for (model, data), rs in groups.items():
        grid = metric_grid(rs, metric)
        if np.isfinite(grid.mean).any():
            panels.append((f"{model} on {data}", grid))
    if not panels:
        return None
    fig = Figure(figsize=(1.5 + 4.5 * len(panels), 4.2), layout="constrained")
    for ax, (title, grid) in zip(
        fig.subplots(1, len(panels), squeeze=False)[0], panels, strict=True
    ):
        # Masked (no run) cells are not drawn: they stay blank.
        im = ax.imshow(
            np.ma.masked_invalid(grid.mean), origin="lower", aspect="auto", cmap="viridis"
        )
        for (i, j), value in np.ndenumerate(grid.mean):
            if math.isfinite(value):
                color = "black" if im.norm(value) > 0.5 else "white"
                text = _cell_text(metric, value, grid.std[i, j], grid.count[i, j])
                ax.text(j, i, text, ha="center", va="center", fontsize=8, color=color)
        ax.set_xticks(range(len(grid.zs)), [str(z) for z in grid.zs])
        ax.set_yticks(range(len(grid.betas)), [f"{b:g}" for b in grid.betas])
        ax.set_xlabel("latent_dim")
        ax.set_ylabel("beta")
        ax.set_title(title)
        fig.colorbar(im, ax=ax, label=metric)
    fig.suptitle(HEATMAP_METRICS[metric])
    return _save(fig, out / f"heatmap_{metric.replace('/', '_')}.png")


def _plot_rate_distortion(ok: Sequence[ReportedRun], out: Path) -> Path | None:
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize

    def finite(r: ReportedRun, key: str) -> bool:
        return r.metric(key) is not None and math.isfinite(r.metric(key))

    # Only variational runs log test/kl (an AE has no rate).
    runs = [
        r for r in ok if finite(r, "test/kl") and finite(r, "test/recon") and r.beta is not None
    ]
    if not runs:
        return None
    lo, hi = min(r.beta for r in runs), max(r.beta for r in runs)
    norm = Normalize(lo, hi) if hi > lo else Normalize(lo - 0.5, hi + 0.5)
    cmap = "plasma"
    groups = sorted({(r.model or "?", r.dataset or "?") for r in runs})
    fig = Figure(figsize=(7.5, 5.5), layout="constrained")
    ax = fig.subplots()
    for marker, group in zip("osD^v<>ph*", groups, strict=False):
        rs = [r for r in runs if (r.model or "?", r.dataset or "?") == group]
        ax.scatter(
            [r.metric("test/kl") for r in rs],
            [r.metric("test/recon") for r in rs],
            c=[r.beta for r in rs],
            cmap=cmap,
            norm=norm,
            marker=marker,
            s=50,
            edgecolors="black",
            label=f"{group[0]} on {group[1]}",
        )
        for r in rs:
            xy = (r.metric("test/kl"), r.metric("test/recon"))
            ax.annotate(_label(r, False), xy, xytext=(5, 4), textcoords="offset points", fontsize=7)
    ax.set_xlabel("rate: test/kl (nats per image)")
    ax.set_ylabel("distortion: test/recon (nats per image)")
    ax.set_title("rate against distortion on the test set")
    if len(groups) > 1:
        ax.legend(fontsize=8)
    fig.colorbar(ScalarMappable(norm=norm, cmap=cmap), ax=ax, label="beta")
    return _save(fig, out / "rate_distortion.png")


def _plot_val_curves(ok: Sequence[ReportedRun], out: Path) -> Path | None:
    from matplotlib import colormaps
    from matplotlib.ticker import FormatStrFormatter, MaxNLocator

    curves = [(r, points) for r in ok if (points := r.val_curve())]
    if not curves:
        return None
    with_group = len({(r.model, r.dataset) for r, _ in curves}) > 1
    palette = colormaps["tab20"]
    fig = Figure(figsize=(9, 5.5), layout="constrained")
    ax = fig.subplots()
    for k, (r, points) in enumerate(curves):
        xs, ys = zip(*points, strict=True)
        ax.plot(
            xs,
            ys,
            marker="." if len(xs) <= 30 else None,
            color=palette(k % 20),
            label=_label(r, with_group),
        )
    if all(y > 0 for _, points in curves for _, y in points):
        ax.set_yscale("log")
        # plain numbers: losses span well under a decade, where 1.2×10² labels only obscure
        ax.yaxis.set_major_formatter(FormatStrFormatter("%g"))
        ax.yaxis.set_minor_formatter(FormatStrFormatter("%g"))
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("epochs trained")
    ax.set_ylabel("val/loss (nats per image)")
    ax.set_title(f"validation loss of {len(curves)} ok runs")
    ax.grid(alpha=0.3, which="both")
    fig.legend(loc="outside right upper", fontsize=7)
    return _save(fig, out / "val_curves.png")


def write_plots(runs: Sequence[ReportedRun], out: Path) -> list[Path]:
    """The heatmaps, rate-distortion and validation-curve plots of the ok runs that have data."""
    ok = [r for r in runs if r.status == "ok"]
    groups = swept_groups(ok)
    plots = [_plot_heatmap(groups, metric, out) for metric in HEATMAP_METRICS]
    plots += [_plot_rate_distortion(ok, out), _plot_val_curves(ok, out)]
    return [p for p in plots if p is not None]
