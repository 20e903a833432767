"""vae-bench sweep=true (studies.sweep_bench): the 20-job sweep's grid timed through each
launcher as a real command (here a 2-job grid), and its checks."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from vae_lightning.studies.bench import main


@pytest.mark.slow
def test_bench_sweep_mode_times_each_launcher_on_the_same_grid(data_dir: Path, tmp_path: Path):
    out = tmp_path / "bench.json"
    grid = ("train=['data.verify=false','data.download=false','data.val_size=128',"
            "'model.latent_dim=2,3','model.beta=1','model.hidden_dim=32',"
            "'callbacks=minimal','logger=none','trainer.accelerator=cpu']")  # fmt: skip
    args = ["sweep=true", "sweep_launchers=[basic,fused]", "sweep_epochs=2",
            f"data_dir={data_dir}", f"out={out}", grid]  # fmt: skip
    assert main(args) == 0
    summary = json.loads(out.read_text())
    assert summary["complete"] is True and summary["sweep"]["epochs"] == 2
    runs = summary["sweep"]["launchers"]
    assert list(runs) == ["basic", "fused"]
    for r in runs.values():
        assert (r["jobs"], r["ok"], r["complete"]) == (2, 2, True)
        assert r["jobs_per_hour"] == pytest.approx(2 / r["wall_s"] * 3600)
    assert min(r["over_fastest"] for r in runs.values()) == 1.0


@pytest.mark.parametrize(
    ("arg", "message"),
    [
        ("sweep_launchers=[ray]", "sweep_launchers must be a non-empty list of basic, joblib"),
        ("sweep_epochs=0", "sweep_epochs must be an integer >= 1, got 0"),
        ("sweep=maybe", "sweep must be true or false, got 'maybe'"),
    ],
)
def test_bench_sweep_mode_refuses_bad_values(tmp_path: Path, capsys, arg: str, message: str):
    out = tmp_path / "bench.json"
    sweep = [] if arg.startswith("sweep=") else ["sweep=true"]
    assert main([*sweep, f"out={out}", arg]) == 2
    assert capsys.readouterr().err.startswith(f"error: {message}")
    assert not out.exists()
