"""The visual and probing callbacks on tiny runs: files, TensorBoard tags, values."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from vae_lightning.errors import ConfigError
from vae_lightning.evaluation.metrics import LatentMoments, active_units
from vae_lightning.evaluation.probes import fit_probes
from vae_lightning.models import eval_mode
from vae_lightning.train import train
from vae_lightning.views import grids, publish
from vae_lightning.views.images import Interpolations, Reconstructions

IMAGE_TAGS = {
    "images/reconstructions",
    "images/samples_prior",
    "images/interpolations",
    "images/traversals",
    "latent/scatter",
    "probe/confusion_rf",
    "collapse/kl_per_dim",
}


def tiny(compose_cfg, *overrides):  # a 2-epoch run of 5 batches with every callback
    return compose_cfg(
        "debug=limit",
        "callbacks=default",
        "model.latent_dim=4",
        "callbacks.latent_probe.max_train=300",
        "callbacks.latent_probe.pixels=true",
        *overrides,
    )


@pytest.fixture(scope="module")
def vae_run(tmp_path_factory, data_dir):
    from tests.conftest import small_overrides
    from vae_lightning.config import compose

    out = tmp_path_factory.mktemp("vae_run")
    cfg = compose(
        [
            *small_overrides(data_dir, out),
            "debug=limit",
            "model.latent_dim=4",
            "callbacks.latent_probe.max_train=300",
            "callbacks.latent_probe.pixels=true",
        ]
    )
    train(cfg)
    return out


def test_every_picture_is_a_png_and_a_tensorboard_image(vae_run):
    pngs = {p.name for p in (vae_run / "images").glob("*.png")}
    for tag in IMAGE_TAGS:
        assert any(name.startswith(tag.replace("/", "_")) for name in pngs), tag
    acc = EventAccumulator(str(vae_run / "tensorboard"), size_guidance={"images": 0})
    acc.Reload()
    assert IMAGE_TAGS <= set(acc.Tags()["images"])
    # reconstructions every epoch (every_n_epochs=1) of the 2-epoch run
    assert len(acc.Images("images/reconstructions")) == 2
    recon = acc.Images("images/reconstructions")[-1]
    # a grid of 2 rows x 16 images of 28 px with 2 px padding
    assert (recon.height, recon.width) == (2 + 2 * 30, 2 + 16 * 30)
    scalars = set(acc.Tags()["scalars"])
    assert {
        "val/active_units",
        "collapse/kl_dim_00",
        "collapse/kl_dim_03",
        "probe/rf_acc",
    } <= scalars
    # the projector: embeddings with class names and thumbnails, written once at the end
    assert (vae_run / "tensorboard" / "projector_config.pbtxt").is_file()
    (metadata,) = (vae_run / "tensorboard").glob("*/latent/metadata.tsv")
    assert len(metadata.read_text().splitlines()) == 256  # projector_n=1000 > 256 test images
    assert (metadata.parent / "sprite.png").is_file()


def test_probe_and_collapse_results_in_metrics_json(vae_run):
    record = json.loads((vae_run / "metrics.json").read_text())
    m = record["metrics"]
    for key in ("probe/rf_acc", "probe/logreg_acc", "probe/knn_acc", "probe/pixels_rf_acc"):
        assert 0.0 <= m[key] <= 1.0, key
    # the synthetic classes are a bright band at a class-dependent height: pixels separate them
    assert m["probe/pixels_rf_acc"] > 0.9
    confusion = np.array(record["probe"]["confusion_rf"])
    assert confusion.shape == (10, 10) and confusion.sum() == record["probe"]["n_test"]
    assert np.trace(confusion) / confusion.sum() == pytest.approx(m["probe/rf_acc"])
    assert record["probe"]["n_train"] == 300 and record["probe"]["features"] == "mu"
    collapse = record["collapse"]
    assert len(collapse["kl_per_dim"]) == 4
    assert collapse["active_units"] == m["val/active_units"]
    assert collapse["active_units"] == sum(v > 0.01 for v in collapse["mu_variance"])


def test_ae_gets_fitted_gaussian_samples_and_no_traversals(compose_cfg):
    cfg = tiny(compose_cfg, "model=ae", "callbacks.latent_probe.pixels=false")
    train(cfg)
    out = Path(cfg.paths.output_dir)
    names = {p.name for p in (out / "images").glob("*.png")}
    assert any(n.startswith("images_samples_ae_fitted_gaussian") for n in names)
    assert not any("traversals" in n or "collapse" in n for n in names)
    record = json.loads((out / "metrics.json").read_text())
    assert record["probe"]["features"] == "z" and "collapse" not in record


def test_traversals_on_the_ae_are_refused_before_training_when_asked(compose_cfg):
    cfg = tiny(compose_cfg, "model=ae", "callbacks.traversals.on_unsupported=error")
    with pytest.raises(
        ConfigError, match=r"callbacks\.Traversals needs a VAE.*AE is deterministic"
    ):
        train(cfg)
    assert not (Path(cfg.paths.output_dir) / "checkpoints").exists()


def test_callbacks_work_under_fast_dev_run(compose_cfg):
    cfg = tiny(compose_cfg, "debug=fast", "callbacks.latent_probe.pixels=false")
    train(cfg)
    out = Path(cfg.paths.output_dir)
    assert (out / "images").is_dir() and list((out / "images").glob("images_reconstructions*"))
    assert not (out / "tensorboard").exists()  # loggers are off under fast_dev_run


def test_probe_is_near_perfect_on_separable_latents_and_chance_on_shuffled_labels():
    rng = np.random.default_rng(0)
    y_train, y_test = rng.integers(0, 10, 2000), rng.integers(0, 10, 500)

    def feats(y):
        return np.eye(10)[y] * 3 + rng.normal(scale=0.3, size=(len(y), 10))

    res = fit_probes(feats(y_train), y_train, feats(y_test), y_test)
    assert min(res.accuracy.values()) > 0.98
    assert res.confusion.sum() == 500
    shuffled = fit_probes(feats(y_train), rng.permutation(y_train), feats(y_test), y_test)
    assert max(shuffled.accuracy.values()) < 0.2


def test_active_units_match_a_hand_computed_case():
    # mu over 4 "images": per-dimension variances 0, 0.005, 0.02 and 1 (alternating +-sqrt(v))
    signs = torch.tensor([1.0, -1.0, 1.0, -1.0]).unsqueeze(1)
    variances = torch.tensor([0.0, 0.005, 0.02, 1.0])
    mu = 5.0 + signs * variances.sqrt()  # (4, 4), an offset mean does not matter
    moments = LatentMoments()
    moments.update(mu[:3])
    moments.update(mu[3:])  # in two batches
    assert torch.allclose(moments.mu_variance().float(), variances, atol=1e-6)
    assert active_units(moments.mu_variance()) == 2
    assert active_units(moments.mu_variance(), threshold=0.001) == 3


def test_fixed_examples_depend_on_the_seed_only(data_dir):
    from types import SimpleNamespace

    from vae_lightning.data import MNISTDataModule

    dm = MNISTDataModule(data_dir=str(data_dir), verify=False, val_size=100)
    dm.setup()
    trainer = SimpleNamespace(datamodule=dm)
    a = Reconstructions("unused", seed=1)._test_examples(trainer, 8, "cpu")[1]
    b = Reconstructions("unused", seed=1)._test_examples(trainer, 8, "cpu")[1]
    c = Reconstructions("unused", seed=2)._test_examples(trainer, 8, "cpu")[1]
    assert torch.equal(a, b) and not torch.equal(a, c)
    pairs = Interpolations("unused", n_pairs=8)._pairs(dm.splits["test"][1])
    labels = dm.splits["test"][1]
    assert len(pairs) == 8 and all(labels[i] != labels[j] for i, j in pairs)


@pytest.mark.parametrize("key", ["every_n_epochs=0", "n=0", "on_unsupported=maybe"])
def test_bad_callback_values_name_the_key(key):
    name, value = key.split("=")
    kwargs = {name: int(value) if value.lstrip("-").isdigit() else value}
    with pytest.raises(ConfigError) as info:
        Reconstructions("unused", **kwargs)
    assert info.value.key == name


def test_publish_writes_a_png_and_a_tensorboard_image_and_eval_mode_restores(tmp_path):
    from matplotlib.figure import Figure
    from PIL import Image
    from torch.utils.tensorboard import SummaryWriter

    fig = Figure(figsize=(2, 1), dpi=100)
    fig.subplots().plot([0, 1], [1, 0])
    grid = grids.grid(torch.rand(6, 1, 28, 28), nrow=3)  # (3, 2 + 2 * 30, 2 + 3 * 30)
    with SummaryWriter(str(tmp_path / "tb")) as writer:
        publish.publish(fig, tmp_path / "fig.png", "t/fig", step=3, writers=[writer])
        publish.publish(grid, tmp_path / "grid.png", "t/grid", step=4, writers=[writer])
    assert Image.open(tmp_path / "fig.png").size == (200, 100)  # figsize x dpi
    png = torch.from_numpy(np.array(Image.open(tmp_path / "grid.png").convert("RGB")))
    assert torch.equal(png.permute(2, 0, 1), (grid * 255 + 0.5).clamp(0, 255).to(torch.uint8))
    assert not list(tmp_path.glob(".*.part"))  # nothing half-written left beside them
    acc = EventAccumulator(str(tmp_path / "tb"), size_guidance={"images": 0})
    acc.Reload()
    (fig_event,) = acc.Images("t/fig")
    (grid_event,) = acc.Images("t/grid")
    assert (fig_event.step, fig_event.width, fig_event.height) == (3, 200, 100)
    assert (grid_event.step, grid_event.height, grid_event.width) == (4, 62, 92)

    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Dropout())
    with pytest.raises(RuntimeError, match="inside"), eval_mode(model):
        assert not model.training and not torch.is_grad_enabled()
        raise RuntimeError("inside")
    assert model.training and model[1].training and torch.is_grad_enabled()
