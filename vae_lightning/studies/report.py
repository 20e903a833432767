"""Aggregate run folders into one report: ``vae-report dir=DIR [out=OUT]`` (conf/report.yaml).

A run folder is any folder below DIR (DIR itself included, ``.hydra`` folders excluded) that
holds a ``metrics.json``: single runs (``DIR/runs/<timestamp>/``) and multirun jobs
(``DIR/<job num>_<overrides>/``) alike. From each, only the files train.py writes for this
purpose are read, never TensorBoard internals:

- ``metrics.json``: status, error, final metrics, key hyper-parameters, timings;
- ``history.csv``: per-epoch metrics (for the validation curves);
- ``.hydra/overrides.yaml``: the command-line overrides (shown for failed runs).

A failed run (even one without metrics or hyper-parameters) and a ``metrics.json`` that is not
valid JSON are listed, never skipped and never fatal. Written to OUT (default DIR):

- ``summary.csv``: one row per run, raw values, empty cells where a value is absent;
- ``REPORT.md``: counts, a formatted table, the failed runs with their errors, links to the plots;
- ``heatmap_<metric>.png`` (latent_dim × beta, one panel per model and dataset that was swept),
  ``rate_distortion.png`` (VAE runs) and ``val_curves.png``, each only when there is data for it.

Longer than ~450 lines on purpose: the readers, the table and the four plots of one report; the
readers and formatters are the ones reproduce.py uses too.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from matplotlib.figure import Figure
from omegaconf import DictConfig

from vae_lightning import config
from vae_lightning.errors import ConfigError, check_path
from vae_lightning.files import atomic_write, atomic_write_text

log = logging.getLogger(__name__)

SUMMARY_COLUMNS = (
    "run",
    "status",
    "model",
    "data",
    "latent_dim",
    "beta",
    "epochs",
    "test/loss",
    "test/recon",
    "test/kl",
    "test/mse",
    "val/loss_best",
    "probe/rf_acc",
    "probe/logreg_acc",
    "probe/knn_acc",
    "val/active_units",
    "test/usage",  # a VQ-VAE's share of codes used, and their perplexity (per test batch)
    "test/perplexity",
    "time/fit_s",
    "error",
)
HEATMAP_METRICS = {
    "test/loss": "test loss (nats per image)",
    "test/recon": "test reconstruction term (nats per image)",
    "test/kl": "test KL term, the rate (nats per image)",
    "test/mse": "test mean squared error per pixel",
    "probe/rf_acc": "RandomForest probe accuracy on the latent code",
    "val/active_units": "active latent units at the last validation",
}
TIMING_KEYS = ("time/fit_s", "time/epoch_s_median", "time/total_s")
LOSS_NOTE = (
    "Losses are in nats per image: recon is the binary cross-entropy summed over the 784 pixels, "
    "kl the KL divergence summed over latent dimensions, both averaged over images, and "
    "loss = recon + kl, the negative ELBO whatever beta (an AE has no kl: its loss is recon); "
    "the VAEs optimise recon + beta * kl. mse is the mean squared "
    "error per pixel; accuracies are the latent probes' on the test set."
)
NO_RUNS_HINT = "train with `make train` or `make sweep` first"


def _number(value: Any) -> float | None:
    """A JSON number as float (NaN kept: a diverged run says so), else None."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value)


@dataclass
class RunRecord:
    """What one run folder says about its run; absent values are None or empty."""

    path: Path
    status: str  # "ok", "failed", "running" (as train.py writes it), or "unreadable"
    error: str | None = None
    hparams: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    history: list[dict[str, float]] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    epochs: int | None = None
    overrides: list[str] = field(default_factory=list)

    @property
    def model(self) -> str | None:
        value = self.hparams.get("model")
        return value if isinstance(value, str) else None

    @property
    def data(self) -> str | None:
        value = self.hparams.get("data")
        return value if isinstance(value, str) else None

    @property
    def latent_dim(self) -> int | None:
        value = _number(self.hparams.get("latent_dim"))
        return int(value) if value is not None and value.is_integer() else None

    @property
    def beta(self) -> float | None:
        value = _number(self.hparams.get("beta"))
        return value if value is not None and math.isfinite(value) else None

    def metric(self, key: str) -> float | None:
        return self.metrics.get(key)


# --- reading ------------------------------------------------------------------------------------


def _find_run_folders(root: Path) -> Iterable[Path]:
    for folder, subdirs, files in os.walk(root):
        # Hydra's own folder holds configs, never a run (and must not be mistaken for one).
        subdirs[:] = sorted(d for d in subdirs if d != ".hydra")
        if "metrics.json" in files:
            yield Path(folder)


def read_history(path: Path) -> list[dict[str, float]]:
    """history.csv's rows, every cell a float (NaN where a column was empty); [] when absent."""

    def cell(text: str | None) -> float:
        try:
            return float(text)  # "nan" parses; "" (a column this epoch lacked) does not
        except (TypeError, ValueError):
            return math.nan

    if not path.is_file():
        return []
    try:
        with open(path, newline="") as f:
            return [{k: cell(v) for k, v in row.items() if k} for row in csv.DictReader(f)]
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        log.warning("%s is unreadable (%s): no curve for this run", path, err)
        return []


def _read_overrides(path: Path) -> list[str]:
    try:
        overrides = yaml.safe_load(path.read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return []
    return [str(o) for o in overrides] if isinstance(overrides, list) else []


def _read_run(folder: Path) -> RunRecord:
    history = read_history(folder / "history.csv")
    overrides = _read_overrides(folder / ".hydra" / "overrides.yaml")
    try:
        payload = json.loads((folder / "metrics.json").read_text())
    except OSError as err:
        error = f"metrics.json could not be read: {err}"
        return RunRecord(folder, "unreadable", error, history=history, overrides=overrides)
    except ValueError as err:  # JSONDecodeError and UnicodeDecodeError both are
        error = f"metrics.json is not valid JSON: {err}"
        return RunRecord(folder, "unreadable", error, history=history, overrides=overrides)
    if not isinstance(payload, dict):
        error = f"metrics.json holds a {type(payload).__name__}, not an object"
        return RunRecord(folder, "unreadable", error, history=history, overrides=overrides)

    def mapping(key: str) -> dict[str, Any]:
        value = payload.get(key)
        return value if isinstance(value, dict) else {}

    metrics = {k: x for k, v in mapping("metrics").items() if (x := _number(v)) is not None}
    timings = {k: x for k in TIMING_KEYS if (x := _number(payload.get(k))) is not None}
    epochs = payload.get("epochs")
    status, error = payload.get("status"), payload.get("error")
    return RunRecord(
        path=folder,
        status=status if isinstance(status, str) else "unknown",
        error=None if error is None else str(error),
        hparams=mapping("hparams"),
        metrics=metrics,
        history=history,
        timings=timings,
        epochs=epochs if isinstance(epochs, int) and not isinstance(epochs, bool) else None,
        overrides=overrides,
    )


def _sort_key(run: RunRecord) -> tuple:
    # Missing values sort last, so failed runs without hyper-parameters end the table.
    m, d, z, b = run.model, run.data, run.latent_dim, run.beta
    return (
        m is None,
        m or "",
        d is None,
        d or "",
        z is None,
        z or 0,
        b is None,
        b or 0.0,
        str(run.path),
    )


def collect_runs(root: Path) -> list[RunRecord]:
    """Every run folder below ``root``, sorted by (model, data, latent_dim, beta, path)."""
    return sorted((_read_run(f) for f in _find_run_folders(Path(root))), key=_sort_key)


# --- tables -------------------------------------------------------------------------------------


def _relative(path: Path, root: Path) -> str:
    try:
        return path.relative_to(root).as_posix() or "."
    except ValueError:
        return str(path)


def summary_row(run: RunRecord, root: Path) -> dict[str, Any]:
    """One summary.csv row of raw values (None where absent)."""
    row: dict[str, Any] = {
        "run": _relative(run.path, root),
        "status": run.status,
        "model": run.model,
        "data": run.data,
        "latent_dim": run.latent_dim,
        "beta": run.beta,
        "epochs": run.epochs,
        "time/fit_s": run.timings.get("time/fit_s"),
        "error": run.error,
    }
    for key in SUMMARY_COLUMNS:
        if key not in row:
            row[key] = run.metric(key)
    return {key: row[key] for key in SUMMARY_COLUMNS}


def _format(column: str, value: Any) -> str:
    """A value as REPORT.md shows it: "—" when absent, units by column."""
    if value is None:
        return "—"
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if column.endswith("_acc"):
            return f"{100 * value:.2f}%"
        if column.endswith("mse"):
            return f"{value:.4f}"
        if column.startswith("time/"):
            return f"{value:.1f}"
        if column in ("beta", "val/active_units"):
            return f"{value:g}"
        return f"{value:.2f}"  # losses, nats per image
    return str(value)


def fmt(value: Any, digits: int = 2) -> str:
    """A number with ``digits`` decimals; "—" when absent (None or NaN)."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    return f"{value:.{digits}f}"


def pct(value: Any) -> str:
    """A fraction as a percentage with two decimals ("84.01 %"); "—" when absent."""
    return "—" if value is None else f"{100 * value:.2f} %"


def md_row(*cells: Any) -> str:
    """One markdown table row of the cells as given."""
    return "| " + " | ".join(str(c) for c in cells) + " |"


def _md_cell(text: str, limit: int | None = None) -> str:
    text = " ".join(text.split())  # a table row is one line
    if limit is not None and len(text) > limit:
        text = text[: limit - 1] + "…"
    return text.replace("|", "\\|")


def _write_summary_csv(rows: list[dict[str, Any]], path: Path) -> None:
    def write(tmp: Path) -> None:
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=SUMMARY_COLUMNS)
            writer.writeheader()
            for row in rows:
                writer.writerow({k: "" if v is None else v for k, v in row.items()})

    atomic_write(path, write)


# --- plots --------------------------------------------------------------------------------------


def _save(fig: Figure, path: Path) -> Path:
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    return path


def _label(run: RunRecord, with_group: bool) -> str:
    beta = "?" if run.beta is None else f"{run.beta:g}"
    label = f"z={run.latent_dim if run.latent_dim is not None else '?'} β={beta}"
    return f"{run.model} {run.data} {label}" if with_group else label


def metric_grid(
    runs: Sequence[RunRecord], metric: str
) -> tuple[list[int], list[float], np.ndarray, np.ndarray]:
    """``metric`` over latent_dim (columns) × beta (rows) for runs with both set.

    Returns the sorted latent_dims, the sorted betas, the values (mean over the runs of a cell,
    NaN where no run has a finite value) and the number of runs averaged per cell.
    """
    runs = [r for r in runs if r.latent_dim is not None and r.beta is not None]
    zs = sorted({r.latent_dim for r in runs})
    betas = sorted({r.beta for r in runs})
    total = np.zeros((len(betas), len(zs)))
    count = np.zeros((len(betas), len(zs)), dtype=int)
    for r in runs:
        value = r.metric(metric)
        if value is not None and math.isfinite(value):
            i, j = betas.index(r.beta), zs.index(r.latent_dim)
            total[i, j] += value
            count[i, j] += 1
    values = np.where(count > 0, total / np.maximum(count, 1), np.nan)
    return zs, betas, values, count


def _swept_groups(ok: Sequence[RunRecord]) -> dict[tuple[str, str], list[RunRecord]]:
    """(model, data) groups with at least 2 latent_dims or 2 betas: a heatmap says something."""
    groups: dict[tuple[str, str], list[RunRecord]] = {}
    for r in ok:
        if r.model and r.data and r.latent_dim is not None and r.beta is not None:
            groups.setdefault((r.model, r.data), []).append(r)
    return {
        key: rs
        for key, rs in sorted(groups.items())
        if len({r.latent_dim for r in rs}) >= 2 or len({r.beta for r in rs}) >= 2
    }


def _plot_heatmap(
    groups: dict[tuple[str, str], list[RunRecord]], metric: str, out: Path
) -> Path | None:
    panels = []
    for (model, data), rs in groups.items():
        grid = metric_grid(rs, metric)
        if np.isfinite(grid[2]).any():
            panels.append((f"{model} on {data}", *grid))
    if not panels:
        return None
    fig = Figure(figsize=(1.5 + 4.5 * len(panels), 4.2), layout="constrained")
    for ax, (title, zs, betas, values, count) in zip(
        fig.subplots(1, len(panels), squeeze=False)[0], panels, strict=True
    ):
        # Masked (no run) cells are not drawn: they stay blank.
        im = ax.imshow(np.ma.masked_invalid(values), origin="lower", aspect="auto", cmap="viridis")
        for (i, j), value in np.ndenumerate(values):
            if math.isfinite(value):
                text = _format(metric, float(value)) + (
                    f"\n(n={count[i, j]})" if count[i, j] > 1 else ""
                )
                color = "black" if im.norm(value) > 0.5 else "white"
                ax.text(j, i, text, ha="center", va="center", fontsize=8, color=color)
        ax.set_xticks(range(len(zs)), [str(z) for z in zs])
        ax.set_yticks(range(len(betas)), [f"{b:g}" for b in betas])
        ax.set_xlabel("latent_dim")
        ax.set_ylabel("beta")
        ax.set_title(title)
        fig.colorbar(im, ax=ax, label=metric)
    fig.suptitle(HEATMAP_METRICS[metric])
    return _save(fig, out / f"heatmap_{metric.replace('/', '_')}.png")


def _plot_rate_distortion(ok: Sequence[RunRecord], out: Path) -> Path | None:
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize

    def finite(r: RunRecord, key: str) -> bool:
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
    groups = sorted({(r.model or "?", r.data or "?") for r in runs})
    fig = Figure(figsize=(7.5, 5.5), layout="constrained")
    ax = fig.subplots()
    for marker, group in zip("osD^v<>ph*", groups, strict=False):
        rs = [r for r in runs if (r.model or "?", r.data or "?") == group]
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


def _plot_val_curves(ok: Sequence[RunRecord], out: Path) -> Path | None:
    from matplotlib import colormaps
    from matplotlib.ticker import FormatStrFormatter, MaxNLocator

    curves = []
    for r in ok:
        points = [
            (row.get("epoch", i) + 1, row["val/loss"])  # epoch is 0-based: plot epochs done
            for i, row in enumerate(r.history)
            if math.isfinite(row.get("val/loss", math.nan))
        ]
        if points:
            curves.append((r, points))
    if not curves:
        return None
    with_group = len({(r.model, r.data) for r, _ in curves}) > 1
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


# --- the report ---------------------------------------------------------------------------------


def _plot_note(name: str) -> str:
    if name.startswith("heatmap_"):
        metric = next(m for m in HEATMAP_METRICS if name == f"heatmap_{m.replace('/', '_')}.png")
        return (
            f"{HEATMAP_METRICS[metric]} over latent_dim (x) × beta (y), one panel per swept model "
            "and dataset; blank cell: no ok run; (n=…): the mean of n runs."
        )
    if name == "rate_distortion.png":
        return (
            "each ok VAE run's rate (test/kl) against its distortion (test/recon), coloured by "
            "beta; the lower-left envelope is the trade-off the sweep reached."
        )
    return (
        "val/loss per epoch (from history.csv) of every ok run, overlaid; the y axis is "
        "logarithmic when every value is positive."
    )


def _no_runs_message(root: Path) -> str:
    return f"no run folder (a folder with metrics.json) below {root}; {NO_RUNS_HINT}"


def write_plots(runs: Sequence[RunRecord], out: Path) -> list[Path]:
    """The heatmaps, rate-distortion and validation-curve plots of the ok runs that have data."""
    ok = [r for r in runs if r.status == "ok"]
    groups = _swept_groups(ok)
    plots = [_plot_heatmap(groups, metric, out) for metric in HEATMAP_METRICS]
    plots += [_plot_rate_distortion(ok, out), _plot_val_curves(ok, out)]
    return [p for p in plots if p is not None]


def _count_line(runs: Sequence[RunRecord]) -> str:
    counts = Counter(r.status for r in runs)
    count_line = ", ".join(
        [f"{counts.pop('ok', 0)} ok", f"{counts.pop('failed', 0)} failed"]
        + [f"{n} {status}" for status, n in sorted(counts.items())]
    )
    return f"{len(runs)} runs: {count_line}."


def _runs_table(rows: Sequence[dict[str, Any]]) -> list[str]:
    lines = [md_row(*SUMMARY_COLUMNS), "|" + "|".join("---" for _ in SUMMARY_COLUMNS) + "|"]
    for row in rows:
        cells = {
            k: _md_cell(_format(k, v), limit=80 if k == "error" else None) for k, v in row.items()
        }
        cells["run"] = f"`{cells['run']}`"  # folder names hold `_` and `*`, markdown emphasis
        lines.append(md_row(*cells.values()))
    return lines


def _failed_section(runs: Sequence[RunRecord], rows: Sequence[dict[str, Any]]) -> list[str]:
    failed = [
        (r, row) for r, row in zip(runs, rows, strict=True) if r.status in ("failed", "unreadable")
    ]
    if not failed:
        return []
    lines = ["", "## Failed runs", ""]
    for r, row in failed:
        overrides = ", ".join(f"`{o}`" for o in r.overrides) or "none"
        lines += [
            f"- `{row['run']}` ({r.status}; overrides: {overrides})",
            "",
            "  ```text",
            *(f"  {line}" for line in (r.error or "(no error recorded)").splitlines()),
            "  ```",
        ]
    return lines


def _plots_section(plots: Sequence[Path]) -> list[str]:
    if not plots:
        return []
    return ["", "## Plots", "", *(f"- [{p.name}]({p.name}): {_plot_note(p.name)}" for p in plots)]


def render_report(
    root: Path, runs: Sequence[RunRecord], rows: Sequence[dict[str, Any]], plots: Sequence[Path]
) -> str:
    """REPORT.md's text: counts, the runs table, the failed runs, the plots."""
    lines = [
        "# VAE experiment report",
        "",
        f"Root: `{root.resolve()}`",
        "",
        _count_line(runs),
        "",
        LOSS_NOTE,
        "",
        "## Runs",
        "",
        *_runs_table(rows),
        *_failed_section(runs, rows),
        *_plots_section(plots),
    ]
    return "\n".join(lines) + "\n"


def write_report(root: Path, out_dir: Path | None = None) -> Path:
    """Write summary.csv, REPORT.md and the plots for every run below ``root``.

    Raises:
        FileNotFoundError: ``root`` is not a folder, or holds no run folder.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root} is not a folder; {NO_RUNS_HINT}")
    runs = collect_runs(root)
    if not runs:
        raise FileNotFoundError(_no_runs_message(root))
    out = Path(out_dir) if out_dir is not None else root
    out.mkdir(parents=True, exist_ok=True)
    rows = [summary_row(r, root) for r in runs]
    _write_summary_csv(rows, out / "summary.csv")
    plots = write_plots(runs, out)
    report = out / "REPORT.md"
    atomic_write_text(report, render_report(root, runs, rows, plots))
    return report


@config.tool_main("report", doc=__doc__)
def main(cfg: DictConfig) -> None:
    """vae-report dir=DIR [out=OUT]: aggregate every run folder below DIR (folders with
    metrics.json) into REPORT.md, summary.csv and plots, written to OUT (default DIR)."""
    if cfg.dir is None or cfg.dir == "":
        raise ConfigError(
            "dir", "is required: a folder holding run folders, e.g. vae-report dir=outputs/<task>"
        )
    hint = f"expected a folder holding run folders (folders with metrics.json); {NO_RUNS_HINT}"
    root = check_path("dir", cfg.dir, "folder", hint, must_exist=True)
    out = None
    if cfg.out is not None:
        out = check_path(
            "out", cfg.out, "folder", "give the folder for REPORT.md, summary.csv and the plots "
            "(created when missing), or out=null to write into dir",
        )  # fmt: skip
    try:
        report = write_report(root, out)
    except OSError as err:
        if err.errno is None:  # write_report's own: no run folder below root
            raise ConfigError("dir", f"holds {err}") from None
        raise ConfigError(  # creating or writing the output folder
            "out" if out else "dir",
            f"{out or root} cannot be written ({err.strerror or err}): give out= a folder you "
            "can write to",
        ) from None
    log.info("report written: %s", report)


if __name__ == "__main__":
    raise SystemExit(main())
