"""`make reproduce-quick`'s pipeline end to end on small synthetic data."""

import json
import re

import pytest

from tests.conftest import N_TEST, write_synthetic
from vae_lightning.studies.reproduce import main


@pytest.mark.slow
def test_reproduce_quick_end_to_end(tmp_path):
    # a data folder of its own: the session's may hold an FID classifier cached by other tests
    # with other settings, which evaluate refuses rather than silently reuse
    data_dir = write_synthetic(tmp_path / "data")
    out = tmp_path / "reproduce"
    train = ["data.verify=false", "data.download=false", "trainer.accelerator=cpu",
             "callbacks.latent_probe.max_train=200"]  # fmt: skip
    args = [
        "quick=true", f"out={out}", f"data_dir={data_dir}", "k=4", "n_fid=64",
        # 5 classifier steps on synthetic images stay near chance: no accuracy floor here
        "classifier_max_steps=5", "classifier_min_accuracy=0",
        "train=[" + ",".join(f"'{o}'" for o in train) + "]",
    ]  # fmt: skip
    assert main(args) == 0
    report = (out / "REPORT.md").read_text()
    # seed 1's per-epoch table: the seed's numbers beside measured ones for epoch 1 only (2 epochs)
    row1 = next(line for line in report.splitlines() if line.startswith("| 1 | 163.2 | 147.8 |"))
    measured = row1.split("|")[4:6]
    assert all(re.fullmatch(r" \d+\.\d\d ", cell) for cell in measured), row1
    assert "| 20 | 131.2 | 129.9 | — | — |" in report  # not trained that far
    # like-for-like comparison rows for both models, with the seed's mixed-scale column beside
    assert re.search(r"^\| VAE \| \d+\.\d\d \| \d+\.\d\d \| \d+\.\d\d \| 0\.\d{4} \|", report, re.M)
    assert re.search(
        r"^\| AE \| \d+\.\d\d \| \d+\.\d\d \| — \| 0\.\d{4} \|.* 0\.0891 \| 0\.0398 \|",
        report,
        re.M,
    )
    # seed 2: both latent sizes; our confusion matrices sum to the test-set size, the seed's not
    for name in ("seed2_convvae_z32", "seed2_convvae_z16"):
        assert re.search(rf"^\| {name} \| .* \| {N_TEST} \|$", report, re.M), name
    assert "| 9123 |" in report and "92.02 %" in report
    assert (out / "loss_curves.png").is_file()
    assert len(list((out / "figures").glob("*.png"))) == 15  # 3 pictures x 5 models
    assert re.search(r"Test negative log-likelihood .*: \*\*\d+\.\d\d nats\*\*", report)
    assert "## Where we differ from the seeds, and why" in report
    assert "Seed 2 expects latent 32 to probe as well as latent 16 or better: measured" in report
    active = [
        json.loads((out / name / "eval.json").read_text())["metrics"]["test/active_units"]
        for name in ("seed2_convvae_z32", "seed2_convvae_z16")
    ]
    assert f"> 0.01): {active[0]:.0f} of 32 and {active[1]:.0f} of 16" in report
    # the final weights are tested and evaluated: with val_on_test the "best" checkpoint was
    # chosen on the test set
    for name in ("seed1_vae", "seed1_ae", "seed2_convvae_z32", "seed2_convvae_z16"):
        record = json.loads((out / name / "metrics.json").read_text())
        assert record["tested"] == "final weights", name
        evaluation = json.loads((out / name / "eval.json").read_text())
        assert evaluation["checkpoint"] == str((out / name / "checkpoints" / "last.ckpt").resolve())
        assert re.search(rf"^\| {name} \| 2 \| \d+ \| \d+\.\d \| \d+ \| ", report, re.M), name
    # a second call reuses the finished runs and evaluations and rewrites the report
    stamps = {
        f: f.stat().st_mtime_ns
        for name in ("seed1_vae", "seed2_convvae_z16")
        for f in (out / name / "metrics.json", out / name / "eval.json")
    }
    (out / "REPORT.md").unlink()
    assert main(args) == 0
    assert {f: f.stat().st_mtime_ns for f in stamps} == stamps
    assert (out / "REPORT.md").read_text() == report
    # ... unless the evaluation asked for differs: a new k evaluates the VAEs again
    assert main([*args, "k=3"]) == 0
    evaluation = json.loads((out / "seed1_vae" / "eval.json").read_text())
    assert evaluation["nll_iw"]["k"] == 3
    assert (out / "seed1_vae" / "metrics.json").stat().st_mtime_ns == stamps[
        out / "seed1_vae" / "metrics.json"
    ]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["runs=[seed1_vae,seed3_gan]"], "error: runs names unknown run(s) seed3_gan"),
        (["runs=[]"], "(none given)"),
        (["k=0"], "error: k must be at least 1"),
        (["n_fid=-1"], "error: n_fid must be >= 0"),
        (["quick=true", "k=0"], "error: k must be at least 1"),
        (["classifier_max_steps=0"], "error: classifier_max_steps must be"),
        (["classifier_min_accuracy=1.5"], "error: classifier_min_accuracy must be a test accuracy"),
        (["train=3"], "error: train must be a list of strings"),
        (["--quick"], "error: --quick is not an option"),
    ],
)
def test_reproduce_refuses_bad_arguments_before_writing(tmp_path, capsys, args, message):
    out = tmp_path / "out"
    assert main([*args, f"out={out}"]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1  # one line
    if "runs" in args[0]:
        assert "seed1_vae, seed1_ae" in err  # names the valid choices
    assert not out.exists()  # nothing created for a refused command


def test_reproduce_help_shows_every_key(capsys):
    assert main(["--help"]) == 0
    shown = capsys.readouterr().out
    for key in ("quick:", "out:", "data_dir:", "k:", "n_fid:", "runs:", "train:"):
        assert f"\n{key}" in shown, key
