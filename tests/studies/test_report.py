"""vae-report (runs.py, plots.py, report.py) on hand-made run folders with known numbers: CSV
rows, REPORT.md, PNGs, the CLI; a grid of several seeds per cell, its mean ± std, hand-made and
from a real multirun."""

from __future__ import annotations

import csv
import json
import math
import statistics
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.conftest import job_records, run_here, run_sweep
from vae_lightning.studies import report
from vae_lightning.studies.markdown import format_cell
from vae_lightning.studies.report import main, write_report
from vae_lightning.studies.runs import SUMMARY_COLUMNS, collect_runs, metric_grid

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

# (latent_dim, beta) -> (recon, kl, mse, rf_acc); loss = recon + beta * kl. Every number is
# exact in binary, so what the report prints can be asserted exactly.
GRID = {
    (2, 1.0): (95.5, 4.25, 0.0625, 0.5),
    (2, 4.0): (99.0, 2.5, 0.075, 0.4375),
    (8, 1.0): (80.0, 12.5, 0.03125, 0.875),
    (8, 4.0): (81.25, 5.0, 0.0375, 0.8125),  # test/loss 101.25
}
FAILED_ERROR = "ConfigError: model.beta must be a finite number >= 0.0, got -1.0"


def write_run(
    folder: Path,
    *,
    status: str = "ok",
    model: str = "VAE",
    data: str = "mnist",
    latent_dim: int = 2,
    beta: float = 1.0,
    recon: float = 90.0,
    kl: float | None = 5.0,
    mse: float = 0.05,
    rf_acc: float = 0.75,
    val_losses: tuple[float, ...] = (120.0, 110.0, 105.0),
    overrides: tuple[str, ...] = (),
    payload: dict[str, Any] | None = None,
    seed: int = 0,
) -> Path:
    """A run folder as train.py writes it: metrics.json, history.csv, .hydra/overrides.yaml."""
    folder.mkdir(parents=True)
    (folder / ".hydra").mkdir()
    (folder / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
    if payload is None:
        loss = recon + beta * (kl or 0.0)
        metrics = {
            "test/loss": loss,
            "test/recon": recon,
            "test/mse": mse,
            "val/loss": val_losses[-1],
            "val/loss_best": min(val_losses),
            "probe/rf_acc": rf_acc,
            "probe/logreg_acc": rf_acc - 0.0625,
            "probe/knn_acc": rf_acc + 0.0625,
        }
        if kl is not None:
            metrics.update({"test/kl": kl, "val/active_units": float(latent_dim - 1)})
        payload = {
            "status": status,
            "metrics": metrics,
            "hparams": {
                "model": model,
                "data": data,
                "latent_dim": latent_dim,
                "beta": beta,
                "lr": 0.001,
                "batch_size": 128,
                "max_epochs": 3,
                "seed": seed,
            },
            "epochs": len(val_losses),
            "time/fit_s": 12.3,
            "time/epoch_s_median": 4.0,
            "time/total_s": 13.0,
            "output_dir": str(folder),
            "best_checkpoint": None,
        }
    (folder / "metrics.json").write_text(json.dumps(payload))
    with open(folder / "history.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["epoch", "step", "train/loss", "val/loss", "time/epoch_s", "time/val_s"])
        for epoch, val in enumerate(val_losses):
            # an empty cell, as History writes for a column an epoch lacked
            writer.writerow([epoch, 10 * (epoch + 1), val + 5, val, "", 0.5])
    return folder


@pytest.fixture
def sweep(tmp_path: Path) -> Path:
    """A 2×2 multirun (two levels down), a failed single run and one with broken JSON."""
    root = tmp_path / "outputs"
    for num, ((z, beta), (recon, kl, mse, acc)) in enumerate(GRID.items()):
        job = root / "multiruns" / "2026-01-01_00-00-00" / f"{num}_z{z}_b{beta}"
        overrides = (f"model.latent_dim={z}", f"model.beta={beta}")
        write_run(
            job,
            latent_dim=z,
            beta=beta,
            recon=recon,
            kl=kl,
            mse=mse,
            rf_acc=acc,
            overrides=overrides,
        )
    write_run(
        root / "runs" / "2026-01-02_00-00-00_000001",
        overrides=("model.beta=-1.0",),
        payload={"status": "failed", "error": FAILED_ERROR, "time/total_s": 0.5},
    )
    broken = write_run(root / "runs" / "2026-01-03_00-00-00_000002")
    (broken / "metrics.json").write_text('{"status": "ok", "metrics": {')
    return root


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def markdown_table(text: str, section: str = "## Runs") -> list[dict[str, str]]:
    """The table of REPORT.md's ``section`` (the runs table unless told) as one dict per row
    (header -> cell text)."""
    body = text.split(f"\n{section}\n", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in body.splitlines() if line.startswith("| ")]
    header = [c.strip() for c in rows[0].strip("|").split(" | ")]
    return [
        dict(zip(header, (c.strip() for c in r.strip("|").split(" | ")), strict=True))
        for r in rows[1:]
    ]


def is_png(path: Path) -> bool:
    return path.is_file() and path.read_bytes()[:8] == PNG_SIGNATURE


def test_collect_runs_finds_nested_runs_sorted_and_ignores_hydra(sweep: Path) -> None:
    # a metrics.json inside a .hydra folder is not a run
    (sweep / "runs" / "2026-01-02_00-00-00_000001" / ".hydra" / "metrics.json").write_text("{}")
    runs = collect_runs(sweep)
    assert [(r.latent_dim, r.beta, r.status) for r in runs] == [
        (2, 1.0, "ok"),
        (2, 4.0, "ok"),
        (8, 1.0, "ok"),
        (8, 4.0, "ok"),
        (None, None, "failed"),
        (None, None, "unreadable"),
    ]
    assert all(".hydra" not in r.path.parts for r in runs)
    z8b4 = runs[3]
    assert z8b4.path.relative_to(sweep).parts[:2] == ("multiruns", "2026-01-01_00-00-00")
    assert z8b4.metrics["test/loss"] == 101.25
    assert z8b4.overrides == ["model.latent_dim=8", "model.beta=4.0"]
    assert z8b4.timings == {"time/fit_s": 12.3, "time/epoch_s_median": 4.0, "time/total_s": 13.0}
    assert [row["val/loss"] for row in z8b4.history] == [120.0, 110.0, 105.0]
    assert math.isnan(z8b4.history[0]["time/epoch_s"])
    assert runs[4].error == FAILED_ERROR and runs[4].hparams == {} and runs[4].metrics == {}
    assert "not valid JSON" in runs[5].error


def test_summary_csv_rows_and_values(sweep: Path) -> None:
    write_report(sweep)
    rows = read_csv(sweep / "summary.csv")
    assert tuple(rows[0]) == SUMMARY_COLUMNS
    assert [(r["latent_dim"], r["beta"], r["status"]) for r in rows] == [
        ("2", "1.0", "ok"),
        ("2", "4.0", "ok"),
        ("8", "1.0", "ok"),
        ("8", "4.0", "ok"),
        ("", "", "failed"),
        ("", "", "unreadable"),
    ]
    assert rows[3] == {
        "run": "multiruns/2026-01-01_00-00-00/3_z8_b4.0",
        "status": "ok",
        "model": "VAE",
        "data": "mnist",
        "latent_dim": "8",
        "beta": "4.0",
        "epochs": "3",
        "test/loss": "101.25",
        "test/recon": "81.25",
        "test/kl": "5.0",
        "test/mse": "0.0375",
        "val/loss_best": "105.0",
        "probe/rf_acc": "0.8125",
        "probe/logreg_acc": "0.75",
        "probe/knn_acc": "0.875",
        "val/active_units": "7.0",
        "test/usage": "",  # a VQ-VAE's
        "test/perplexity": "",
        "time/fit_s": "12.3",
        "error": "",
    }
    assert [r["test/loss"] for r in rows[:4]] == ["99.75", "109.0", "92.5", "101.25"]
    failed = rows[4]
    assert failed["run"] == "runs/2026-01-02_00-00-00_000001"
    assert failed["error"] == FAILED_ERROR
    assert all(failed[c] == "" for c in SUMMARY_COLUMNS if c not in ("run", "status", "error"))
    assert rows[5]["run"] == "runs/2026-01-03_00-00-00_000002"
    assert rows[5]["error"].startswith("metrics.json is not valid JSON")
    assert not list(sweep.glob("*.part"))  # written atomically: no temporary file left


def test_report_markdown(sweep: Path, tmp_path: Path) -> None:
    out = tmp_path / "report"
    report = write_report(sweep, out)
    assert report == out / "REPORT.md"
    text = report.read_text()
    assert not (sweep / "REPORT.md").exists()  # --out is honoured
    assert "6 runs: 4 ok, 1 failed, 1 unreadable." in text
    assert "nats per image" in text and "loss = recon + kl, the negative ELBO" in text
    table = markdown_table(text)
    assert tuple(table[0]) == SUMMARY_COLUMNS
    assert len(table) == 6
    z8b4 = table[3]
    assert z8b4["run"] == "`multiruns/2026-01-01_00-00-00/3_z8_b4.0`"
    assert (z8b4["latent_dim"], z8b4["beta"], z8b4["test/loss"]) == ("8", "4", "101.25")
    assert z8b4["test/mse"] == "0.0375"
    assert z8b4["probe/rf_acc"] == "81.25%"
    assert z8b4["time/fit_s"] == "12.3"
    assert z8b4["val/active_units"] == "7"
    assert z8b4["error"] == "—"
    assert sum("101.25" in line for line in text.splitlines()) == 1
    assert table[4]["model"] == "—" and table[4]["test/loss"] == "—"
    assert table[4]["error"] == FAILED_ERROR
    failed_section = text.split("## Failed runs", 1)[1].split("## Plots", 1)[0]
    assert (
        "`runs/2026-01-02_00-00-00_000001` (failed; overrides: `model.beta=-1.0`)" in failed_section
    )
    assert FAILED_ERROR in failed_section
    assert "`runs/2026-01-03_00-00-00_000002` (unreadable" in failed_section
    for name in ("heatmap_test_loss.png", "rate_distortion.png", "val_curves.png"):
        assert f"[{name}]({name})" in text
    # one seed per cell: no cells section, the report as it was before seeds were summarised
    assert "## Mean ± std over seeds" not in text and "(n=…): the mean of n runs." in text


# (latent_dim, seed) -> (recon, kl, rf_acc), beta 1: two seeds of each of two latent sizes
SEEDED = {
    (2, 1): (95.5, 4.25, 0.5),
    (2, 2): (96.5, 4.75, 0.625),
    (8, 1): (80.0, 12.5, 0.875),
    (8, 2): (81.0, 12.0, 0.75),
}


def cells_table(text: str) -> dict[int, dict[str, str]]:
    """REPORT.md's cells section by latent_dim (one beta here)."""
    return {int(r["latent_dim"]): r for r in markdown_table(text, "## Mean ± std over seeds")}


def test_several_seeds_per_cell_report_their_mean_std_and_n(tmp_path: Path) -> None:
    for num, ((z, seed), (recon, kl, acc)) in enumerate(SEEDED.items()):
        write_run(tmp_path / f"{num}_z{z}_s{seed}", latent_dim=z, recon=recon, kl=kl,
                  rf_acc=acc, seed=seed)  # fmt: skip
    # a third run of z=8 whose probe did not run: its cell says n=2 for that column
    probe_less = write_run(tmp_path / "4_z8_s3", latent_dim=8, recon=82.0, kl=11.5, seed=3)
    record = json.loads((probe_less / "metrics.json").read_text())
    del record["metrics"]["probe/rf_acc"]
    (probe_less / "metrics.json").write_text(json.dumps(record))
    text = write_report(tmp_path).read_text()
    cells = cells_table(text)
    assert set(cells) == {2, 8}
    assert (cells[2]["n"], cells[2]["seeds"], cells[2]["beta"]) == ("2", "1, 2", "1")
    assert (cells[8]["n"], cells[8]["seeds"]) == ("3", "1, 2, 3")
    # loss = recon + kl: z=2 gives 99.75 and 101.25, mean 100.5, sample std 1.5 / sqrt(2)
    assert cells[2]["test/loss"] == "100.50 ± 1.06"
    for z, n in ((2, 2), (8, 3)):
        losses = [recon + kl for (zz, _), (recon, kl, _) in SEEDED.items() if zz == z]
        losses += [93.5] if z == 8 else []
        assert len(losses) == n
        mean, std = statistics.mean(losses), statistics.stdev(losses)  # stdev: ddof=1
        assert cells[z]["test/loss"] == f"{mean:.2f} ± {std:.2f}"
    accs = [0.875, 0.75]
    assert cells[8]["probe/rf_acc"] == (
        f"{format_cell('probe/rf_acc', statistics.mean(accs))} ± "
        f"{format_cell('probe/rf_acc', statistics.stdev(accs))} (n=2)"
    )
    assert "ddof=1" in text and "a cell of several runs: their mean, ±" in text
    assert len(markdown_table(text)) == 5  # the runs table still has a row per run
    assert is_png(tmp_path / "heatmap_test_loss.png")


def test_a_multirun_of_two_seeds_reports_each_cells_mean_and_std(data_dir, tmp_path) -> None:
    """A real 2 × 1 × 2-seed grid (debug=fast jobs): REPORT.md's cells are the mean and the
    sample standard deviation of what the jobs' metrics.json hold."""
    out = tmp_path / "sweep"
    run_sweep(data_dir, out, "model.latent_dim=2,4", "model.beta=1", "seed=1,2")
    records = list(job_records(out).values())
    assert len(records) == 4 and {r["status"] for r in records} == {"ok"}
    cells = cells_table((out / "REPORT.md").read_text())
    assert set(cells) == {2, 4}
    for z, cell in cells.items():
        jobs = [r for r in records if r["hparams"]["latent_dim"] == z]
        assert sorted(r["hparams"]["seed"] for r in jobs) == [1, 2]
        assert (cell["n"], cell["seeds"]) == ("2", "1, 2")
        for metric in ("test/loss", "test/recon", "test/kl", "test/mse", "probe/rf_acc"):
            values = [r["metrics"][metric] for r in jobs]
            mean, std = statistics.mean(values), statistics.stdev(values)
            expected = f"{format_cell(metric, mean)} ± {format_cell(metric, std)}"
            assert cell[metric] == expected, (z, metric)
    assert is_png(out / "heatmap_test_loss.png")


def test_plots_written(sweep: Path) -> None:
    write_report(sweep)
    expected = {
        "heatmap_test_loss.png",
        "heatmap_test_recon.png",
        "heatmap_test_kl.png",
        "heatmap_test_mse.png",
        "heatmap_probe_rf_acc.png",
        "heatmap_val_active_units.png",
        "rate_distortion.png",
        "val_curves.png",
    }
    assert {p.name for p in sweep.glob("*.png")} == expected
    assert all(is_png(sweep / name) for name in expected)


def test_metric_grid_places_values_and_leaves_missing_cells_blank(sweep: Path) -> None:
    runs = [
        r for r in collect_runs(sweep) if r.status == "ok" and (r.latent_dim, r.beta) != (2, 4.0)
    ]
    grid = metric_grid(runs, "test/loss")
    assert (grid.zs, grid.betas) == ([2, 8], [1.0, 4.0])
    np.testing.assert_array_equal(grid.mean, [[99.75, 92.5], [np.nan, 101.25]])  # rows: beta
    np.testing.assert_array_equal(grid.count, [[1, 1], [0, 1]])
    assert np.isnan(grid.std).all()  # one run per cell: no spread to give


def test_no_heatmap_for_a_single_configuration(tmp_path: Path) -> None:
    write_run(tmp_path / "runs" / "a", latent_dim=2, beta=1.0, recon=90.0, kl=5.0)
    write_run(tmp_path / "runs" / "b", latent_dim=2, beta=1.0, recon=92.0, kl=4.0)  # same cell
    ae = write_run(tmp_path / "runs" / "c", model="AE", latent_dim=2, beta=0.0, kl=None)
    text = write_report(tmp_path).read_text()
    assert not list(tmp_path.glob("heatmap_*.png"))
    assert "](heatmap_" not in text
    assert is_png(tmp_path / "rate_distortion.png") and is_png(tmp_path / "val_curves.png")
    ae_row = next(r for r in read_csv(tmp_path / "summary.csv") if r["model"] == "AE")
    assert ae_row["run"] == ae.relative_to(tmp_path).as_posix()
    assert (ae_row["test/kl"], ae_row["val/active_units"], ae_row["test/loss"]) == ("", "", "90.0")
    md_ae = next(r for r in markdown_table(text) if r["model"] == "AE")
    assert (md_ae["test/kl"], md_ae["test/loss"]) == ("—", "90.00")


def test_only_failed_runs_still_make_a_report(tmp_path: Path) -> None:
    write_run(tmp_path / "0_x", payload={"status": "failed", "error": "RuntimeError: boom"})
    write_run(tmp_path / "1_y", payload={"status": "failed"})  # not even an error
    text = write_report(tmp_path).read_text()
    assert "2 runs: 0 ok, 2 failed." in text
    assert "RuntimeError: boom" in text and "(no error recorded)" in text
    assert not list(tmp_path.glob("*.png")) and "## Plots" not in text


def test_main_writes_the_report_into_out_and_nothing_into_dir(sweep: Path, tmp_path: Path) -> None:
    before = {p for p in sweep.rglob("*")}
    out = tmp_path / "out"
    assert main([f"dir={sweep}", f"out={out}"]) == 0
    assert {p.name for p in out.iterdir()} >= {"REPORT.md", "summary.csv", "val_curves.png"}
    assert "6 runs: 4 ok, 1 failed, 1 unreadable." in (out / "REPORT.md").read_text()
    assert len(read_csv(out / "summary.csv")) == 6
    assert {p for p in sweep.rglob("*")} == before


NO_RUNS_HINT = "train with `make train` or `make sweep` first"
DIR_HINT = "expected a folder holding run folders (folders with metrics.json); " + NO_RUNS_HINT
OUT_HINT = (
    "give the folder for REPORT.md, summary.csv and the plots (created when missing), or "
    "out=null to write into dir"
)


def written_reports(root: Path) -> list[Path]:
    return [
        p for p in root.rglob("*") if p.name in ("REPORT.md", "summary.csv") or p.suffix == ".png"
    ]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["dir={sweep}", "out={file}"], "out {file} is a file, not a folder: " + OUT_HINT),
        (
            ["dir={sweep}", "out={file}/sub"],
            "out {file}/sub lies below {file}, which is a file: " + OUT_HINT,
        ),
        (["dir={sweep}", "out=''"], "out must be the path of a folder, got '': " + OUT_HINT),
        (["dir={tmp}/missing"], "dir {tmp}/missing does not exist: " + DIR_HINT),
        (["dir={file}"], "dir {file} is a file, not a folder: " + DIR_HINT),
        (
            ["dir={tmp}/empty"],
            "dir holds no run folder (a folder with metrics.json) below {tmp}/empty; "
            + NO_RUNS_HINT,
        ),
        ([], "dir is required: a folder holding run folders, e.g. vae-report dir=outputs/<task>"),
    ],
    ids=[
        "out-is-a-file",
        "out-below-a-file",
        "out-empty",
        "dir-missing",
        "dir-is-a-file",
        "dir-without-runs",
        "dir-missing-key",
    ],
)
def test_vae_report_refuses_a_bad_dir_or_out_in_one_line(
    sweep: Path, tmp_path: Path, args: list[str], message: str
) -> None:
    """The real vae-report: one line naming the key, exit 2, nothing written (the file is left
    as it was)."""
    file = tmp_path / "notes.txt"
    file.write_text("keep me")
    (tmp_path / "empty" / "runs" / ".hydra").mkdir(parents=True)
    (tmp_path / "empty" / "runs" / ".hydra" / "metrics.json").write_text("{}")  # not a run
    values = {"sweep": sweep, "file": file, "tmp": tmp_path}
    result = run_here("vae-report", *(a.format(**values) for a in args))
    assert result.returncode == 2
    assert result.stderr == f"error: {message.format(**values)}\n"
    assert written_reports(tmp_path) == [] and file.read_text() == "keep me"


def test_main_names_out_when_it_cannot_be_written(
    sweep: Path, tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    def refuse(runs: Any, out: Path) -> list[Path]:
        raise PermissionError(13, "Permission denied", str(out / "val_curves.png"))

    monkeypatch.setattr(report, "write_plots", refuse)
    assert main([f"dir={sweep}", f"out={tmp_path / 'out'}"]) == 2
    assert capsys.readouterr().err == (
        f"error: out {tmp_path / 'out'} cannot be written (Permission denied): give out= a "
        "folder you can write to\n"
    )
