"""End-to-end: the entry points as a user runs them, vae-train and vae-evaluate (in a process of
their own, or their console script in this one), reading back the files they wrote; every kind
of refusal reaching the user as one line."""

import json
import math
import re
import shutil
import sys
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams import plugin_data_pb2

from tests.conftest import (
    FIXTURES,
    REPO_ROOT,
    SMALL,
    RunsCode,
    history,
    one_line_error,
    run_cli,
    run_here,
    start_together,
    write_synthetic,
)
from vae_lightning.config import CONFIG_DIR
from vae_lightning.models import VAE
from vae_lightning.run.checkpoints import ADVICE


@pytest.fixture(scope="module")
def cli_run(data_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "run"
    result = run_cli(
        "debug=limit",
        "model.latent_dim=4",
        "model.beta=2",
        f"paths.data_dir={data_dir}",
        f"hydra.run.dir={out}",
        *SMALL,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return out, result


# [time][logger][LEVEL] - message: a record of the run's log (conf/hydra/job_logging)
LOG_RECORD = re.compile(r"^\[[^]]+\]\[([\w.]+)\]\[[A-Z]+\] - ", re.M)


def test_run_folder_contents(cli_run):
    out, _ = cli_run
    for name in ("metrics.json", "history.csv", "train.log", ".hydra/config.yaml"):
        assert (out / name).is_file(), name
    record = json.loads((out / "metrics.json").read_text())
    assert record["status"] == "ok"
    assert record["epochs"] == 2 and record["time/epoch_s_median"] > 0
    assert record["hparams"]["beta"] == 2.0 and record["hparams"]["latent_dim"] == 4
    assert all(math.isfinite(v) for v in record["metrics"].values())
    # the loss is the negative ELBO, whatever beta weighs the objective with
    assert record["metrics"]["test/loss"] == pytest.approx(
        record["metrics"]["test/recon"] + record["metrics"]["test/kl"], rel=1e-5
    )
    # history.csv: a row per epoch, the last one the final metrics
    rows = history(out)
    assert [(row["epoch"], row["step"]) for row in rows] == [(0, 5), (1, 10)]
    assert {"train/loss", "val/loss", "val/kl", "time/epoch_s"} <= set(rows[0])
    assert rows[-1]["val/loss"] == pytest.approx(record["metrics"]["val/loss"])
    # the last and the best checkpoint, side by side, each reloading the run's model
    last, best = out / "checkpoints" / "last.ckpt", Path(record["best_checkpoint"])
    assert last.is_file() and best.is_file() and best.parent == last.parent
    model = VAE.load_from_checkpoint(last, weights_only=True)
    assert model.hparams.latent_dim == 4 and model.beta == 2.0
    # train.log holds the run's own log records and Lightning's
    loggers = set(LOG_RECORD.findall((out / "train.log").read_text()))
    own = {"__main__", "vae_lightning.train"}  # train.py's, run as `python -m` or imported
    assert own & loggers or any(n.startswith("vae_lightning.") for n in loggers), loggers
    assert any(name.startswith("lightning.") for name in loggers), loggers


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


# Every kind of bad setting vae-train refuses before training: one line, exit 2, naming the key
# (the checks themselves: the models', the data's, the schedules' and the trainer's own tests).
BAD = [
    (["model.latent_dim=0"], "model.latent_dim must be an integer >= 1, got 0"),
    (["model.latent_dim=abc"], "model.latent_dim must be an integer >= 1, got 'abc'"),
    (["model.beta=-0.5"], "model.beta must be a finite number >= 0.0, got -0.5"),
    (["model.beta=high"], "model.beta must be a finite number >= 0.0, got 'high'"),
    (["model.lr=-1"], "model.lr must be a finite number > 0.0, got -1"),
    (
        ["model=conv_vae", "model.in_shape=[784]"],
        "model.in_shape must be (channels, height, width)",
    ),
    (["model.feature_loss_weight=-1"], "model.feature_loss_weight must be a finite number >= 0.0"),
    (["+model.latnet_dim=4"], "model has a key its class does not take"),
    (
        ["scheduler=cosine", "model.scheduler.warmup_epochs=-1"],
        "model.scheduler.warmup_epochs must be an integer >= 0, got -1",
    ),
    (["kl=cyclical", "model.kl.cycles=0"], "model.kl.cycles must be an integer >= 1, got 0"),
    (["data.batch_size=0"], "data.batch_size must be an integer >= 1, got 0"),
    (["data.binarize=yes"], "data.binarize must be one of none, dynamic, static, got 'yes'"),
    (["data.val_size=100000"], "data.val_size must be < 640 (the training set), got 100000"),
    (["trainer.max_epochs=0"], "trainer.max_epochs must be an integer >= 1, got 0"),
    (["trainer.log_every_n_steps=0"], "trainer.log_every_n_steps must be an integer >= 1, got 0"),
    (["trainer.limit_train_batches=0"], "trainer.limit_train_batches must be a fraction in (0, 1]"),
    (["seed=abc"], "seed must be an integer >= 0, got 'abc'"),
    (["threads=many"], "threads must be an integer >= 1, got 'many'"),
]


@pytest.mark.parametrize(
    ("extra", "message"),
    [pytest.param(extra, message, id=" ".join(extra)) for extra, message in BAD],
)
def test_a_bad_setting_is_one_line_naming_the_key_before_training(
    data_dir, tmp_path, extra, message
):
    out = tmp_path / "run"
    args = [f"paths.data_dir={data_dir}", *SMALL, "logger=none", "callbacks=minimal"]
    result = run_here("vae-train", *args, f"hydra.run.dir={out}", *extra)
    assert result.returncode == 2
    assert one_line_error(result).startswith(message)
    assert not (out / "checkpoints").exists()
    if (out / "metrics.json").exists():
        assert json.loads((out / "metrics.json").read_text())["status"] == "failed"


def test_a_loss_that_turns_non_finite_is_one_line_naming_what_to_lower(data_dir, tmp_path):
    out = tmp_path / "run"
    args = [f"paths.data_dir={data_dir}", *SMALL, "logger=none", "callbacks=minimal"]
    result = run_here("vae-train", *args, f"hydra.run.dir={out}", "model.lr=1e12",
                      "trainer.max_epochs=1")  # fmt: skip
    line = one_line_error(result, "Lower model.lr")
    assert line.startswith("non-finite training loss (nan) at epoch 0, step ")
    assert not (out / "checkpoints" / "last.ckpt").exists()
    assert json.loads((out / "metrics.json").read_text())["status"] == "failed"


@pytest.mark.parametrize("logger", ["wandb", "mlflow"])
def test_a_logger_whose_package_is_missing_names_the_extra_to_install(
    data_dir, tmp_path, monkeypatch, logger
):
    monkeypatch.setitem(sys.modules, logger, None)  # as if the extra were not installed
    out = tmp_path / "run"
    args = [f"paths.data_dir={data_dir}", *SMALL, f"logger={logger}", "callbacks=minimal"]
    result = run_here("vae-train", *args, f"hydra.run.dir={out}")
    assert result.returncode == 2
    assert one_line_error(result) == (
        f"logger.{logger} needs the {logger} package, which is not installed: install the "
        f"'{logger}' extra, pip install 'vae_lightning[{logger}]' (in a checkout: pip install -e "
        f"'.[{logger}]'; make install has it)"
    )
    assert not (out / "metrics.json").exists()  # refused before the run began


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("model=vea", "In 'train': Could not find 'model/vea'"),
        ("model.latnet_dim=4", "Could not override 'model.latnet_dim'"),
    ],
)
def test_an_option_or_key_the_config_lacks_is_named_before_the_run(tmp_path, override, message):
    """Hydra's own refusal (exit status 1, docs/errors.md): the option lists the choices."""
    out = tmp_path / "run"
    result = run_here("vae-train", override, f"hydra.run.dir={out}")
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.startswith(message)
    if override.startswith("model="):
        for option in sorted(p.stem for p in (CONFIG_DIR / "model").glob("*.yaml")):
            assert f"\t{option}\n" in result.stderr, option
    assert not out.exists()


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


def test_tensorboard_binds_to_localhost():
    import subprocess

    out = subprocess.run(
        ["make", "-n", "tensorboard"], cwd=REPO_ROOT, capture_output=True, text=True
    )
    assert "--host 127.0.0.1" in out.stdout


# --- vae-evaluate on the run's checkpoint --------------------------------------------------------


def evaluate_ckpt(cli_run) -> Path:
    out, _ = cli_run
    return out / "checkpoints" / "last.ckpt"


def test_vae_evaluate_writes_eval_json_beside_the_run(cli_run):
    ckpt = evaluate_ckpt(cli_run)
    (ckpt.parents[1] / "eval.json").unlink(missing_ok=True)
    result = run_here("vae-evaluate", f"ckpt={ckpt}", "k=4", "n_fid=0", "device=cpu",
                      "batch_size=64")  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    written = json.loads((ckpt.parents[1] / "eval.json").read_text())
    assert written["nll_iw"]["k"] == 4 and "gen/fid" not in written["metrics"]
    assert written["checkpoint"] == str(ckpt.resolve())
    assert written["model"] == "VAE" and written["data"]["n_test"] == 256
    m = written["metrics"]
    assert m["test/nll_iw"] <= m["test/loss"] + 1.0  # the k-sample bound improves on the ELBO


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["ckpt={ckpt}", "kk=4"], "Could not override 'kk'"),
        (["ckpt={ckpt}", "+kk=4"], "kk is not a setting of vae-evaluate"),
        (["ckpt={ckpt}", "k=-1"], "k must be an integer >= 0, got -1"),
        (["ckpt={ckpt}", "probes=maybe"], "probes must be true or false, got 'maybe'"),
        (
            ["ckpt={ckpt}", "classifier_epochs=0"],
            "classifier_epochs must be an integer >= 1, got 0",
        ),
        (["k=3"], "ckpt is required"),
        (
            ["ckpt={run}/nonexistent.ckpt"],
            "ckpt points to {run}/nonexistent.ckpt, which is not a file",
        ),
    ],
)
def test_vae_evaluate_refuses_bad_settings_in_one_line_before_any_work(cli_run, args, message):
    ckpt = evaluate_ckpt(cli_run)
    run = ckpt.parents[1]
    (run / "eval.json").unlink(missing_ok=True)
    result = run_here("vae-evaluate", *(a.format(ckpt=ckpt, run=run) for a in args))
    assert result.returncode == 2
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1, result.stderr
    assert message.format(run=run) in result.stderr
    assert not (run / "eval.json").exists()


def evaluate_refused(*args: str) -> str:
    """``vae-evaluate`` refusing as a user error: exit 2, its one error line (without the
    prefix); any lines before it are its log."""
    result = run_here("vae-evaluate", *args)
    err = result.stderr
    assert result.returncode == 2, (result.returncode, err[-3000:])
    assert [line for line in err.splitlines() if line.startswith("error: ")] == [
        err.splitlines()[-1]
    ], err
    assert "Traceback" not in err and "weights_only=False" not in err
    return err.splitlines()[-1][len("error: ") :]


def test_vae_evaluate_refuses_a_device_it_does_not_have_before_loading(tmp_path):
    missing = tmp_path / "missing.ckpt"  # never reached: the device is checked first
    assert evaluate_refused(f"ckpt={missing}", "device=gpu0") == (
        "device must be one of cpu, cuda, cuda:<index>, mps, or null (CUDA when available, "
        "else the CPU); got 'gpu0'"
    )
    if not torch.cuda.is_available():
        assert evaluate_refused(f"ckpt={missing}", "device=cuda") == (
            "device is 'cuda', but no CUDA device is available here: use device=cpu, or leave "
            "device unset (CUDA when available, else the CPU)"
        )


def test_vae_evaluate_help_prints_the_settings():
    result = run_here("vae-evaluate", "--help")
    assert result.returncode == 0
    assert "vae-evaluate" in result.stdout
    assert "n_fid: 10000" in result.stdout and "classifiers: false" in result.stdout


def test_vae_evaluate_writes_nothing_but_its_files(cli_run, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # where Hydra would put outputs/ or .hydra/
    ckpt = evaluate_ckpt(cli_run)
    run = ckpt.parents[1]
    before = set(run.rglob("*"))
    result = run_here("vae-evaluate", f"ckpt={ckpt}", "k=2", "n_fid=0", "device=cpu")
    assert result.returncode == 0, result.stderr[-3000:]
    assert list(tmp_path.iterdir()) == []
    eval_files = {
        run / "eval",
        *(run / "eval" / f"{n}.png" for n in ("reconstructions", "samples")),
    }
    assert set(run.rglob("*")) - before <= {run / "eval.json", *eval_files}
    assert eval_files <= set(run.rglob("*"))


def test_vae_evaluate_trains_the_classifiers_ahead_of_time(tmp_path):
    data = write_synthetic(tmp_path / "data")
    args = ["classifiers=true", f"data_dir={data}", "classifier_epochs=1", "classifier_max_steps=2"]
    args.append("classifier_min_accuracy=0")  # 2 steps: near chance
    # the synthetic files are not the official ones: verification names the first it checks
    assert "train-images-idx3-ubyte" in evaluate_refused(*args)
    assert not (data / "classifiers" / "mnist.pt").exists()
    assert run_here("vae-evaluate", *args, "verify=false", "device=cpu").returncode == 0
    for name in ("mnist", "fashion_mnist"):
        record = json.loads((data / "classifiers" / f"{name}.json").read_text())
        assert record["max_steps"] == 2 and 0 <= record["test_accuracy"] <= 1
        assert (data / "classifiers" / f"{name}.pt").is_file()
    assert "data_dir is required" in evaluate_refused("classifiers=true", "verify=false")
    assert "datasets must be one of mnist, fashion_mnist" in evaluate_refused(
        *args, "datasets=[cifar]"
    )


def test_vae_evaluate_never_replaces_a_cached_classifier_below_the_floor_unasked(cli_run, tmp_path):
    """A cached classifier too weak for FID is refused in one line and kept as it is (every
    way the cache can disagree with what is asked: tests/evaluation/test_fid.py)."""
    from vae_lightning.evaluate import prepare_classifiers

    data = write_synthetic(tmp_path / "data")
    prepare_classifiers(
        data, "mnist", classifier_epochs=1, classifier_max_steps=5, device="cpu", verify=False,
        classifier_min_accuracy=0,
    )  # fmt: skip
    weights = data / "classifiers" / "mnist.pt"
    cached = weights.read_bytes()
    accuracy = torch.load(weights, weights_only=True)["record"]["test_accuracy"]
    ckpt = evaluate_ckpt(cli_run)
    run = ckpt.parents[1]
    (run / "eval.json").unlink(missing_ok=True)
    shutil.rmtree(run / "eval", ignore_errors=True)  # earlier tests' grids
    message = evaluate_refused(
        f"ckpt={ckpt}", f"data_dir={data}", "device=cpu", "k=0", "batch_size=64",
        "classifier_epochs=1", "classifier_max_steps=5",
    )  # fmt: skip
    assert message == (
        f"the cached FID classifier {weights} reaches {accuracy:.4f} test accuracy, below "
        "classifier_min_accuracy=0.8: its features would make gen/fid meaningless, so no FID was "
        "computed. Replace it: retrain_classifier=true, with enough training (more "
        "classifier_epochs, classifier_max_steps=null)"
    )
    assert weights.read_bytes() == cached
    assert not (run / "eval.json").exists() and not (run / "eval").exists()


# --- a checkpoint refused on reading (run.checkpoints: tests/run/test_checkpoints.py) ----------


@pytest.mark.parametrize("damage", ["runs-code", "truncated"])
@pytest.mark.parametrize("tool", ["vae-evaluate", "vae-train"])
def test_a_checkpoint_refused_on_reading_reaches_the_user_as_one_line(
    tool, damage, data_dir, tmp_path
):
    """vae-evaluate ckpt= and vae-train resume= each say which of the two a file is, in one
    line, without passing on torch's hint to load it with weights_only=False; nothing of it
    ran, nothing was written."""
    real = FIXTURES / "pre_redesign" / "vae.ckpt"
    marker = tmp_path / "code_ran"
    path = tmp_path / f"{damage}.ckpt"
    if damage == "runs-code":
        torch.save({**torch.load(real, weights_only=True), "extra": RunsCode(marker)}, path)
        expected = (
            f"{path} was not loaded: it holds a posix.system object, not only tensors and plain "
            f"containers, and unpickling it could run code. {ADVICE}"
        )
    else:
        path.write_bytes(real.read_bytes()[: real.stat().st_size // 2])
        expected = (
            f"{path} is truncated or not a checkpoint (not a zip archive, as torch.save "
            f"writes). {ADVICE}"
        )
    out = tmp_path / "run"
    if tool == "vae-evaluate":
        args = [f"ckpt={path}", "device=cpu"]
    else:
        args = [f"paths.data_dir={data_dir}", *SMALL, "logger=none", "callbacks=minimal",
                f"hydra.run.dir={out}", "model.hidden_dim=8", "model.latent_dim=2",
                f"resume={path}"]  # fmt: skip
    result = run_here(tool, *args)
    assert result.returncode == 2
    assert one_line_error(result) == expected
    assert "weights_only=False" not in result.stderr
    assert not marker.exists()
    assert not (out / "checkpoints").exists() and not (tmp_path / "eval.json").exists()
