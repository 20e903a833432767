"""Training schedules: the learning-rate scheduler (``scheduler=`` config group) and the KL
weight's schedule with free bits (``kl=`` config group).

A schedule is plain data in the model's hyper-parameters (``model.scheduler``: a dict with a
``name``), checked when the model is built, so a bad value stops before training with one line
naming the key, and checkpoints keep loading with ``weights_only=True``. ``lr_scheduler``
builds the torch scheduler in Lightning's ``lr_scheduler`` config form; Lightning steps it each
epoch and saves and restores its state with the checkpoint, so a resumed run follows the same
learning rates. The KL weight is a function of the global step alone, so a resumed run
follows the same weights without any state of its own.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch

from vae_lightning.errors import ConfigError, check_float, check_int

# every scheduler's keys and their defaults (conf/scheduler/<name>.yaml states the same)
SCHEDULERS: dict[str, dict[str, Any]] = {
    "none": {},
    # ReduceLROnPlateau on val/loss: lr *= factor after `patience` epochs without improvement
    "plateau": {"factor": 0.5, "patience": 5, "min_lr": 0.0},
    # CosineAnnealingLR over trainer.max_epochs, after `warmup_epochs` of linear warm-up
    "cosine": {"warmup_epochs": 0, "eta_min": 0.0},
    # the IWAE paper's (Burda et al. 2015, Sec. 5): lr * 10^(-i/7) for 3^i epochs, i = 0 ..
    # stages - 1 (all 8: 3280 epochs), then the last rate
    "burda": {"stages": 8},
}


def _named(
    key: str, spec: Any, table: dict[str, dict[str, Any]], common: dict[str, Any] | None = None
) -> dict[str, Any]:
    """``spec``, a mapping with a ``name`` from ``table``, with that entry's defaults (and
    ``common``'s) filled in; a ConfigError names ``key`` for anything else."""
    if not isinstance(spec, Mapping):
        raise ConfigError(key, f"must be a mapping with a name, got {spec!r}")
    spec = {str(k): v for k, v in spec.items()}
    name = spec.pop("name", None)
    if name not in table:
        raise ConfigError(f"{key}.name", f"must be one of {', '.join(table)}, got {name!r}")
    allowed = {**table[name], **(common or {})}
    unknown = sorted(set(spec) - set(allowed))
    if unknown:
        raise ConfigError(
            key, f"{name} takes {', '.join(allowed) or 'no keys'}, not {', '.join(unknown)}"
        )
    return {"name": name, **allowed, **spec}


def check_scheduler(spec: Any) -> dict[str, Any] | None:
    """``spec`` (null or a mapping with ``name``) as a plain, checked dict; None for no
    scheduler. A ConfigError names the key (``scheduler.<key>``)."""
    if spec is None:
        return None
    out = _named("scheduler", spec, SCHEDULERS)
    name = out["name"]
    if name == "plateau":
        out["factor"] = check_float("scheduler.factor", out["factor"], 0.0, inclusive=False)
        if out["factor"] >= 1:
            raise ConfigError("scheduler.factor", f"must be below 1, got {out['factor']}")
        out["patience"] = check_int("scheduler.patience", out["patience"], 0)
        out["min_lr"] = check_float("scheduler.min_lr", out["min_lr"], 0.0)
    elif name == "cosine":
        out["warmup_epochs"] = check_int("scheduler.warmup_epochs", out["warmup_epochs"], 0)
        out["eta_min"] = check_float("scheduler.eta_min", out["eta_min"], 0.0)
    elif name == "burda":
        out["stages"] = check_int("scheduler.stages", out["stages"], 1)
    return None if name == "none" else out


def burda_factor(epoch: int, stages: int) -> float:
    """The IWAE paper's learning-rate factor at ``epoch`` (0-based): 10^(-i/7) during stage i,
    which lasts 3^i epochs (stage 0: epoch 0; stage 1: epochs 1-3; stage 2: 4-12; ...)."""
    i, end = 0, 1
    while epoch >= end and i < stages - 1:
        i += 1
        end += 3**i
    return 10.0 ** (-i / 7)


def burda_epochs(stages: int) -> int:
    """The epochs of ``stages`` stages: 1 + 3 + ... + 3^(stages-1)."""
    return (3**stages - 1) // 2


def lr_scheduler(
    optimizer: torch.optim.Optimizer, spec: dict[str, Any] | None, max_epochs: int
) -> dict[str, Any] | None:
    """Lightning's ``lr_scheduler`` config for ``spec`` (stepped once per epoch), or None."""
    if spec is None:
        return None
    if spec["name"] == "plateau":
        scheduler: Any = torch.optim.lr_scheduler.ReduceLROnPlateau(
            optimizer, factor=spec["factor"], patience=spec["patience"], min_lr=spec["min_lr"]
        )
        return {"scheduler": scheduler, "interval": "epoch", "monitor": "val/loss"}
    if spec["name"] == "burda":
        stages = spec["stages"]
        lam = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda e: burda_factor(e, stages))
        return {"scheduler": lam, "interval": "epoch"}
    warmup = spec["warmup_epochs"]
    cosine = torch.optim.lr_scheduler.CosineAnnealingLR(
        optimizer, T_max=max(1, max_epochs - warmup), eta_min=spec["eta_min"]
    )
    if warmup == 0:
        return {"scheduler": cosine, "interval": "epoch"}
    # warm-up from lr / (warmup + 1) to lr over `warmup` epochs, then the cosine
    ramp = torch.optim.lr_scheduler.LinearLR(optimizer, 1.0 / (warmup + 1), 1.0, warmup)
    scheduler = torch.optim.lr_scheduler.SequentialLR(optimizer, [ramp, cosine], [warmup])
    return {"scheduler": scheduler, "interval": "epoch"}


# every KL schedule's keys and their defaults (conf/kl/<name>.yaml states the same); each also
# takes free_bits (Kingma et al. 2016): the objective's KL of each latent dimension (a batch
# mean) is at least free_bits nats, so a dimension below it gets no KL gradient
KL_SCHEDULES: dict[str, dict[str, Any]] = {
    "constant": {},  # beta throughout: the seeds' objective
    # linear from 0 to beta over `length` epochs or steps (Bowman et al. 2016)
    "warmup": {"length": 10, "unit": "epoch"},
    # `cycles` cycles over the whole training; in each, linear from 0 to beta over the first
    # `ratio` of it, then beta (Fu et al. 2019)
    "cyclical": {"cycles": 4, "ratio": 0.5},
}


def check_kl(spec: Any) -> dict[str, Any] | None:
    """``spec`` (null or a mapping with ``name``) as a plain, checked dict; None for the seeds'
    objective (constant beta, no free bits). A ConfigError names the key (``kl.<key>``)."""
    if spec is None:
        return None
    out = _named("kl", spec, KL_SCHEDULES, common={"free_bits": 0.0})
    name = out["name"]
    out["free_bits"] = check_float("kl.free_bits", out["free_bits"], 0.0)
    if name == "warmup":
        out["length"] = check_int("kl.length", out["length"], 1)
        if out["unit"] not in ("epoch", "step"):
            raise ConfigError("kl.unit", f"must be epoch or step, got {out['unit']!r}")
    elif name == "cyclical":
        out["cycles"] = check_int("kl.cycles", out["cycles"], 1)
        out["ratio"] = check_float("kl.ratio", out["ratio"], 0.0, inclusive=False)
        if out["ratio"] > 1:
            raise ConfigError("kl.ratio", f"must be in (0, 1], got {out['ratio']}")
    return None if name == "constant" and out["free_bits"] == 0 else out


def kl_weight(
    spec: dict[str, Any], beta: float, step: int, steps_per_epoch: int, total: int
) -> float:
    """The KL weight at global step ``step`` (0-based) of a training of ``total`` steps."""
    if spec["name"] == "warmup":
        length = spec["length"] * (steps_per_epoch if spec["unit"] == "epoch" else 1)
        return beta * min(1.0, step / length)
    if spec["name"] == "cyclical":
        period = max(1, math.ceil(total / spec["cycles"]))
        phase = (step % period) / period  # in [0, 1)
        return beta * min(1.0, phase / spec["ratio"])
    return beta
