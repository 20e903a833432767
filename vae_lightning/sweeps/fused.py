"""Which jobs of a sweep can train as one stacked model (``hydra/launcher=fused``): the jobs
whose configs differ only in ``model.beta``, ``model.latent_dim`` and ``seed``, with a model,
trainer and callbacks a stack reproduces exactly. ``group_key`` says which jobs belong together,
``why_not_fused`` why a job must run alone. Training a group is ``sweeps.stacked``'s.
"""

from __future__ import annotations

from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from vae_lightning.training.schedules import check_kl, check_scheduler

# the keys in which a group's jobs may differ (data.seed and the callbacks' seeds follow seed)
STACKABLE_KEYS = ("model.beta", "model.latent_dim", "seed")

# trainer keys a stack's Trainer takes over from the jobs' (sweeps.stacked.TRAINER_KEYS) or
# leaves as they are; every other key must keep its Lightning default
_TRAINER_HONOURED = {
    "_target_", "default_root_dir", "accelerator", "devices", "max_epochs", "min_epochs",
    "limit_train_batches", "limit_val_batches", "limit_test_batches", "log_every_n_steps",
    "num_sanity_val_steps", "deterministic", "enable_model_summary", "enable_progress_bar",
    "enable_checkpointing", "benchmark",
}  # fmt: skip
_TRAINER_DEFAULTS = {
    "max_steps": (-1, None),
    "precision": ("32-true", "32", 32, None),
    "check_val_every_n_epoch": (1, None),
    "val_check_interval": (1.0, None),
    "accumulate_grad_batches": (1, None),
    "gradient_clip_val": (None, 0, 0.0),
    "strategy": ("auto", None),
    "num_nodes": (1, None),
    "fast_dev_run": (False, 0, None),
    "overfit_batches": (0, 0.0, None),
}


# the ModelCheckpoint a stack writes each job's checkpoints with (conf/callbacks/minimal.yaml's)
_CHECKPOINT_SETTINGS = {"monitor": "val/loss", "mode": "min", "save_top_k": 1, "save_last": True}


def group_key(cfg: DictConfig) -> str:
    """What a job's config must share with the others of its group: all of it but the
    stackable keys and the folders (unresolved, so ``${seed}`` is the same text everywhere)."""
    plain = OmegaConf.to_container(cfg, resolve=False)
    plain.pop("hydra", None)
    plain.pop("resume", None)
    for key in STACKABLE_KEYS:
        *parents, leaf = key.split(".")
        node = plain
        for p in parents:
            node = node.get(p, {}) if isinstance(node, dict) else {}
        if isinstance(node, dict):
            node.pop(leaf, None)
    return OmegaConf.to_yaml(OmegaConf.create(plain), sort_keys=True)


def stack_device(trainer: DictConfig) -> torch.device:
    """Where a stack of jobs with this trainer config trains: the GPU under accelerator=auto
    when there is one, as Lightning would put each job."""
    accelerator = str(trainer.get("accelerator", "auto"))
    if accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available()):
        index = torch.cuda.current_device() if torch.cuda.is_available() else None
        return torch.device("cuda", index)
    return torch.device("cpu")


def why_not_fused(cfg: DictConfig, gpu: bool = False) -> str | None:
    """Why this (resolved) job config cannot be trained in a stack, or None when it can.
    ``gpu``: stacks may train on a CUDA GPU (off until the stack has run on one: its CUDA
    path, per-job CUDA generators and its deferred non-finite check, is untested)."""
    from vae_lightning.errors import USER_ERRORS

    try:
        return _trainer_reason(cfg.get("trainer") or {}, gpu) or _model_reason(
            cfg.get("model") or {}
        ) or _callbacks_reason(cfg.get("callbacks") or {})  # fmt: skip
    except USER_ERRORS as err:  # the job alone refuses it, naming the key
        return f"its config is refused ({err})"


def _trainer_reason(trainer: Any, gpu: bool) -> str | None:
    for key, allowed in _TRAINER_DEFAULTS.items():
        if key in trainer and trainer.get(key) not in allowed:
            return f"trainer.{key}={trainer.get(key)} (a stack keeps Lightning's default)"
    extra = sorted(set(trainer) - _TRAINER_HONOURED - set(_TRAINER_DEFAULTS))
    if extra:
        return f"trainer.{extra[0]} is set (a stack does not know it)"
    if str(trainer.get("accelerator", "auto")) not in ("auto", "cpu", "gpu", "cuda"):
        return f"trainer.accelerator={trainer.get('accelerator')}"
    if trainer.get("devices", 1) not in (1, "1", "auto"):
        return f"trainer.devices={trainer.get('devices')} (one device per group)"
    if stack_device(trainer).type == "cuda":
        if not torch.cuda.is_available():
            return f"trainer.accelerator={trainer.get('accelerator')} but no CUDA GPU is here"
        if not gpu:
            return ("it would train on the GPU, where the stack has not run yet "
                    "(hydra.launcher.gpu=true to try it)")  # fmt: skip
    if not isinstance(trainer.get("max_epochs"), int) or trainer.get("max_epochs") < 1:
        return "trainer.max_epochs is not a number of epochs"
    return None


def _model_reason(model: Any) -> str | None:
    target = str(model.get("_target_", ""))
    if target.rsplit(".", 1)[-1] not in ("VAE", "AE", "ConvVAE"):
        return f"model {target} (fused: VAE, AE, ConvVAE)"
    if model.get("batchnorm"):
        return "model.batchnorm=true (BatchNorm's running statistics cannot be stacked)"
    if model.get("compile"):
        return "model.compile=true"
    if model.get("feature_loss_weight"):
        return "model.feature_loss_weight > 0 (its frozen classifier is not stacked)"
    scheduler = check_scheduler(model.get("scheduler"))
    if scheduler is not None:
        return f"scheduler={scheduler['name']} (a stack trains at a constant rate)"
    kl = check_kl(model.get("kl"))
    if kl is not None and kl["name"] != "constant":
        return f"kl={kl['name']} (a stack trains with a constant beta)"
    if kl is not None and kl["free_bits"] > 0:
        # a padded job's unused dimensions would each add free_bits to its objective
        return "kl.free_bits > 0 (a padded job's unused dimensions would count)"
    return None


def _callbacks_reason(callbacks: Any) -> str | None:
    for name, cb in callbacks.items():
        if cb and str(cb.get("_target_", "")).endswith("ModelCheckpoint"):
            settings = {k: cb.get(k) for k in _CHECKPOINT_SETTINGS}
            filename = str(cb.get("filename") or "")
            named = filename.replace("{epoch", "").replace("{step", "")
            if settings != {**settings, **_CHECKPOINT_SETTINGS} or "{" in named:
                return (f"callbacks.{name} is not the default (the best checkpoint by val/loss, "
                        f"named by epoch or step, and last.ckpt)")  # fmt: skip
    return None
