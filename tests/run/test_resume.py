"""Resuming (run.resume, run.folder's resume=): a run interrupted by a signal at any step and
resumed records what the uninterrupted run records, with every scheduler's and the KL weight's
state; a checkpoint file continues in a new folder; checkpoints of the code before the redesign
continue too."""

import json
import os
import shutil
import signal
from pathlib import Path

import lightning as L
import pytest

from tests.conftest import FIXTURES, RESUME, last_files
from vae_lightning.train import train


class SignalAt(L.Callback):
    """Sends a real signal to this process at a given global step (a deterministic preemption)."""

    def __init__(self, step: int, signum: int = signal.SIGTERM) -> None:
        self.step, self.signum = step, signum

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step:
            os.kill(os.getpid(), self.signum)


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
        "+callbacks.signal._target_=tests.run.test_resume.SignalAt",
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


def test_a_run_continues_from_a_checkpoint_written_before_the_redesign(compose_cfg, tmp_path):
    old = tmp_path / "old.ckpt"
    shutil.copy(FIXTURES / "pre_redesign" / "vae.ckpt", old)
    cfg = compose_cfg(
        "callbacks=minimal", "logger=none", "model.hidden_dim=8", "model.latent_dim=2",
        "trainer.max_epochs=2", "trainer.limit_train_batches=3", f"resume={old}",
    )  # fmt: skip
    train(cfg)
    record = json.loads((Path(cfg.paths.output_dir) / "metrics.json").read_text())
    assert record["status"] == "ok" and record["epochs"] == 2  # epoch 0 from the old history
    rows = (Path(cfg.paths.output_dir) / "history.csv").read_text().splitlines()
    assert [r.split(",")[:2] for r in rows[1:]] == [["0", "3"], ["1", "6"]]


# steps 5: the first epoch (no last.ckpt saved at an epoch's end yet); 21: epoch 1; 60: the last
@pytest.mark.parametrize("steps", [(5,), (21,), (60,), (5, 37)])
def test_last_ckpt_holds_the_newest_weights_after_any_stop_and_resume(compose_cfg, tmp_path, steps):
    """Lightning writes ``last-v1.ckpt`` beside a ``last.ckpt`` it did not record as its own
    last: a signal's checkpoint in the first epoch recorded none. Stopped and resumed, once
    or twice, a run's one last file is ``last.ckpt``, holding its final epoch and step."""
    from vae_lightning.errors import RunInterrupted

    out = tmp_path / "run"
    for step in steps:
        cut = compose_cfg(*RESUME, f"paths.output_dir={out}", "resume=true",
                          "+callbacks.signal._target_=tests.run.test_resume.SignalAt",
                          f"+callbacks.signal.step={step}")  # fmt: skip
        with pytest.raises(RunInterrupted):
            train(cut)
        assert last_files(out) == {"last.ckpt": (step // 16, step + 1)}  # where it stopped
    train(compose_cfg(*RESUME, f"paths.output_dir={out}", f"resume={out}"))
    assert last_files(out) == {"last.ckpt": (3, 64)}  # 4 epochs of 16 steps
    assert final_metrics(out)["epochs"] == 4


def test_a_folder_with_a_stale_last_ckpt_resumes_from_its_newest_last_file(tmp_path):
    """Folders written before last.ckpt was kept the newest hold a stale last.ckpt beside the
    newer last-v1.ckpt: a resume of the folder starts from the newer."""
    from vae_lightning.run.folder import resume_checkpoint

    checkpoints = tmp_path / "checkpoints"
    checkpoints.mkdir()
    (checkpoints / "last.ckpt").write_bytes(b"old")
    os.utime(checkpoints / "last.ckpt", (1, 1))
    (checkpoints / "last-v1.ckpt").write_bytes(b"new")
    assert resume_checkpoint(True, tmp_path) == str(checkpoints / "last-v1.ckpt")
    assert resume_checkpoint(str(tmp_path), tmp_path / "other") == str(checkpoints / "last-v1.ckpt")
