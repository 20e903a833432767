"""vae-bench in-process on the small synthetic data: the JSON it writes and what it derives."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import pytest

from vae_lightning.bench import main


def test_bench_writes_consistent_timings(data_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    args = [
        "models=[vae]", "repeats=2", "threads=2", "seeds_loop=false", "startup_repeats=0",
        f"data_dir={data_dir}", f"out={out}",
        "train=['data.verify=false','data.download=false','data.batch_size=64']",
    ]  # fmt: skip
    assert main(args) == 0
    summary = json.loads(out.read_text())
    assert (summary["threads"], summary["repeats"], summary["startup_s"]) == (2, 2, [])
    assert summary["sgemm_peak_gflops"] > 0
    vae = summary["models"]["vae"]
    assert (vae["dataset"], vae["images"], vae["batch_size"]) == ("mnist", 640, 64)
    times = vae["seconds_per_epoch"]
    assert times["c"] == [] and vae["c_over_a"] is None  # the seeds' loop was not asked for
    for path in ("a", "b"):
        assert len(times[path]) == 2 and all(t > 0 for t in times[path]), path
        assert vae["median_s"][path] == statistics.median(times[path])
        assert vae["samples_per_s"][path] == pytest.approx(640 / vae["median_s"][path])
    medians = vae["median_s"]
    assert vae["a_over_b"] == pytest.approx(medians["a"] / medians["b"])
    assert vae["gflop_per_epoch"] > 0
    assert vae["gflops"]["b"] == pytest.approx(vae["gflop_per_epoch"] / medians["b"])


@pytest.mark.parametrize(
    ("arg", "message"),
    [("models=[gan]", "error: models must be a non-empty list"), ("repeats=0", "error: repeats")],
)
def test_bench_refuses_bad_values(tmp_path: Path, capsys, arg: str, message: str) -> None:
    out = tmp_path / "bench.json"
    assert main([arg, f"out={out}"]) == 2
    assert capsys.readouterr().err.startswith(message)
    assert not out.exists()
