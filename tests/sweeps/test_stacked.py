"""A group's jobs trained as one stack (sweeps.stacked.train_group), in-process: each job then
finished by train() is the job trained alone, for every model the stack takes; a SIGTERM stops
the stack where each job resumes alone; a job whose loss turns non-finite leaves the stack.
(Through the launcher and the CLI: tests/sweeps/test_fused_launcher.py.)"""

from __future__ import annotations

import math
import os
import signal
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf, open_dict

from tests.conftest import assert_same_run, last_files, small_overrides
from vae_lightning.config import compose
from vae_lightning.sweeps.stacked import train_group
from vae_lightning.train import train


def signal_at_step(monkeypatch, n: int) -> None:
    """The stack's ``n``-th step sends this process SIGTERM (as a scheduler would)."""
    from vae_lightning.training.stack import Stack

    step, calls = Stack.training_step, []

    def signalling(self, batch, batch_idx):
        calls.append(1)
        if len(calls) == n:
            os.kill(os.getpid(), signal.SIGTERM)
        return step(self, batch, batch_idx)

    monkeypatch.setattr(Stack, "training_step", signalling)


# the stack's step 5 is in its first epoch (no last.ckpt saved at an epoch's end yet), 12 in
# its second (8 batches per epoch)
@pytest.mark.parametrize("stop", [5, 12])
def test_a_stack_stopped_by_sigterm_resumes_job_by_job_as_if_never_stopped(
    data_dir, tmp_path, monkeypatch, stop
):
    from vae_lightning.errors import RunInterrupted

    def cfg(folder: Path, beta: int):
        composed = compose([*small_overrides(data_dir, folder), "model.hidden_dim=32",
                            f"model.beta={beta}", "trainer.max_epochs=3", "logger=none",
                            "callbacks=minimal"])  # fmt: skip
        return OmegaConf.create(OmegaConf.to_container(composed, resolve=True))

    for beta in (1, 4):
        train(cfg(tmp_path / f"alone{beta}", beta))
    signal_at_step(monkeypatch, stop)
    stacked = [cfg(tmp_path / f"stack{beta}", beta) for beta in (1, 4)]
    with pytest.raises(RunInterrupted) as info:
        train_group(stacked, [Path(c.paths.output_dir) for c in stacked])
    assert (info.value.epoch, info.value.step) == (stop // 8, stop)
    monkeypatch.undo()
    for c, beta in zip(stacked, (1, 4), strict=True):
        folder = Path(c.paths.output_dir)
        assert last_files(folder) == {"last.ckpt": (stop // 8, stop)}  # where the stack stopped
        with open_dict(c):
            c.resume = True
        train(c)
        assert_same_run(tmp_path / f"alone{beta}", folder)
        assert last_files(folder) == {"last.ckpt": (2, 24)}  # the newest weights, no last-v1


MODELS = {
    "vae": ["model=vae", "model.hidden_dim=32"],
    "ae": ["model=ae", "model.hidden_dim=32"],
    "conv_vae": ["model=conv_vae", "model.channels=[4,8,8]"],
}


@pytest.mark.parametrize("kind", list(MODELS))
def test_a_job_trained_in_a_stack_is_the_job_trained_alone(kind, data_dir, tmp_path):
    """Through train() itself: each job alone, and the same jobs stacked then handed over."""
    jobs = [("model.latent_dim=2", "seed=0"), ("model.latent_dim=5", "seed=1")]
    if kind != "ae":
        jobs = [(*j, f"model.beta={b}") for j, b in zip(jobs, (1, 4), strict=True)]

    def cfg(job: tuple[str, ...], folder: Path):
        composed = compose([*small_overrides(data_dir, folder), *MODELS[kind], *job,
                            "trainer.max_epochs=2", "logger=none", "callbacks=minimal",
                            "data.binarize=dynamic"])  # fmt: skip
        return OmegaConf.create(OmegaConf.to_container(composed, resolve=True))

    for n, job in enumerate(jobs):
        train(cfg(job, tmp_path / f"alone{n}"))
    stacked = [cfg(job, tmp_path / f"stack{n}") for n, job in enumerate(jobs)]
    assert train_group(stacked, [Path(c.paths.output_dir) for c in stacked]) == []
    for n, c in enumerate(stacked):
        with open_dict(c):
            c.resume = True
        train(c)
        assert_same_run(tmp_path / f"alone{n}", tmp_path / f"stack{n}")
    if kind == "ae":  # its sampling Gaussian: fitted to the same codes
        from vae_lightning.models import AE

        a, b = (AE.load_from_checkpoint(tmp_path / f"{w}0/checkpoints/last.ckpt")
                for w in ("alone", "stack"))  # fmt: skip
        assert torch.allclose(a.code_cov, b.code_cov, rtol=1e-3, atol=1e-4)


def test_a_job_whose_loss_turns_non_finite_leaves_the_stack_and_the_others_go_on(
    data_dir, tmp_path, monkeypatch
):
    """Job 1's weights are poisoned after its 3rd step: the stack drops it at the next one (it
    then goes on alone from its last good checkpoint, where a real NaN recurs and fails it as
    a job alone fails); job 0 trains on exactly as it trains alone."""
    from vae_lightning.training.stack import Stack

    calls = []

    def poisoned(self, outputs, batch, batch_idx):  # after the step's backward and Adam
        calls.append(list(self.alive))
        if len(calls) == 3:
            with torch.no_grad():
                self.stacked()[0]["decoder.net.0.weight"][1].fill_(math.nan)

    def cfg(folder: Path, beta: int):
        composed = compose([*small_overrides(data_dir, folder), "model.hidden_dim=32",
                            f"model.beta={beta}", "trainer.max_epochs=2", "logger=none",
                            "callbacks=minimal"])  # fmt: skip
        return OmegaConf.create(OmegaConf.to_container(composed, resolve=True))

    train(cfg(tmp_path / "alone", 1))
    monkeypatch.setattr(Stack, "on_train_batch_end", poisoned, raising=False)
    stacked = [cfg(tmp_path / "stack0", 1), cfg(tmp_path / "stack1", 4)]
    assert train_group(stacked, [tmp_path / "stack0", tmp_path / "stack1"]) == [1]
    assert calls[:3] == [[True, True]] * 3 and calls[3:] == [[True, False]] * (len(calls) - 3)
    assert not (tmp_path / "stack1" / "checkpoints").exists()  # dropped before its first one
    with open_dict(stacked[0]):
        stacked[0].resume = True
    train(stacked[0])
    assert_same_run(tmp_path / "alone", tmp_path / "stack0")
