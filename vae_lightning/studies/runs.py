"""Run folders as plain data for the studies' reports (report.py renders, plots.py draws them).

A run folder is any folder below a root (the root itself included, ``.hydra`` folders excluded)
that holds a ``metrics.json``: single runs (``DIR/runs/<timestamp>/``) and multirun jobs
(``DIR/<job num>_<overrides>/``) alike. From each, only the files train.py writes for this
purpose are read, never TensorBoard internals:

- ``metrics.json`` through the run floor's ``RunRecord``: status, error, final metrics, key
  hyper-parameters, timings;
- ``history.csv``: per-epoch metrics (for the validation curves);
- ``.hydra/overrides.yaml``: the command-line overrides (shown for failed runs).

``collect_runs`` reads every run folder into a ``ReportedRun`` (a failed run, even one without
metrics or hyper-parameters, and a ``metrics.json`` that is not valid JSON included, never
fatal); ``summary_row`` is one row of summary.csv, ``metric_grid`` and ``swept_groups`` the
heatmaps' cells, ``grid_cells`` the cells' mean ± std over their runs (their seeds).
``Result`` is a run that reproduce, claims and zoo trained and evaluated (its record,
``eval.json`` and history).
"""

from __future__ import annotations

import csv
import logging
import math
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from vae_lightning.run.record import RunRecord, json_number

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


@dataclass
class ReportedRun:
    """One run folder as the report reads it: its record (None when metrics.json cannot be
    read, with why in ``unreadable``), its history.csv rows and its command-line overrides.
    Absent values are None or empty."""

    path: Path
    record: RunRecord | None
    history: list[dict[str, float]] = field(default_factory=list)
    overrides: list[str] = field(default_factory=list)
    unreadable: str | None = None

    @property
    def status(self) -> str:
        """As train.py writes it ("ok", "failed", "running", ...), or "unreadable"."""
        return "unreadable" if self.record is None else self.record.status

    @property
    def error(self) -> str | None:
        return self.unreadable if self.record is None else self.record.error

    @property
    def hparams(self) -> dict[str, Any]:
        return {} if self.record is None else self.record.hparams

    @property
    def metrics(self) -> dict[str, float]:
        return {} if self.record is None else self.record.metrics

    @property
    def timings(self) -> dict[str, float]:
        return {} if self.record is None else self.record.timings

    @property
    def epochs(self) -> int | None:
        return None if self.record is None else self.record.epochs

    @property
    def model(self) -> str | None:
        value = self.hparams.get("model")
        return value if isinstance(value, str) else None

    @property
    def dataset(self) -> str | None:
        value = self.hparams.get("data")
        return value if isinstance(value, str) else None

    @property
    def latent_dim(self) -> int | None:
        value = json_number(self.hparams.get("latent_dim"))
        return int(value) if value is not None and value.is_integer() else None

    @property
    def beta(self) -> float | None:
        value = json_number(self.hparams.get("beta"))
        return value if value is not None and math.isfinite(value) else None

    @property
    def seed(self) -> int | None:
        value = json_number(self.hparams.get("seed"))
        return int(value) if value is not None and value.is_integer() else None

    def metric(self, key: str) -> float | None:
        return self.metrics.get(key)

    def val_curve(self) -> list[tuple[float, float]]:
        """(epochs done, val/loss) for each epoch of history.csv with a finite val/loss."""
        return [
            (row.get("epoch", i) + 1, row["val/loss"])  # epoch is 0-based: plot epochs done
            for i, row in enumerate(self.history)
            if math.isfinite(row.get("val/loss", math.nan))
        ]


@dataclass
class Result:
    """One reproduced run: its metrics.json, eval.json, history.csv rows and folder."""

    record: dict[str, Any]
    evaluation: dict[str, Any]
    history: list[dict[str, float]]
    folder: Path

    @classmethod
    def read(cls, folder: Path, evaluation: dict[str, Any]) -> Result:
        """The finished run in ``folder`` with its evaluation (metrics.json must be readable)."""
        return cls(
            RunRecord.parse(folder).data, evaluation, read_history(folder / "history.csv"), folder
        )

    @property
    def metrics(self) -> dict[str, Any]:
        """eval.json's metrics (the final weights on the test set)."""
        return self.evaluation.get("metrics", {})

    @property
    def rf_acc(self) -> float | None:
        """The RandomForest probe's accuracy, from metrics.json (the probe callback's)."""
        return self.record.get("metrics", {}).get("probe/rf_acc")

    def by_epoch(self) -> dict[int, dict[str, float]]:
        """history.csv's rows by epochs done (1-based)."""
        return {int(r["epoch"]) + 1: r for r in self.history}


Results = dict[str, Result]


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


def _read_run(folder: Path) -> ReportedRun:
    history = read_history(folder / "history.csv")
    overrides = _read_overrides(folder / ".hydra" / "overrides.yaml")
    try:
        return ReportedRun(folder, RunRecord.parse(folder), history, overrides)
    except OSError as err:
        why = f"metrics.json could not be read: {err}"
    except ValueError as err:  # JSONDecodeError and UnicodeDecodeError both are
        why = f"metrics.json is not valid JSON: {err}"
    except TypeError as err:  # valid JSON, but not an object
        why = str(err)
    return ReportedRun(folder, None, history, overrides, unreadable=why)


def _sort_key(run: ReportedRun) -> tuple:
    # Missing values sort last, so failed runs without hyper-parameters end the table.
    m, d, z, b = run.model, run.dataset, run.latent_dim, run.beta
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


def collect_runs(root: Path) -> list[ReportedRun]:
    """Every run folder below ``root``, sorted by (model, data, latent_dim, beta, path)."""
    return sorted((_read_run(f) for f in _find_run_folders(Path(root))), key=_sort_key)


# --- what the report shows ----------------------------------------------------------------------


def _relative(path: Path, root: Path) -> str:
    try:
        return path.relative_to(root).as_posix() or "."
    except ValueError:
        return str(path)


def summary_row(run: ReportedRun, root: Path) -> dict[str, Any]:
    """One summary.csv row of raw values (None where absent)."""
    row: dict[str, Any] = {
        "run": _relative(run.path, root),
        "status": run.status,
        "model": run.model,
        "data": run.dataset,
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


@dataclass
class Stats:
    """A metric over the runs of one cell: its mean, its sample standard deviation (ddof=1,
    n - 1 in the denominator; NaN for fewer than two values) and n, the runs with a finite
    value."""

    mean: float
    std: float
    n: int

    @classmethod
    def of(cls, values: Sequence[float]) -> Stats:
        finite = np.array([v for v in values if v is not None and math.isfinite(v)], dtype=float)
        n = len(finite)
        mean = float(finite.mean()) if n else math.nan
        return cls(mean, float(finite.std(ddof=1)) if n > 1 else math.nan, n)


@dataclass
class MetricGrid:
    """A metric over latent_dim (``zs``, columns) × beta (``betas``, rows): per cell the mean,
    the sample standard deviation and the count of its runs (``Stats``; NaN where none)."""

    zs: list[int]
    betas: list[float]
    mean: np.ndarray
    std: np.ndarray
    count: np.ndarray


def _cells(runs: Sequence[ReportedRun]) -> dict[tuple[float, int], list[ReportedRun]]:
    """The runs with latent_dim and beta set, by (beta, latent_dim)."""
    cells: dict[tuple[float, int], list[ReportedRun]] = {}
    for r in runs:
        if r.latent_dim is not None and r.beta is not None:
            cells.setdefault((r.beta, r.latent_dim), []).append(r)
    return cells


def metric_grid(runs: Sequence[ReportedRun], metric: str) -> MetricGrid:
    """``metric`` over latent_dim (columns) × beta (rows) for runs with both set: each cell's
    mean, sample standard deviation and count of runs with a finite value."""
    cells = _cells(runs)
    zs = sorted({z for _, z in cells})
    betas = sorted({b for b, _ in cells})
    mean, std = np.full((len(betas), len(zs)), np.nan), np.full((len(betas), len(zs)), np.nan)
    count = np.zeros((len(betas), len(zs)), dtype=int)
    for (beta, z), rs in cells.items():
        stats = Stats.of([r.metric(metric) for r in rs])
        i, j = betas.index(beta), zs.index(z)
        mean[i, j], std[i, j], count[i, j] = stats.mean, stats.std, stats.n
    return MetricGrid(zs, betas, mean, std, count)


@dataclass
class GridCell:
    """One (model, data, latent_dim, beta) cell of a grid: its runs' seeds, in order, and each
    metric's ``Stats`` over them."""

    model: str
    data: str
    latent_dim: int
    beta: float
    seeds: list[int | None]
    stats: dict[str, Stats]

    @property
    def runs(self) -> int:
        return len(self.seeds)


def grid_groups(ok: Sequence[ReportedRun]) -> dict[tuple[str, str], list[ReportedRun]]:
    """The runs with a model, data, latent_dim and beta, by (model, data), sorted."""
    groups: dict[tuple[str, str], list[ReportedRun]] = {}
    for r in ok:
        if r.model and r.dataset and r.latent_dim is not None and r.beta is not None:
            groups.setdefault((r.model, r.dataset), []).append(r)
    return dict(sorted(groups.items()))


def grid_cells(ok: Sequence[ReportedRun], metrics: Sequence[str]) -> list[GridCell]:
    """Every cell of every (model, data) group, sorted by model, data, latent_dim and beta,
    with the ``Stats`` of each of ``metrics`` over the cell's runs."""
    cells = []
    for (model, data), rs in grid_groups(ok).items():
        for (beta, z), members in sorted(_cells(rs).items(), key=lambda c: (c[0][1], c[0][0])):
            seeds = sorted(members, key=lambda r: (r.seed is None, r.seed or 0))
            stats = {m: Stats.of([r.metric(m) for r in members]) for m in metrics}
            cells.append(GridCell(model, data, z, beta, [r.seed for r in seeds], stats))
    return cells


def swept_groups(ok: Sequence[ReportedRun]) -> dict[tuple[str, str], list[ReportedRun]]:
    """(model, data) groups with at least 2 latent_dims or 2 betas: a heatmap says something."""
    return {
        key: rs
        for key, rs in grid_groups(ok).items()
        if len({r.latent_dim for r in rs}) >= 2 or len({r.beta for r in rs}) >= 2
    }
