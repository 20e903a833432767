"""What ``vae-evaluate`` evaluates: a checkpoint, read safely, with its run folder's data
settings; nothing its run config names is instantiated but the model and data classes it checks.

A checkpoint is read with ``weights_only`` (its class from ``run.checkpoints.model_class``) and
checked against its run folder's ``.hydra/config.yaml`` (the same class, the same
hyper-parameters); of that config only the data settings are used.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from omegaconf import OmegaConf

from vae_lightning import config
from vae_lightning.errors import ConfigError
from vae_lightning.run import checkpoints

if TYPE_CHECKING:
    from vae_lightning.data import IDXDataModule
    from vae_lightning.models import Autoencoder

DATA_CLASSES = {"MNISTDataModule": "mnist", "FashionMNISTDataModule": "fashion_mnist"}
# the data settings read from the run config; nothing else in it is used
DATA_KEYS = ("binarize", "seed", "val_size", "val_on_test", "download", "verify", "image_shape")
DEVICES = "cpu, cuda, cuda:<index>, mps, or null (CUDA when available, else the CPU)"


def device_of(device: str | None) -> torch.device:
    """``device``, checked to exist here; default (null): CUDA when available, else the CPU."""
    if device is None or device == "":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if not isinstance(device, str) or not re.fullmatch(r"cpu|mps|cuda(:\d+)?", device):
        raise ConfigError("device", f"must be one of {DEVICES}; got {device!r}")
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError(
                "device",
                f"is {device!r}, but no CUDA device is available here: use device=cpu, or leave "
                f"device unset (CUDA when available, else the CPU)",
            )
        count, index = torch.cuda.device_count(), int(device.partition(":")[2] or 0)
        if index >= count:
            raise ConfigError(
                "device",
                f"is {device!r}, but this machine has {count} CUDA device(s): "
                f"use one of cuda:0 to cuda:{count - 1}",
            )
    if device == "mps" and not torch.backends.mps.is_available():
        raise ConfigError("device", "is 'mps', but no MPS device is available here: use device=cpu")
    return torch.device(device)


def plain(value: Any) -> Any:
    """Lists and tuples as lists, for comparing configs with checkpoints."""
    return [plain(v) for v in value] if isinstance(value, (list, tuple)) else value


def read_run_config(run_dir: Path) -> Any:
    """The run's ``.hydra/config.yaml`` (OmegaConf, unresolved); nothing in it is instantiated."""
    path = run_dir / ".hydra" / "config.yaml"
    if not path.is_file():
        raise ConfigError(
            "ckpt",
            f"needs its run folder's config: {path} does not exist (expected "
            f"<run folder>/checkpoints/<file>.ckpt next to <run folder>/.hydra/config.yaml)",
        )
    config.register_resolvers()  # paths.* use ${root_dir:} (older runs ${repo_root:})
    return OmegaConf.load(path)


def _select(cfg: Any, key: str, path: Path) -> Any:
    try:
        value = OmegaConf.select(cfg, key, throw_on_missing=True)
    except Exception as err:  # an interpolation that cannot be resolved outside Hydra
        raise ConfigError(key, f"in {path} cannot be read: {err}") from None
    return OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value


def _target_name(target: Any, key: str, allowed: Sequence[str], path: Path) -> str:
    """The class name of a ``_target_`` string, if it is one of ``allowed`` vae_lightning's."""
    module = "vae_lightning.models" if key == "model" else "vae_lightning.data"
    name = str(target).rsplit(".", 1)[-1]
    if name not in allowed or str(target) not in (name, f"{module}.{name}"):
        raise ConfigError(
            f"{key}._target_",
            f"in {path} is {target!r}; evaluate takes only "
            f"{', '.join(f'{module}.{a}' for a in allowed)}",
        )
    return name


def _as_saved(key: str, value: Any) -> Any:
    """A model config value as a bound step saves it: schedules are normalised (``none`` and
    a constant KL weight without free bits are saved as None), so a checkpoint whose model was
    never bound to a step (a stack's job) compares as one whose model was."""
    from vae_lightning.training.schedules import check_kl, check_scheduler

    normalise = {"scheduler": check_scheduler, "kl": check_kl}.get(key)
    return plain(normalise(value) if normalise else value)


def _check_run_matches(cfg: Any, path: Path, name: str, checkpoint: dict, ckpt: Path) -> None:
    """Refuse a checkpoint whose class or hyper-parameters disagree with its run config."""
    target = _select(cfg, "model._target_", path)
    configured = _target_name(target, "model", checkpoints.MODEL_CLASSES, path)
    if configured != name:
        raise ConfigError(
            "ckpt",
            f"{ckpt} holds a {name} but its run config {path} says model._target_="
            f"vae_lightning.models.{configured}: the checkpoint does not belong to this run folder",
        )
    model_cfg = _select(cfg, "model", path) or {}
    differ = {
        key: (model_cfg[key], value)
        for key, value in (checkpoint.get("hyper_parameters") or {}).items()
        if key in model_cfg and _as_saved(key, model_cfg[key]) != _as_saved(key, value)
    }
    if differ:
        detail = ", ".join(f"{k}: config {c!r} vs checkpoint {v!r}" for k, (c, v) in differ.items())
        raise ConfigError("ckpt", f"{ckpt} disagrees with its run config {path}: {detail}")


def _datamodule(cfg: Any, path: Path, data_dir: Path | None, batch_size: int) -> IDXDataModule:
    """The run's datamodule, from its data settings only (its class checked by name)."""
    from vae_lightning.data import datamodules as data

    name = _target_name(_select(cfg, "data._target_", path), "data", tuple(DATA_CLASSES), path)
    cls = getattr(data, name)  # one of DATA_CLASSES, checked above
    kwargs = {key: _select(cfg, f"data.{key}", path) for key in DATA_KEYS}
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    kwargs["data_dir"] = (
        str(data_dir) if data_dir is not None else _select(cfg, "data.data_dir", path)
    )
    if kwargs["data_dir"] is None:
        raise ConfigError("data_dir", f"is not in {path}; give data_dir=<folder>")
    try:
        return cls(batch_size=batch_size, **kwargs)
    except ConfigError as err:
        raise ConfigError(f"data.{err.key}", f"(from {path}) {err.message}") from None


@dataclass
class Subject:
    """What is evaluated: the model, its checkpoint's record and the run's data."""

    ckpt: Path
    run_dir: Path
    name: str  # the model class
    checkpoint: dict[str, Any]  # without its weights and optimizer states
    seed: int
    dm: IDXDataModule
    model: Autoencoder
    device: torch.device


def load_subject(
    ckpt: Path | str, data_dir: Path | str | None, batch_size: int, device: torch.device
) -> Subject:
    """Read the checkpoint, check it against its run folder, load the model and datamodule."""
    ckpt = Path(ckpt).expanduser().resolve()
    run_dir = ckpt.parent.parent  # <run>/checkpoints/<file>.ckpt
    checkpoint = checkpoints.read(ckpt, "ckpt")
    name = checkpoints.model_class(checkpoint, ckpt, "ckpt")
    cfg = read_run_config(run_dir)
    cfg_path = run_dir / ".hydra" / "config.yaml"
    _check_run_matches(cfg, cfg_path, name, checkpoint, ckpt)
    seed = _select(cfg, "seed", cfg_path)
    dm = _datamodule(cfg, cfg_path, Path(data_dir) if data_dir is not None else None, batch_size)
    model = checkpoints.load_model(ckpt, name, device, "ckpt")
    for key in ("state_dict", "optimizer_states"):  # loaded: free them
        checkpoint.pop(key, None)
    return Subject(ckpt, run_dir, name, checkpoint, int(seed or 0), dm, model, device)


def load_test_images(dm: IDXDataModule, seed: int) -> torch.Tensor:
    """The test set as float images in [0, 1] (N, C, H, W), binarized as in the run."""
    from vae_lightning.data.idx import to_unit_float

    dm.prepare_data()
    dm.setup("test")
    x = to_unit_float(dm.splits["test"][0])  # from uint8; static binarization already applied
    if dm.binarize == "dynamic":
        # one seeded draw of the test set, the same for every metric (a fresh draw per batch, as
        # in training, would give each metric different images)
        x = torch.bernoulli(x, generator=torch.Generator().manual_seed(seed + 2))
    return x
