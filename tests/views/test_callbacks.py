"""The callbacks that draw and measure while a model trains (views.images, views.measures) on
tiny runs: the files and TensorBoard images they write, the probe's and the collapse's results
in metrics.json, an AE's views, the contract they check at setup, fast_dev_run, seeded examples,
and a run's memory with every callback on."""

import json
import os
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from vae_lightning.errors import ConfigError
from vae_lightning.train import train
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


@pytest.mark.slow
def test_memory_stays_flat_over_many_epochs(compose_cfg, tmp_path):
    """Resident memory after epoch 10 and after epoch 40 of a tiny run with every callback on."""

    class Rss(L.Callback):
        def __init__(self):
            self.mb = []

        def on_train_epoch_end(self, trainer, pl_module):
            with open("/proc/self/statm") as f:
                self.mb.append(int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20)

    rss = Rss()
    import vae_lightning.run.history as cbs

    cfg = compose_cfg(
        "trainer.max_epochs=40",
        "trainer.limit_train_batches=2",
        "trainer.limit_val_batches=1",
        "callbacks.latent_probe.max_train=100",
        "callbacks.latent_space.every_n_epochs=5",
        "callbacks.latent_space.projector_n=0",
    )
    original = cbs.History.__init__

    def with_rss(self, path):  # ride along with the callback train.py always adds
        original(self, path)
        self.rss = rss

    monkey = pytest.MonkeyPatch()
    monkey.setattr(cbs.History, "__init__", with_rss)
    monkey.setattr(
        cbs.History,
        "on_train_epoch_end",
        (lambda f: lambda self, t, m: (f(self, t, m), self.rss.on_train_epoch_end(t, m)))(
            cbs.History.on_train_epoch_end
        ),
    )
    try:
        train(cfg)
    finally:
        monkey.undo()
    assert len(rss.mb) == 40
    growth = rss.mb[-1] - rss.mb[9]
    assert growth < 25, f"resident memory grew {growth:.1f} MB over 30 epochs: {rss.mb[9::10]}"
