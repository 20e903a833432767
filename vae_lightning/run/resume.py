"""What makes a resume exact: the global RNG state travels in checkpoints, so a resumed run
draws the noise it would have drawn, and a run resumed from its own ``last.ckpt`` writes its
newest weights there again."""

from __future__ import annotations

import os
from typing import Any

import lightning as L
import torch


class ExactResume(L.Callback):
    """The global RNG state travels in checkpoints, so the noise of a resumed run (the
    reparameterisation's, ``binarize=dynamic``'s) continues exactly where it stopped. Applied
    when training starts: after the sanity check (whose draws Lightning undoes), before the
    first batch is fetched and binarized. Also records the dataset (``vae_lightning.dataset``),
    which ``check_resume`` compares with the configured one."""

    def __init__(self) -> None:
        self._pending: dict[str, Any] | None = None

    def state_dict(self) -> dict[str, Any]:
        cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []
        return {"torch_rng": torch.get_rng_state(), "cuda_rng": cuda}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._pending = dict(state_dict)

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        dataset = getattr(trainer.datamodule, "dataset_name", None)
        if dataset:
            checkpoint.setdefault("vae_lightning", {})["dataset"] = dataset

    def on_load_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        legacy = checkpoint.get("vae_lightning") or {}  # written before this callback existed
        if "torch_rng" in legacy:
            self._pending = {"torch_rng": legacy["torch_rng"], "cuda_rng": legacy.get("cuda_rng")}

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        keep_last_name(trainer)
        if self._pending is None:
            return
        torch.set_rng_state(self._pending["torch_rng"].cpu())
        if self._pending.get("cuda_rng") and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(self._pending["cuda_rng"])
        self._pending = None


def keep_last_name(trainer: L.Trainer) -> None:
    """A run resumed from the ``last*.ckpt`` of one of its ModelCheckpoints writes its newest
    weights to that callback's ``last.ckpt`` again.

    Lightning's ModelCheckpoint writes ``last-v1.ckpt`` beside an existing ``last.ckpt`` that
    is not its recorded ``last_model_path``; a checkpoint saved on a signal before the first
    epoch's end records ``last_model_path=""`` (nothing was saved as last yet), and so did every
    checkpoint of the fused launcher's jobs before this, which left ``last.ckpt`` stale behind
    a ``last-v1.ckpt``. The file the run resumed from is its own last one, whatever it recorded.
    """
    resumed = trainer.ckpt_path
    if not resumed:
        return
    folder, name = os.path.split(os.path.realpath(resumed))
    for cb in trainer.checkpoint_callbacks:
        if not getattr(cb, "save_last", False) or not getattr(cb, "dirpath", None):
            continue
        if folder == os.path.realpath(cb.dirpath) and name.startswith(cb.CHECKPOINT_NAME_LAST):
            cb.last_model_path = cb.format_checkpoint_name({}, cb.CHECKPOINT_NAME_LAST)
