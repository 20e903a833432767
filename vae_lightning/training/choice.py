"""Which step trains a model: the config's ``step`` settings resolved for a trainer's
accelerator, and the step attached (``train.py``'s ``attach``; a sweep's stack resolves its
jobs' step the same way)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from vae_lightning.training.step import AutomaticStep

if TYPE_CHECKING:
    from vae_lightning.models import Autoencoder


# step=auto: the fast step on a CUDA GPU, once it has been measured there (it has not yet)
FAST_ON_CUDA = False
STEPS = ("auto", "automatic", "fast")


def resolve_step(settings: Any, accelerator: str) -> tuple[str, dict[str, Any]]:
    """The step the config's ``step`` settings choose for a trainer on ``accelerator``
    (``auto`` resolved): ``automatic`` or ``fast``, and the fast step's options."""
    from vae_lightning.errors import check_choice

    spec = {str(k): v for k, v in (settings or {}).items()}
    name = check_choice("step.name", spec.pop("name", "automatic"), STEPS)
    if name == "auto":
        cuda = accelerator in ("gpu", "cuda") or (
            accelerator == "auto" and torch.cuda.is_available()
        )
        name = "fast" if cuda and FAST_ON_CUDA else "automatic"
    return name, spec


def attach(model: Autoencoder, settings: Any = None, accelerator: str = "cpu") -> AutomaticStep:
    """Attach the step that trains ``model`` (train.py's): ``settings`` is the config's
    ``step`` (``name``: automatic, fast or auto; the fast step's ``chunk`` and ``cuda_graph``)
    for a trainer on ``accelerator``. A ConfigError names the key (``step.chunk``, or the
    model's ``model.kl.length`` when its schedules are refused)."""
    from vae_lightning.errors import ConfigError

    name, spec = resolve_step(settings, accelerator)
    step = AutomaticStep()
    if name == "fast":
        from vae_lightning.training.fast import FastStep

        try:
            step = FastStep(**spec)
        except ConfigError as err:
            raise ConfigError(f"step.{err.key}", err.message) from None
        except TypeError as err:
            raise ConfigError("step", f"has a key the fast step does not take ({err})") from None
    try:
        step.bind(model)
    except ConfigError as err:
        raise ConfigError(f"model.{err.key}", err.message) from None
    return step
