"""End-to-end: the real CLI in a subprocess, reading back the files it wrote."""

import json
import math
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams import plugin_data_pb2

from tests.conftest import SMALL, run_cli, run_here, start_together
from vae_lightning.models import VAE


@pytest.fixture(scope="module")
def cli_run(data_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "run"
    result = run_cli(
        "debug=limit",
        "model.latent_dim=4",
        f"paths.data_dir={data_dir}",
        f"hydra.run.dir={out}",
        *SMALL,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return out, result


def test_run_folder_contents(cli_run):
    out, _ = cli_run
    for name in ("metrics.json", "history.csv", "train.log", ".hydra/config.yaml"):
        assert (out / name).is_file(), name
    assert (out / "checkpoints" / "last.ckpt").is_file()
    record = json.loads((out / "metrics.json").read_text())
    assert record["status"] == "ok"
    assert record["epochs"] == 2
    assert all(math.isfinite(v) for v in record["metrics"].values())
    assert record["metrics"]["test/loss"] == pytest.approx(
        record["metrics"]["test/recon"] + record["metrics"]["test/kl"], rel=1e-5
    )
    log = (out / "train.log").read_text()
    assert "run folder" in log and "max_epochs=2" in log  # Lightning's own messages land here


def test_tensorboard_events_read_back(cli_run):
    out, _ = cli_run
    record = json.loads((out / "metrics.json").read_text())
    events = list((out / "tensorboard").glob("events.out.tfevents.*"))
    assert events
    acc = EventAccumulator(str(out / "tensorboard"))
    acc.Reload()
    scalars = set(acc.Tags()["scalars"])
    for stage in ("train", "val"):
        for name in ("loss", "recon", "kl", "mse"):
            assert f"{stage}/{name}" in scalars
            assert len(acc.Scalars(f"{stage}/{name}")) == 2  # one point per epoch
    assert {"test/loss", "test/mse", "train/loss_step"} <= scalars
    assert acc.Scalars("test/loss")[-1].value == pytest.approx(record["metrics"]["test/loss"])
    # the hparams view: real final metrics, not -1
    content = acc.PluginTagToContent("hparams")
    session = plugin_data_pb2.HParamsPluginData.FromString(
        content["_hparams_/session_start_info"]
    ).session_start_info
    assert session.hparams["latent_dim"].number_value == 4
    assert session.hparams["model"].string_value == "VAE"
    assert acc.Scalars("hp/test/loss")[-1].value == pytest.approx(record["metrics"]["test/loss"])
    assert acc.Scalars("hp/val/loss")[-1].value == pytest.approx(record["metrics"]["val/loss"])


def test_checkpoint_reloads_and_reproduces_the_test_loss(cli_run, data_dir):
    from vae_lightning.data import MNISTDataModule

    out, _ = cli_run
    record = json.loads((out / "metrics.json").read_text())
    assert record["tested"] == record["best_checkpoint"]  # a held-out validation split here
    model = VAE.load_from_checkpoint(record["best_checkpoint"], weights_only=True)
    assert model.hparams.latent_dim == 4
    dm = MNISTDataModule(data_dir=str(data_dir), verify=False, val_size=128, batch_size=64)
    dm.setup()
    model.eval()
    # debug=limit tests 2 batches of 64; the ELBO estimate samples z, so compare with tolerance
    x = dm.on_after_batch_transfer(next(iter(dm.test_dataloader())), 0)[0]
    with torch.no_grad():
        losses = torch.stack([model.terms(x)["loss"] for _ in range(20)])
    assert losses.mean().item() == pytest.approx(record["metrics"]["test/loss"], rel=0.05)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("model.latent_dim=0", "model.latent_dim must be an integer >= 1, got 0"),
        ("model.beta=-0.5", "model.beta must be a finite number >= 0.0, got -0.5"),
        ("data.batch_size=0", "data.batch_size must be an integer >= 1, got 0"),
        ("model.lr=-1", "model.lr must be a finite number > 0.0, got -1"),
    ],
)
def test_bad_value_is_one_clear_line_before_training(data_dir, tmp_path, override, message):
    out = tmp_path / "run"
    result = run_here("vae-train", *SMALL, f"paths.data_dir={data_dir}", f"hydra.run.dir={out}",
                      override)  # fmt: skip
    assert result.returncode != 0
    assert result.stderr.strip().splitlines()[-1] == f"error: {message}"
    assert "Traceback" not in result.stderr
    assert not (out / "checkpoints").exists()
    assert json.loads((out / "metrics.json").read_text())["status"] == "failed"


def test_unknown_model_name_lists_the_choices(tmp_path):
    result = run_here("vae-train", "model=vea", f"hydra.run.dir={tmp_path / 'run'}")
    assert result.returncode != 0
    assert "model/vea" in result.stderr
    assert "ae" in result.stderr and "conv_vae" in result.stderr


def test_missing_data_says_what_was_tried_and_what_to_run(tmp_path):
    result = run_here(
        "vae-train",
        f"paths.data_dir={tmp_path / 'nothing'}",
        "data.download=false",
        f"hydra.run.dir={tmp_path / 'run'}",
    )
    assert result.returncode != 0
    assert "missing train-images-idx3-ubyte" in result.stderr
    assert "make data" in result.stderr.splitlines()[-1]


def test_runs_started_together_get_their_own_folders(data_dir, tmp_path):
    start_together("debug=fast", f"paths.data_dir={data_dir}", f"paths.log_dir={tmp_path}", *SMALL)
    runs = sorted(Path(tmp_path, "debug", "runs").iterdir())
    assert len(runs) == 2
    for run in runs:
        assert json.loads((run / "metrics.json").read_text())["status"] == "ok"


@pytest.mark.realdata
@pytest.mark.slow
def test_one_real_epoch_of_seed1_vae(real_data_dir, tmp_path):
    """pytorch/examples' VAE reaches a test loss of about 127 nats after one MNIST epoch."""
    out = tmp_path / "run"
    result = run_here(
        "vae-train",
        "experiment=seed1_vae_mnist",
        "trainer.max_epochs=1",
        "trainer.accelerator=cpu",
        "callbacks.latent_probe.max_train=10000",  # the probe on 55k codes is 16 s of 26
        f"paths.data_dir={real_data_dir}",
        f"hydra.run.dir={out}",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())["metrics"]
    assert 124 < metrics["test/loss"] < 131
    assert 0 < metrics["test/mse"] < 0.05
