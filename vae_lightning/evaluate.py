"""Metrics and image grids from a checkpoint: ``vae-evaluate ckpt=PATH [key=value ...]``, with
the settings of ``conf/evaluate.yaml``; ``vae-evaluate classifiers=true data_dir=PATH`` trains
(or checks) the FID classifiers ahead of time instead.

Reads the checkpoint (``weights_only``; its class from ``run.checkpoints.model_class``) and,
from its run folder's ``.hydra/config.yaml``, only the data settings: nothing named there is
instantiated.
On the test set: ``test/loss``, ``test/recon``, ``test/kl``, ``test/mse`` (``model.terms``, the
training definitions), ``test/nll_iw`` (the importance-weighted bound, ``k`` samples),
``test/active_units`` and the KL per latent dimension; ``gen/fid`` between ``n_fid`` samples and
as many test images in the features of a classifier trained on the same dataset (cached under
``<data_dir>/classifiers/``, replaced only with ``retrain_classifier=true``, and refused below
``classifier_min_accuracy``), ``gen/fid_train_test`` (training against test images: a perfect
generator's floor); with ``probes=true``, the latent probes. Writes only ``<run folder>/eval.json``
and the grids in ``<run folder>/eval/``.

Cost of ``test/nll_iw``: ``k`` decoder passes per test image, i.e. 10^7 passes for the 10k test
images at the default k = 1000 (Burda et al. use k = 5000): for seed 1's MLP VAE about 2.5
minutes on 2 CPU cores, the bulk of an evaluation; it grows linearly with k.

The entry point's wiring, beside ``train.py``: the measurements are ``evaluation``'s (the
checkpoint and its run folder in ``evaluation.subject``, the test-set measures in
``evaluation.measures``), the grids ``views``'.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from vae_lightning import config
from vae_lightning.errors import ConfigError, check_choice, check_float, check_int
from vae_lightning.evaluation import measures
from vae_lightning.evaluation.fid import (
    CLASSIFIER_MIN_ACCURACY,
    CLASSIFIER_SEED,
    ClassifierSettings,
    classifier_of,
)
from vae_lightning.evaluation.subject import (
    DATA_CLASSES,
    Subject,
    device_of,
    load_subject,
    load_test_images,
    plain,
)
from vae_lightning.files import atomic_write_json

log = logging.getLogger(__name__)

MINIMUM = {"k": 0, "chunk": 1, "n_fid": 0, "batch_size": 1, "classifier_epochs": 1}
MINIMUM |= {"classifier_max_steps": 1, "probe_max_train": 0, "classifier_seed": 0}
OPTIONAL = ("classifier_max_steps", "probe_max_train")
FLAGS = ("probes", "verify", "classifiers", "retrain_classifier")


# --- the settings --------------------------------------------------------------------------------


def check_settings(settings: dict[str, Any]) -> None:
    """A ConfigError naming the first of the tool's settings with a bad type or value, or a
    device this machine does not have: all before anything is loaded or trained."""
    for key, value in settings.items():
        if key in MINIMUM and not (value is None and key in OPTIONAL):
            check_int(key, value, MINIMUM[key])
        elif key in FLAGS and not isinstance(value, bool):
            raise ConfigError(key, f"must be true or false, got {value!r}")
        elif key == "classifier_min_accuracy":
            if check_float(key, value, 0.0) > 1:
                raise ConfigError(key, f"must be a test accuracy in [0, 1], got {value!r}")
        elif key == "datasets":
            for name in [value] if isinstance(value, str) else value:
                check_choice(key, name, tuple(DATA_CLASSES.values()))
        elif key == "device":
            device_of(value)


@dataclass(frozen=True)
class EvalSettings:
    """How a checkpoint is evaluated: ``conf/evaluate.yaml``'s settings (described there),
    checked when made (a ConfigError names the first bad one)."""

    k: int = 1000
    chunk: int = 100
    n_fid: int = 10_000
    probes: bool = False
    batch_size: int = 500
    device: str | None = None
    probe_max_train: int | None = None
    # the FID classifier: how it is trained when it is not cached, and which cache is used
    classifier_epochs: int = 4
    classifier_max_steps: int | None = None
    retrain_classifier: bool = False
    classifier_min_accuracy: float = CLASSIFIER_MIN_ACCURACY
    classifier_seed: int = CLASSIFIER_SEED

    def __post_init__(self) -> None:
        check_settings(dataclasses.asdict(self))

    @classmethod
    def of(cls, keys: dict[str, Any]) -> EvalSettings:
        """The settings from ``keys`` (the config's names); an unknown key is a ConfigError."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(keys) - names)
        if unknown:
            raise ConfigError(unknown[0], "is not a setting of vae-evaluate (see --help)")
        return cls(**keys)

    @property
    def classifier(self) -> ClassifierSettings:
        """How the FID classifier is obtained (``evaluation.fid.classifier_of``)."""
        return ClassifierSettings(
            epochs=self.classifier_epochs, max_steps=self.classifier_max_steps,
            seed=self.classifier_seed, retrain=self.retrain_classifier,
            min_accuracy=self.classifier_min_accuracy,
        )  # fmt: skip


# --- the evaluation ------------------------------------------------------------------------------


def grids(subject: Subject, x: torch.Tensor, y: torch.Tensor) -> dict[str, str]:
    """16 fixed test images over their reconstructions, and 64 samples, as PNG grids; for a
    conditional model also its samples by class and its test images decoded with every label."""
    from vae_lightning.views import grids as draw
    from vae_lightning.views.publish import publish

    model, seed, folder = subject.model, subject.seed, subject.run_dir / "eval"
    idx = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))[:16]
    xs, ys = x[idx].to(subject.device), y[idx].to(subject.device)
    made = {"reconstructions": draw.reconstruction_grid(model, xs, ys)}
    generator = torch.Generator(device=subject.device).manual_seed(seed)
    made["samples"] = draw.sample_grid(model, 64, nrow=8, generator=generator)
    if model.conditional:
        made["samples_by_class"] = draw.class_sample_grid(model, 8, generator)
        made["relabelled"] = draw.relabel_grid(model, xs[:8], ys[:8])
    return {name: str(publish(image, folder / f"{name}.png")) for name, image in made.items()}


def _header(subject: Subject, n_test: int) -> dict[str, Any]:
    """eval.json's description of what was evaluated, on what."""
    checkpoint, dm = subject.checkpoint, subject.dm
    log.info(
        "evaluating %s (%s) on %d %s test images, on %s",
        subject.ckpt, subject.name, n_test, dm.dataset_name, subject.device,
    )  # fmt: skip
    return {
        "checkpoint": str(subject.ckpt),
        "run_dir": str(subject.run_dir),
        "model": subject.name,
        "hparams": plain(dict(checkpoint.get("hyper_parameters") or {})),
        "epoch": checkpoint.get("epoch"),
        "global_step": checkpoint.get("global_step"),
        "data": {
            "dataset": dm.dataset_name,
            "data_dir": str(dm.data_dir),
            "binarize": dm.binarize,
            "n_test": n_test,
        },
        "seed": subject.seed,
        "device": str(subject.device),
    }


@contextlib.contextmanager
def _timed(seconds: dict[str, float], key: str) -> Iterator[None]:
    t0 = time.perf_counter()
    yield
    seconds[key] = time.perf_counter() - t0


def evaluate(
    ckpt: Path | str,
    data_dir: Path | str | None = None,
    settings: EvalSettings | None = None,
    **keys: Any,
) -> dict[str, Any]:
    """Evaluate a checkpoint on its dataset's test set; write ``eval.json`` and grids; return it.

    ``ckpt`` is ``<run folder>/checkpoints/<file>.ckpt`` of a run of vae_lightning.train;
    ``settings`` (or the same as keywords, ``k=...``) are described in ``conf/evaluate.yaml``.
    Every setting is checked before anything is loaded, and the FID classifier is obtained (or
    refused) before any measurement: an error leaves nothing written.
    """
    import lightning as L

    s = settings or EvalSettings.of(keys)
    t_start = time.perf_counter()
    subject = load_subject(ckpt, data_dir, s.batch_size, device_of(s.device))
    L.seed_everything(subject.seed, verbose=False)
    x = load_test_images(subject.dm, subject.seed)
    result, metrics, seconds = _header(subject, len(x)), {}, {}
    if s.n_fid > 0:  # its training forks the RNG: the measurements below are as without it
        with _timed(seconds, "classifier"):
            dm = subject.dm
            fid_classifier = classifier_of(dm.dataset_name, dm.data_dir, subject.device,
                                           s.classifier)  # fmt: skip
    y = subject.dm.splits["test"][1]  # (N,) the labels of x, in its order
    with _timed(seconds, "terms"):
        found, latent = measures.mean_terms(subject.model, x, s.batch_size, y)
    metrics.update(found)
    if latent is not None:  # a VAE
        result["latent"] = latent
    if subject.name == "VQVAE":
        found, result["codebook"] = measures.codebook_use(subject.model, x, s.batch_size)
        metrics.update(found)
    if subject.model.variational and s.k > 0:
        negative_elbo = metrics["test/recon"] + metrics["test/kl"]
        found, result["nll_iw"] = measures.nll_iw(subject, x, s.k, s.chunk, negative_elbo, y)
        metrics.update(found)
        seconds["nll_iw"] = result["nll_iw"]["seconds"]
    result["images"] = grids(subject, x, y)
    if s.n_fid > 0:
        with _timed(seconds, "fid"):
            found, result["fid"] = measures.frechet_distances(
                subject, fid_classifier, s.n_fid, s.batch_size
            )
        metrics.update(found)
    if s.probes:
        with _timed(seconds, "probes"):
            found, result["probe"] = measures.latent_probes(subject, s.batch_size,
                                                            s.probe_max_train)  # fmt: skip
        metrics.update(found)
    seconds["total"] = time.perf_counter() - t_start
    result["metrics"] = dict(sorted(metrics.items()))
    result["time"] = {f"{key}_s": value for key, value in seconds.items()}
    atomic_write_json(subject.run_dir / "eval.json", result)
    log.info("wrote %s", subject.run_dir / "eval.json")
    return result


def prepare_classifiers(
    data_dir: Path | str,
    datasets: Sequence[str] = tuple(DATA_CLASSES.values()),
    verify: bool = True,
    settings: EvalSettings | None = None,
    **keys: Any,
) -> dict[str, float]:
    """Train (or load from the cache) the FID classifier of each dataset; its test accuracy.

    Missing raw files are fetched first (``data.sources.ensure_dataset``; md5-checked when
    ``verify``). A cache trained otherwise, or a classifier below ``classifier_min_accuracy``,
    is an error (``evaluation.fid.load_or_train_classifier``). ``settings`` (or keywords): the
    classifier's and the device."""
    from vae_lightning.data.sources import ensure_dataset

    s = settings or EvalSettings.of(keys)
    check_settings({"datasets": datasets, "verify": verify})
    dev, accuracy = device_of(s.device), {}
    for name in [datasets] if isinstance(datasets, str) else datasets:
        ensure_dataset(name, Path(data_dir), verify=verify)
        accuracy[name] = classifier_of(name, Path(data_dir), dev, s.classifier).accuracy
        log.info("classifier %s: test accuracy %.4f", name, accuracy[name])
    return accuracy


# --- the command line ----------------------------------------------------------------------------

# the settings of conf/evaluate.yaml that are not EvalSettings
TOOL_KEYS = ("ckpt", "data_dir", "classifiers", "datasets", "verify")


def run(cfg: DictConfig) -> None:
    """``vae-evaluate ckpt=PATH [key=value ...]``, or ``vae-evaluate classifiers=true
    data_dir=PATH``; the settings are conf/evaluate.yaml's."""
    keys = OmegaConf.to_container(cfg, resolve=True)
    tool = {key: keys.pop(key, None) for key in TOOL_KEYS}
    check_settings({k: v for k, v in tool.items() if v is not None})
    settings = EvalSettings.of(keys)
    if tool["classifiers"]:
        if tool["data_dir"] is None:
            raise ConfigError("data_dir", "is required with classifiers=true: data_dir=<folder>")
        prepare_classifiers(tool["data_dir"], tool["datasets"], bool(tool["verify"]), settings)
    elif tool["ckpt"] is None:
        raise ConfigError(
            "ckpt",
            "is required: ckpt=<run folder>/checkpoints/<file>.ckpt (or classifiers=true "
            "data_dir=<folder> to train the FID classifiers)",
        )
    else:
        result = evaluate(tool["ckpt"], tool["data_dir"], settings)
        log.info("done: %s", {key: round(value, 4) for key, value in result["metrics"].items()})


main = config.tool_main("evaluate", doc=__doc__)(run)


if __name__ == "__main__":
    sys.exit(main())
