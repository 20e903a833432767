"""vae-zoo: its refusals, and the real command on synthetic data: a conditional VAE and a VQ-VAE
trained, the VQ-VAE's prior fitted, both evaluated and tabulated; rerun without redoing any."""

from __future__ import annotations

import json
import math

import pytest
import torch

from tests.conftest import SMALL, run_here
from vae_lightning.studies.markdown import fmt, pct
from vae_lightning.studies.zoo import main


@pytest.mark.parametrize(
    ("arg", "message"),
    [
        ("runs=[cvae,nope]", "error: runs names unknown run(s) nope; choose among seed1_vae"),
        ("epochs=0", "error: epochs must be an integer >= 1, got 0"),
    ],
)
def test_bad_settings_are_one_line_before_any_run(tmp_path, arg, message):
    done = run_here("vae-zoo", arg, f"out={tmp_path / 'zoo'}")
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [done.stderr.strip()]
    assert done.stderr.startswith(message)
    assert not (tmp_path / "zoo").exists() or not any((tmp_path / "zoo").iterdir())


@pytest.mark.slow
def test_the_zoo_trains_fits_the_prior_evaluates_and_tabulates(feature_data_dir, tmp_path):
    out = tmp_path / "zoo"
    train = ["data.download=false", *SMALL, "callbacks.latent_probe.n_estimators=10"]
    args = [
        "epochs=1", "prior_epochs=1", "runs=[cvae,vq_vae]", f"out={out}",
        f"data_dir={feature_data_dir}", "k=2", "n_fid=64", "classifier_epochs=16",
        "train=[" + ",".join(f"'{t}'" for t in train) + "]",
    ]  # fmt: skip
    assert main(args) == 0
    report = (out / "ZOO.md").read_text()
    rows = {line.split(" | ")[0][2:]: line for line in report.splitlines() if line.startswith("| ")}
    cvae = json.loads((out / "cvae" / "eval.json").read_text())
    vq = json.loads((out / "vq_vae" / "eval.json").read_text())
    assert f" {fmt(cvae['metrics']['test/nll_iw'])}† " in rows["cvae"]
    assert f" {pct(cvae['metrics']['gen/cond_acc'])} " in rows["cvae"]

    # the VQ-VAE is evaluated with its fitted prior: the bound is recon - log p(z*) under it
    assert vq["checkpoint"].endswith("prior.ckpt") and "PixelCNN" in vq["fid"]["fake"]
    m = vq["metrics"]
    assert m["test/kl"] < 49 * math.log(128)  # better than the uniform prior
    assert m["test/loss"] == pytest.approx(m["test/recon"] + m["test/kl"])
    assert 0 < m["test/usage"] <= 1 and 1 <= m["test/perplexity"] <= 128
    assert sum(vq["codebook"]["counts"]) == 256 * 49  # every test image's 7x7 codes
    assert "test/nll_iw" not in m and "gen/fid" in m
    assert f" {fmt(m['test/loss'])}‡ " in rows["vq_vae"]
    assert f" {pct(m['test/usage'])}, {fmt(m['test/perplexity'], 1)} " in rows["vq_vae"]

    # rerun: nothing is trained, fitted or evaluated again
    files = [out / n / f for n in ("cvae", "vq_vae") for f in ("eval.json", "metrics.json")]
    prior = out / "vq_vae" / "checkpoints" / "prior.ckpt"
    stamps = [f.stat().st_mtime for f in [*files, prior]]
    assert main(args) == 0
    assert stamps == [f.stat().st_mtime for f in [*files, prior]]
    # another prior length fits the prior again, and evaluates it again; the runs stay
    assert main([a.replace("prior_epochs=1", "prior_epochs=2") for a in args]) == 0
    assert torch.load(prior, weights_only=True)["vae_lightning"]["prior"]["epochs"] == 2
    assert (out / "vq_vae" / "eval.json").stat().st_mtime > stamps[2]
    assert [f.stat().st_mtime for f in files[:2]] == stamps[:2]  # the CVAE's untouched
