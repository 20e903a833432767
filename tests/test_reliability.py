"""Reliability: interrupt and resume, non-finite losses, concurrent data preparation,
checkpoint checks, bad data and paths, bad configs, memory, security."""

import json
import os
import signal
from pathlib import Path

import hydra
import lightning as L
import pytest
import torch

from vae_lightning.train import train


class SignalAt(L.Callback):
    """Sends a real signal to this process at a given global step (a deterministic preemption)."""

    def __init__(self, step: int, signum: int = signal.SIGTERM) -> None:
        self.step, self.signum = step, signum

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step:
            os.kill(os.getpid(), self.signum)


class PoisonAt(L.Callback):
    """Sets the weights to infinity at a given global step: the next loss is not finite."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step:
            with torch.no_grad():
                for p in pl_module.parameters():
                    p.fill_(float("inf"))


RESUME = [
    "callbacks=minimal",
    "data.batch_size=32",
    "trainer.max_epochs=4",
    "trainer.log_every_n_steps=5",
    "threads=1",
]


def final_metrics(out: Path) -> dict:
    record = json.loads((out / "metrics.json").read_text())
    assert record["status"] == "ok", record
    return record


@pytest.mark.parametrize(
    ("signum", "extra"),
    [
        (signal.SIGTERM, []),
        (signal.SIGINT, []),
        # the schedulers' state travels too: the same learning rate at every epoch (train/lr)
        (signal.SIGTERM, ["scheduler=cosine", "model.scheduler.warmup_epochs=1"]),
        (signal.SIGTERM, ["scheduler=plateau", "model.scheduler.patience=0"]),
        (signal.SIGTERM, ["scheduler=burda", "model.scheduler.stages=3"]),
        # the KL weight is a function of the step: the same train/beta at every epoch
        (signal.SIGTERM, ["kl=cyclical", "model.kl.cycles=3"]),
        # the feature-matching loss: its frozen classifier travels in the checkpoint
        (signal.SIGTERM, ["model.feature_loss_weight=0.5"]),
    ],
)
def test_interrupted_and_resumed_run_equals_an_uninterrupted_one(
    compose_cfg, tmp_path, signum, extra, request
):
    from vae_lightning.errors import RunInterrupted

    if "model.feature_loss_weight=0.5" in extra:  # data whose classifier is cached
        extra = [*extra, f"paths.data_dir={request.getfixturevalue('feature_data_dir')}"]

    whole = compose_cfg(*RESUME, *extra, f"paths.output_dir={tmp_path / 'whole'}")
    train(whole)
    # 512 training images / 32 = 16 steps per epoch: step 21 is in the middle of epoch 1
    cut = compose_cfg(
        *RESUME,
        *extra,
        f"paths.output_dir={tmp_path / 'cut'}",
        "+callbacks.signal._target_=tests.test_reliability.SignalAt",
        "+callbacks.signal.step=21",
        f"+callbacks.signal.signum={int(signum)}",
    )
    with pytest.raises(RunInterrupted) as info:
        train(cut)
    assert info.value.step == 22 and info.value.signum == signum  # after the step it was in
    record = json.loads((tmp_path / "cut" / "metrics.json").read_text())
    assert record["status"] == "interrupted" and "resume=" in record["resume"]
    assert (tmp_path / "cut" / "checkpoints" / "last.ckpt").is_file()
    resumed = compose_cfg(
        *RESUME, *extra, f"paths.output_dir={tmp_path / 'cut'}", f"resume={tmp_path / 'cut'}"
    )
    train(resumed)
    a, b = final_metrics(tmp_path / "whole"), final_metrics(tmp_path / "cut")
    assert a["epochs"] == b["epochs"] == 4
    assert set(a["metrics"]) == set(b["metrics"])
    for key, value in a["metrics"].items():
        assert b["metrics"][key] == pytest.approx(value, abs=1e-6), key
    history_a = (tmp_path / "whole" / "history.csv").read_text().splitlines()
    history_b = (tmp_path / "cut" / "history.csv").read_text().splitlines()
    assert [r.split(",")[:-2] for r in history_a] == [r.split(",")[:-2] for r in history_b]
    if "model.feature_loss_weight=0.5" in extra:
        assert b["metrics"]["train/feature"] > 0
    elif extra:
        assert ("train/beta" if "kl=cyclical" in extra else "train/lr") in history_a[0]
        if "scheduler=cosine" in extra:  # warm-up then cosine over the 3 remaining epochs
            rates = [row["train/lr"] for row in _rows(tmp_path / "cut" / "history.csv")]
            assert rates == pytest.approx([5e-4, 1e-3, 7.5e-4, 2.5e-4], rel=1e-6)


def _rows(path: Path) -> list[dict[str, float]]:
    import csv

    with open(path) as f:
        return [{k: float(v) for k, v in row.items()} for row in csv.DictReader(f)]


@pytest.mark.slow
def test_sigterm_to_a_real_training_process_then_resume(data_dir, tmp_path):
    import subprocess
    import sys
    import time

    from tests.conftest import run_here

    out = tmp_path / "run"
    args = [
        *RESUME[:-1],
        "trainer.max_epochs=200",
        f"paths.data_dir={data_dir}",
        "data.verify=false",
        "data.download=false",
        "data.val_size=128",
        "trainer.accelerator=cpu",
    ]
    proc = subprocess.Popen(
        [sys.executable, "-m", "vae_lightning.train", *args, f"hydra.run.dir={out}"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.time() + 120
    while time.time() < deadline and not (out / "history.csv").exists():
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, stderr[-2000:]
    assert "Resume with:" in stderr and f"resume={out}" in stderr
    record = json.loads((out / "metrics.json").read_text())
    assert record["status"] == "interrupted"
    done = len((out / "history.csv").read_text().splitlines()) - 1
    assert 1 <= done < 200
    # the resume is checked by what it writes: in this process
    result = run_here("vae-train", *args, "trainer.max_epochs=" + str(done + 2), f"resume={out}")
    assert result.returncode == 0, result.stderr[-2000:]
    record = json.loads((out / "metrics.json").read_text())
    assert record["status"] == "ok" and record["epochs"] == done + 2


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(compose_cfg, tmp_path):
    import torch

    from vae_lightning.run.stops import NonFiniteLossError

    out = tmp_path / "run"
    # the weights turn to inf at step 20 (epoch 1), after epoch 0's good last.ckpt
    blow_up = compose_cfg(
        *RESUME,
        f"paths.output_dir={out}",
        "trainer.max_epochs=3",
        "+callbacks.poison._target_=tests.test_reliability.PoisonAt",
        "+callbacks.poison.step=20",
    )
    with pytest.raises(
        NonFiniteLossError, match=r"non-finite training loss .* at epoch 1, step 20"
    ) as info:
        train(blow_up)
    last = out / "checkpoints" / "last.ckpt"
    assert str(last) in str(info.value)
    saved = torch.load(last, weights_only=True)  # not overwritten with broken weights
    assert saved["epoch"] == 0 and saved["global_step"] < 20
    assert all(torch.isfinite(t).all() for t in saved["state_dict"].values())
    record = json.loads((out / "metrics.json").read_text())
    assert record["status"] == "failed" and "NonFiniteLossError" in record["error"]


def test_testing_an_earlier_checkpoint_keeps_every_epochs_history(data_dir, tmp_path):
    """Lightning restores the callbacks of the checkpoint a test loads; History keeps the rows
    of the fit (metrics.json's per-epoch timings once lost the epochs after the best one)."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    from vae_lightning.data import MNISTDataModule
    from vae_lightning.models import VAE
    from vae_lightning.run.history import History
    from vae_lightning.training import AutomaticStep

    history = History(tmp_path / "history.csv")
    every = ModelCheckpoint(dirpath=tmp_path, filename="e{epoch}", save_top_k=-1,
                            monitor="val/loss")  # fmt: skip
    trainer = L.Trainer(
        max_epochs=3, limit_train_batches=2, limit_val_batches=1, callbacks=[history, every],
        logger=False, enable_progress_bar=False, enable_model_summary=False,
    )  # fmt: skip
    model = AutomaticStep().bind(VAE(latent_dim=2, hidden_dim=8))
    data = MNISTDataModule(data_dir=str(data_dir), verify=False, download=False, val_size=128)
    trainer.fit(model, datamodule=data)
    trainer.test(model, datamodule=data, ckpt_path=tmp_path / "eepoch=0.ckpt", verbose=False)
    assert [row["epoch"] for row in history.rows] == [0, 1, 2]


def test_concurrent_preparation_of_one_data_folder(tmp_path, monkeypatch):
    """Four processes preparing the same empty folder at once all end with verified files, and
    the (slow) source is asked once: the others wait on the lock and find the files."""
    import hashlib
    import multiprocessing as mp
    import time

    from tests.conftest import synthetic_images
    from vae_lightning.data import sources

    images, labels = synthetic_images(50, seed=0)
    files = {
        "train-images-idx3-ubyte": sources.idx_bytes(images),
        "train-labels-idx1-ubyte": sources.idx_bytes(labels),
        "t10k-images-idx3-ubyte": sources.idx_bytes(images[:10]),
        "t10k-labels-idx1-ubyte": sources.idx_bytes(labels[:10]),
    }
    spec = sources.DatasetSpec(
        "mnist", "MNIST", {k: hashlib.md5(v).hexdigest() for k, v in files.items()}, ("0",)
    )
    monkeypatch.setitem(sources.DATASETS, "mnist", spec)
    calls = tmp_path / "calls"

    def slow_source(spec_, workdir):
        with open(calls, "a") as f:
            f.write("x")
        time.sleep(0.5)
        return files

    monkeypatch.setitem(sources._FETCHERS, "offline", slow_source)
    ctx = mp.get_context("fork")  # the children inherit the patched source
    procs = [
        ctx.Process(target=sources.ensure_dataset, args=("mnist", tmp_path / "data", ("offline",)))
        for _ in range(4)
    ]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0, 0, 0, 0]
    assert calls.read_text() == "x"
    raw = spec.raw_dir(tmp_path / "data")
    for name, md5 in spec.md5.items():
        assert sources.md5sum(raw / name) == md5
    assert not [
        p for p in (tmp_path / "data").rglob("*") if ".part" in p.name or ".fetch" in p.name
    ]


@pytest.fixture
def vae_checkpoint(compose_cfg, tmp_path) -> Path:
    out = tmp_path / "ckpt_run"
    train(
        compose_cfg(
            "callbacks=minimal", "debug=limit", "model.latent_dim=3", f"paths.output_dir={out}"
        )
    )
    return out / "checkpoints" / "last.ckpt"


def test_checkpoint_of_another_class_or_shape_is_refused(vae_checkpoint):
    from vae_lightning.errors import ConfigError
    from vae_lightning.models import AE, VAE
    from vae_lightning.run.checkpoints import check_fits as check_checkpoint

    check_checkpoint(vae_checkpoint, VAE(latent_dim=3))  # fits
    with pytest.raises(ConfigError, match=r"holds a VAE, but the configured model is a AE"):
        check_checkpoint(vae_checkpoint, AE(latent_dim=3))
    with pytest.raises(
        ConfigError, match=r"encoder\.net\.3\.weight has shape \(6, 400\) there and \(10, 400\)"
    ):
        check_checkpoint(vae_checkpoint, VAE(latent_dim=5))


def test_truncated_checkpoint_is_named(vae_checkpoint, tmp_path):
    from vae_lightning.errors import DataError
    from vae_lightning.models import VAE
    from vae_lightning.run.checkpoints import check_fits as check_checkpoint

    broken = tmp_path / "broken.ckpt"
    broken.write_bytes(vae_checkpoint.read_bytes()[:5000])
    with pytest.raises(DataError, match=r"broken\.ckpt is truncated or not a checkpoint"):
        check_checkpoint(broken, VAE(latent_dim=3))


def test_resuming_from_a_foreign_checkpoint_stops_before_training(compose_cfg, vae_checkpoint):
    from vae_lightning.errors import ConfigError

    cfg = compose_cfg("model=ae", "model.latent_dim=3", f"resume={vae_checkpoint}")
    with pytest.raises(ConfigError, match="holds a VAE, but the configured model is a AE"):
        train(cfg)


def test_checkpoints_load_weights_only_and_refuse_code(tmp_path, vae_checkpoint):
    """A checkpoint that would run code on loading is refused, naming the file."""
    import torch

    from vae_lightning.errors import DataError
    from vae_lightning.models import VAE
    from vae_lightning.run.checkpoints import check_fits as check_checkpoint

    class Evil:
        def __reduce__(self):
            return (os.system, ("touch " + str(tmp_path / "pwned"),))

    ckpt = torch.load(vae_checkpoint, weights_only=True)
    ckpt["evil"] = Evil()
    path = tmp_path / "evil.ckpt"
    torch.save(ckpt, path)
    with pytest.raises(DataError, match=r"evil\.ckpt"):
        check_checkpoint(path, VAE(latent_dim=3))
    assert not (tmp_path / "pwned").exists()


def test_a_failed_checkpoint_write_leaves_the_previous_one_intact(tmp_path, monkeypatch):
    import errno

    import torch

    from vae_lightning.run.checkpoints import AtomicCheckpointIO

    io = AtomicCheckpointIO()
    path = tmp_path / "last.ckpt"
    io.save_checkpoint({"state_dict": {"w": torch.ones(3)}}, path)
    before = path.read_bytes()

    def disk_full(obj, f, *args, **kwargs):
        f.write(b"half a checkpoint")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(OSError, match="No space left"):
        io.save_checkpoint({"state_dict": {"w": torch.zeros(3)}}, path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]  # no temporary file left


def test_an_output_folder_that_cannot_be_written(compose_cfg, tmp_path):
    from vae_lightning.errors import ConfigError

    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        if os.access(locked, os.W_OK):
            pytest.skip("running as a user who can write anywhere (root)")
        cfg = compose_cfg(f"paths.output_dir={locked / 'run'}")
        with pytest.raises(ConfigError, match=r"paths\.output_dir .* cannot be written"):
            train(cfg)
    finally:
        locked.chmod(0o700)


def test_an_output_path_that_is_a_file(compose_cfg, tmp_path):
    from vae_lightning.errors import ConfigError

    (tmp_path / "taken").write_text("a file, not a folder")
    cfg = compose_cfg(f"paths.output_dir={tmp_path / 'taken' / 'run'}")
    with pytest.raises(ConfigError, match=r"paths\.output_dir .* cannot be written"):
        train(cfg)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["model.latnet_dim=4"], "Could not override 'model.latnet_dim'"),
        (["+model.latnet_dim=4"], "model has a key its class does not take"),
        (["model.latent_dim=abc"], "model.latent_dim must be an integer >= 1, got 'abc'"),
        (["model.beta=high"], "model.beta must be a finite number"),
        (
            ["model=conv_vae", "model.in_shape=[784]"],
            "model.in_shape must be (channels, height, width)",
        ),
        (
            ["model=ae", "callbacks.traversals.on_unsupported=error"],
            "callbacks.Traversals needs a VAE",
        ),
    ],
)
def test_bad_configs_are_caught_before_training_naming_the_key(compose_cfg, overrides, message):
    from hydra.errors import ConfigCompositionException

    try:
        cfg = compose_cfg(*overrides, "debug=limit")
    except ConfigCompositionException as err:
        assert message in str(err)
        return
    with pytest.raises(Exception) as info:
        train(cfg)
    assert message in str(info.value)
    assert not (Path(cfg.paths.output_dir) / "checkpoints").exists()


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


def test_slurm_runs_of_the_trainer_config_get_auto_requeue(monkeypatch):
    from lightning.pytorch.plugins.environments import SLURMEnvironment

    for key, value in {
        "SLURM_NTASKS": "1",
        "SLURM_JOB_ID": "123",
        "SLURM_JOB_NAME": "vae",
        "SLURM_PROCID": "0",
        "SLURM_LOCALID": "0",
        "SLURM_NODEID": "0",
        "SLURM_NTASKS_PER_NODE": "1",
        "SLURM_NODELIST": "node1",
    }.items():
        monkeypatch.setenv(key, value)
    from vae_lightning.config import compose

    cfg = compose(["trainer.accelerator=cpu", "paths.output_dir=unused"])
    trainer = hydra.utils.instantiate(cfg.trainer, logger=False)  # the project's trainer config
    env = trainer._accelerator_connector.cluster_environment
    assert isinstance(env, SLURMEnvironment) and env.auto_requeue


def test_tensorboard_binds_to_localhost():
    import subprocess

    from vae_lightning.config import REPO_ROOT

    out = subprocess.run(
        ["make", "-n", "tensorboard"], cwd=REPO_ROOT, capture_output=True, text=True
    )
    assert "--host 127.0.0.1" in out.stdout


def fake_trainer(step: int, log_every: int = 5):
    from types import SimpleNamespace

    ckpt = SimpleNamespace(last_model_path="/run/checkpoints/last.ckpt", best_model_path="")
    return SimpleNamespace(
        training=True, global_step=step, current_epoch=0, log_every_n_steps=log_every,
        checkpoint_callback=ckpt,
    )  # fmt: skip


def test_non_finite_stop_checks_every_loss_on_the_cpu():
    from vae_lightning.run.stops import NonFiniteLossError, NonFiniteStop

    stop = NonFiniteStop()
    stop.on_before_backward(fake_trainer(3), None, torch.tensor(1.0))
    with pytest.raises(NonFiniteLossError, match=r"\(nan\) at epoch 0, step 4.*last\.ckpt"):
        stop.on_before_backward(fake_trainer(4), None, torch.tensor(float("nan")))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_non_finite_stop_on_a_gpu_flags_on_the_device_and_raises_at_the_next_check():
    from vae_lightning.run.stops import NonFiniteLossError, NonFiniteStop

    stop = NonFiniteStop()
    for step, value in ((5, 1.0), (6, float("inf")), (7, float("nan")), (8, 2.0)):
        stop.on_before_backward(fake_trainer(step), None, torch.tensor(value, device="cuda"))
        stop.on_train_batch_end(fake_trainer(step + 1, log_every=10), None, None, None, 0)
    # no synchronisation yet: checked every log_every_n_steps and before any checkpoint
    with pytest.raises(NonFiniteLossError, match=r"at epoch 0, step 6\."):
        stop.on_save_checkpoint(fake_trainer(9), None, {})
    with pytest.raises(NonFiniteLossError, match=r"step 6\."):
        stop.on_train_batch_end(fake_trainer(10, log_every=10), None, None, None, 0)


def test_resume_from_a_checkpoint_file_continues_in_a_new_folder(compose_cfg, tmp_path):
    first = compose_cfg(*RESUME, "trainer.max_epochs=1", f"paths.output_dir={tmp_path / 'a'}")
    train(first)
    ckpt = tmp_path / "a" / "checkpoints" / "last.ckpt"
    second = compose_cfg(*RESUME, "trainer.max_epochs=2", f"paths.output_dir={tmp_path / 'b'}",
                         f"resume={ckpt}")  # fmt: skip
    train(second)
    record = final_metrics(tmp_path / "b")
    assert record["epochs"] == 2  # the first epoch's row came with the checkpoint
    rows = (tmp_path / "b" / "history.csv").read_text().splitlines()[1:]
    assert [r.split(",")[:2] for r in rows] == [["0", "16"], ["1", "32"]]
    assert final_metrics(tmp_path / "a")["epochs"] == 1  # the first run's folder is untouched


@pytest.mark.parametrize(
    ("resume", "message"),
    [("{tmp}/nothing.ckpt", "resume points to .*nothing.ckpt, which does not exist"),
     ("{tmp}", "holds no run")],
)  # fmt: skip
def test_resume_from_nothing_says_so(compose_cfg, tmp_path, resume, message):
    from vae_lightning.errors import ConfigError

    cfg = compose_cfg("debug=limit", f"resume={resume.format(tmp=tmp_path)}")
    with pytest.raises(ConfigError, match=message):
        train(cfg)


def test_resume_true_skips_a_finished_run_and_starts_a_new_one(compose_cfg, tmp_path):
    out = tmp_path / "run"
    cfg = compose_cfg(*RESUME, "trainer.max_epochs=1", f"paths.output_dir={out}", "resume=true")
    first = train(cfg)  # nothing there yet: a fresh start
    stamp = (out / "metrics.json").stat().st_mtime_ns
    assert train(cfg) == first  # finished: skipped, its metric returned
    assert (out / "metrics.json").stat().st_mtime_ns == stamp
