"""The test-set measures vae-evaluate reports (evaluation.measures), on checkpoints of tiny real
runs: the loss terms, the importance-weighted bound, the KL per dimension and active units, FID,
the probes, a binarized ConvVAE's Bernoulli likelihood, an AE's measures, and their seeding."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from omegaconf import OmegaConf

from tests.conftest import small_overrides
from vae_lightning.config import compose
from vae_lightning.evaluate import evaluate
from vae_lightning.train import train


def _tiny_run(tmp_path_factory, data_dir: Path, name: str, *overrides: str) -> Path:
    """A 2-epoch run of a few batches; its config saved as Hydra saves it."""
    out = tmp_path_factory.mktemp(name)
    cfg = compose(
        [
            *small_overrides(data_dir, out),
            "debug=limit",
            "callbacks=minimal",
            "logger=none",
            "model.latent_dim=4",
            *overrides,
        ]
    )
    train(cfg)
    # train() wrote a resolved one; Hydra writes it unresolved, with ${root_dir:} in paths.*
    OmegaConf.save(cfg, out / ".hydra" / "config.yaml")
    return out


@pytest.fixture(scope="module")
def vae_run(tmp_path_factory, data_dir) -> Path:
    return _tiny_run(tmp_path_factory, data_dir, "vae_run", "model.hidden_dim=64")


@pytest.fixture(scope="module")
def ae_run(tmp_path_factory, data_dir) -> Path:
    return _tiny_run(tmp_path_factory, data_dir, "ae_run", "model=ae", "model.hidden_dim=64")


@pytest.fixture(scope="module")
def conv_run(tmp_path_factory, data_dir) -> Path:
    return _tiny_run(
        tmp_path_factory,
        data_dir,
        "conv_run",
        "model=conv_vae",
        "model.channels=[4,8,8]",
        "data=fashion_mnist",
        "data.binarize=dynamic",
    )


# classifier_min_accuracy=0: 5 steps on the synthetic images stay far below the real floor
FAST = {
    "classifier_epochs": 1,
    "classifier_max_steps": 5,
    "classifier_min_accuracy": 0.0,
    "device": "cpu",
    "batch_size": 64,
}


def test_evaluate_a_vae_checkpoint(vae_run):
    ckpt = vae_run / "checkpoints" / "last.ckpt"
    result = evaluate(ckpt, k=64, chunk=16, n_fid=200, probes=True, probe_max_train=200, **FAST)
    written = json.loads((vae_run / "eval.json").read_text())
    assert written["metrics"] == pytest.approx(result["metrics"])
    m = result["metrics"]
    assert result["model"] == "VAE" and result["data"]["dataset"] == "mnist"
    assert result["data"]["n_test"] == 256
    for key in ("test/loss", "test/recon", "test/kl", "test/mse", "test/nll_iw", "gen/fid"):
        assert math.isfinite(m[key]), key
    # beta = 1: the loss is the single-sample -ELBO, which the k-sample bound improves on
    assert m["test/nll_iw"] <= m["test/loss"] + 1.0
    assert m["test/loss"] == pytest.approx(m["test/recon"] + m["test/kl"], rel=1e-5)
    assert 0 <= m["test/mse"] <= 1
    # the KL per dimension adds up to the (closed-form) test KL
    kl_dims = result["latent"]["kl_per_dim"]
    assert len(kl_dims) == 4 and sum(kl_dims) == pytest.approx(m["test/kl"], rel=1e-4, abs=1e-4)
    assert m["test/active_units"] == sum(v > 0.01 for v in result["latent"]["mu_variance"])
    assert m["gen/fid"] >= 0 and m["gen/fid_train_test"] >= 0
    assert 0 <= m["classifier/test_acc"] <= 1
    assert result["fid"]["n"] == 200
    assert {"probe/rf_acc", "probe/logreg_acc", "probe/knn_acc"} <= set(m)
    assert np.asarray(result["probe"]["confusion_rf"]).sum() == 256
    for path in result["images"].values():
        assert Path(path).is_file() and Path(path).parent == vae_run / "eval"
    assert (data_dir_of(result) / "classifiers" / "mnist.pt").is_file()


def data_dir_of(result) -> Path:
    return Path(result["data"]["data_dir"])


def test_evaluate_is_seeded(vae_run):
    ckpt = vae_run / "checkpoints" / "last.ckpt"
    first = evaluate(ckpt, k=8, n_fid=0, **FAST)["metrics"]
    second = evaluate(ckpt, k=8, n_fid=0, **FAST)["metrics"]
    assert first == second and "gen/fid" not in first


def test_evaluate_an_ae_checkpoint(ae_run):
    result = evaluate(ae_run / "checkpoints" / "last.ckpt", n_fid=100, **FAST)
    m = result["metrics"]
    assert result["model"] == "AE"
    assert {"test/loss", "test/recon", "test/mse", "gen/fid"} <= set(m)
    assert not {"test/kl", "test/nll_iw", "test/active_units"} & set(m)


def test_evaluate_a_binarized_convvae_on_fashion_mnist(conv_run):
    result = evaluate(conv_run / "checkpoints" / "last.ckpt", k=32, n_fid=100, **FAST)
    m = result["metrics"]
    assert result["model"] == "ConvVAE" and result["data"]["dataset"] == "fashion_mnist"
    assert result["data"]["binarize"] == "dynamic"
    assert result["nll_iw"]["likelihood"].startswith("Bernoulli on binary images")
    assert m["test/nll_iw"] <= m["test/recon"] + m["test/kl"] + 1.0
    assert Path(result["fid"]["classifier"]).name == "fashion_mnist.pt"
