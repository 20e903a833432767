"""The sweep and run folders a multirun writes (sweeps.folders.RunFolders): each job's record and
line in jobs.jsonl, the exit status and line of a sweep whose job failed, a resumed sweep that
reruns only what did not finish, a sweep folder held by one sweep at a time, and a folder that
cannot be created refused in one line naming its key."""

import json
import os

import pytest

from tests.conftest import SWEEP, job_records, one_line_error, run_here, run_sweep, start_together


def test_a_failing_job_is_recorded_and_the_others_run(data_dir, tmp_path):
    out = tmp_path / "sweep"
    result = run_sweep(data_dir, out, "model.latent_dim=0,3", status=1)  # a job failed
    assert "error: 1 of 2 jobs of this sweep failed" in result.stderr
    records = job_records(out)
    assert len(records) == 2
    failed = [r for name, r in records.items() if "latent_dim=0" in name]
    ok = [r for name, r in records.items() if "latent_dim=3" in name]
    assert failed[0]["status"] == "failed"
    assert "model.latent_dim must be an integer >= 1, got 0" in failed[0]["error"]
    assert ok[0]["status"] == "ok"
    jobs = [json.loads(x) for x in (out / "jobs.jsonl").read_text().splitlines()]
    assert sorted(j["status"] for j in jobs) == ["failed", "ok"]
    assert "2 runs: 1 ok" in (out / "REPORT.md").read_text()  # the report is still written


def test_a_resumed_sweep_reruns_only_unfinished_jobs(data_dir, tmp_path):
    out = tmp_path / "sweep"
    run_sweep(data_dir, out, "model.latent_dim=2,3,4")
    records = job_records(out)
    assert len(records) == 3
    finished = {p: p.stat().st_mtime_ns for p in out.glob("*/metrics.json")}
    # one job "killed": its record says running
    (victim,) = [
        p for p in finished if "latent_dim=3" in (p.parent / ".hydra/overrides.yaml").read_text()
    ]
    victim.write_text(json.dumps({"status": "running"}))
    run_sweep(data_dir, out, "model.latent_dim=2,3,4", "resume=true")
    for path, mtime in finished.items():
        if path == victim:
            assert json.loads(path.read_text())["status"] == "ok"  # rerun
        else:
            assert path.stat().st_mtime_ns == mtime  # untouched
    assert len(job_records(out)) == 3  # the same folders, no new ones


def test_two_sweeps_started_together_get_their_own_folders(data_dir, tmp_path):
    start_together(
        "-m", "debug=fast", "model.latent_dim=2,3", f"paths.data_dir={data_dir}",
        f"paths.log_dir={tmp_path}", *SWEEP,
    )  # fmt: skip
    sweeps = sorted((tmp_path / "debug" / "multiruns").iterdir())
    assert len(sweeps) == 2
    for folder in sweeps:
        records = job_records(folder)
        assert len(records) == 2 and {r["status"] for r in records.values()} == {"ok"}


def test_a_second_sweep_into_a_sweep_folder_in_use_is_refused(tmp_path, capsys):
    from omegaconf import OmegaConf

    from vae_lightning.files import hold_folder
    from vae_lightning.sweeps.folders import RunFolders

    sweep = tmp_path / "sweep"
    sweep.mkdir()
    cfg = OmegaConf.create({"hydra": {"sweep": {"dir": str(sweep)}}})
    with hold_folder(sweep):  # another sweep holds it
        with pytest.raises(SystemExit) as info:
            RunFolders().on_multirun_start(cfg)
    assert info.value.code == 2
    assert capsys.readouterr().err == (
        f"error: hydra.sweep.dir {sweep} is being written by another sweep right now. Wait for "
        "it to finish, or choose another folder.\n"
    )
    assert list(sweep.iterdir()) == []  # nothing written


@pytest.mark.parametrize("where", ["file", "no-permission"])
def test_an_output_folder_that_cannot_be_created_is_one_line(data_dir, tmp_path, where):
    if where == "file":
        blocker = tmp_path / "a_file"
        blocker.write_text("in the way")
        target = blocker / "run"
    else:
        if os.geteuid() == 0:
            pytest.skip("root may write anywhere")
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        target = locked / "run"
    args = [f"paths.data_dir={data_dir}", *SWEEP, "logger=none", f"hydra.run.dir={target}"]
    line = one_line_error(run_here("vae-train", *args), "hydra.run.dir")
    assert line.startswith(f"hydra.run.dir {target} cannot be created")
