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
  when a cell of a grid (model, data, latent_dim, beta) holds several ok runs (seeds), also a
  table of each cell's mean ± sample standard deviation and n;
- ``heatmap_<metric>.png`` (latent_dim × beta, one panel per model and dataset that was swept),
  ``rate_distortion.png`` (VAE runs) and ``val_curves.png``, each only when there is data for it.

This module renders (summary.csv, REPORT.md) and holds the command; reading the run folders
into data is runs.py's, the plots are plots.py's.
"""

from __future__ import annotations

import csv
import logging
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from vae_lightning import config
from vae_lightning.errors import ConfigError, check_path
from vae_lightning.files import atomic_write, atomic_write_text
from vae_lightning.studies.markdown import format_cell, md_cell, md_row
from vae_lightning.studies.plots import HEATMAP_METRICS, write_plots
from vae_lightning.studies.runs import (
    SUMMARY_COLUMNS,
    GridCell,
    ReportedRun,
    Stats,
    collect_runs,
    grid_cells,
    summary_row,
)

log = logging.getLogger(__name__)

LOSS_NOTE = (
    "Losses are in nats per image: recon is the binary cross-entropy summed over the 784 pixels, "
    "kl the KL divergence summed over latent dimensions, both averaged over images, and "
    "loss = recon + kl, the negative ELBO whatever beta (an AE has no kl: its loss is recon); "
    "the VAEs optimise recon + beta * kl. mse is the mean squared "
    "error per pixel; accuracies are the latent probes' on the test set."
)
NO_RUNS_HINT = "train with `make train` or `make sweep` first"
CELLS_NOTE = (
    "Each cell of a grid over its ok runs, here its seeds: the mean ± the sample standard "
    "deviation (ddof=1: n − 1 in the denominator); n is the number of runs, and a value taken "
    "from fewer of them says so. The heatmaps show the means."
)


def _write_summary_csv(rows: list[dict[str, Any]], path: Path) -> None:
    def write(tmp: Path) -> None:
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=SUMMARY_COLUMNS)
            writer.writeheader()
            for row in rows:
                writer.writerow({k: "" if v is None else v for k, v in row.items()})

    atomic_write(path, write)


def _plot_note(name: str, replicated: bool = False) -> str:
    if name.startswith("heatmap_"):
        metric = next(m for m in HEATMAP_METRICS if name == f"heatmap_{m.replace('/', '_')}.png")
        several = (
            "a cell of several runs: their mean, ± their sample standard deviation (n=…)."
            if replicated
            else "(n=…): the mean of n runs."
        )
        return (
            f"{HEATMAP_METRICS[metric]} over latent_dim (x) × beta (y), one panel per swept model "
            f"and dataset; blank cell: no ok run; {several}"
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


def _count_line(runs: Sequence[ReportedRun]) -> str:
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
            k: md_cell(format_cell(k, v), limit=80 if k == "error" else None)
            for k, v in row.items()
        }
        cells["run"] = f"`{cells['run']}`"  # folder names hold `_` and `*`, markdown emphasis
        lines.append(md_row(*cells.values()))
    return lines


def _failed_section(runs: Sequence[ReportedRun], rows: Sequence[dict[str, Any]]) -> list[str]:
    stopped = ("failed", "killed", "unreadable")
    failed = [(r, row) for r, row in zip(runs, rows, strict=True) if r.status in stopped]
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


def _plots_section(plots: Sequence[Path], replicated: bool) -> list[str]:
    if not plots:
        return []
    notes = (f"- [{p.name}]({p.name}): {_plot_note(p.name, replicated)}" for p in plots)
    return ["", "## Plots", "", *notes]


def _stats_cell(metric: str, stats: Stats, runs: int) -> str:
    """``mean ± std``, the one value of a single run, or "—"; ``(n=k)`` when k < ``runs``."""
    if stats.n == 0:
        return "—"
    text = format_cell(metric, stats.mean)
    if stats.n > 1:
        text += f" ± {format_cell(metric, stats.std)}"
    return text + (f" (n={stats.n})" if stats.n < runs else "")


def _cells_section(cells: Sequence[GridCell]) -> list[str]:
    """Each grid cell's mean ± std over its runs, when a cell holds several (else nothing)."""
    if not any(c.runs > 1 for c in cells):
        return []
    columns = ("model", "data", "latent_dim", "beta", "n", "seeds", *HEATMAP_METRICS)
    lines = ["", "## Mean ± std over seeds", "", CELLS_NOTE, "", md_row(*columns)]
    lines.append("|" + "|".join("---" for _ in columns) + "|")
    for c in cells:
        seeds = ", ".join("?" if seed is None else str(seed) for seed in c.seeds)
        stats = (_stats_cell(m, c.stats[m], c.runs) for m in HEATMAP_METRICS)
        lines.append(md_row(md_cell(c.model), md_cell(c.data), c.latent_dim,
                            format_cell("beta", c.beta), c.runs, seeds, *stats))  # fmt: skip
    return lines


def render_report(
    root: Path,
    runs: Sequence[ReportedRun],
    rows: Sequence[dict[str, Any]],
    plots: Sequence[Path],
    cells: Sequence[GridCell] = (),
) -> str:
    """REPORT.md's text: counts, the cells' mean ± std when a cell holds several runs, the runs
    table, the failed runs, the plots."""
    lines = [
        "# VAE experiment report",
        "",
        f"Root: `{root.resolve()}`",
        "",
        _count_line(runs),
        "",
        LOSS_NOTE,
        *_cells_section(cells),
        "",
        "## Runs",
        "",
        *_runs_table(rows),
        *_failed_section(runs, rows),
        *_plots_section(plots, any(c.runs > 1 for c in cells)),
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
    cells = grid_cells([r for r in runs if r.status == "ok"], list(HEATMAP_METRICS))
    report = out / "REPORT.md"
    atomic_write_text(report, render_report(root, runs, rows, plots, cells))
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
