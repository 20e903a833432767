"""Metrics and image grids from a checkpoint: ``vae-evaluate ckpt=PATH [key=value ...]``, with
the settings of ``conf/evaluate.yaml``; ``vae-evaluate classifiers=true data_dir=PATH`` trains
(or checks) the FID classifiers ahead of time instead.

Reads the checkpoint (``weights_only``; its class from ``checkpoints.model_class``) and, from its
run folder's ``.hydra/config.yaml``, only the data settings: nothing named there is instantiated.
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

Longer than ~450 lines on purpose: reading a run folder's config without instantiating it
(about 110 lines of checks) belongs with the evaluation that needs it, and is used nowhere else.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import re
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from omegaconf import DictConfig, OmegaConf

from vae_lightning import checkpoints, config
from vae_lightning.errors import ConfigError, check_choice, check_float, check_int
from vae_lightning.fid import CLASSIFIER_MIN_ACCURACY, CLASSIFIER_SEED, FIDClassifier, classifier_of
from vae_lightning.files import atomic_write_json

if TYPE_CHECKING:
    from vae_lightning.data import IDXDataModule
    from vae_lightning.models import Autoencoder

log = logging.getLogger(__name__)

DATA_CLASSES = {"MNISTDataModule": "mnist", "FashionMNISTDataModule": "fashion_mnist"}
# the data settings read from the run config; nothing else in it is used
DATA_KEYS = ("binarize", "seed", "val_size", "val_on_test", "download", "verify", "image_shape")
# Images per iwae_bound call: ROWS_PER_PASS // chunk, so a decoder pass holds ~20k images.
ROWS_PER_PASS = 20_000
# The FID classifier's seed is fixed, not the run's: every run of a dataset is then measured
# in the same feature space and their FIDs can be compared.
ACTIVE_UNITS_THRESHOLD = 0.01  # on Var_x of mu_d (Burda et al.)
LIKELIHOOD = {
    "binary": "Bernoulli on binary images: a log-likelihood",
    "grey": "Bernoulli on grey levels: the training objective's scale, not a normalised "
    "density (evaluate a binarized run for a log-likelihood)",
}
# the integer settings and their lowest values; OPTIONAL ones may also be null
MINIMUM = {"k": 0, "chunk": 1, "n_fid": 0, "batch_size": 1, "classifier_epochs": 1}
MINIMUM |= {"classifier_max_steps": 1, "probe_max_train": 0, "classifier_seed": 0}
OPTIONAL = ("classifier_max_steps", "probe_max_train")
FLAGS = ("probes", "verify", "classifiers", "retrain_classifier")
DEVICES = "cpu, cuda, cuda:<index>, mps, or null (CUDA when available, else the CPU)"


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
            _device(value)


def _device(device: str | None) -> torch.device:
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


# --- the run folder: checkpoint and data settings ------------------------------------------------


def _plain(value: Any) -> Any:
    return [_plain(v) for v in value] if isinstance(value, (list, tuple)) else value


def read_run_config(run_dir: Path) -> Any:
    """The run's ``.hydra/config.yaml`` (OmegaConf, unresolved); nothing in it is instantiated."""
    path = run_dir / ".hydra" / "config.yaml"
    if not path.is_file():
        raise ConfigError(
            "ckpt",
            f"needs its run folder's config: {path} does not exist (expected "
            f"<run folder>/checkpoints/<file>.ckpt next to <run folder>/.hydra/config.yaml)",
        )
    config.register_resolvers()  # paths.* use ${repo_root:}
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
    """A model config value as the model saves it: schedules are normalised (``none`` and a
    constant KL weight without free bits are saved as None)."""
    from vae_lightning.schedules import check_kl, check_scheduler

    normalise = {"scheduler": check_scheduler, "kl": check_kl}.get(key)
    return _plain(normalise(value) if normalise else value)


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
        if key in model_cfg and _as_saved(key, model_cfg[key]) != _plain(value)
    }
    if differ:
        detail = ", ".join(f"{k}: config {c!r} vs checkpoint {v!r}" for k, (c, v) in differ.items())
        raise ConfigError("ckpt", f"{ckpt} disagrees with its run config {path}: {detail}")


def _datamodule(cfg: Any, path: Path, data_dir: Path | None, batch_size: int) -> IDXDataModule:
    """The run's datamodule, from its data settings only (its class checked by name)."""
    from vae_lightning import data

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
    from vae_lightning.data import to_unit_float

    dm.prepare_data()
    dm.setup("test")
    x = to_unit_float(dm.splits["test"][0])  # from uint8; static binarization already applied
    if dm.binarize == "dynamic":
        # one seeded draw of the test set, the same for every metric (a fresh draw per batch, as
        # in training, would give each metric different images)
        x = torch.bernoulli(x, generator=torch.Generator().manual_seed(seed + 2))
    return x


# --- the measurements: each returns its metrics and its record for eval.json ---------------------


def _batches(n: int, size: int) -> Iterator[tuple[int, int]]:
    return ((i, min(i + size, n)) for i in range(0, n, size))


def _subset(images: torch.Tensor, n: int, seed: int) -> torch.Tensor:
    if n >= len(images):
        return images
    return images[torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))[:n]]


@torch.no_grad()
def mean_terms(
    model: Autoencoder, x: torch.Tensor, batch_size: int, y: torch.Tensor | None = None
) -> tuple[dict[str, float], dict[str, Any] | None]:
    """Means over the test set of ``model.terms`` (the training definitions); for a VAE also
    ``test/active_units`` and the record of the KL per dimension and Var_x of mu. ``y``: the
    labels (a conditional model reads them)."""
    from vae_lightning.losses import gaussian_kl
    from vae_lightning.metrics import LatentMoments, active_units

    device = next(model.parameters()).device
    sums: dict[str, float] = {}
    moments = LatentMoments() if model.variational else None
    for lo, hi in _batches(len(x), batch_size):
        xb = x[lo:hi].to(device)  # (B, C, H, W) float
        yb = None if y is None else y[lo:hi].to(device)
        for key, value in model.terms(xb, y=yb).items():
            if value.ndim == 0:  # a batch mean (the rest are per-image outputs) -> a sum
                sums[key] = sums.get(key, 0.0) + float(value) * (hi - lo)
        if moments is not None:
            mu, logvar = model.encode(xb, yb)  # (B, D)
            moments.update(mu, gaussian_kl(mu, logvar))
    metrics = {f"test/{k}": v / len(x) for k, v in sums.items()}
    if moments is None:
        return metrics, None
    mu_var = moments.mu_variance()
    metrics["test/active_units"] = float(active_units(mu_var, ACTIVE_UNITS_THRESHOLD))
    return metrics, {
        "kl_per_dim": [round(float(v), 6) for v in moments.kl_per_dim()],
        "mu_variance": [round(float(v), 6) for v in mu_var],
        "active_units_threshold": ACTIVE_UNITS_THRESHOLD,
    }


@torch.no_grad()
def codebook_use(
    model: Autoencoder, x: torch.Tensor, batch_size: int
) -> tuple[dict[str, float], dict[str, Any]]:
    """A VQ-VAE's use of its codebook over the whole test set (its training logs the same keys
    per batch): ``test/usage``, the share of the K codes that some test image's code map uses,
    and ``test/perplexity``, exp of the entropy of the codes' frequencies (K when all are used
    equally); the record holds the counts and the prior that ``test/loss`` bounds with."""
    device = next(model.parameters()).device
    k = model.hparams.codebook_size
    counts = torch.zeros(k, dtype=torch.long)
    for lo, hi in _batches(len(x), batch_size):
        counts += torch.bincount(model.codes(x[lo:hi].to(device)).flatten().cpu(), minlength=k)
    p = counts.double() / counts.sum()
    perplexity = float(torch.exp(-(p * p.clamp_min(1e-300).log()).sum()))
    usage = float((counts > 0).double().mean())
    log.info(
        "codebook: %d of %d codes used, perplexity %.1f", int((counts > 0).sum()), k, perplexity
    )
    fitted = bool(model.prior_fitted)
    return {"test/perplexity": perplexity, "test/usage": usage}, {
        "codebook_size": k,
        "counts": counts.tolist(),
        "prior": "PixelCNN fitted by vae-prior" if fitted else "uniform (vae-prior not run)",
        # the posterior is a point mass on the code map z*: log p(x) >= log p(z*) + log p(x|z*)
        "bounds": "-log p(x) <= -log p(z*) - log p(x | z*) = test/loss (test/kl = -log p(z*))",
    }


def nll_iw(
    subject: Subject,
    x: torch.Tensor,
    k: int,
    chunk: int,
    negative_elbo: float,
    y: torch.Tensor | None = None,
) -> tuple[dict[str, float], dict[str, Any]]:
    """``test/nll_iw``: ``iwae_bound`` over the test set, a few images at a time."""
    from vae_lightning.metrics import iwae_bound

    t0 = time.perf_counter()
    generator = torch.Generator(device=subject.device).manual_seed(subject.seed)
    per_call = max(1, ROWS_PER_PASS // min(chunk, k))
    nll = torch.cat(
        [
            iwae_bound(
                subject.model,
                x[lo:hi].to(subject.device),
                k,
                chunk,
                generator,
                None if y is None else y[lo:hi].to(subject.device),
            ).cpu()
            for lo, hi in _batches(len(x), per_call)
        ]
    )  # (N,) nats
    seconds, mean = time.perf_counter() - t0, float(nll.mean())
    log.info("test/nll_iw (k=%d): %.3f nats (%.1f s)", k, mean, seconds)
    if mean > negative_elbo + 0.5:  # a bound worse than k = 1: a bug
        log.warning("test/nll_iw %.3f exceeds the single-sample -ELBO %.3f", mean, negative_elbo)
    return {"test/nll_iw": mean}, {
        "k": k,
        "chunk": chunk,
        "n_images": len(nll),
        "std_over_images": float(nll.std()) if len(nll) > 1 else 0.0,
        "likelihood": LIKELIHOOD["grey" if subject.dm.binarize == "none" else "binary"],
        # a conditional model's bound is on -log p(x | y): it is given the label, so it is not
        # comparable with an unconditional model's -log p(x) (lower by up to log 10 nats)
        "bounds": "-log p(x | y)" if subject.model.conditional else "-log p(x)",
        "seconds": seconds,
    }


def grids(subject: Subject, x: torch.Tensor, y: torch.Tensor) -> dict[str, str]:
    """16 fixed test images over their reconstructions, and 64 samples, as PNG grids; for a
    conditional model also its samples by class and its test images decoded with every label."""
    from vae_lightning import views

    model, seed, folder = subject.model, subject.seed, subject.run_dir / "eval"
    idx = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))[:16]
    xs, ys = x[idx].to(subject.device), y[idx].to(subject.device)
    made = {"reconstructions": views.reconstruction_grid(model, xs, ys)}
    generator = torch.Generator(device=subject.device).manual_seed(seed)
    made["samples"] = views.sample_grid(model, 64, nrow=8, generator=generator)
    if model.conditional:
        made["samples_by_class"] = views.class_sample_grid(model, 8, generator)
        made["relabelled"] = views.relabel_grid(model, xs[:8], ys[:8])
    return {name: str(views.publish(image, folder / f"{name}.png")) for name, image in made.items()}


def frechet_distances(
    subject: Subject, fid_classifier: FIDClassifier, n_fid: int, batch_size: int
) -> tuple[dict[str, float], dict[str, Any]]:
    """gen/fid (samples vs test images) and gen/fid_train_test (the floor); for a conditional
    model also gen/cond_acc: the share of its class-c samples that the classifier assigns to c
    (the classes drawn in turn)."""
    from vae_lightning.fid import classifier_accuracy, frechet_distance

    model, seed = subject.model, subject.seed
    # The classifier and the distances see grey images (the raw files), whatever the run's
    # binarization; samples are the decoder's pixel means.
    classifier, accuracy = fid_classifier.model, fid_classifier.accuracy
    train_grey, test_grey = fid_classifier.train, fid_classifier.test
    n = min(n_fid, len(test_grey))
    real = _subset(test_grey, n, seed)
    generator = torch.Generator(device=subject.device).manual_seed(seed + 1)
    labels = torch.arange(n) % model.hparams.num_classes if model.conditional else None
    draws = (
        model.sample(
            hi - lo, generator=generator,
            y=None if labels is None else labels[lo:hi].to(subject.device),
        )
        for lo, hi in _batches(n, batch_size)
    )  # fmt: skip
    fake = torch.cat([images.float().cpu() for images in draws])  # (n, C, H, W) in [0, 1]
    fid = frechet_distance(real, fake, classifier, batch_size)
    floor = frechet_distance(real, _subset(train_grey, n, seed + 1), classifier, batch_size)
    log.info(
        "gen/fid: %.3f (train vs test floor %.3f; classifier accuracy %.4f)", fid, floor, accuracy
    )
    metrics = {"gen/fid": fid, "gen/fid_train_test": floor, "classifier/test_acc": accuracy}
    if labels is not None:
        metrics["gen/cond_acc"] = classifier_accuracy(classifier, fake, labels)
        log.info("gen/cond_acc: %.4f", metrics["gen/cond_acc"])
    fake_z = _sampled_from(model)
    return metrics, {
        "n": n,
        "real": "test images (grey)",
        "fake": f"decoded samples (pixel means){fake_z}",
        "floor": "training images against test images",
        "classifier": str(fid_classifier.path),
        "classifier_test_acc": accuracy,
        "classifier_seed": fid_classifier.seed,
        "independent": _independent_judge(model, fid_classifier.seed),
        "feature_dim": classifier.feature_dim,
    }


def _sampled_from(model: Any) -> str:
    """What a model's samples are decoded from, for eval.json's fid record."""
    if model.variational:
        return ""
    if not hasattr(model, "prior_fitted"):
        return " of z from the Gaussian fitted to the AE's codes"
    if bool(model.prior_fitted):
        return " of code maps from the PixelCNN prior"
    log.warning("this VQ-VAE's prior is uniform: vae-prior fits the PixelCNN its samples need")
    return " of uniformly drawn code maps (vae-prior not run)"


def _independent_judge(model: Any, classifier_seed: int) -> bool:
    """Whether FID's classifier is another one than the model's feature-matching loss was
    trained against (the default one, seed ``CLASSIFIER_SEED``): in the same features, FID
    rewards the objective itself and is no longer an independent judge."""
    if not float(model.hparams.get("feature_loss_weight") or 0.0):
        return True
    if classifier_seed != CLASSIFIER_SEED:
        return True
    log.warning(
        "gen/fid is measured in the features this model's feature-matching loss was trained "
        "on, so it is not an independent judge; classifier_seed=1 measures it with another "
        "classifier"
    )
    return False


def latent_probes(
    subject: Subject, batch_size: int, max_train: int | None
) -> tuple[dict[str, float], dict[str, Any]]:
    """The latent probes (fit_probes) on the embeddings of the train split and the test set."""
    from vae_lightning.metrics import embed_images, fit_probes

    model, dm, seed = subject.model, subject.dm, subject.seed
    (train_x, train_y), (test_x, test_y) = dm.splits["train"], dm.splits["test"]
    if max_train:  # the same seed and length: the same permutation for images and labels
        train_x, train_y = _subset(train_x, max_train, seed), _subset(train_y, max_train, seed)
    train_z, test_z = (
        embed_images(model, x, batch_size, labels=y).numpy()
        for x, y in ((train_x, train_y), (test_x, test_y))
    )
    # seed 2's RandomForest (random_state=42, fit_probes' default)
    res = fit_probes(train_z, train_y.numpy(), test_z, test_y.numpy(), num_classes=len(dm.classes))
    return {f"probe/{key}_acc": value for key, value in res.accuracy.items()}, {
        "features": "mu" if model.variational else "z",
        "n_train": res.n_train,
        "n_test": res.n_test,
        "classes": list(dm.classes),
        "confusion_rf": res.confusion.tolist(),
    }


# --- the evaluation ------------------------------------------------------------------------------


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
        "hparams": _plain(dict(checkpoint.get("hyper_parameters") or {})),
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
    k: int = 1000,
    chunk: int = 100,
    n_fid: int = 10_000,
    probes: bool = False,
    data_dir: Path | str | None = None,
    batch_size: int = 500,
    device: str | None = None,
    classifier_epochs: int = 4,
    classifier_max_steps: int | None = None,
    retrain_classifier: bool = False,
    classifier_min_accuracy: float = CLASSIFIER_MIN_ACCURACY,
    probe_max_train: int | None = None,
    classifier_seed: int = CLASSIFIER_SEED,
) -> dict[str, Any]:
    """Evaluate a checkpoint on its dataset's test set; write ``eval.json`` and grids; return it.

    ``ckpt`` is ``<run folder>/checkpoints/<file>.ckpt`` of a run of vae_lightning.train; the
    other settings are described in ``conf/evaluate.yaml``. Every setting is checked before
    anything is loaded, and the FID classifier is obtained (or refused) before any measurement:
    an error leaves nothing written.
    """
    import lightning as L

    check_settings(locals())
    t_start = time.perf_counter()
    subject = load_subject(ckpt, data_dir, batch_size, _device(device))
    L.seed_everything(subject.seed, verbose=False)
    x = load_test_images(subject.dm, subject.seed)
    result, metrics, seconds = _header(subject, len(x)), {}, {}
    if n_fid > 0:  # its training forks the RNG: the measurements below are as without it
        with _timed(seconds, "classifier"):
            fid_classifier = classifier_of(
                subject.dm.dataset_name, subject.dm.data_dir, subject.device,
                seed=classifier_seed, epochs=classifier_epochs, max_steps=classifier_max_steps,
                retrain=retrain_classifier, min_accuracy=classifier_min_accuracy,
            )  # fmt: skip
    y = subject.dm.splits["test"][1]  # (N,) the labels of x, in its order
    with _timed(seconds, "terms"):
        found, latent = mean_terms(subject.model, x, batch_size, y)
    metrics.update(found)
    if latent is not None:  # a VAE
        result["latent"] = latent
    if subject.name == "VQVAE":
        found, result["codebook"] = codebook_use(subject.model, x, batch_size)
        metrics.update(found)
    if subject.model.variational and k > 0:
        negative_elbo = metrics["test/recon"] + metrics["test/kl"]
        found, result["nll_iw"] = nll_iw(subject, x, k, chunk, negative_elbo, y)
        metrics.update(found)
        seconds["nll_iw"] = result["nll_iw"]["seconds"]
    result["images"] = grids(subject, x, y)
    if n_fid > 0:
        with _timed(seconds, "fid"):
            found, result["fid"] = frechet_distances(subject, fid_classifier, n_fid, batch_size)
        metrics.update(found)
    if probes:
        with _timed(seconds, "probes"):
            found, result["probe"] = latent_probes(subject, batch_size, probe_max_train)
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
    classifier_epochs: int = 4,
    classifier_max_steps: int | None = None,
    retrain_classifier: bool = False,
    classifier_min_accuracy: float = CLASSIFIER_MIN_ACCURACY,
    device: str | None = None,
    verify: bool = True,
    classifier_seed: int = CLASSIFIER_SEED,
) -> dict[str, float]:
    """Train (or load from the cache) the FID classifier of each dataset; its test accuracy.

    Missing raw files are fetched first (``sources.ensure_dataset``; md5-checked when
    ``verify``). A cache trained otherwise, or a classifier below ``classifier_min_accuracy``,
    is an error (``fid.load_or_train_classifier``)."""
    from vae_lightning.sources import ensure_dataset

    check_settings(locals())
    dev, accuracy = _device(device), {}
    for name in [datasets] if isinstance(datasets, str) else datasets:
        ensure_dataset(name, Path(data_dir), verify=verify)
        accuracy[name] = classifier_of(
            name, Path(data_dir), dev, seed=classifier_seed,
            epochs=classifier_epochs, max_steps=classifier_max_steps,
            retrain=retrain_classifier, min_accuracy=classifier_min_accuracy,
        ).accuracy  # fmt: skip
        log.info("classifier %s: test accuracy %.4f", name, accuracy[name])
    return accuracy


# --- the command line ----------------------------------------------------------------------------


def _arguments(fn: Any, settings: dict[str, Any]) -> dict[str, Any]:
    """The settings that ``fn`` takes."""
    return {k: v for k, v in settings.items() if k in inspect.signature(fn).parameters}


def run(cfg: DictConfig) -> None:
    """``vae-evaluate ckpt=PATH [key=value ...]``, or ``vae-evaluate classifiers=true
    data_dir=PATH``; the settings are conf/evaluate.yaml's."""
    settings = OmegaConf.to_container(cfg, resolve=True)
    for_evaluate, for_classifiers = (
        _arguments(f, settings) for f in (evaluate, prepare_classifiers)
    )
    unknown = sorted(set(settings) - {"classifiers", *for_evaluate, *for_classifiers})
    if unknown:
        raise ConfigError(unknown[0], "is not a setting of vae-evaluate (see vae-evaluate --help)")
    check_settings(settings)
    if settings["classifiers"]:
        if settings["data_dir"] is None:
            raise ConfigError("data_dir", "is required with classifiers=true: data_dir=<folder>")
        prepare_classifiers(**for_classifiers)
    elif settings["ckpt"] is None:
        raise ConfigError(
            "ckpt",
            "is required: ckpt=<run folder>/checkpoints/<file>.ckpt (or classifiers=true "
            "data_dir=<folder> to train the FID classifiers)",
        )
    else:
        result = evaluate(**for_evaluate)
        log.info("done: %s", {key: round(value, 4) for key, value in result["metrics"].items()})


main = config.tool_main("evaluate", doc=__doc__)(run)


if __name__ == "__main__":
    sys.exit(main())
