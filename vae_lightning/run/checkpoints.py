"""Checkpoints: reading them safely, telling which model they hold, checking that they fit, and
writing them atomically. Shared by ``train`` (resume) and ``evaluate``.

A checkpoint is read with ``weights_only=True``: tensors and plain containers only, so a file
that would run code on loading is refused, and torch's hint to load it with ``weights_only=False``
is never passed on. The model class is only ever one of vae_lightning's own: recorded in the
checkpoint (``vae_lightning.model_class``) and checked against what the weights are.
"""

from __future__ import annotations

import pickle
import pickletools
import re
import warnings
import zipfile
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from vae_lightning.errors import ConfigError, DataError
from vae_lightning.files import atomic_write

MODEL_CLASSES = ("VAE", "AE", "ConvVAE", "CVAE", "HVAE", "VQVAE")
# the classes whose weights carry the same names as another's (a CVAE is an MLP or a conv VAE
# with wider inputs): _weights_class names the other
LOOKS_LIKE = {"CVAE": ("VAE", "ConvVAE")}


# How torch's weights_only unpickler words a refusal to build an object it does not admit (a
# class, a function to call); any other unpickling error is damage.
REFUSED = re.compile(r"GLOBAL (\S+)|Can only (create new object|build)|call reduce", re.IGNORECASE)
# Lines of torch's messages that are advice for torch's users, not a description of the file:
# above all its hint that ``weights_only=False`` "will likely succeed", which would run the code.
TORCH_ADVICE = re.compile(
    r"weights.only|safe_globals|trust|file an issue|documentation|internal miniz|If you are seeing",
    re.IGNORECASE,
)
ADVICE = (
    "Use another checkpoint written by vae_lightning, e.g. <run folder>/checkpoints/last.ckpt "
    "or best-*.ckpt"
)


def torch_reason(err: BaseException) -> str:
    """The first line of a torch error that describes the problem, without torch's advice."""
    for line in str(err).splitlines():
        line = line.strip().split(". This is an internal")[0]
        if line and not TORCH_ADVICE.search(line):
            return f"{type(err).__name__}: {line[:200]}"
    return type(err).__name__


# the modules of the globals a checkpoint of tensors and plain containers refers to
OWN_MODULES = ("torch", "collections", "builtins")
STRING_OPS = {"SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "UNICODE", "SHORT_BINSTRING"}


def _foreign_global(path: Path) -> str | None:
    """The first global outside ``OWN_MODULES`` that the checkpoint's pickle refers to, read
    from its opcodes without unpickling anything; "" when there is none, None when the pickle is
    missing or not whole (damage). For the refusals torch words only as an unsupported opcode
    (e.g. pickle protocol 4's framing, before it reaches the global)."""
    try:
        with zipfile.ZipFile(path) as archive:
            name = next(n for n in archive.namelist() if n.endswith("data.pkl"))
            data = archive.read(name)
        strings: list[Any] = []  # the values pushed, strings only (None for anything else)
        memo: dict[int, Any] = {}
        for op, arg, _ in pickletools.genops(data):
            found = None
            if op.name == "GLOBAL":
                found = str(arg).replace(" ", ".")
            elif op.name == "STACK_GLOBAL" and len(strings) >= 2:
                found = f"{strings[-2]}.{strings[-1]}"
            if found and found.split(".")[0] not in OWN_MODULES:
                return found
            if op.name in ("MEMOIZE", "PUT", "BINPUT", "LONG_BINPUT"):
                memo[len(memo) if arg is None else arg] = strings[-1] if strings else None
            elif op.name in ("GET", "BINGET", "LONG_BINGET"):
                strings.append(memo.get(arg))
            else:
                strings.append(arg if op.name in STRING_OPS else None)
    except Exception:  # StopIteration, zip or opcode errors: damaged
        return None
    return ""


def load_weights_only(path: Path, advice: str = ADVICE, map_location: Any = "cpu") -> Any:
    """``torch.load(path, weights_only=True)`` of an existing file, or a DataError that says which
    of two things is wrong, then ``advice``: the file holds objects other than tensors and plain
    containers (not loaded: unpickling them could run code), or it is truncated or not a
    checkpoint. Never passes on torch's suggestion to load with ``weights_only=False``.
    """
    if not zipfile.is_zipfile(path):  # torch.save has written zip archives since torch 1.6
        raise DataError(
            f"{path} is truncated or not a checkpoint (not a zip archive, as torch.save writes). "
            f"{advice}"
        )
    try:
        with warnings.catch_warnings():  # torch warns about pickle protocols: one line on stderr
            warnings.simplefilter("ignore")
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        refused = REFUSED.search(str(err))
        name = refused.group(1) if refused else _foreign_global(path)
        if not refused and not name:
            raise DataError(
                f"{path} is truncated or not a checkpoint ({torch_reason(err)}). {advice}"
            ) from None
        what = f"a {name} object" if name else "an object"
        raise DataError(
            f"{path} was not loaded: it holds {what}, not only tensors and plain containers, and "
            f"unpickling it could run code. {advice}"
        ) from None
    except Exception as err:  # zip errors of a truncated or foreign file
        raise DataError(
            f"{path} is truncated or not a checkpoint ({torch_reason(err)}). {advice}"
        ) from None


def read(path: str | Path, key: str = "ckpt") -> dict[str, Any]:
    """The checkpoint at ``path`` as plain containers and tensors, or a clear error.

    Raises ConfigError (naming ``key``) when there is no such file; DataError (load_weights_only)
    when the file holds objects other than tensors and containers, is truncated, or is not a
    Lightning checkpoint.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(
            key,
            f"points to {path}, which is not a file: give a checkpoint written by vae_lightning, "
            f"e.g. {key}=<run folder>/checkpoints/last.ckpt",
        )
    checkpoint = load_weights_only(path)
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("state_dict"), dict):
        raise DataError(f"{path} is not a Lightning checkpoint (no state_dict). {ADVICE}")
    return checkpoint


def _weights_class(state_dict: dict[str, Any]) -> str | None:
    """Which of vae_lightning's models these weights are, from their names alone."""
    keys = set(state_dict)
    if {"code_mean", "code_cov"} <= keys:  # the AE's Gaussian fitted to its training codes
        return "AE"
    if any(key.startswith("quantizer.") for key in keys):
        return "VQVAE"
    if "encoder.q1.net.1.weight" in keys:
        return "HVAE"
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
    if inferred is not None and inferred in LOOKS_LIKE.get(recorded, ()):
        inferred = recorded
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
    from vae_lightning.models import MODELS

    cls = MODELS[name]  # one of MODEL_CLASSES (model_class checked it)
    try:
        model = cls.load_from_checkpoint(path, map_location=device, weights_only=True)
    except ConfigError as err:
        raise ConfigError(key, f"{path}: hyper-parameter {err.key} {err.message}") from None
    except (RuntimeError, TypeError, KeyError) as err:
        lines = [line.strip() for line in str(err).strip().splitlines()[:3]]
        first = " ".join(line for line in lines if not TORCH_ADVICE.search(line))
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
