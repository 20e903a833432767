"""Checkpoints: reading them safely, telling which model they hold, checking that they fit, and
writing them atomically. Shared by ``train`` (resume) and ``evaluate``.

A checkpoint is read with ``weights_only=True``: tensors and plain containers only, so a file
that would run code on loading is refused. The model class is only ever one of vae_lightning's
own: recorded in the checkpoint (``vae_lightning.model_class``) and checked against what the
weights are.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from vae_lightning.errors import ConfigError, DataError
from vae_lightning.files import atomic_write

MODEL_CLASSES = ("VAE", "AE", "ConvVAE")


def read(path: str | Path, key: str = "ckpt") -> dict[str, Any]:
    """The checkpoint at ``path`` as plain containers and tensors, or a clear error.

    Raises ConfigError (naming ``key``) when there is no such file, DataError when the file is
    truncated, not a Lightning checkpoint, or holds objects other than tensors and containers.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(key, f"points to {path}, which is not a file")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # zip/pickle errors of a truncated or foreign file
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(err))
        if found:  # torch's weights_only unpickler refused a class
            raise DataError(
                f"{path}: holds a {found.group(1)} object, not only tensors and plain "
                f"containers; refusing to unpickle it (weights_only=True)"
            ) from None
        first = str(err).splitlines()[0][:200] if str(err) else ""
        raise DataError(
            f"{path} is truncated or not a checkpoint ({type(err).__name__}: {first}). "
            f"Use an earlier one, e.g. the best-*.ckpt."
        ) from None
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("state_dict"), dict):
        raise DataError(f"{path}: not a Lightning checkpoint (no state_dict)")
    return checkpoint


def _weights_class(state_dict: dict[str, Any]) -> str | None:
    """Which of vae_lightning's models these weights are, from their names alone."""
    keys = set(state_dict)
    if {"code_mean", "code_cov"} <= keys:  # the AE's Gaussian fitted to its training codes
        return "AE"
    if any(key.startswith("encoder.conv.") for key in keys):
        return "ConvVAE"
    if "encoder.net.1.weight" in keys:
        return "VAE"
    return None


def model_class(checkpoint: dict[str, Any], path: Path, key: str = "ckpt") -> str:
    """A checkpoint's model class: its recorded ``model_class``, checked against its weights."""
    inferred = _weights_class(checkpoint["state_dict"])
    recorded = (checkpoint.get("vae_lightning") or {}).get("model_class")
    if recorded is not None and recorded not in MODEL_CLASSES:
        raise ConfigError(
            key,
            f"{path} records model_class={recorded!r}; only vae_lightning's "
            f"{', '.join(MODEL_CLASSES)} are read",
        )
    if recorded is not None and inferred is not None and recorded != inferred:
        raise ConfigError(
            key, f"{path} records model_class={recorded} but holds the weights of a {inferred}"
        )
    name = recorded or inferred
    if name is None:
        raise ConfigError(
            key, f"{path} holds weights of none of vae_lightning's models ({MODEL_CLASSES})"
        )
    return name


def check_fits(path: str | Path, model: torch.nn.Module, key: str = "resume") -> dict[str, Any]:
    """Read the checkpoint at ``path`` and check it fits ``model`` (class, names, shapes).

    Raises DataError for an unreadable file and ConfigError naming both sides when the
    checkpoint holds another model class or other shapes. Returns the checkpoint.
    """
    path = Path(path)
    checkpoint = read(path, key)
    wanted = type(model).__name__
    saved = model_class(checkpoint, path, key)
    if saved != wanted:
        raise ConfigError(key, f"{path} holds a {saved}, but the configured model is a {wanted}")
    own = model.state_dict()
    for name, tensor in checkpoint["state_dict"].items():
        if name in own and tuple(own[name].shape) != tuple(tensor.shape):
            raise ConfigError(
                key,
                f"{path} does not fit the configured {wanted}: {name} has shape "
                f"{tuple(tensor.shape)} there and {tuple(own[name].shape)} here (saved "
                f"hyper-parameters: {dict(checkpoint.get('hyper_parameters') or {})})",
            )
    missing = sorted(set(own) - set(checkpoint["state_dict"]))
    if missing:
        raise ConfigError(key, f"{path} lacks {', '.join(missing[:3])} of the configured {wanted}")
    return checkpoint


def load_model(path: Path, name: str, device: torch.device, key: str = "ckpt") -> Any:
    """``Cls.load_from_checkpoint`` of one of vae_lightning's models, in eval mode, or a clear
    error naming what does not fit."""
    from vae_lightning import models

    cls = {"VAE": models.VAE, "AE": models.AE, "ConvVAE": models.ConvVAE}[name]
    try:
        model = cls.load_from_checkpoint(path, map_location=device, weights_only=True)
    except ConfigError as err:
        raise ConfigError(key, f"{path}: hyper-parameter {err.key} {err.message}") from None
    except (RuntimeError, TypeError, KeyError) as err:
        first = " ".join(line.strip() for line in str(err).strip().splitlines()[:3])
        raise ConfigError(
            key,
            f"{path}: its weights do not fit a {name} built from its hyper-parameters ({first})",
        ) from None
    return model.to(device).eval()


class AtomicCheckpointIO(TorchCheckpointIO):
    """Checkpoints written to a temporary file and renamed into place.

    Lightning's own writer opens the target file for writing, so a crash or a full disk halfway
    through would leave a truncated ``last.ckpt`` in place of the previous good one.
    """

    def save_checkpoint(self, checkpoint: dict, path: Any, storage_options: Any = None) -> None:
        write = super().save_checkpoint
        atomic_write(path, lambda tmp: write(checkpoint, tmp, storage_options))
