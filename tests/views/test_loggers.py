"""The pictures through every logger that takes them (views.publish): real runs with
``logger=wandb`` (offline) and ``logger=mlflow`` (a store in the run folder) hold the
reconstructions, the samples and the probe's confusion matrix, the same pictures as the run's
``images/``, read back from W&B's offline run folder and through MLflow's own client; the jobs
of a multirun in one process each get a W&B run of their own."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.conftest import SMALL, run_here

# the pictures the issue names, and the epochs they are drawn at in a 2-epoch run of 5 batches
PICTURES = {"images/reconstructions": (1, 2), "images/samples_prior": (1, 2),
            "probe/confusion_rf": (2,)}  # fmt: skip
STEPS_PER_EPOCH = 5


def run(data_dir: Path, out: Path, *extra: str) -> Path:
    """A 2-epoch run of 5 batches with the default callbacks (a small probe), into ``out``."""
    args = [f"paths.data_dir={data_dir}", *SMALL, "debug=limit", "model.latent_dim=4",
            "callbacks.latent_probe.max_train=300", "callbacks.latent_probe.n_estimators=20",
            "~callbacks.latent_space", f"hydra.run.dir={out}", *extra]  # fmt: skip
    result = run_here("vae-train", *args)
    assert result.returncode == 0, result.stderr[-3000:]
    return out


def png(folder: Path, tag: str, epoch: int) -> Path:
    """The run's own copy of a picture: images/<tag with / as _>_epoch<NNN>.png."""
    return folder / "images" / f"{tag.replace('/', '_')}_epoch{epoch:03d}.png"


def pixels(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGBA"))


@pytest.fixture(scope="module")
def wandb_run(tmp_path_factory, data_dir) -> Path:
    return run(data_dir, tmp_path_factory.mktemp("wandb") / "run", "logger=wandb")


@pytest.fixture(scope="module")
def mlflow_run(tmp_path_factory, data_dir) -> Path:
    return run(data_dir, tmp_path_factory.mktemp("mlflow") / "run", "logger=mlflow")


def offline_run(folder: Path) -> Path:
    """The one W&B offline run folder under a run folder."""
    (found,) = (folder / "wandb").glob("offline-run-*")
    return found


def test_a_wandb_offline_run_holds_the_pictures_in_its_run_folder(wandb_run):
    offline = offline_run(wandb_run)
    (history,) = offline.glob("run-*.wandb")  # the run's records: metrics and media, by key
    records = history.read_bytes()
    media = offline / "files" / "media" / "images"
    for tag, epochs in PICTURES.items():
        files = sorted(media.glob(f"{tag}_*.png"))
        # the same files as the run's images/, one per epoch drawn
        assert sorted(f.read_bytes() for f in files) == sorted(
            png(wandb_run, tag, e).read_bytes() for e in epochs
        ), tag
        for f in files:  # each logged under its tag: the record names the tag and the file
            name = f.relative_to(offline / "files").as_posix().encode()
            at = records.find(name)
            assert at > 0 and tag.encode() in records[at : at + 400], name
    # the metrics went there too (W&B's own record, beside metrics.json's)
    test_loss = json.loads((wandb_run / "metrics.json").read_text())["metrics"]["test/loss"]
    assert b"test/loss" in records and np.isfinite(test_loss)
    assert not (wandb_run / "tensorboard").exists()  # logger=wandb alone


def mlflow_client(folder: Path):
    from mlflow import MlflowClient

    return MlflowClient(f"sqlite:///{folder}/mlflow/mlflow.db")


def test_an_mlflow_run_holds_the_pictures_and_the_metrics_in_its_run_folder(mlflow_run):
    client = mlflow_client(mlflow_run)
    (experiment,) = [e for e in client.search_experiments() if e.name == "debug"]
    (found,) = client.search_runs([experiment.experiment_id])
    assert found.info.status == "FINISHED"
    record = json.loads((mlflow_run / "metrics.json").read_text())
    for key in ("test/loss", "test/recon", "probe/rf_acc"):
        assert found.data.metrics[key] == pytest.approx(record["metrics"][key], rel=1e-6), key
    assert found.data.params["latent_dim"] == "4"
    # its artifacts are files under the run folder, fetched here through MLflow's client
    root = Path(found.info.artifact_uri.removeprefix("file://"))
    assert root.is_relative_to(mlflow_run / "mlflow" / "artifacts")
    names = [Path(a.path).name for a in client.list_artifacts(found.info.run_id, "images")]
    for tag, epochs in PICTURES.items():
        # an image series by step: <tag with / as ~>+step+<global step>+...png
        key = tag.replace("/", "~")
        for epoch in epochs:
            step = epoch * STEPS_PER_EPOCH
            (name,) = [n for n in names if n.startswith(f"{key}+step+{step}+") and
                       n.endswith(".png")]  # fmt: skip
            local = client.download_artifacts(found.info.run_id, f"images/{name}")
            np.testing.assert_array_equal(pixels(Path(local)), pixels(png(mlflow_run, tag, epoch)))


def test_each_job_of_a_multirun_in_one_process_gets_its_own_wandb_run(data_dir, tmp_path):
    sweep = tmp_path / "sweep"
    args = [f"paths.data_dir={data_dir}", *SMALL, "trainer.max_epochs=1",
            "trainer.limit_train_batches=2", "trainer.limit_val_batches=1",
            "trainer.limit_test_batches=1", "callbacks=minimal",
            "+callbacks.reconstructions._target_=vae_lightning.views.images.Reconstructions",
            "+callbacks.reconstructions.output_dir=${paths.output_dir}/images",
            "logger=wandb", f"hydra.sweep.dir={sweep}"]  # fmt: skip
    result = run_here("vae-train", "-m", *args, "seed=1,2")
    assert result.returncode == 0, result.stderr[-3000:]
    jobs = sorted(p.parent for p in sweep.glob("*/metrics.json"))
    assert len(jobs) == 2
    ids = set()
    for job in jobs:
        offline = offline_run(job)
        ids.add(offline.name.rsplit("-", 1)[1])
        (media,) = (offline / "files" / "media" / "images" / "images").glob("reconstructions_*")
        assert media.read_bytes() == png(job, "images/reconstructions", 1).read_bytes()
    assert len(ids) == 2  # two W&B runs, not the first job's run reused by the second
