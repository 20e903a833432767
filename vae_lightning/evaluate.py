"""Metrics and image grids from a checkpoint: ``vae-evaluate ckpt=PATH [key=value ...]``.

Reads the checkpoint (``weights_only``) and, from its run folder's ``.hydra/config.yaml``, only the
data settings; nothing named in that file is instantiated. The model class comes from the
checkpoint itself (its recorded ``model_class``, else what its weights are: an AE keeps the
Gaussian fitted to its codes, a ConvVAE has convolutions, a VAE neither) and must be one of
vae_lightning's own. On the test set it computes ``test/loss``, ``test/recon``, ``test/kl``,
``test/mse`` (``model.terms``, the training definitions), ``test/nll_iw`` (the importance-weighted
bound with ``k`` samples), ``test/active_units`` and the KL per latent dimension; ``gen/fid``
between ``n_fid`` samples and as many test images in the feature space of a classifier trained on
the same dataset (cached under ``<data_dir>/classifiers/``), ``gen/fid_train_test`` (training
images against test images: the floor a perfect generator would reach) and, with
``probes=true``, the latent probes. Writes ``<run folder>/eval.json`` and grids under
``<run folder>/eval/``. ``vae-evaluate classifiers data_dir=PATH`` trains (or checks) the
classifiers ahead of time.

Cost of ``test/nll_iw``: ``k`` decoder passes per test image, i.e. 10^7 passes for the 10k test
images at the default k = 1000 (Burda et al. use k = 5000): for seed 1's MLP VAE about 2.5
minutes on 2 CPU cores, the bulk of an evaluation; it grows linearly with k.
"""

from __future__ import annotations

import logging
import re
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from vae_lightning.errors import ConfigError, DataError
from vae_lightning.files import atomic_write_json

if TYPE_CHECKING:
    from vae_lightning.data import IDXDataModule
    from vae_lightning.models import Autoencoder

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[1]
MODEL_CLASSES = ("VAE", "AE", "ConvVAE")
DATA_CLASSES = {"MNISTDataModule": "mnist", "FashionMNISTDataModule": "fashion_mnist"}
# Images per iwae_bound call: ROWS_PER_PASS // chunk, so a decoder pass holds ~20k images.
ROWS_PER_PASS = 20_000
# The FID classifier's seed is fixed, not the run's: every run of a dataset is then measured
# in the same feature space and their FIDs can be compared.
CLASSIFIER_SEED = 0


# --- the run folder: checkpoint and data settings ------------------------------------------------


def run_folder(ckpt: Path) -> Path:
    """``<run>/checkpoints/<file>.ckpt`` -> ``<run>``."""
    return ckpt.parent.parent


def _read_checkpoint(ckpt: Path) -> dict[str, Any]:
    """The checkpoint as plain containers and tensors (``weights_only``), or a clear error."""
    if not ckpt.is_file():
        raise ConfigError("ckpt", f"points to {ckpt}, which is not a file")
    try:
        checkpoint = torch.load(ckpt, map_location="cpu", weights_only=True)
    except Exception as err:
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(err))
        if found:  # torch's weights_only unpickler refused a class
            raise DataError(
                f"{ckpt}: holds a {found.group(1)} object, not only tensors and plain "
                f"containers; refusing to unpickle it (weights_only=True)"
            ) from None
        raise DataError(
            f"{ckpt}: cannot be read as a checkpoint (truncated or corrupted? "
            f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})"
        ) from None
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("state_dict"), dict):
        raise DataError(f"{ckpt}: not a Lightning checkpoint (no state_dict)")
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


def checkpoint_class(checkpoint: dict[str, Any], ckpt: Path) -> str:
    """A checkpoint's model class: its recorded ``model_class``, checked against its weights."""
    inferred = _weights_class(checkpoint["state_dict"])
    recorded = (checkpoint.get("vae_lightning") or {}).get("model_class") or checkpoint.get(
        "model_class"
    )
    if recorded is not None and recorded not in MODEL_CLASSES:
        raise ConfigError(
            "ckpt",
            f"{ckpt} records model_class={recorded!r}; evaluate takes only vae_lightning's "
            f"{', '.join(MODEL_CLASSES)}",
        )
    if recorded is not None and inferred is not None and recorded != inferred:
        raise ConfigError(
            "ckpt", f"{ckpt} records model_class={recorded} but holds the weights of a {inferred}"
        )
    name = recorded or inferred
    if name is None:
        raise ConfigError(
            "ckpt",
            f"{ckpt} holds weights of none of vae_lightning's models ({', '.join(MODEL_CLASSES)})",
        )
    return name


def _plain(value: Any) -> Any:
    return [_plain(v) for v in value] if isinstance(value, (list, tuple)) else value


def read_run_config(run_dir: Path) -> Any:
    """The run's ``.hydra/config.yaml`` (OmegaConf, unresolved); nothing in it is instantiated."""
    from omegaconf import OmegaConf

    path = run_dir / ".hydra" / "config.yaml"
    if not path.is_file():
        raise ConfigError(
            "ckpt",
            f"needs its run folder's config: {path} does not exist (expected "
            f"<run folder>/checkpoints/<file>.ckpt next to <run folder>/.hydra/config.yaml)",
        )
    if not OmegaConf.has_resolver("repo_root"):  # the one custom resolver paths.* use
        OmegaConf.register_new_resolver("repo_root", lambda: str(REPO_ROOT))
    return OmegaConf.load(path)


def _select(cfg: Any, key: str, path: Path, default: Any = None) -> Any:
    from omegaconf import OmegaConf

    try:
        value = OmegaConf.select(cfg, key, default=default, throw_on_missing=True)
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


def _check_run_matches(cfg: Any, path: Path, name: str, checkpoint: dict, ckpt: Path) -> None:
    """Refuse a checkpoint whose class or hyper-parameters disagree with its run config."""
    configured = _target_name(_select(cfg, "model._target_", path), "model", MODEL_CLASSES, path)
    if configured != name:
        raise ConfigError(
            "ckpt",
            f"{ckpt} holds a {name} but its run config {path} says model._target_="
            f"vae_lightning.models.{configured}: the checkpoint does not belong to this run folder",
        )
    model_cfg = _select(cfg, "model", path) or {}
    hparams = checkpoint.get("hyper_parameters") or {}
    differ = {
        key: (model_cfg[key], value)
        for key, value in hparams.items()
        if key in model_cfg and _plain(model_cfg[key]) != _plain(value)
    }
    if differ:
        detail = ", ".join(f"{k}: config {c!r} vs checkpoint {v!r}" for k, (c, v) in differ.items())
        raise ConfigError("ckpt", f"{ckpt} disagrees with its run config {path}: {detail}")


def load_model(
    ckpt: Path, name: str, checkpoint: dict[str, Any], device: torch.device
) -> Autoencoder:
    """``Cls.load_from_checkpoint`` of one of vae_lightning's models, or a clear error."""
    from vae_lightning import models

    cls = {"VAE": models.VAE, "AE": models.AE, "ConvVAE": models.ConvVAE}[name]
    try:
        model = cls.load_from_checkpoint(ckpt, map_location=device, weights_only=True)
    except ConfigError as err:
        raise ConfigError("ckpt", f"{ckpt}: hyper-parameter {err.key} {err.message}") from None
    except (RuntimeError, TypeError, KeyError) as err:
        hp = checkpoint.get("hyper_parameters")
        first = str(err).strip().splitlines()
        raise ConfigError(
            "ckpt",
            f"{ckpt}: its weights do not fit a {name} built from its hyper-parameters {hp} "
            f"({' '.join(line.strip() for line in first[:3])})",
        ) from None
    return model.to(device).eval()


def _datamodule(cfg: Any, path: Path, data_dir: Path | None, batch_size: int) -> IDXDataModule:
    from vae_lightning import data

    name = _target_name(_select(cfg, "data._target_", path), "data", tuple(DATA_CLASSES), path)
    cls = {
        "MNISTDataModule": data.MNISTDataModule,
        "FashionMNISTDataModule": data.FashionMNISTDataModule,
    }[name]
    kwargs = {
        key: _select(cfg, f"data.{key}", path)
        for key in (
            "binarize",
            "seed",
            "val_size",
            "val_on_test",
            "download",
            "verify",
            "image_shape",
        )
    }
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


# --- the measurements ----------------------------------------------------------------------------


def _batches(n: int, size: int):
    return ((i, min(i + size, n)) for i in range(0, n, size))


@torch.no_grad()
def mean_terms(
    model: Autoencoder, x: torch.Tensor, batch_size: int
) -> tuple[dict[str, float], Any]:
    """Means over the test set of ``model.terms`` (the training definitions), and for a VAE the
    posterior moments (KL per dimension, Var_x of mu) behind the active units."""
    from vae_lightning.losses import gaussian_kl
    from vae_lightning.metrics import LatentMoments

    device = next(model.parameters()).device
    sums: dict[str, float] = {}
    moments = LatentMoments() if model.variational else None
    for lo, hi in _batches(len(x), batch_size):
        xb = x[lo:hi].to(device)  # (B, C, H, W) float
        for key, value in model.terms(xb).items():
            sums[key] = sums.get(key, 0.0) + float(value) * (hi - lo)  # batch mean -> sum
        if moments is not None:
            mu, logvar = model.encode(xb)  # (B, D)
            moments.update(mu, gaussian_kl(mu, logvar))
    return {f"test/{k}": v / len(x) for k, v in sums.items()}, moments


def nll_iw(
    model: Autoencoder, x: torch.Tensor, k: int, chunk: int, generator: torch.Generator
) -> torch.Tensor:
    """``iwae_bound`` over a whole set, a few images at a time -> (N,) nats, on the CPU."""
    from vae_lightning.metrics import iwae_bound

    device = next(model.parameters()).device
    per_call = max(1, ROWS_PER_PASS // min(chunk, k))
    out = [
        iwae_bound(model, x[lo:hi].to(device), k=k, chunk=chunk, generator=generator).cpu()
        for lo, hi in _batches(len(x), per_call)
    ]
    return torch.cat(out)


@torch.no_grad()
def _samples(
    model: Autoencoder, n: int, batch_size: int, generator: torch.Generator
) -> torch.Tensor:
    """n decoded samples (N, C, H, W) float in [0, 1], on the CPU."""
    return torch.cat(
        [
            model.sample(hi - lo, generator=generator).float().cpu()
            for lo, hi in _batches(n, batch_size)
        ]
    )


def _subset(images: torch.Tensor, n: int, seed: int) -> torch.Tensor:
    if n >= len(images):
        return images
    return images[torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))[:n]]


def _save_grid(images: torch.Tensor, nrow: int, path: Path) -> Path:
    from torchvision.utils import make_grid, save_image

    path.parent.mkdir(parents=True, exist_ok=True)
    save_image(
        make_grid(images.float().cpu().clamp(0, 1), nrow=nrow, padding=2, pad_value=1.0), path
    )
    return path


LIKELIHOOD = {
    "binary": "Bernoulli on binary images: a log-likelihood",
    "grey": "Bernoulli on grey levels: the training objective's scale, not a normalised "
    "density (evaluate a binarized run for a log-likelihood)",
}


@torch.no_grad()
def _grids(model: Autoencoder, x: torch.Tensor, folder: Path, seed: int) -> dict[str, str]:
    """16 fixed test images over their reconstructions, and 64 samples, as PNG grids."""
    device = next(model.parameters()).device
    idx = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))[:16]
    x16 = x[idx].to(device)
    recon = model.decode(model.embed(x16))  # mu for a VAE: the mean reconstruction
    samples = model.sample(64, generator=torch.Generator(device=device).manual_seed(seed))
    return {
        "reconstructions": str(
            _save_grid(torch.cat([x16, recon]), 16, folder / "reconstructions.png")
        ),
        "samples": str(_save_grid(samples, 8, folder / "samples.png")),
    }


def _frechet_distances(
    model: Autoencoder,
    dm: IDXDataModule,
    n_fid: int,
    batch_size: int,
    seed: int,
    epochs: int,
    max_steps: int | None,
) -> tuple[dict[str, float], dict[str, Any]]:
    """gen/fid (samples vs test images) and gen/fid_train_test (the floor), with the record."""
    from vae_lightning.data import load_split
    from vae_lightning.fid import frechet_distance, load_or_train_classifier

    device = next(model.parameters()).device
    # The classifier and the distances see grey images (the raw files), whatever the run's
    # binarization; samples are the decoder's pixel means.
    train_grey, train_labels = load_split(dm.raw_dir, "train")
    test_grey, test_labels = load_split(dm.raw_dir, "test")
    classifier, accuracy = load_or_train_classifier(
        dm.dataset_name,
        dm.data_dir,
        train_grey,
        train_labels,
        test_grey,
        test_labels,
        epochs=epochs,
        seed=CLASSIFIER_SEED,
        max_steps=max_steps,
        device=device,
    )
    n = min(n_fid, len(test_grey))
    real = _subset(test_grey, n, seed)
    fake = _samples(model, n, batch_size, torch.Generator(device=device).manual_seed(seed + 1))
    metrics = {
        "gen/fid": frechet_distance(real, fake, classifier, batch_size),
        "gen/fid_train_test": frechet_distance(
            real, _subset(train_grey, n, seed + 1), classifier, batch_size
        ),
        "classifier/test_acc": accuracy,
    }
    log.info(
        "gen/fid: %.3f (train vs test floor %.3f; classifier accuracy %.4f)",
        metrics["gen/fid"],
        metrics["gen/fid_train_test"],
        accuracy,
    )
    record = {
        "n": n,
        "real": "test images (grey)",
        "fake": "decoded samples (pixel means)"
        + ("" if model.variational else " of z from the Gaussian fitted to the AE's codes"),
        "floor": "training images against test images",
        "classifier": str(dm.data_dir / "classifiers" / f"{dm.dataset_name}.pt"),
        "classifier_test_acc": accuracy,
        "feature_dim": classifier.feature_dim,
    }
    return metrics, record


def _probes(
    model: Autoencoder, dm: IDXDataModule, batch_size: int, max_train: int | None, seed: int
) -> tuple[dict[str, float], dict[str, Any]]:
    """The latent probes (fit_probes) on the embeddings of the train split and the test set."""
    from vae_lightning.metrics import embed_images, fit_probes

    (train_x, train_y), (test_x, test_y) = dm.splits["train"], dm.splits["test"]
    if max_train:  # the same seed and length: the same permutation for images and labels
        train_x, train_y = _subset(train_x, max_train, seed), _subset(train_y, max_train, seed)
    res = fit_probes(
        embed_images(model, train_x, batch_size).numpy(),
        train_y.numpy(),
        embed_images(model, test_x, batch_size).numpy(),
        test_y.numpy(),
        random_state=42,
        num_classes=len(dm.classes),
    )
    record = {
        "features": "mu" if model.variational else "z",
        "n_train": res.n_train,
        "n_test": res.n_test,
        "classes": list(dm.classes),
        "confusion_rf": res.confusion.tolist(),
    }
    return {f"probe/{key}_acc": value for key, value in res.accuracy.items()}, record


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
    probe_max_train: int | None = None,
) -> dict[str, Any]:
    """Evaluate a checkpoint on its dataset's test set; write ``eval.json`` and grids; return it.

    Args:
        ckpt: ``<run folder>/checkpoints/<file>.ckpt`` of a run of vae_lightning.train.
        k: importance samples per image for ``test/nll_iw`` (VAEs); costs k decoder passes per
            image. 0 skips it.
        chunk: importance samples per decoder pass (memory: ~20k decoded images per pass).
        n_fid: samples (and test images, and training images for the floor) for the Fréchet
            distances, at most the test set's size; 0 skips them.
        probes: also fit the latent probes (RandomForest, logistic regression, kNN).
        data_dir: the data folder, instead of the run config's ``data.data_dir``.
        batch_size: images per batch for the test terms, sampling and embeddings.
        device: ``cuda``, ``cpu``, …; default: CUDA when available.
        classifier_epochs, classifier_max_steps: training of the FID classifier when it is not
            cached yet (a cache trained otherwise is retrained).
        probe_max_train: subsample the probes' training split (seeded); default: all of it.
    """
    from vae_lightning.data import to_unit_float
    from vae_lightning.metrics import active_units

    t_start = time.perf_counter()
    for key, value, low in (
        ("k", k, 0),
        ("chunk", chunk, 1),
        ("n_fid", n_fid, 0),
        ("batch_size", batch_size, 1),
    ):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ConfigError(key, f"must be an integer >= {low}, got {value!r}")
    ckpt = Path(ckpt).expanduser().resolve()
    run_dir = run_folder(ckpt)
    checkpoint = _read_checkpoint(ckpt)
    name = checkpoint_class(checkpoint, ckpt)
    cfg = read_run_config(run_dir)
    cfg_path = run_dir / ".hydra" / "config.yaml"
    _check_run_matches(cfg, cfg_path, name, checkpoint, ckpt)
    seed = _select(cfg, "seed", cfg_path)
    seed = 0 if seed is None else int(seed)
    dm = _datamodule(cfg, cfg_path, Path(data_dir) if data_dir is not None else None, batch_size)
    dev = (
        torch.device(device)
        if device
        else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    )
    model = load_model(ckpt, name, checkpoint, dev)
    for key in ("state_dict", "optimizer_states"):  # loaded: free them
        checkpoint.pop(key, None)

    import lightning as L

    L.seed_everything(seed, verbose=False)
    dm.prepare_data()
    dm.setup("test")
    test_u8 = dm.splits["test"][0]  # (N, 1, 28, 28) uint8; static binarization applied
    x_test = to_unit_float(test_u8)
    if dm.binarize == "dynamic":
        # one seeded draw of the test set, the same for every metric (a fresh draw per batch, as
        # in training, would give each metric different images)
        x_test = torch.bernoulli(x_test, generator=torch.Generator().manual_seed(seed + 2))
    log.info(
        "evaluating %s (%s) on %d %s test images, on %s",
        ckpt,
        name,
        len(x_test),
        dm.dataset_name,
        dev,
    )

    result: dict[str, Any] = {
        "checkpoint": str(ckpt),
        "run_dir": str(run_dir),
        "model": name,
        "hparams": _plain(dict(checkpoint.get("hyper_parameters") or {})),
        "epoch": checkpoint.get("epoch"),
        "global_step": checkpoint.get("global_step"),
        "data": {
            "dataset": dm.dataset_name,
            "data_dir": str(dm.data_dir),
            "binarize": dm.binarize,
            "n_test": len(x_test),
        },
        "seed": seed,
        "device": str(dev),
    }
    metrics: dict[str, float] = {}
    seconds: dict[str, float] = {}

    t0 = time.perf_counter()
    terms, moments = mean_terms(model, x_test, batch_size)
    metrics.update(terms)
    if moments is not None:
        threshold = 0.01
        mu_var = moments.mu_variance()
        metrics["test/active_units"] = float(active_units(mu_var, threshold))
        result["latent"] = {
            "kl_per_dim": [round(float(v), 6) for v in moments.kl_per_dim()],
            "mu_variance": [round(float(v), 6) for v in mu_var],
            "active_units_threshold": threshold,
        }
    seconds["terms"] = time.perf_counter() - t0

    if model.variational and k > 0:
        t0 = time.perf_counter()
        nll = nll_iw(model, x_test, k, chunk, torch.Generator(device=dev).manual_seed(seed))
        seconds["nll_iw"] = time.perf_counter() - t0
        metrics["test/nll_iw"] = float(nll.mean())
        result["nll_iw"] = {
            "k": k,
            "chunk": chunk,
            "n_images": len(nll),
            "std_over_images": float(nll.std()) if len(nll) > 1 else 0.0,
            "likelihood": LIKELIHOOD["grey" if dm.binarize == "none" else "binary"],
            "seconds": seconds["nll_iw"],
        }
        log.info(
            "test/nll_iw (k=%d): %.3f nats (%.1f s)", k, metrics["test/nll_iw"], seconds["nll_iw"]
        )
        negative_elbo = metrics["test/recon"] + metrics["test/kl"]
        if metrics["test/nll_iw"] > negative_elbo + 0.5:  # a bound worse than k = 1: a bug
            log.warning(
                "test/nll_iw %.3f exceeds the single-sample -ELBO %.3f",
                metrics["test/nll_iw"],
                negative_elbo,
            )

    result["images"] = _grids(model, x_test, run_dir / "eval", seed)

    if n_fid > 0:
        t0 = time.perf_counter()
        fid_metrics, result["fid"] = _frechet_distances(
            model, dm, n_fid, batch_size, seed, classifier_epochs, classifier_max_steps
        )
        metrics.update(fid_metrics)
        seconds["fid"] = time.perf_counter() - t0

    if probes:
        t0 = time.perf_counter()
        probe_metrics, result["probe"] = _probes(model, dm, batch_size, probe_max_train, seed)
        metrics.update(probe_metrics)
        seconds["probes"] = time.perf_counter() - t0

    seconds["total"] = time.perf_counter() - t_start
    result["metrics"] = dict(sorted(metrics.items()))
    result["time"] = {f"{key}_s": value for key, value in seconds.items()}
    atomic_write_json(run_dir / "eval.json", result)
    log.info("wrote %s", run_dir / "eval.json")
    return result


def prepare_classifiers(
    data_dir: Path | str,
    datasets: Sequence[str] = tuple(DATA_CLASSES.values()),
    classifier_epochs: int = 4,
    classifier_max_steps: int | None = None,
    device: str | None = None,
    verify: bool = True,
) -> dict[str, float]:
    """Train (or load from the cache) the FID classifier of each dataset; its test accuracy.

    Missing raw files are fetched first (``sources.ensure_dataset``; md5-checked when
    ``verify``)."""
    from vae_lightning.data import load_split
    from vae_lightning.fid import load_or_train_classifier
    from vae_lightning.sources import ensure_dataset, get_spec

    accuracy = {}
    for name in datasets:
        spec = get_spec(name)
        ensure_dataset(name, Path(data_dir), verify=verify)
        raw = spec.raw_dir(data_dir)
        _, accuracy[name] = load_or_train_classifier(
            name,
            Path(data_dir),
            *load_split(raw, "train"),
            *load_split(raw, "test"),
            epochs=classifier_epochs,
            seed=CLASSIFIER_SEED,
            max_steps=classifier_max_steps,
            device=device,
        )
        log.info("classifier %s: test accuracy %.4f", name, accuracy[name])
    return accuracy


# --- the command line ----------------------------------------------------------------------------


def _bool(value: str) -> bool:
    lowered = value.lower()
    if lowered in ("true", "1", "yes", "on"):
        return True
    if lowered in ("false", "0", "no", "off"):
        return False
    raise ValueError("must be true or false")


def _optional(convert: Callable[[str], Any]) -> Callable[[str], Any]:
    return lambda value: None if value.lower() in ("null", "none", "") else convert(value)


# key -> converter; the keyword arguments of evaluate()
KEYS: dict[str, Callable[[str], Any]] = {
    "ckpt": Path,
    "k": int,
    "chunk": int,
    "n_fid": int,
    "probes": _bool,
    "data_dir": _optional(Path),
    "batch_size": int,
    "device": _optional(str),
    "classifier_epochs": int,
    "classifier_max_steps": _optional(int),
    "probe_max_train": _optional(int),
}

# the keyword arguments of prepare_classifiers(): `vae-evaluate classifiers [key=value ...]`
CLASSIFIER_KEYS: dict[str, Callable[[str], Any]] = {
    "data_dir": Path,
    "datasets": lambda value: tuple(v for v in value.strip("[]").split(",") if v),
    "classifier_epochs": int,
    "classifier_max_steps": _optional(int),
    "device": _optional(str),
    "verify": _bool,
}

USAGE = (
    "usage: vae-evaluate ckpt=PATH [k=1000] [chunk=100] [n_fid=10000] [probes=false] "
    "[data_dir=PATH] [batch_size=500] [device=cuda|cpu] [classifier_epochs=4] "
    "[classifier_max_steps=null] [probe_max_train=null]\n"
    "       vae-evaluate classifiers data_dir=PATH [datasets=mnist,fashion_mnist] "
    "[classifier_epochs=4] [device=cuda|cpu] [verify=true]"
)


def parse_args(
    argv: Sequence[str], keys: dict[str, Callable[[str], Any]] = KEYS, required: str = "ckpt"
) -> dict[str, Any]:
    """Hydra-style ``key=value`` arguments -> keyword arguments of ``evaluate``."""
    kwargs: dict[str, Any] = {}
    for arg in argv:
        key, sep, value = arg.partition("=")
        if not sep:
            raise ConfigError(arg, f"is not key=value. {USAGE}")
        if key not in keys:
            raise ConfigError(key, f"is not a key evaluate takes; known: {', '.join(keys)}")
        try:
            kwargs[key] = keys[key](value)
        except ValueError as err:
            raise ConfigError(key, f"has an invalid value {value!r}: {err}") from None
    if required not in kwargs:
        raise ConfigError(required, f"is required. {USAGE}")
    return kwargs


def main(argv: Sequence[str] | None = None) -> int:
    """``vae-evaluate ckpt=PATH [key=value ...]``, or ``vae-evaluate classifiers data_dir=PATH``
    (train the FID classifiers ahead of time); 0 on success, 2 for a user error."""
    logging.basicConfig(
        level=logging.INFO, format="[%(asctime)s][%(name)s][%(levelname)s] - %(message)s"
    )
    argv = sys.argv[1:] if argv is None else list(argv)
    if any(arg in ("-h", "--help") for arg in argv):
        sys.stdout.write(__doc__ + "\n" + USAGE + "\n")
        return 0
    try:
        if argv[:1] == ["classifiers"]:
            prepare_classifiers(**parse_args(argv[1:], CLASSIFIER_KEYS, required="data_dir"))
            return 0
        result = evaluate(**parse_args(argv))
    except (ConfigError, DataError) as err:
        log.error("%s", err)
        return 2
    shown = {key: round(value, 4) for key, value in result["metrics"].items()}
    log.info("done: %s", shown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
