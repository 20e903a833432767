"""The feature-matching loss (model.feature_loss_weight) and FID's second classifier
(vae-evaluate classifier_seed): the objective, a real CLI run, its checkpoint and its evaluation.
(The distance itself: tests/models/test_losses.py; a feature-loss job runs alone in a fused
sweep: tests/sweeps/test_fused.py.)"""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from tests.conftest import SMALL, run_here, write_synthetic
from vae_lightning.errors import ConfigError
from vae_lightning.evaluation.fid import classifier_path
from vae_lightning.models import AE, VAE, ConvVAE
from vae_lightning.models.losses import feature_distance
from vae_lightning.models.networks import FeatureClassifier
from vae_lightning.training import AutomaticStep


@pytest.mark.parametrize("cls", [VAE, AE, ConvVAE])
def test_the_objective_adds_the_weighted_feature_term_and_the_loss_is_unchanged(cls):
    torch.manual_seed(0)
    plain = cls()
    weighted = cls(feature_loss_weight=2.5)
    weighted.load_state_dict(plain.state_dict(), strict=False)  # the same networks
    classifier = FeatureClassifier()
    weighted.load_feature_classifier(classifier)
    x = torch.rand(8, 1, 28, 28)
    knobs = {"eps": torch.randn(8, plain.latent_dim)} if plain.variational else {}
    a, b = plain.terms(x, **knobs), weighted.terms(x, **knobs)
    feature = feature_distance(lambda v: classifier.eval().features(v), torch.sigmoid(
        weighted.decoder(weighted.reparameterize(*weighted.encode(x), knobs["eps"])
                         if plain.variational else weighted.encode(x))), x).mean()  # fmt: skip
    torch.testing.assert_close(b["feature"], feature)
    torch.testing.assert_close(b["loss"], a["loss"])
    torch.testing.assert_close(b["objective"], a.get("objective", a["loss"]) + 2.5 * feature)
    assert b["feature"] > 0 and "feature" not in a


def test_the_frozen_features_stay_in_eval_mode_and_out_of_the_optimizer():
    model = AutomaticStep().bind(ConvVAE(feature_loss_weight=1.0)).train()
    assert model.encoder.training and not model.feature_net.training
    optimizer = model.configure_optimizers()
    trained = {id(p) for group in optimizer.param_groups for p in group["params"]}
    frozen = list(model.feature_net.parameters())
    assert frozen and not any(id(p) in trained for p in frozen)
    assert len(trained) == len([p for p in model.parameters() if p.requires_grad])


def test_bad_feature_loss_settings_are_refused_naming_the_key():
    with pytest.raises(ConfigError, match="feature_loss_weight must be a finite number >= 0"):
        VAE(feature_loss_weight=-1.0)
    with pytest.raises(ConfigError, match=r"feature_loss_weight needs 28x28 grey images"):
        VAE(in_shape=(1, 32, 32), feature_loss_weight=1.0)
    with pytest.raises(ConfigError, match="feature_loss_weight is 0"):
        VAE().load_feature_classifier(FeatureClassifier())


def test_a_feature_loss_run_trains_reloads_without_the_cache_and_fid_names_its_judge(
    feature_data_dir, tmp_path
):
    feature_data = feature_data_dir
    out = tmp_path / "run"
    result = run_here("vae-train",
        f"paths.data_dir={feature_data}", f"hydra.run.dir={out}", *SMALL,
        "experiment=seed2_convvae_fashion", "trainer.max_epochs=2", "callbacks=minimal",
        "model.feature_loss_weight=0.5",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    metrics = json.loads((out / "metrics.json").read_text())["metrics"]
    for stage in ("train", "val", "test"):
        m = {k.split("/")[1]: v for k, v in metrics.items() if k.startswith(f"{stage}/")}
        assert m["feature"] > 0
        assert m["loss"] == pytest.approx(m["recon"] + m["kl"], rel=1e-5)  # the ELBO, beta 1
        assert m["objective"] == pytest.approx(m["loss"] + 0.5 * m["feature"], rel=1e-5)

    # the frozen features are the cached classifier's, unchanged by training (no optimizer, no
    # BatchNorm update), and travel in the checkpoint: reloaded without the cache
    cache = classifier_path(feature_data, "fashion_mnist")
    cached = torch.load(cache, weights_only=True)["state_dict"]
    moved = tmp_path / "moved"
    shutil.move(cache.parent, moved)
    try:
        model = ConvVAE.load_from_checkpoint(out / "checkpoints" / "last.ckpt", map_location="cpu")
    finally:
        shutil.move(moved, cache.parent)
    reloaded = model.feature_net.classifier.state_dict()
    assert reloaded.keys() == cached.keys()
    assert all(torch.equal(reloaded[k], cached[k]) for k in cached)

    # FID in the loss's own features is flagged; classifier_seed=1 trains a second judge
    ckpt = f"ckpt={out / 'checkpoints' / 'last.ckpt'}"
    figures = {}
    for seed in (0, 1):
        done = run_here(
            "vae-evaluate", ckpt, f"data_dir={feature_data}", "k=2", "n_fid=128",
            "classifier_epochs=16", f"classifier_seed={seed}", "device=cpu",
        )  # fmt: skip
        assert done.returncode == 0, done.stderr[-2000:]
        fid = json.loads((out / "eval.json").read_text())["fid"]
        assert fid["classifier_seed"] == seed and fid["independent"] is (seed == 1)
        assert fid["classifier"] == str(classifier_path(feature_data, "fashion_mnist", seed))
        figures[seed] = json.loads((out / "eval.json").read_text())["metrics"]["gen/fid"]
    assert classifier_path(feature_data, "fashion_mnist", 1).is_file()
    assert figures[0] != figures[1]


def test_a_classifier_too_weak_for_the_feature_loss_is_one_line_before_training(tmp_path):
    data = write_synthetic(tmp_path / "data")  # no classifier cached: 4 epochs reach 0.65 here
    out = tmp_path / "run"
    done = run_here("vae-train", f"paths.data_dir={data}", f"hydra.run.dir={out}", *SMALL,
                    "data=fashion_mnist", "model.feature_loss_weight=0.5",
                   "callbacks=minimal")  # fmt: skip
    assert done.returncode == 2
    line = done.stderr.strip()
    assert line.count("\n") == 0
    assert line.startswith("error: model.feature_loss_weight needs fashion_mnist's classifier: ")
    assert "below classifier_min_accuracy=0.8" in line
    assert f"vae-evaluate classifiers=true data_dir={data} datasets=fashion_mnist" in line
    assert not (out / "checkpoints").exists()
    assert not classifier_path(data, "fashion_mnist").exists()  # below the floor: not cached
