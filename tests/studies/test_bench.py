"""vae-bench on the small synthetic data: the JSON it writes and what it derives, its checks
before any timing (through the real CLI), and bench.json kept model by model. (Its sweep mode:
tests/studies/test_sweep_bench.py.)"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import pytest

from tests.conftest import run_here
from vae_lightning.studies import bench
from vae_lightning.studies.bench import main


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
    assert summary["complete"] is True and list(summary["models"]) == ["vae"]
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


CKPT_HINT = (
    "give a checkpoint written by vae-train (<run folder>/checkpoints/<file>.ckpt), or "
    "evaluate=null not to time vae-evaluate"
)


@pytest.mark.parametrize(
    ("arg", "message"),
    [
        ("models=[gan]", "models must be a non-empty list of vae, ae, conv_vae, got ['gan']"),
        ("models=[vae,vae]", "models lists a model twice: ['vae', 'vae']; list each once"),
        ("repeats=0", "repeats must be an integer >= 1, got 0"),
        ("threads=-1", "threads must be an integer >= 1, got -1"),
        ("startup_repeats=-1", "startup_repeats must be an integer >= 0, got -1"),
        ("seeds_loop=maybe", "seeds_loop must be true or false, got 'maybe'"),
        ("train=5", "train must be a list of overrides, got 5"),
        ("train=['nokey=1']", "train holds an override vae-train refuses: Could not override"),
        ("train=['model.latent_dim=0']", "model.latent_dim must be an integer >= 1, got 0"),
        ("evaluate={tmp}/missing.ckpt", "evaluate {tmp}/missing.ckpt does not exist: " + CKPT_HINT),
        ("evaluate={tmp}", "evaluate {tmp} is a folder, not a file: " + CKPT_HINT),
        (
            "evaluate={tmp}/run/checkpoints/last.ckpt",
            "evaluate {tmp}/run/checkpoints/last.ckpt has no run config "
            "{tmp}/run/.hydra/config.yaml: " + CKPT_HINT,
        ),
        ("out={tmp}", "out {tmp} is a folder, not a file: give the file for the results"),
        ("data_dir={tmp}/bench.txt", "data_dir {tmp}/bench.txt is a file, not a folder"),
    ],
)
def test_vae_bench_refuses_bad_values_before_timing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, arg: str, message: str
) -> None:
    """The real vae-bench: one line, exit 2, before the sgemm peak (its first timing) and
    before any file is written."""
    timed = []
    monkeypatch.setattr(bench, "sgemm_peak", lambda *a, **kw: timed.append(1) or 1.0)
    out = tmp_path / "bench.json"
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    (tmp_path / "run" / "checkpoints" / "last.ckpt").write_bytes(b"")  # without its run config
    (tmp_path / "bench.txt").write_text("")
    result = run_here("vae-bench", f"out={out}", arg.format(tmp=tmp_path))
    assert result.returncode == 2
    assert result.stderr.startswith(f"error: {message.format(tmp=tmp_path)}")
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    assert timed == [] and not out.exists()


def test_bench_json_keeps_the_models_done_when_one_fails(
    data_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "bench.json"
    seen = []

    def fake_bench_model(cfg, name: str, peak: float) -> dict:
        seen.append(json.loads(out.read_text()) if out.exists() else None)
        if name == "ae":
            raise RuntimeError("ae failed")
        return {"dataset": "mnist", "median_s": {"a": 2.0, "b": 1.0}}

    monkeypatch.setattr(bench, "bench_model", fake_bench_model)
    monkeypatch.setattr(bench, "sgemm_peak", lambda: 10.0)
    args = ["models=[vae,ae]", "startup_repeats=0", f"data_dir={data_dir}", f"out={out}"]
    with pytest.raises(RuntimeError, match="ae failed"):
        main(args)
    assert seen[0] is None  # nothing before the first model
    assert seen[1]["models"] == {"vae": {"dataset": "mnist", "median_s": {"a": 2.0, "b": 1.0}}}
    summary = json.loads(out.read_text())
    assert summary == seen[1] and summary["complete"] is False
    assert summary["sgemm_peak_gflops"] == 10.0 and summary["startup_s"] is None
    assert not list(tmp_path.glob(".bench.json.*"))  # no temporary file left beside it
